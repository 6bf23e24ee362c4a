"""Start Ray and Serve with the dflash application, and shut them down again.

Ray is imported inside the functions, so the CLI can read the defaults here without it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from deployments.app import AppArgs

logger = logging.getLogger(__name__)

DEFAULT_GRPC_PORT = 9000
DEFAULT_HTTP_PORT = 8000
DEFAULT_HOST = "127.0.0.1"
# Object store of a cluster started here: requests and stream chunks are small.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2
GRPC_HOST_ENV_VAR = "DFLASH_GRPC_HOST"


@dataclass(frozen=True)
class ServeOptions:
    """Listening ports and host of Serve's proxies, and the Ray cluster to run on."""

    grpc_port: int = DEFAULT_GRPC_PORT
    http_port: int = DEFAULT_HTTP_PORT
    host: str = DEFAULT_HOST  # interface both proxies bind to
    address: str | None = None  # Ray cluster address; None starts a local cluster
    num_cpus: float | None = None  # CPUs of a local cluster; None fits the application

    def __post_init__(self) -> None:
        # Serve starts both proxies on one port without an error, and gRPC calls then fail.
        if self.grpc_port == self.http_port:
            raise ValueError(
                f"the gRPC and HTTP ports are both {self.grpc_port}; pass different "
                "--grpc-port and --http-port values"
            )


def bind_grpc_proxy_to_host() -> None:
    """Make Serve's gRPC proxy listen on $DFLASH_GRPC_HOST instead of every interface.

    Runs in each Ray worker as its `worker_process_setup_hook`. ray.serve 2.60 has no host
    option for the gRPC proxy and binds `[::]:<port>`; this replaces the host in the address
    its proxy passes to `default_impl.add_grpc_address`.
    """
    host = os.environ.get(GRPC_HOST_ENV_VAR)
    if not host:
        return
    from ray.serve._private import default_impl

    add_address = default_impl.add_grpc_address

    def add_address_on_host(server: object, address: str) -> None:
        port = address.rsplit(":", 1)[1]
        add_address(server, f"{host}:{port}")

    default_impl.add_grpc_address = add_address_on_host


def local_cluster_cpus(args: AppArgs) -> float:
    """Return the CPUs a local cluster needs for the ingress and the max engine replicas."""
    from deployments.app import placement_bundles

    per_replica = sum(bundle["CPU"] for bundle in placement_bundles(args))
    return float(math.ceil(args.ingress_num_cpus + args.max_replicas * per_replica))


def local_cluster_gpus(device: str) -> int | None:
    """Return ray.init's num_gpus for a local cluster: None lets Ray count this machine's GPUs.

    Ray counts GPUs without asking torch, so "auto" with a CPU build of torch on a GPU machine
    gets 0 GPUs (and runs on the CPU), and "cuda" fails here at once.
    """
    import torch

    from dflash_core.pipeline import resolve_device

    if device == "cuda":
        resolve_device(device)  # ValueError with the fix when torch has no CUDA
        return None
    if device == "auto" and torch.cuda.is_available():
        return None
    return 0


def check_tensor_parallel(model: str, tp: int) -> None:
    """Raise ValueError if the target cannot be split over `tp` ranks.

    Called for a local cluster, whose replicas load the model on this machine. The replica
    checks again, but there the error surfaces only after Serve's constructor retries.
    """
    from dflash_core.config import DecoderConfig, read_config_json
    from dflash_core.fetch import resolve_model
    from dflash_core.target_shard import plan_shards

    plan_shards(DecoderConfig.from_hf(read_config_json(resolve_model(model))), tp)


LOCAL_SERVE_TIMEOUTS = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    # ray.init waits 30 s for the GCS server to write its port; a loaded machine can take longer.
    "RAY_gcs_server_port_wait_time_s": "60",
}
# Seconds shutdown() waits for the processes of a local cluster to exit before killing them.
LOCAL_EXIT_TIMEOUT_S = 30.0
# Starts of a local cluster tried before giving up. Two errors make one retry: the GCS server
# wrote no port file in time, or the raylet did not register with the GCS within the 30 s that
# ray.init allows it (a constant in Ray, not a setting).
LOCAL_START_ATTEMPTS = 3
START_TIMEOUTS = ("Timed out waiting for file", "timed out during startup")
# Processes that were children of this process before start() made a local cluster; None while
# no local cluster runs here.
_children_before_cluster: set[int] | None = None


def start_local_cluster(num_cpus: float, num_gpus: int | None, runtime_env: dict) -> None:
    """ray.init a local cluster, retrying when its GCS server or raylet does not come up in time.

    On a loaded machine the GCS server was seen to write no port file (and no log) within
    ray.init's wait, and once (in CI) the raylet did not register within 30 s. The processes a
    failed start left are stopped before the next start.
    NOTE: the cause is unknown, and no retry after a real failure of this kind has been seen.
    The retry is tested with injected failures only.
    """
    import ray

    global _children_before_cluster
    _children_before_cluster = {child.pid for child in psutil.Process().children(recursive=True)}
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        logger.info(
            "starting a local Ray cluster with %g CPUs (attempt %d of %d)",
            num_cpus,
            attempt,
            LOCAL_START_ATTEMPTS,
        )
        try:
            ray.init(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                include_dashboard=False,
                runtime_env=runtime_env,
            )
            return
        except Exception as error:
            retry = any(marker in str(error) for marker in START_TIMEOUTS)
            if not retry or attempt == LOCAL_START_ATTEMPTS:
                stop_local_processes(failed_start=True)
                raise
            logger.warning(
                "the local Ray cluster did not start (attempt %d of %d): %s; retrying",
                attempt,
                LOCAL_START_ATTEMPTS,
                error,
            )
            stop_local_processes(failed_start=True)
            _children_before_cluster = {
                child.pid for child in psutil.Process().children(recursive=True)
            }


def stop_local_processes(failed_start: bool = False) -> None:
    """ray.shutdown(), then wait for the processes of the local cluster started here to exit.

    ray.shutdown() stops the head's processes but does not wait for the workers. Waiting keeps
    a cluster started next on this machine from competing with a dying one; a process still
    running after LOCAL_EXIT_TIMEOUT_S is killed. After a failed ray.init, Ray keeps no handle on
    the processes it started (ray.shutdown() does not stop them), so they are sent SIGTERM here.
    """
    import ray

    global _children_before_cluster
    before = _children_before_cluster or set()
    cluster = [
        child for child in psutil.Process().children(recursive=True) if child.pid not in before
    ]
    _children_before_cluster = None
    ray.shutdown()
    if failed_start:
        for process in cluster:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
    _, alive = psutil.wait_procs(cluster, timeout=LOCAL_EXIT_TIMEOUT_S)
    for process in alive:
        logger.warning(
            "Ray process %d still running %g s after shutdown; killing it",
            process.pid,
            LOCAL_EXIT_TIMEOUT_S,
        )
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    logger.info("local Ray cluster stopped (%d processes)", len(cluster))


def start(args: AppArgs, options: ServeOptions) -> None:
    """Connect to or start Ray, start Serve's proxies and deploy the application."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from deployments.app import APP_NAME, GRPC_SERVICER_FUNCTION, build_app

    if args.tp > 1 and options.address is None:
        check_tensor_parallel(args.model, args.tp)
    runtime_env = {
        "worker_process_setup_hook": f"{__name__}.bind_grpc_proxy_to_host",
        "env_vars": {GRPC_HOST_ENV_VAR: options.host},
    }
    if options.address is None:
        # A busy machine can take more than Serve's 5 s to start a proxy, and Serve then kills
        # the proxy and the deployment fails. The local cluster's processes inherit this
        # process's environment, so give them longer limits (a value set by the user wins).
        for name, seconds in LOCAL_SERVE_TIMEOUTS.items():
            os.environ.setdefault(name, seconds)
        start_local_cluster(
            num_cpus=options.num_cpus or local_cluster_cpus(args),
            num_gpus=local_cluster_gpus(args.device),
            runtime_env=runtime_env,
        )
    else:
        logger.info("connecting to the Ray cluster at %s", options.address)
        ray.init(address=options.address, runtime_env=runtime_env)
    serve.start(
        http_options={"host": options.host, "port": options.http_port},
        grpc_options=gRPCOptions(
            port=options.grpc_port, grpc_servicer_functions=[GRPC_SERVICER_FUNCTION]
        ),
    )
    logger.info("deploying %s with %s", APP_NAME, args.model_dump())
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")


def shutdown() -> None:
    """Delete the application, stop Serve, and disconnect from (or stop) Ray."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    serve.shutdown()
    if _children_before_cluster is None:
        ray.shutdown()  # a cluster this process only connected to keeps running
        return
    stop_local_processes()
