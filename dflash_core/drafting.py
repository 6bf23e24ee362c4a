"""The drafter interface the decoding loop calls, and the DFlash drafter behind it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dflash_core.draft import DraftModel, check_draft_fits_target
from dflash_core.target import TargetModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftRequest:
    """One draft pass for a batch of rows.

    Row `i` has `context_starts[i]` tokens already in the drafter's context for `slots[i]`;
    `context[i]` contains the tapped target states [new_tokens, n * hidden] of the tokens committed
    since then (the whole prompt for a new sequence, whose start is 0) and `context_tokens[i]`
    their token ids. `last_tokens[i]` is the newest committed token, which opens the block.
    """

    slots: list[int]
    context_starts: list[int]
    context: list[torch.Tensor]
    context_tokens: list[list[int]]
    last_tokens: list[int]


class Drafter(Protocol):
    """Proposes `block_size - 1` draft tokens per row from the committed context."""

    block_size: int
    target_layer_ids: tuple[int, ...]  # target layers whose outputs the drafter reads

    def draft(self, request: DraftRequest) -> torch.Tensor:
        """Return draft logits [batch, block_size - 1, vocab] (fp32) for the block slots 1..B-1."""
        ...


class DraftHead:
    """The target's LM head as a drafter applies it, returning fp32 logits over the vocabulary.

    With `vocab_ids` (the draft's vocabulary) it scores only those rows and gives every other
    token -inf, so the draft never proposes it. For SmolLM2 on 2 CPU cores the full head over
    7 block slots measured about a third of a plain decoding step. Verification is unchanged, so
    the output stays exact either way.
    """

    def __init__(self, lm_head: nn.Linear, vocab_ids: tuple[int, ...] = ()) -> None:
        weight = lm_head.weight.detach()
        self.vocab_size = weight.shape[0]
        self.ids = torch.tensor(vocab_ids, device=weight.device) if vocab_ids else None
        self.weight = weight[self.ids].contiguous() if self.ids is not None else weight

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden.to(self.weight.dtype), self.weight).float()
        if self.ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        full[..., self.ids] = logits
        return full


class DFlashDrafter:
    """Runs a DFlash draft model with the target's embedding table and LM head.

    The draft KV cache has one row per slot. Setting a row's length to the request's
    `context_starts` before appending makes every call self-contained: a new sequence
    (start 0) needs no separate reset.
    """

    def __init__(
        self,
        model: DraftModel,
        embed_tokens: nn.Embedding,
        lm_head: nn.Linear | None,  # None when only draft_hidden is called
        num_slots: int,
        max_seq_len: int,
        block_size: int | None = None,
    ) -> None:
        self.model = model
        self.embed_tokens = embed_tokens
        self.head = DraftHead(lm_head, model.config.draft_vocab_ids) if lm_head else None
        self.block_size = model.config.block_size if block_size is None else block_size
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        if self.block_size > model.config.block_size:
            logger.warning(
                "block_size %d is larger than the draft's trained block size %d; acceptance "
                "may drop",
                self.block_size,
                model.config.block_size,
            )
        self.mask_token_id = model.config.mask_token_id
        self.target_layer_ids = model.config.target_layer_ids
        self.cache = model.new_cache(num_slots, max_seq_len)

    @classmethod
    def for_target(
        cls,
        model: DraftModel,
        target: TargetModel,
        num_slots: int,
        max_seq_len: int,
        block_size: int | None = None,
    ) -> DFlashDrafter:
        """Pair a draft with the target whose embedding table and LM head it borrows."""
        check_draft_fits_target(model.config, target.config)
        return cls(model, target.embed_tokens, target.lm_head, num_slots, max_seq_len, block_size)

    @torch.inference_mode()
    def draft(self, request: DraftRequest) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("this drafter was built without an LM head; call draft_hidden")
        return self.head(self.draft_hidden(request))

    @torch.inference_mode()
    def draft_hidden(self, request: DraftRequest) -> torch.Tensor:
        """Return the draft's output states [batch, block_size - 1, hidden] before the LM head.

        A drafter in another process returns these: they are vocab / hidden times smaller
        than the logits, and the caller applies the target's LM head.
        """
        device = self.model.device
        slots = torch.tensor(request.slots, device=device)
        self.cache.lengths[slots] = torch.tensor(request.context_starts, device=device)
        self._append_context(slots, request.context)
        batch = len(request.slots)
        block = torch.full((batch, self.block_size), self.mask_token_id, device=device)
        block[:, 0] = torch.tensor(request.last_tokens, device=device)
        hidden = self.model(self.embed_tokens(block), self.cache, slots)  # [batch, B, hidden]
        return hidden[:, 1:]

    def _append_context(self, slots: torch.Tensor, context: list[torch.Tensor]) -> None:
        counts = torch.tensor([c.shape[0] for c in context], device=slots.device)
        longest = int(counts.max())
        if longest == 0:
            return
        if longest > self.block_size and len(context) > 1:
            # A prompt among per-step updates (at most block_size tokens each): append rows one
            # by one. Padding every row to the prompt's length would waste work and could write
            # past the end of a row that is close to max_seq_len.
            for i, rows in enumerate(context):
                self.model.append_context(
                    self.cache, slots[i : i + 1], rows[None], counts[i : i + 1]
                )
            return
        padded = context[0].new_zeros(len(context), longest, context[0].shape[-1])
        for i, rows in enumerate(context):
            padded[i, : rows.shape[0]] = rows
        self.model.append_context(self.cache, slots, padded, counts)
