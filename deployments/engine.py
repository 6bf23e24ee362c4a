"""The engine replica: one target model, its draft and the continuous-batching loop.

A request lives its whole life on one replica. The replica tokenizes it, queues it on its
`EngineLoop` and streams the committed output back to the caller (the ingress) through a
streaming DeploymentHandle. The draft model runs in the replica's process (colocated) or in a
drafter actor in the replica's placement group. With `tp` > 1 the replica is rank 0 of the
tensor-parallel target and starts verifier actors for the other ranks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from functools import partial
from typing import Literal

import torch
from pydantic import BaseModel, Field
from ray import serve
from transformers import PreTrainedTokenizerBase

from deployments.drafter import start_drafter_actor
from deployments.engine_loop import EngineLoop
from deployments.logs import configure_worker_logging
from deployments.schemas import (
    DEFAULT_TRANSPORT,
    DrafterTransport,
    EngineStepError,
    EngineStoppedError,
    GenerationRequest,
    InvalidRequestError,
    StreamChunk,
)
from deployments.verifier import TensorParallelVerifiers, start_verifiers
from dflash_core.cli import DEFAULT_MAX_BATCH_SIZE, MAX_BLOCK_SIZE
from dflash_core.draft import DraftModel
from dflash_core.engine import SpeculativeEngine
from dflash_core.fetch import DEFAULT_MODEL
from dflash_core.pipeline import (
    AUTO_DRAFT,
    DEFAULT_BLOCK_SIZE,
    DTYPES,
    RANDOM_DRAFT,
    LoadedTarget,
    build_draft,
    build_engine,
    encode_prompt,
    load_target_and_tokenizer,
    resolve_device,
)
from dflash_core.sampling import SamplingParams
from dflash_core.scheduler import Request, Scheduler

logger = logging.getLogger(__name__)


class EngineConfig(BaseModel):
    """Model specs and KV cache sizes of one engine replica."""

    model: str = Field(
        default=DEFAULT_MODEL,
        description="Target model: a known name, a .gguf file or a Hugging Face folder.",
    )
    draft: str | None = Field(
        default=AUTO_DRAFT,
        description=f"Draft checkpoint folder, {AUTO_DRAFT!r} for the draft shipped with the "
        f"target (plain decoding if none ships), {RANDOM_DRAFT!r} for a randomly initialised "
        "draft, or None for plain decoding with the target alone.",
    )
    block_size: int | None = Field(
        default=None,
        ge=2,
        le=MAX_BLOCK_SIZE,
        description="Draft block size in tokens; None uses the draft's own.",
    )
    max_batch_size: int = Field(
        default=DEFAULT_MAX_BATCH_SIZE,
        ge=1,
        description="Sequences decoded together: the number of KV cache slots.",
    )
    max_seq_len: int | None = Field(
        default=None,
        ge=2,
        description="Tokens per KV cache slot (prompt + max_tokens + block_size must fit); "
        "None sizes slots for the model's full context.",
    )
    dtype: str = Field(default="float32", description=f"One of {', '.join(DTYPES)}.")
    device: Literal["cpu", "cuda"] = Field(
        default="cpu",
        description="Where the replica, its drafter actor and its verifier actors run the "
        "models; with cuda each reserves one GPU (a colocated draft shares the replica's).",
    )
    threads: int = Field(default=1, ge=1, description="torch CPU threads in the replica.")
    colocated: bool = Field(
        default=True,
        description="Run the draft in the replica's process; False runs it in a drafter actor.",
    )
    drafter_num_cpus: float = Field(
        default=1.0, gt=0, description="CPUs of the drafter actor when not colocated."
    )
    drafter_transport: DrafterTransport = Field(
        default=DEFAULT_TRANSPORT,
        description="How the replica calls its drafter actor each step: 'actor' (plain actor "
        "calls) or 'compiled' (a Ray Compiled Graph); see docs/serving-measurements.md.",
    )
    tp: int = Field(
        default=1,
        ge=1,
        description="Tensor-parallel ranks of the target: the replica is rank 0 and starts a "
        "verifier actor for each other rank. At most the target's key/value heads.",
    )
    verifier_num_cpus: float = Field(
        default=1.0, gt=0, description="CPUs of each verifier actor when tp > 1."
    )
    log_level: str = Field(default="INFO", description="Level of the replica's project logs.")


def encode_request(tokenizer: PreTrainedTokenizerBase, request: GenerationRequest) -> list[int]:
    """Tokenize the prompt or the messages of a request; raises ValueError for empty input."""
    if (request.prompt is None) == (request.messages is None):
        raise ValueError("set exactly one of prompt and messages")
    if request.messages is not None:
        if not request.messages:
            raise ValueError("messages is empty: send at least one message")
        if request.raw_prompt:
            raise ValueError("raw_prompt applies to prompt only; remove it or send a prompt")
        if not tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template; send a prompt")
        ids = tokenizer.apply_chat_template(
            [message.model_dump() for message in request.messages],
            add_generation_prompt=True,
            tokenize=True,
        )
        # transformers 5 returns a BatchEncoding here, older releases a plain list.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    if not request.prompt:
        raise ValueError("the prompt is empty: send at least one character")
    return encode_prompt(tokenizer, request.prompt, chat_template=not request.raw_prompt)


def load_engine(
    config: EngineConfig,
) -> tuple[LoadedTarget, SpeculativeEngine, TensorParallelVerifiers | None]:
    """Load the target and the draft, and build the engine with a colocated or remote drafter.

    With `tp` > 1 the target is sharded over this process and verifier actors, which the
    caller closes when the engine stops.
    """
    resolve_device(config.device)  # fails now, not after the verifier actors have loaded
    # With tp > 1 the whole target is loaded on the CPU and only the shards move to the GPUs.
    load_device = config.device if config.tp == 1 else "cpu"
    target = load_target_and_tokenizer(config.model, config.dtype, load_device)
    # The placement group has a drafter bundle whenever the config requests a drafter actor,
    # even if `draft="auto"` finds no shipped draft. The verifier bundles come after it.
    separate_drafter = not config.colocated and config.draft is not None
    draft = None
    if config.draft is not None:
        block_size = config.block_size or DEFAULT_BLOCK_SIZE
        # A drafter actor gets a CPU copy anyway, so its draft is loaded on the CPU.
        draft_device = "cpu" if separate_drafter else target.model.device
        draft = build_draft(
            config.draft, target, block_size=block_size, dtype=config.dtype, device=draft_device
        )
    block_size = config.block_size or (draft.config.block_size if draft else 1)
    max_seq_len = config.max_seq_len or (target.model.config.max_position_embeddings + block_size)
    verifiers = None
    if config.tp > 1:
        verifiers = start_verifiers(
            target.model,
            target.folder,
            tp=config.tp,
            dtype=config.dtype,
            num_cpus=config.verifier_num_cpus,
            threads=config.threads,
            separate_drafter=separate_drafter,
            device=config.device,
        )
        # Rank 0 keeps only its shard, so the whole model is freed here.
        target = replace(target, model=verifiers.target)
        if draft is not None and config.colocated:
            draft = draft.to(target.model.device)
    try:
        return target, build_engine_on(target, draft, config, max_seq_len), verifiers
    except BaseException:
        if verifiers is not None:
            verifiers.close()
        raise


def build_engine_on(
    target: LoadedTarget, draft: DraftModel | None, config: EngineConfig, max_seq_len: int
) -> SpeculativeEngine:
    """Build the engine with the draft in this process or in a drafter actor."""
    if config.colocated or draft is None:
        engine = build_engine(
            target,
            draft,
            max_seq_len=max_seq_len,
            num_slots=config.max_batch_size,
            block_size=config.block_size,
        )
    else:
        drafter = start_drafter_actor(
            draft,
            target.model,
            num_slots=config.max_batch_size,
            max_seq_len=max_seq_len,
            block_size=config.block_size,
            num_cpus=config.drafter_num_cpus,
            threads=config.threads,
            transport=config.drafter_transport,
            num_gpus=1 if config.device == "cuda" else 0,
        )
        engine = SpeculativeEngine(
            target.model,
            drafter,
            max_seq_len=max_seq_len,
            num_slots=config.max_batch_size,
            eos_token_ids=target.eos_token_ids,
            decode=partial(target.tokenizer.decode, skip_special_tokens=True),
        )
    return engine


@serve.deployment(name="DFlashEngine")
class DFlashEngine:
    """A Serve replica holding one speculative engine; the ingress calls it by handle."""

    def __init__(self, config: EngineConfig) -> None:
        configure_worker_logging(config.log_level)
        torch.set_num_threads(config.threads)
        logger.info(
            "loading engine: %s (OMP_NUM_THREADS=%s)",
            config.model_dump(),
            os.environ.get("OMP_NUM_THREADS"),
        )
        target, engine, self.verifiers = load_engine(config)
        self.tokenizer = target.tokenizer
        # A compiled graph's actor busy-waits while idle; tear its graph down when there is no
        # work (the next request compiles it again). Other drafters have nothing to free.
        self.loop = EngineLoop(
            Scheduler(engine), on_idle=getattr(engine.drafter, "teardown_graph", None)
        )
        logger.info(
            "engine ready: block_size %d, %d slots of max_seq_len %d",
            engine.block_size,
            engine.num_slots,
            engine.max_seq_len,
        )

    def _make_request(self, request: GenerationRequest) -> Request:
        params = SamplingParams.from_dict(request.sampling_fields())
        return Request(request.request_id, encode_request(self.tokenizer, request), params)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """Yield the request's output as it is committed.

        The last chunk carries the result, or the error that ended the request. Errors are
        sent as values because Serve logs a traceback for every exception a replica raises,
        and the ingress logs each failure once.
        """
        try:
            async for chunk in self.loop.stream(
                request.request_id, lambda: self._make_request(request)
            ):
                yield chunk
        except (InvalidRequestError, EngineStepError, EngineStoppedError) as error:
            yield StreamChunk(text="", error=error)

    async def generate(self, request: GenerationRequest) -> StreamChunk:
        """Run the request to completion; returns one chunk with the whole output and result."""
        text, token_ids = [], []
        async for chunk in self.generate_stream(request):
            text.append(chunk.text)
            token_ids.extend(chunk.token_ids)
            if chunk.result is not None or chunk.error is not None:
                return StreamChunk("".join(text), token_ids, chunk.result, chunk.error)
        raise RuntimeError(f"request {request.request_id}: the stream ended without a result")

    def stats(self) -> dict[str, int]:
        """Return request counts: held now (queued, waiting or running) and cancelled so far."""
        return {"num_requests": self.loop.num_requests, "num_cancelled": self.loop.num_cancelled}

    def check_health(self) -> None:
        """Called by Serve; an exception marks the replica unhealthy, so Serve replaces it."""
        self.loop.check_alive()
        if self.verifiers is not None:
            self.verifiers.check_alive()

    def __del__(self) -> None:
        # The loop thread stops first: it is the only other caller of the verifier group.
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()
            # Only the loop thread drafts, so the drafter actor and its compiled graph can stop now.
            close_drafter = getattr(loop.scheduler.engine.drafter, "close", None)
            if close_drafter is not None:
                close_drafter()
        verifiers = getattr(self, "verifiers", None)
        if verifiers is not None:
            verifiers.close()
