"""A small gRPC client for DFlashService, used by `dflash client` and the tests."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
from ray.serve.generated import serve_pb2, serve_pb2_grpc

from deployments.protos import dflash_pb2, dflash_pb2_grpc

# Serve's gRPC proxy picks the application from this metadata key; with a single application
# it may be left out.
APPLICATION_METADATA_KEY = "application"


class DFlashClient:
    """Calls one dflash gRPC endpoint (HOST:PORT) over an insecure channel."""

    def __init__(self, target: str, application: str = "dflash") -> None:
        self.target = target
        self.channel = grpc.insecure_channel(target)
        self.stub = dflash_pb2_grpc.DFlashServiceStub(self.channel)
        self.metadata = ((APPLICATION_METADATA_KEY, application),)
        self.application = application

    def generate(
        self, request: dflash_pb2.GenerateRequest, timeout: float | None = None
    ) -> dflash_pb2.GenerateResponse:
        return self.stub.Generate(request, metadata=self.metadata, timeout=timeout)

    def generate_stream(
        self, request: dflash_pb2.GenerateRequest, timeout: float | None = None
    ) -> Iterator[dflash_pb2.GenerateStreamResponse]:
        return self.stub.GenerateStream(request, metadata=self.metadata, timeout=timeout)

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Wait until the proxy routes to the application; raises TimeoutError otherwise.

        Serve reports an application ready before its proxy has the route, and until then
        calls fail with NOT_FOUND.
        """
        stub = serve_pb2_grpc.RayServeAPIServiceStub(self.channel)
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            try:
                listed = stub.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=5)
                if self.application in listed.application_names:
                    return
                last_error = f"applications listed: {list(listed.application_names)}"
            except grpc.RpcError as error:
                last_error = f"{error.code().name}: {error.details()}"
            time.sleep(0.2)
        raise TimeoutError(
            f"application {self.application!r} not reachable at {self.target} after "
            f"{timeout:g} s ({last_error})"
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DFlashClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
