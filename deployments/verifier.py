"""Tensor-parallel verifier actors: ranks 1..tp-1 of the target, beside the engine replica.

The engine replica is rank 0. It runs the engine and calls a `TensorParallelTarget`, which
broadcasts each target call to these actors over torch.distributed. Each actor loads the target
from the folder rank 0 resolved, keeps its own shard and runs the follower command loop inside
one long actor call (`serve`) until rank 0 sends a shutdown.

The actors are children of the replica, so they die with it. They sit in its placement group
after the replica's bundle and the drafter's, on the same node (STRICT_PACK), so the group
meets on 127.0.0.1 at a port rank 0 picks at start.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray.exceptions import RayError
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.drafter import DRAFTER_BUNDLE_INDEX
from deployments.logs import configure_worker_logging
from dflash_core.checkpoint import load_target
from dflash_core.pipeline import DTYPES
from dflash_core.target import TargetModel
from dflash_core.target_shard import TargetShard, plan_shards, shard_target
from dflash_core.tensor_parallel import (
    TensorParallelGroup,
    TensorParallelTarget,
    follow,
    join_group,
    leave_group,
    open_store,
    rank0_target,
)

logger = logging.getLogger(__name__)

RENDEZVOUS_HOST = "127.0.0.1"
# How long closing waits for the actors' command loops to return before killing the actors.
STOP_TIMEOUT_SECONDS = 30.0


def verifier_bundle_index(rank: int, separate_drafter: bool) -> int:
    """Return the placement group bundle of verifier `rank` (1 or more).

    The bundles are, in order: the engine replica (rank 0), the drafter actor when the draft
    is not colocated, then ranks 1..tp-1.
    """
    return rank + (DRAFTER_BUNDLE_INDEX if separate_drafter else 0)


class VerifierActor:
    """One follower rank: a shard of the target and its KV caches."""

    def __init__(
        self,
        folder: str,
        dtype: str,
        rank: int,
        world_size: int,
        threads: int,
        log_level: str,
        device: str = "cpu",
    ) -> None:
        configure_worker_logging(log_level)
        torch.set_num_threads(threads)
        self.rank = rank
        self.world_size = world_size
        # Loaded whole on the CPU; only this rank's shard moves to the device (see join).
        self.device = torch.device(device)
        self.model: TargetModel | None = load_target(folder, dtype=DTYPES[dtype])
        self.rank_shard = plan_shards(self.model.config, world_size)[rank]
        self.group: TensorParallelGroup | None = None
        self.sharded: TargetShard | None = None
        logger.info(
            "verifier rank %d of %d loaded %s (pid %d, torch threads %d, device %s)",
            rank,
            world_size,
            folder,
            os.getpid(),
            threads,
            self.device,
        )

    def pid(self) -> int:
        return os.getpid()

    def join(self, port: int) -> None:
        """Join rank 0's group at RENDEZVOUS_HOST:port, then keep only this rank's shard."""
        store = open_store(RENDEZVOUS_HOST, port, self.rank, self.world_size)
        self.group = join_group(store, self.rank, self.world_size, self.device)
        self.sharded = shard_target(self.model, self.rank_shard, self.group.data).to(self.device)
        self.model = None

    def serve(self) -> str | None:
        """Run rank 0's commands until it sends a shutdown.

        Returns None after a shutdown, or the error that ended the loop, which the replica's
        health check reports.
        """
        try:
            follow(self.sharded, self.group)
        except Exception as error:
            logger.exception(
                "verifier rank %d (pid %d): command loop failed", self.rank, os.getpid()
            )
            return f"{type(error).__name__}: {error}"
        finally:
            leave_group(self.group)
        logger.info("verifier rank %d (pid %d) stopped", self.rank, os.getpid())
        return None


@dataclass
class TensorParallelVerifiers:
    """Rank 0's target, the actors of ranks 1..tp-1 and their running `serve` calls."""

    target: TensorParallelTarget
    actors: list[ray.actor.ActorHandle]
    loops: list[ray.ObjectRef]  # one `serve` call per actor, which ends at shutdown or failure

    def check_alive(self) -> None:
        """Raise RuntimeError if a command failed on rank 0 or a follower's loop has ended."""
        if self.target.failure is not None:
            raise RuntimeError(f"tensor-parallel target failed: {self.target.failure}")
        ended, _ = ray.wait(self.loops, num_returns=len(self.loops), timeout=0)
        for ref in ended:
            rank = self.loops.index(ref) + 1
            try:
                reason = ray.get(ref) or "its command loop returned"
            except RayError as error:
                reason = str(error)
            raise RuntimeError(f"verifier rank {rank} stopped: {reason}")

    def close(self) -> None:
        """Shut the followers down, leave the group and kill the actors."""
        self.target.close()
        _, pending = ray.wait(self.loops, num_returns=len(self.loops), timeout=STOP_TIMEOUT_SECONDS)
        if pending:
            logger.warning(
                "%d verifier actor(s) did not stop within %g s; killing them",
                len(pending),
                STOP_TIMEOUT_SECONDS,
            )
        for rank, actor in enumerate(self.actors, start=1):
            ray.kill(actor)
            logger.info("killed verifier rank %d (actor %s)", rank, actor._actor_id.hex())


def start_verifiers(
    model: TargetModel,
    folder: Path,
    *,
    tp: int,
    dtype: str,
    num_cpus: float,
    threads: int,
    separate_drafter: bool,
    device: str = "cpu",
) -> TensorParallelVerifiers:
    """Start ranks 1..tp-1 as actors, join them as rank 0 and shard `model` for rank 0.

    Raises ValueError before starting anything when the target cannot be split over `tp`
    ranks. `model` is the whole target, loaded from `folder` (on the CPU, so it need not fit
    one GPU). Drop it afterwards. With `device` "cuda" every rank reserves a GPU of the
    replica's placement group, keeps its shard there, and the ranks talk over NCCL.
    """
    plan_shards(model.config, tp)
    placement_group = get_current_placement_group()
    level = logging.getLevelName(logger.getEffectiveLevel())
    actors = []
    group = None
    try:
        for rank in range(1, tp):
            scheduling = None
            if placement_group is not None:
                scheduling = PlacementGroupSchedulingStrategy(
                    placement_group,
                    placement_group_bundle_index=verifier_bundle_index(rank, separate_drafter),
                )
            actor = (
                ray.remote(VerifierActor)
                .options(
                    num_cpus=num_cpus,
                    num_gpus=1 if device == "cuda" else 0,
                    scheduling_strategy=scheduling,
                    runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},
                )
                .remote(str(folder), dtype, rank, tp, threads, level, device)
            )
            actors.append(actor)
        # Waiting for the constructors first surfaces a failed load here, not as a hang in
        # the rendezvous below.
        pids = ray.get([actor.pid.remote() for actor in actors])
        logger.info(
            "started %d verifier actor(s): pids %s, placement group %s",
            len(actors),
            pids,
            None if placement_group is None else placement_group.id.hex(),
        )
        store = open_store(RENDEZVOUS_HOST, 0, 0, tp)
        joins = [actor.join.remote(store.port) for actor in actors]
        group = join_group(store, 0, tp, torch.device(device))
        ray.get(joins)
        target = rank0_target(model, group, torch.device(device))
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        if group is not None:
            leave_group(group)
        raise
    loops = [actor.serve.remote() for actor in actors]
    logger.info(
        "tensor-parallel verifier ready: %d ranks, rendezvous at %s:%d",
        tp,
        RENDEZVOUS_HOST,
        store.port,
    )
    return TensorParallelVerifiers(target, actors, loops)
