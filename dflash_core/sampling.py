"""Per-request sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # exact unless a stop token ends generation
    temperature: float = 0.0  # 0 means greedy
    stop_token_ids: tuple[int, ...] = ()  # added to the model's end-of-sequence ids

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature != 0.0:
            raise ValueError(
                f"temperature {self.temperature} is not supported yet; only greedy decoding "
                "(temperature 0) is implemented"
            )
