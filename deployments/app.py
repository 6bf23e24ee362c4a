"""The Serve application: a gRPC ingress in front of autoscaled engine replicas.

`build_app` is an application builder, so a Serve config file can name it
(`import_path: deployments.app:build_app`) and pass `AppArgs` fields as `args`.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, model_validator
from ray.serve import Application

from deployments.engine import DFlashEngine, EngineConfig
from deployments.ingress import DFlashIngress

logger = logging.getLogger(__name__)

APP_NAME = "dflash"
# The servicer function Serve's gRPC proxy imports to register DFlashService.
GRPC_SERVICER_FUNCTION = "deployments.protos.add_DFlashServiceServicer_to_server"
DEFAULT_MAX_QUEUED_REQUESTS = 16
# Requests one ingress replica handles at once; they mostly wait on engine replicas.
INGRESS_MAX_ONGOING_REQUESTS = 1000


class AppArgs(EngineConfig):
    """Arguments of the dflash Serve application: each engine replica's `EngineConfig` fields,
    where `device`, `threads` and `verifier_num_cpus` may be left to the application, and the
    replica counts, limits and CPU shares of the deployments."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="cuda: the engine replica, its drafter actor and each verifier actor "
        "reserve one GPU (a colocated draft shares the replica's) and run the models there; "
        "cpu: CPUs only; auto: cuda when the Ray cluster has GPUs.",
    )
    min_replicas: int = Field(default=1, ge=0, description="Minimum number of engine replicas.")
    max_replicas: int = Field(default=1, ge=1, description="Maximum number of engine replicas.")
    target_ongoing_requests: float | None = Field(
        default=None,
        gt=0,
        description="Ongoing requests per engine replica that autoscaling aims for; None "
        "means max_batch_size, so a replica scales out when its slots are full.",
    )
    upscale_delay_s: float | None = Field(
        default=None,
        ge=0,
        description="Seconds the load must stay above target before Serve adds a replica; "
        "None keeps Serve's default.",
    )
    downscale_delay_s: float | None = Field(
        default=None,
        ge=0,
        description="Seconds the load must stay below target before Serve removes a replica; "
        "None keeps Serve's default.",
    )
    max_ongoing_requests: int | None = Field(
        default=None,
        ge=1,
        description="Requests one engine replica accepts at once (running plus waiting for "
        "a slot); None means twice max_batch_size.",
    )
    max_queued_requests: int = Field(
        default=DEFAULT_MAX_QUEUED_REQUESTS,
        ge=-1,
        description="Requests each ingress replica queues for the engines when every engine "
        "replica is at max_ongoing_requests; more are rejected with RESOURCE_EXHAUSTED. "
        "-1 queues without limit.",
    )
    engine_num_cpus: float = Field(
        default=1.0, gt=0, description="CPUs Ray reserves for each engine replica."
    )
    verifier_num_cpus: float | None = Field(
        default=None,
        gt=0,
        description="CPUs Ray reserves for each verifier actor (tp > 1); None means "
        "engine_num_cpus, because every rank does the same share of the target's work.",
    )
    ingress_num_cpus: float = Field(
        default=0.1, gt=0, description="CPUs Ray reserves for the ingress replica."
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch CPU threads per engine replica and per verifier actor; None means "
        "engine_num_cpus rounded down, at least 1.",
    )

    @model_validator(mode="after")
    def check_supported(self) -> AppArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas {self.min_replicas} exceeds max_replicas {self.max_replicas}"
            )
        return self


def resolve_device(args: AppArgs) -> str:
    """Return "cpu" or "cuda"; "auto" is "cuda" when the connected Ray cluster has a GPU."""
    import ray

    if not ray.is_initialized():
        # `serve run` calls the builder before it connects to Ray.
        if args.device == "auto":
            logger.warning(
                "device auto: not connected to Ray yet, so its GPUs cannot be counted; using "
                "cpu. Pass device cuda (--device cuda) to run on GPUs"
            )
            return "cpu"
        return args.device
    gpus = ray.cluster_resources().get("GPU", 0)
    if args.device == "cuda" and gpus < 1:
        logger.warning(
            "device cuda: the Ray cluster has no GPU now; engine replicas wait until GPU nodes "
            "join (pass device cpu to run on CPUs)"
        )
    if args.device != "auto":
        return args.device
    return "cuda" if gpus >= 1 else "cpu"


def placement_bundles(args: AppArgs, device: str = "cpu") -> list[dict[str, float]]:
    """Return the bundles of one engine replica's placement group.

    In the order `verifier_bundle_index` expects: the replica (rank 0), the drafter actor
    when the draft is not colocated, then one verifier actor per rank 1..tp-1. On "cuda"
    each bundle also reserves one GPU.
    """
    # NOTE: the "cuda" layout (and the CUDA code it leads to) has not run on a GPU yet.
    gpu = {"GPU": 1} if device == "cuda" else {}
    bundles = [{"CPU": args.engine_num_cpus, **gpu}]
    if not args.colocated and args.draft is not None:
        bundles.append({"CPU": args.drafter_num_cpus, **gpu})
    verifier_cpus = args.verifier_num_cpus or args.engine_num_cpus
    bundles += [{"CPU": verifier_cpus, **gpu} for _ in range(1, args.tp)]
    return bundles


def build_app(args: AppArgs | dict) -> Application:
    """Build the application from `AppArgs` (or the dict form a Serve config passes)."""
    args = AppArgs.model_validate(args)
    device = resolve_device(args)
    threads = args.threads or max(1, int(args.engine_num_cpus))
    engine_fields = args.model_dump(include=set(EngineConfig.model_fields))
    engine_fields.update(
        device=device,
        threads=threads,
        verifier_num_cpus=args.verifier_num_cpus or args.engine_num_cpus,
    )
    engine_config = EngineConfig(**engine_fields)
    bundles = placement_bundles(args, device)
    placement = {}
    if len(bundles) > 1:
        # All on one node: the tensor-parallel group meets on 127.0.0.1.
        placement = {"placement_group_bundles": bundles, "placement_group_strategy": "STRICT_PACK"}
    autoscaling = {
        "min_replicas": args.min_replicas,
        "initial_replicas": max(args.min_replicas, 1),
        "max_replicas": args.max_replicas,
        "target_ongoing_requests": args.target_ongoing_requests or args.max_batch_size,
    }
    for name in ("upscale_delay_s", "downscale_delay_s"):
        if getattr(args, name) is not None:
            autoscaling[name] = getattr(args, name)
    engine = DFlashEngine.options(
        autoscaling_config=autoscaling,
        max_ongoing_requests=args.max_ongoing_requests or 2 * args.max_batch_size,
        max_queued_requests=args.max_queued_requests,
        ray_actor_options={
            "num_cpus": args.engine_num_cpus,
            "num_gpus": 1 if device == "cuda" else 0,
            # OpenMP reads this at start-up, before torch.set_num_threads runs.
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}},
        },
        **placement,
    ).bind(engine_config)
    ingress = DFlashIngress.options(
        max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
        ray_actor_options={"num_cpus": args.ingress_num_cpus},
    )
    return ingress.bind(engine, args.log_level)
