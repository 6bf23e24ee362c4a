"""A request in flight (`Sequence`) and the result it ends with (`GenerationResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dflash_core.detokenize import OutputText
from dflash_core.sampling import SamplingParams


@dataclass
class Sequence:
    """A request being decoded, with everything committed so far."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    slot: int
    generator: torch.Generator
    text: OutputText | None = None  # present when the engine can decode text
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    acceptance_lengths: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    # Tapped target states of committed tokens that the drafter has not seen yet, and the
    # number of tokens the drafter already holds for this slot.
    pending_context: torch.Tensor | None = None  # [new_tokens, n * hidden]
    pending_tokens: list[int] = field(default_factory=list)  # the ids of those tokens
    context_start: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def num_cached(self) -> int:
        """Tokens in the target KV cache: all but the newest committed token."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def commit(self, tokens: list[int], logprobs: list[float] | None = None) -> int:
        """Append tokens up to the first stop or max_new_tokens; returns how many were kept.

        Nothing after a stop token, a completed stop string or the length limit is kept.
        When a stop and the length limit fall on the same token, the reason is "stop".
        """
        kept = 0
        for token in tokens:
            if logprobs is not None:
                self.logprobs.append(logprobs[kept])
            self.output_ids.append(token)
            kept += 1
            if token in self.stop_ids:
                self.finish_reason = "stop"
                break
            if self.text is not None and self.text.add(token):
                self.finish_reason = "stop"
                break
            if len(self.output_ids) >= self.params.max_new_tokens:
                self.finish_reason = "length"
                break
        return kept

    def result(self) -> GenerationResult:
        return GenerationResult(
            request_id=self.request_id,
            token_ids=list(self.output_ids),
            text=None if self.text is None else self.text.final_text(),
            finish_reason=self.finish_reason or "length",
            num_prompt_tokens=len(self.prompt_ids),
            acceptance_lengths=list(self.acceptance_lengths),
            logprobs=list(self.logprobs) if self.params.logprobs else None,
            prefill_seconds=self.prefill_seconds,
            decode_seconds=self.decode_seconds,
        )


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    token_ids: list[int]  # generated ids; ends with the stop token when a stop id ended it
    text: str | None  # None when the engine has no tokenizer
    finish_reason: str  # "stop" or "length"
    num_prompt_tokens: int
    acceptance_lengths: list[int]  # committed tokens per decode step, counting only returned ones
    logprobs: list[float] | None  # target log-probability of each returned token, on request
    prefill_seconds: float
    decode_seconds: float

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids)

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
