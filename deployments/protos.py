"""Python code for the gRPC API, generated from `dflash/v1/dflash.proto` on first import.

The code is generated with the installed grpcio-tools into
`<cache_dir>/protos/<hash>/`, where the hash covers the .proto text and the grpcio-tools and
protobuf versions, so the generated code always matches the protobuf runtime it runs on and a
changed .proto regenerates. That folder goes first on `sys.path`, so the generated modules keep
their protoc import names (`dflash.v1.dflash_pb2`); Ray pickles request messages by that name
and every process that imports this module can load them.

The .proto file is found next to this module (copied there by the wheel build, see setup.py)
or, in a source checkout or an editable install, in the repository's `protos/` folder.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from dflash_core.fetch import cache_dir

logger = logging.getLogger(__name__)

PROTO_NAME = "dflash/v1/dflash.proto"
PROTO_ROOTS = (
    Path(__file__).resolve().parent / "proto_files",  # wheel install
    Path(__file__).resolve().parents[1] / "protos",  # source checkout, editable install
)


def find_proto_root() -> Path:
    """Return the folder that contains `dflash/v1/dflash.proto`."""
    for root in PROTO_ROOTS:
        if (root / PROTO_NAME).is_file():
            return root
    searched = ", ".join(str(root / PROTO_NAME) for root in PROTO_ROOTS)
    raise FileNotFoundError(f"{PROTO_NAME} not found; searched {searched}. Reinstall dflash-serve.")


def generated_code_dir(proto_root: Path) -> Path:
    """Return the cache folder for the code generated from this .proto and these versions."""
    digest = hashlib.sha256((proto_root / PROTO_NAME).read_bytes())
    for package in ("grpcio-tools", "protobuf"):
        digest.update(f"{package}=={metadata.version(package)}".encode())
    return cache_dir() / "protos" / digest.hexdigest()[:16]


def generate(proto_root: Path, output: Path) -> None:
    """Run protoc (from grpcio-tools) into a temporary folder, then move it to `output`.

    The rename is atomic, so processes that generate at the same time (Ray workers starting
    together) never see half-written code. The first rename wins and the others discard theirs.
    """
    from grpc_tools import protoc

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=output.parent))
    try:
        include = Path(protoc.__file__).parent / "_proto"  # well-known types
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto_root}",
                f"-I{include}",
                f"--python_out={staging}",
                f"--pyi_out={staging}",
                f"--grpc_python_out={staging}",
                str(proto_root / PROTO_NAME),
            ]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed with status {status} on {proto_root / PROTO_NAME}")
        for package in (staging / "dflash", staging / "dflash" / "v1"):
            (package / "__init__.py").touch()
        try:
            os.rename(staging, output)
            logger.info("generated gRPC code for %s in %s", PROTO_NAME, output)
        except OSError:
            if not (output / "dflash" / "v1" / "dflash_pb2.py").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_generated_modules() -> tuple[object, object]:
    """Generate the code if needed and import `(dflash_pb2, dflash_pb2_grpc)`."""
    proto_root = find_proto_root()
    output = generated_code_dir(proto_root)
    if not (output / "dflash" / "v1" / "dflash_pb2_grpc.py").is_file():
        generate(proto_root, output)
    if str(output) not in sys.path:
        sys.path.insert(0, str(output))
    return (
        importlib.import_module("dflash.v1.dflash_pb2"),
        importlib.import_module("dflash.v1.dflash_pb2_grpc"),
    )


dflash_pb2, dflash_pb2_grpc = load_generated_modules()

# The function Serve's gRPC proxy calls to register the service (gRPCOptions takes its path).
add_DFlashServiceServicer_to_server = dflash_pb2_grpc.add_DFlashServiceServicer_to_server
