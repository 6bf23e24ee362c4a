"""Ship the .proto files inside the `deployments` package of the wheel.

`deployments.protos` generates the Python gRPC code from them on first import, with the
installed grpcio-tools, so the wheel carries only the .proto source. Metadata lives in
pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO_SOURCE = Path(__file__).resolve().parent / "protos"


class BuildPyWithProtos(build_py):
    """Copy protos/**/*.proto to deployments/proto_files/ in the build folder."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install reads protos/ in the source tree
        target = Path(self.build_lib) / "deployments" / "proto_files"
        for proto in PROTO_SOURCE.rglob("*.proto"):
            destination = target / proto.relative_to(PROTO_SOURCE)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(proto, destination)


setup(cmdclass={"build_py": BuildPyWithProtos})
