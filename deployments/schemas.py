"""Requests the ingress sends an engine replica, the chunks it streams back, and errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

from dflash_core.sequence import GenerationResult

# Transports between an engine replica and its drafter actor, defined here so the CLI needs no Ray.
DrafterTransport = Literal["actor", "compiled"]
TRANSPORTS: tuple[DrafterTransport, ...] = ("actor", "compiled")
# Actor calls were faster per decode step on 2 shared CPU cores, because a compiled graph's
# readers busy-wait (docs/serving-measurements.md, scripts/measure_drafter_actor.py).
DEFAULT_TRANSPORT: DrafterTransport = "actor"


class ChatMessage(BaseModel):
    role: str = Field(description='Message author: "system", "user" or "assistant".')
    content: str = Field(description="Message text.")


class GenerationRequest(BaseModel):
    """One generation request, independent of the wire protocol that carried it.

    Unset sampling fields (None) take the defaults of `dflash_core.sampling.SamplingParams`.
    """

    request_id: str = Field(description="Id used in logs and returned with the result.")
    prompt: str | None = Field(default=None, description="Prompt text; exclusive with messages.")
    raw_prompt: bool = Field(
        default=False,
        description="Tokenize the prompt as plain text instead of a user message through the "
        "chat template.",
    )
    messages: list[ChatMessage] | None = Field(
        default=None, description="A conversation formatted with the chat template."
    )
    max_tokens: int | None = Field(default=None, description="Tokens to generate at most.")
    temperature: float | None = Field(default=None, description="0 is greedy decoding.")
    top_p: float | None = Field(default=None, description="Nucleus sampling mass, in (0, 1].")
    top_k: int | None = Field(default=None, description="Most likely tokens kept; 0 keeps all.")
    seed: int | None = Field(default=None, description="Sampling seed; None draws a fresh one.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    stop_token_ids: list[int] = Field(
        default_factory=list, description="Token ids that end generation besides the EOS ids."
    )
    # Not implemented: passed on so that SamplingParams rejects values other than neutral.
    presence_penalty: float | None = Field(default=None, description="Not supported.")
    frequency_penalty: float | None = Field(default=None, description="Not supported.")
    repetition_penalty: float | None = Field(default=None, description="Not supported.")

    def sampling_fields(self) -> dict[str, Any]:
        """Return the sampling fields that are set, for `SamplingParams.from_dict`."""
        fields = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
        }
        out = {name: value for name, value in fields.items() if value is not None}
        if self.stop:
            out["stop"] = tuple(self.stop)
        if self.stop_token_ids:
            out["stop_token_ids"] = tuple(self.stop_token_ids)
        return out


@dataclass(frozen=True)
class StreamChunk:
    """Text and token ids committed since the previous chunk.

    The last chunk carries the result, or the error that ended the request. The concatenated
    `text` of all chunks equals `result.text`, and the concatenated `token_ids` equal
    `result.token_ids`.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    result: GenerationResult | None = None
    error: Exception | None = None


class InvalidRequestError(ValueError):
    """A request that can never run: bad option, empty or too long prompt. Not retryable."""


class EngineStepError(RuntimeError):
    """A decode step failed, which failed every request in that step's batch."""


class EngineStoppedError(RuntimeError):
    """The replica's decode loop is not running, so it takes no requests."""
