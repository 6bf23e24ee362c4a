"""Per-request sampling parameters, logit filtering and lossless speculative acceptance.

Speculative rejection sampling keeps the output distribution equal to the target's. Draft
token `d_i` is accepted with probability `min(1, p_{i-1}(d_i) / q_i(d_i))`. At the first
rejection the committed token is drawn from `norm(max(p_{i-1} - q_i, 0))`, and if every draft
is accepted, the bonus token is drawn from `p_{B-1}`. Here `p` is the target's filtered
distribution and `q` the proposal distribution of the draft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_MAX_NEW_TOKENS = 256
PROPOSAL_MODES = ("argmax", "sampled")

# Options that change the output distribution in ways this engine does not reproduce exactly:
# name -> (values that leave the distribution unchanged, reason).
UNSUPPORTED_OPTIONS: dict[str, tuple[tuple[Any, ...], str]] = {
    "repetition_penalty": ((None, 1, 1.0), "penalties are not implemented"),
    "frequency_penalty": ((None, 0, 0.0), "penalties are not implemented"),
    "presence_penalty": ((None, 0, 0.0), "penalties are not implemented"),
    "min_p": ((None, 0, 0.0), "min_p filtering is not implemented"),
    "typical_p": ((None, 1, 1.0), "typical sampling is not implemented"),
    "logit_bias": ((None, {}), "logit bias is not implemented"),
    "n": ((None, 1), "one completion per request is supported"),
    "best_of": ((None, 1), "one completion per request is supported"),
    "top_logprobs": ((None, 0), "only the log-probability of the chosen token is returned"),
}


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # exact unless a stop ends generation
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # 1.0 keeps every token
    seed: int | None = None  # None draws a fresh seed per request
    stop_token_ids: tuple[int, ...] = ()  # added to the model's end-of-sequence ids
    stop: tuple[str, ...] = ()  # stop strings; the returned text ends before the first one
    logprobs: bool = False  # return the target's log-probability of each returned token

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> SamplingParams:
        """Build from request fields (`max_tokens` is accepted for `max_new_tokens`).

        Unknown or unsupported options raise ValueError instead of being ignored.
        """
        fields = dict(fields)
        if "max_tokens" in fields:
            fields["max_new_tokens"] = fields.pop("max_tokens")
        for name, (neutral, reason) in UNSUPPORTED_OPTIONS.items():
            if name in fields and fields[name] not in neutral:
                raise ValueError(f"{name}={fields[name]!r} is not supported ({reason}); remove it")
            fields.pop(name, None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(
                f"unknown sampling options {unknown}; supported: {sorted(known | {'max_tokens'})}"
            )
        if isinstance(fields.get("stop"), str):
            fields["stop"] = (fields["stop"],)
        for name in ("stop", "stop_token_ids"):
            if name in fields:
                fields[name] = tuple(fields[name] or ())
        return cls(**fields)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Turn logits [..., vocab] into the sampling distribution: temperature, then top-k, top-p."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from a distribution [vocab].

    Request generators live on the CPU, so one seed gives the same draws on every device from
    the same probabilities. Probabilities on a GPU are copied to the CPU for the draw.
    """
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def accept_sampled(
    drafts: list[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> list[int]:
    """Run rejection sampling over one row's block; returns the committed tokens.

    drafts: the B - 1 draft tokens; target_probs: [B, vocab], row i the target distribution
    after block position i; draft_probs: [B - 1, vocab] proposal distributions, or None for
    argmax proposals (one-hot q, so d_i is accepted with probability p(d_i)).
    """
    committed: list[int] = []
    for i, token in enumerate(drafts):
        p = target_probs[i]
        q_token = 1.0 if draft_probs is None else float(draft_probs[i, token])
        accept_probability = min(1.0, float(p[token]) / q_token) if q_token > 0 else 0.0
        if float(torch.rand((), generator=generator)) < accept_probability:
            committed.append(token)
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[token] = 0.0
        else:
            residual = (p - draft_probs[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:
            residual = p  # only reachable through rounding when p and q coincide
        committed.append(sample(residual / residual.sum(), generator))
        return committed
    committed.append(sample(target_probs[len(drafts)], generator))
    return committed
