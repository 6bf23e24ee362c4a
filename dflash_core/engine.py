"""Speculative decoding engine: draft a block, verify it with the target, accept, commit.

One decode step for every running sequence:
  1. draft:  the drafter proposes `block_size - 1` tokens after the newest committed token;
  2. verify: the target runs `[newest token, drafts...]` in one forward pass;
  3. accept: greedy rows keep the longest prefix of drafts equal to the target's argmax;
     sampling rows use rejection sampling, which keeps the target's distribution;
  4. commit: append the accepted drafts plus one token of the target's own, cut the target KV
     cache back to the tokens the target has now seen, and queue their tapped states for the
     drafter.
Without a drafter the same loop is plain decoding (a block of one token), the reference that
speculative output must equal token for token under greedy decoding.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

import torch

from dflash_core.detokenize import OutputText
from dflash_core.drafting import Drafter, DraftRequest
from dflash_core.sampling import (
    PROPOSAL_MODES,
    SamplingParams,
    accept_sampled,
    filtered_probs,
    sample,
)
from dflash_core.sequence import GenerationResult, Sequence
from dflash_core.target import TargetModel

logger = logging.getLogger(__name__)

DEFAULT_PROPOSAL = "argmax"
# The output length limit as errors name it: max_new_tokens in the CLI and SamplingParams,
# max_tokens in gRPC and HTTP requests.
LENGTH_OPTION = "max_new_tokens (max_tokens)"


class RequestTooLongError(ValueError):
    """A request whose worst-case length cannot fit in a KV cache slot."""


class SpeculativeEngine:
    """Decodes requests over `num_slots` KV cache rows, with or without a drafter.

    `decode` turns token ids into text; without it results carry no text and stop strings
    are rejected. `proposal` picks how sampling rows choose draft tokens: "argmax" (one-hot
    q) or "sampled" (drawn from the draft distribution). Both keep the output lossless.

    `tap_layer_ids` overrides the target layers tapped for the drafter (by default the
    drafter's). `on_tapped(request_id, states)` receives, in order, the tapped states
    [tokens, n * hidden] of every token the target runs for a request and keeps: the prompt at
    prefill, then the tokens each step commits to its KV cache. Data generation records them
    this way, so training needs no second pass of the target over the responses.
    """

    def __init__(
        self,
        target: TargetModel,
        drafter: Drafter | None,
        *,
        max_seq_len: int,
        num_slots: int = 1,
        eos_token_ids: tuple[int, ...] = (),
        decode: Callable[[list[int]], str] | None = None,
        proposal: str = DEFAULT_PROPOSAL,
        tap_layer_ids: tuple[int, ...] | None = None,
        on_tapped: Callable[[str, torch.Tensor], None] | None = None,
    ) -> None:
        if proposal not in PROPOSAL_MODES:
            raise ValueError(f"proposal {proposal!r} is invalid; choose one of {PROPOSAL_MODES}")
        self.target = target
        self.drafter = drafter
        self.block_size = drafter.block_size if drafter else 1
        if tap_layer_ids is None:
            tap_layer_ids = drafter.target_layer_ids if drafter else ()
        self.tap_layer_ids = tuple(tap_layer_ids)
        self.on_tapped = on_tapped
        self.max_seq_len = max_seq_len
        self.num_slots = num_slots
        self.cache = target.new_cache(num_slots, max_seq_len)
        self.eos_token_ids = tuple(eos_token_ids)
        self.decode = decode
        self.proposal = proposal
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
        if params.stop and self.decode is None:
            raise ValueError("stop strings need an engine with a tokenizer to decode text")
        context = self.target.config.max_position_embeddings
        if len(prompt_ids) + params.max_new_tokens > context:
            raise RequestTooLongError(
                f"prompt of {len(prompt_ids)} tokens + {LENGTH_OPTION} {params.max_new_tokens} "
                f"exceeds the model's context of {context} tokens; shorten the prompt or "
                f"lower {LENGTH_OPTION}"
            )
        # The last block may reach block_size - 1 positions past the final committed token.
        worst = len(prompt_ids) + params.max_new_tokens + self.block_size
        if worst > self.max_seq_len:
            raise RequestTooLongError(
                f"prompt of {len(prompt_ids)} tokens + {LENGTH_OPTION} {params.max_new_tokens} "
                f"+ block_size {self.block_size} = {worst} exceeds max_seq_len "
                f"{self.max_seq_len}; shorten the prompt, lower {LENGTH_OPTION} or raise "
                "max_seq_len"
            )

    def start(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Take a free slot and prefill the prompt; the first token is committed here."""
        self.check_request(prompt_ids, params)
        if not self.free_slots:
            raise RuntimeError("no free KV cache slot; wait for a running sequence to finish")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            stop_ids=frozenset(self.eos_token_ids + params.stop_token_ids),
            slot=self.free_slots.pop(0),
            generator=torch.Generator().manual_seed(seed),
            text=OutputText(self.decode, params.stop) if self.decode else None,
        )
        try:
            self._prefill(seq)
        except BaseException:
            self.free_slots.append(seq.slot)
            raise
        return seq

    @torch.inference_mode()
    def _prefill(self, seq: Sequence) -> None:
        began = time.perf_counter()
        self.cache.reset(seq.slot)
        ids = torch.tensor([seq.prompt_ids], device=self.target.device)
        slot = torch.tensor([seq.slot], device=ids.device)
        out = self.target(ids, self.cache, slot, self.tap_layer_ids)
        logits = self.target.logits(out.hidden[0, -1:])  # [1, vocab]
        first = self._choose(seq, logits)
        seq.pending_context = out.tapped[0]
        if self.on_tapped is not None:
            self.on_tapped(seq.request_id, out.tapped[0])
        seq.pending_tokens = list(seq.prompt_ids)
        seq.commit([first], self._logprobs(seq, logits, [first]))
        seq.prefill_seconds = time.perf_counter() - began

    def finish(self, seq: Sequence) -> GenerationResult:
        """Release the sequence's slot and return its result."""
        if seq.slot in self.free_slots:
            raise RuntimeError(f"request {seq.request_id}: slot {seq.slot} was already released")
        self.free_slots.append(seq.slot)
        self.free_slots.sort()
        return seq.result()

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str = "0"
    ) -> GenerationResult:
        """Decode one request to completion."""
        seq = self.start(request_id, prompt_ids, params)
        try:
            while seq.finish_reason is None:
                self.step([seq])
        finally:
            result = self.finish(seq)
        return result

    # ---- one decode step ----------------------------------------------------------------

    @torch.inference_mode()
    def step(self, running: list[Sequence]) -> None:
        """Advance every unfinished sequence by one draft-verify step."""
        # Slot order lets the KV cache hand out views instead of copies when slots are contiguous.
        batch = sorted((seq for seq in running if seq.finish_reason is None), key=lambda s: s.slot)
        if not batch:
            return
        began = time.perf_counter()
        device = self.target.device
        slots = torch.tensor([seq.slot for seq in batch], device=device)
        last = torch.tensor([[seq.output_ids[-1]] for seq in batch], device=device)  # [batch, 1]

        drafts, draft_probs = self.draft(batch)  # [batch, block_size - 1]
        block = torch.cat([last, drafts], dim=1)  # [batch, block_size]
        out = self.target(block, self.cache, slots, self.tap_layer_ids)
        logits = self.target.logits(out.hidden)  # [batch, block_size, vocab]

        for row, seq in enumerate(batch):
            start = seq.num_cached
            committed = self.accept(seq, drafts[row], draft_probs[row], logits[row])
            # The target keeps the newest token and the k accepted drafts, as many tokens as this
            # step commits (k drafts plus one target token).
            num_seen = len(committed)
            self.cache.truncate(seq.slot, start + num_seen)
            seq.pending_context = out.tapped[row, :num_seen]
            seq.pending_tokens = block[row, :num_seen].tolist()
            if self.on_tapped is not None:
                self.on_tapped(seq.request_id, seq.pending_context)
            kept = seq.commit(committed, self._logprobs(seq, logits[row], committed))
            seq.acceptance_lengths.append(kept)
        elapsed = time.perf_counter() - began
        for seq in batch:
            seq.decode_seconds += elapsed

    def draft(self, batch: list[Sequence]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Propose draft tokens [batch, block_size - 1] and, per row, the proposal distribution.

        The distribution is None where the proposal is one-hot (greedy rows, argmax mode).
        """
        device = self.target.device
        if self.drafter is None:
            return torch.empty(len(batch), 0, dtype=torch.long, device=device), [None] * len(batch)
        request = DraftRequest(
            slots=[seq.slot for seq in batch],
            context_starts=[seq.context_start for seq in batch],
            context=[seq.pending_context for seq in batch],
            context_tokens=[seq.pending_tokens for seq in batch],
            last_tokens=[seq.output_ids[-1] for seq in batch],
        )
        logits = self.drafter.draft(request).to(device)  # [batch, block_size - 1, vocab]
        for seq in batch:
            seq.context_start += len(seq.pending_tokens)
            seq.pending_context = None
            seq.pending_tokens = []
        drafts = logits.argmax(-1)
        draft_probs: list[torch.Tensor | None] = [None] * len(batch)
        if self.proposal == "sampled":
            for row, seq in enumerate(batch):
                if seq.params.greedy:
                    continue
                probs = filtered_probs(logits[row], seq.params)  # [block_size - 1, vocab]
                # The request's generator is on the CPU (see sampling.sample).
                drawn = torch.multinomial(probs.cpu(), 1, generator=seq.generator)[:, 0]
                drafts[row] = drawn.to(drafts.device)
                draft_probs[row] = probs
        return drafts, draft_probs

    def accept(
        self,
        seq: Sequence,
        drafts: torch.Tensor,
        draft_probs: torch.Tensor | None,
        logits: torch.Tensor,
    ) -> list[int]:
        """Return the tokens one row commits: accepted drafts plus one target token.

        drafts: [block_size - 1]; logits: [block_size, vocab], row i the target's prediction
        after block position i.
        """
        if seq.params.greedy:
            target_tokens = logits.argmax(-1)
            k = int(accept_greedy(drafts[None], target_tokens[None])[0])
            return drafts[:k].tolist() + [int(target_tokens[k])]
        return accept_sampled(
            drafts.tolist(), draft_probs, filtered_probs(logits, seq.params), seq.generator
        )

    def _choose(self, seq: Sequence, logits: torch.Tensor) -> int:
        """Pick one token from logits [1, vocab] (prefill): argmax or a filtered sample."""
        if seq.params.greedy:
            return int(logits[0].argmax())
        return sample(filtered_probs(logits[0], seq.params), seq.generator)

    def _logprobs(
        self, seq: Sequence, logits: torch.Tensor, tokens: list[int]
    ) -> list[float] | None:
        """Target log-probabilities (temperature 1, unfiltered) of tokens[i] under logits[i]."""
        if not seq.params.logprobs:
            return None
        rows = logits[: len(tokens)].float().log_softmax(-1)
        index = torch.arange(len(tokens), device=rows.device)
        return rows[index, torch.tensor(tokens, device=rows.device)].tolist()


def accept_greedy(drafts: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
    """Count accepted drafts per row: the longest prefix where draft i equals the target's pick.

    drafts: [batch, block_size - 1]; target_tokens: [batch, block_size], where column i is the
    target's choice after block position i, so draft i + 1 is checked against column i.
    """
    matches = drafts == target_tokens[:, :-1]
    return matches.int().cumprod(dim=1).sum(dim=1)
