"""The draft model as a separate Ray actor, and the Drafter that forwards each step to it.

Per step the engine sends the actor a `DraftRequest` (the tapped target states of the tokens
committed since the last step, and the newest token per row). The actor appends them to its
draft KV cache, runs one draft pass and returns the output states
[batch, block_size - 1, hidden]; the engine applies the target's LM head to them. Hidden
states are vocab / hidden times smaller than logits (85 times for SmolLM2).

The actor is created by the engine replica, so it shares the replica's fate, and it is placed
in the replica's placement group (bundle 1) when there is one.
"""

from __future__ import annotations

import logging
import os

import ray
import torch
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import nn

from deployments.logs import configure_worker_logging
from dflash_core.draft import DraftModel, check_draft_fits_target
from dflash_core.drafting import DFlashDrafter, DraftHead, DraftRequest
from dflash_core.target import TargetModel

logger = logging.getLogger(__name__)

# The placement group bundle of the drafter actor. The engine replica takes bundle 0.
DRAFTER_BUNDLE_INDEX = 1


class DrafterActor:
    """A DFlash draft model with its KV cache and the target's embedding table."""

    def __init__(
        self,
        model: DraftModel,
        embed_tokens: nn.Embedding,
        num_slots: int,
        max_seq_len: int,
        block_size: int | None,
        threads: int,
        log_level: str,
    ) -> None:
        configure_worker_logging(log_level)
        torch.set_num_threads(threads)
        self.drafter = DFlashDrafter(model, embed_tokens, None, num_slots, max_seq_len, block_size)
        logger.info(
            "drafter actor ready (pid %d): block_size %d, %d slots",
            os.getpid(),
            self.drafter.block_size,
            num_slots,
        )

    def config(self) -> tuple[int, tuple[int, ...]]:
        """Return `(block_size, target_layer_ids)`."""
        return self.drafter.block_size, self.drafter.target_layer_ids

    def draft_hidden(self, request: DraftRequest) -> torch.Tensor:
        return self.drafter.draft_hidden(request)


class RemoteDrafter:
    """Implements the `Drafter` protocol by calling a DrafterActor once per step."""

    def __init__(
        self, actor: ray.actor.ActorHandle, lm_head: nn.Linear, vocab_ids: tuple[int, ...] = ()
    ) -> None:
        self.actor = actor
        self.head = DraftHead(lm_head, vocab_ids)
        self.block_size, self.target_layer_ids = ray.get(actor.config.remote())

    @torch.inference_mode()
    def draft(self, request: DraftRequest) -> torch.Tensor:
        # NOTE: a dead actor raises RayActorError here, which fails the step's requests; the
        # engine does not fall back to plain decoding.
        hidden = ray.get(self.actor.draft_hidden.remote(request))  # [batch, B - 1, hidden]
        return self.head(hidden)


def start_drafter_actor(
    draft: DraftModel,
    target: TargetModel,
    *,
    num_slots: int,
    max_seq_len: int,
    block_size: int | None,
    num_cpus: float,
    threads: int,
) -> RemoteDrafter:
    """Create a DrafterActor for this draft and target, and return the Drafter that calls it.

    The draft weights and the embedding table are pickled to the actor once, here.
    """
    check_draft_fits_target(draft.config, target.config)
    placement_group = get_current_placement_group()
    scheduling = None
    if placement_group is not None:
        scheduling = PlacementGroupSchedulingStrategy(
            placement_group, placement_group_bundle_index=DRAFTER_BUNDLE_INDEX
        )
    actor = (
        ray.remote(DrafterActor)
        .options(
            num_cpus=num_cpus,
            scheduling_strategy=scheduling,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},
        )
        .remote(
            draft,
            target.embed_tokens,
            num_slots,
            max_seq_len,
            block_size,
            threads,
            logging.getLevelName(logger.getEffectiveLevel()),
        )
    )
    logger.info(
        "started drafter actor (num_cpus %g, placement group %s)",
        num_cpus,
        None if placement_group is None else placement_group.id.hex(),
    )
    return RemoteDrafter(actor, target.lm_head, draft.config.draft_vocab_ids)
