"""Speculative decoding engine: draft a block, verify it with the target, accept, commit.

One decode step for every running sequence:
  1. draft:  the drafter proposes `block_size - 1` tokens after the newest committed token;
  2. verify: the target runs `[newest token, drafts...]` in one forward pass;
  3. accept: keep the longest prefix of drafts that equals the target's greedy choice;
  4. commit: append the accepted drafts plus the target's bonus token, cut the target KV cache
     back to the tokens the target has now seen, and hand their tapped states to the drafter.
Without a drafter the same loop is plain greedy decoding (block of one token), the reference
that speculative output must equal token for token.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from dflash_core.drafting import Drafter, DraftRequest
from dflash_core.sampling import SamplingParams
from dflash_core.target import TargetModel

logger = logging.getLogger(__name__)


class RequestTooLongError(ValueError):
    """A request whose worst-case length cannot fit in a KV cache slot."""


@dataclass
class Sequence:
    """A request being decoded, with everything committed so far."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    slot: int
    output_ids: list[int] = field(default_factory=list)
    acceptance_lengths: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    # Tapped target states of committed tokens that the drafter has not seen yet, and the
    # number of tokens the drafter already holds for this slot.
    pending_context: torch.Tensor | None = None  # [new_tokens, n * hidden]
    context_start: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def num_cached(self) -> int:
        """Tokens in the target KV cache: all but the newest committed token."""
        return len(self.prompt_ids) + len(self.output_ids) - 1


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    token_ids: list[int]  # generated ids only; ends with the stop token when one ended it
    finish_reason: str  # "stop" or "length"
    num_prompt_tokens: int
    acceptance_lengths: list[int]  # committed tokens per decode step, counting only returned ones
    prefill_seconds: float
    decode_seconds: float

    @property
    def num_steps(self) -> int:
        return len(self.acceptance_lengths)

    @property
    def mean_acceptance_length(self) -> float:
        steps = self.acceptance_lengths
        return sum(steps) / len(steps) if steps else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens committed by decode steps per second of decoding (the prefill token excluded)."""
        decoded = sum(self.acceptance_lengths)
        return decoded / self.decode_seconds if self.decode_seconds > 0 else 0.0


class SpeculativeEngine:
    """Decodes requests over `num_slots` KV cache rows, with or without a drafter."""

    def __init__(
        self,
        target: TargetModel,
        drafter: Drafter | None,
        *,
        max_seq_len: int,
        num_slots: int = 1,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.target = target
        self.drafter = drafter
        self.block_size = drafter.block_size if drafter else 1
        self.tap_layer_ids = drafter.target_layer_ids if drafter else ()
        self.max_seq_len = max_seq_len
        self.cache = target.new_cache(num_slots, max_seq_len)
        self.eos_token_ids = tuple(eos_token_ids)
        self.free_slots = list(range(num_slots))

    # ---- requests ---------------------------------------------------------------------

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request can never run on this engine."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: it must contain at least one token")
        vocab = self.target.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"prompt token ids {bad[:5]} are outside the vocabulary 0..{vocab - 1}"
            )
        # The last block may reach block_size - 1 positions past the final committed token.
        worst = len(prompt_ids) + params.max_new_tokens + self.block_size
        if worst > self.max_seq_len:
            raise RequestTooLongError(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} "
                f"+ block_size {self.block_size} = {worst} exceeds max_seq_len "
                f"{self.max_seq_len}; shorten the prompt, lower max_new_tokens or raise "
                "max_seq_len"
            )

    def start(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Take a free slot and prefill the prompt; the first token is committed here."""
        self.check_request(prompt_ids, params)
        if not self.free_slots:
            raise RuntimeError("no free KV cache slot; wait for a running sequence to finish")
        seq = Sequence(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            stop_ids=frozenset(self.eos_token_ids + params.stop_token_ids),
            slot=self.free_slots.pop(0),
        )
        began = time.perf_counter()
        self.cache.reset(seq.slot)
        ids = torch.tensor([prompt_ids], device=self.target.device)
        out = self.target(ids, self.cache, torch.tensor([seq.slot]), self.tap_layer_ids)
        first = int(self.target.logits(out.hidden[:, -1]).argmax(-1))
        seq.pending_context = out.tapped[0]
        self._commit(seq, [first])
        seq.prefill_seconds = time.perf_counter() - began
        return seq

    def finish(self, seq: Sequence) -> GenerationResult:
        """Release the sequence's slot and return its result."""
        self.free_slots.append(seq.slot)
        self.free_slots.sort()
        return GenerationResult(
            request_id=seq.request_id,
            token_ids=seq.output_ids,
            finish_reason=seq.finish_reason or "length",
            num_prompt_tokens=len(seq.prompt_ids),
            acceptance_lengths=seq.acceptance_lengths,
            prefill_seconds=seq.prefill_seconds,
            decode_seconds=seq.decode_seconds,
        )

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str = "0"
    ) -> GenerationResult:
        """Decode one request to completion."""
        seq = self.start(request_id, prompt_ids, params)
        while seq.finish_reason is None:
            self.step([seq])
        return self.finish(seq)

    # ---- one decode step ----------------------------------------------------------------

    @torch.inference_mode()
    def step(self, running: list[Sequence]) -> None:
        """Advance every unfinished sequence by one draft-verify step."""
        batch = [seq for seq in running if seq.finish_reason is None]
        if not batch:
            return
        began = time.perf_counter()
        device = self.target.device
        slots = torch.tensor([seq.slot for seq in batch], device=device)
        last = torch.tensor([[seq.output_ids[-1]] for seq in batch], device=device)  # [batch, 1]

        drafts = self.draft(batch)  # [batch, block_size - 1]
        block = torch.cat([last, drafts], dim=1)  # [batch, block_size]
        out = self.target(block, self.cache, slots, self.tap_layer_ids)
        target_tokens = self.target.logits(out.hidden).argmax(-1)  # [batch, block_size]
        num_accepted = accept_greedy(drafts, target_tokens)  # [batch]

        elapsed = time.perf_counter() - began
        for row, seq in enumerate(batch):
            k = int(num_accepted[row])
            start = seq.num_cached
            # The target has now seen the newest token and the k accepted drafts.
            self.cache.truncate(seq.slot, start + k + 1)
            seq.pending_context = out.tapped[row, : k + 1]
            committed = drafts[row, :k].tolist() + [int(target_tokens[row, k])]
            seq.acceptance_lengths.append(self._commit(seq, committed))
            seq.decode_seconds += elapsed

    def draft(self, batch: list[Sequence]) -> torch.Tensor:
        """Return draft tokens [batch, block_size - 1] (no columns without a drafter)."""
        if self.drafter is None:
            return torch.empty(len(batch), 0, dtype=torch.long, device=self.target.device)
        request = DraftRequest(
            slots=[seq.slot for seq in batch],
            context_starts=[seq.context_start for seq in batch],
            context=[seq.pending_context for seq in batch],
            last_tokens=[seq.output_ids[-1] for seq in batch],
        )
        logits = self.drafter.draft(request)
        for seq in batch:
            seq.context_start += seq.pending_context.shape[0]
            seq.pending_context = None
        return logits.argmax(-1).to(self.target.device)

    def _commit(self, seq: Sequence, tokens: list[int]) -> int:
        """Append tokens up to the first stop token or max_new_tokens; return how many were kept."""
        kept = 0
        for token in tokens:
            seq.output_ids.append(token)
            kept += 1
            if token in seq.stop_ids:
                seq.finish_reason = "stop"
                break
            if len(seq.output_ids) >= seq.params.max_new_tokens:
                seq.finish_reason = "length"
                break
        return kept


def accept_greedy(drafts: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
    """Count accepted drafts per row: the longest prefix where draft i equals the target's pick.

    drafts: [batch, block_size - 1]; target_tokens: [batch, block_size], where column i is the
    target's choice after block position i, so draft i + 1 is checked against column i.
    """
    matches = drafts == target_tokens[:, :-1]
    return matches.int().cumprod(dim=1).sum(dim=1)
