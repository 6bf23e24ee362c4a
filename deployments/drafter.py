"""The draft model as a separate Ray actor, and the Drafters that forward each step to it.

Per step the engine sends the actor a `DraftRequest` (the tapped target states of the tokens
committed since the last step, and the newest token per row). The actor appends them to its
draft KV cache, runs one draft pass and returns the output states
[batch, block_size - 1, hidden]; the engine applies the target's LM head to them. Hidden
states are vocab / hidden times smaller than logits (85 times for SmolLM2).

Two transports carry that exchange:

- `actor`: a plain Ray actor call per step (`RemoteDrafter`), through the object store;
- `compiled`: a Ray Compiled Graph (`CompiledGraphDrafter`), compiled once, whose messages go
  through shared-memory channels that are allocated once and reused every step.

The actor is created by the engine replica, so it shares the replica's fate, and it is placed
in the replica's placement group (bundle 1) when there is one.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from dataclasses import replace
from typing import TYPE_CHECKING

import ray
import torch
from ray.dag import DAGContext, InputNode
from ray.exceptions import GetTimeoutError, RayChannelTimeoutError, RayError, RayTaskError
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import nn

from deployments.logs import configure_worker_logging
from deployments.schemas import DEFAULT_TRANSPORT, TRANSPORTS, DrafterTransport
from dflash_core.draft import DraftModel, check_draft_fits_target
from dflash_core.drafting import DFlashDrafter, DraftHead, DraftRequest
from dflash_core.target import TargetModel

if TYPE_CHECKING:
    from ray.dag.compiled_dag_node import CompiledDAG

logger = logging.getLogger(__name__)

# The placement group bundle of the drafter actor. The engine replica takes bundle 0.
DRAFTER_BUNDLE_INDEX = 1


# Upper bound of the compiled graph's input channel. A request larger than this (several long
# prompts in one step, or one prompt of a wide target) is sent in several executions.
MAX_CHANNEL_BUFFER_BYTES = 64 * 1024**2
# Bytes allowed for serialization overhead per message, per row and per token id. The tests
# check the estimate against Ray's serializer.
MESSAGE_OVERHEAD_BYTES = 64 * 1024
ROW_OVERHEAD_BYTES = 1024
TOKEN_ID_BYTES = 8
# How long a failed draft waits for the graph's loop on the actor to report why it ended.
LOOP_ERROR_WAIT_S = 2.0


class DrafterError(RuntimeError):
    """A draft step failed in the drafter actor or on its way there and back."""


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
        device: str = "cpu",
    ) -> None:
        configure_worker_logging(log_level)
        torch.set_num_threads(threads)
        # The weights arrive on the CPU; on a GPU node Ray makes this actor's GPU cuda:0.
        self.device = torch.device(device)
        model, embed_tokens = model.to(self.device), embed_tokens.to(self.device)
        self.drafter = DFlashDrafter(model, embed_tokens, None, num_slots, max_seq_len, block_size)
        logger.info(
            "drafter actor ready (pid %d, %s): block_size %d, %d slots",
            os.getpid(),
            self.device,
            self.drafter.block_size,
            num_slots,
        )

    def config(self) -> tuple[int, tuple[int, ...]]:
        """Return `(block_size, target_layer_ids)`."""
        return self.drafter.block_size, self.drafter.target_layer_ids

    def draft_hidden(self, request: DraftRequest) -> torch.Tensor:
        """Draft from a request whose tensors are on the CPU; returns CPU states."""
        if self.device.type != "cpu":
            context = [rows.to(self.device) for rows in request.context]
            request = replace(request, context=context)
        return self.drafter.draft_hidden(request).cpu()

    def set_channel_buffer_bytes(self, num_bytes: int) -> None:
        """Set the size of the compiled-graph channels this process creates: the output's."""
        DAGContext.get_current().buffer_size_bytes = num_bytes


def copy_module_to(module: nn.Module, device: str | torch.device) -> nn.Module:
    """Return a copy of the module on `device`; the original stays where it is.

    Each parameter and buffer is copied straight to `device`, so a GPU module's copy for the
    CPU never needs a second copy on the GPU.
    """
    memo: dict[int, torch.Tensor] = {}
    for param in module.parameters():
        memo[id(param)] = nn.Parameter(param.detach().to(device, copy=True), param.requires_grad)
    for buffer in module.buffers():
        memo[id(buffer)] = buffer.to(device, copy=True)
    return copy.deepcopy(module, memo)


def cpu_copy(module: nn.Module) -> nn.Module:
    """Return the module if it is on the CPU, else `copy_module_to(module, "cpu")`."""
    if all(t.device.type == "cpu" for t in [*module.parameters(), *module.buffers()]):
        return module
    return copy_module_to(module, "cpu")


def compact_request(request: DraftRequest) -> DraftRequest:
    """Return the request on the CPU, each context tensor copied out of any larger tensor.

    The engine's context rows are slices of the verify pass's output for the whole batch, and
    pickling a slice sends the whole storage it views, once per row. Rows on a GPU are copied
    to the CPU (only the slice), because Ray sends CPU tensors between these processes.
    """
    return replace(request, context=[compact_rows(rows) for rows in request.context])


def compact_rows(rows: torch.Tensor) -> torch.Tensor:
    """Return the rows as a CPU tensor that owns exactly its own storage."""
    if rows.device.type != "cpu":
        return rows.cpu()  # copies only the slice
    if rows.untyped_storage().nbytes() == rows.nbytes:
        return rows
    return rows.clone()


def estimate_message_bytes(num_rows: int, num_tokens: int, context_bytes: int) -> int:
    """Estimate an upper bound on a serialized DraftRequest's size, in bytes."""
    return (
        MESSAGE_OVERHEAD_BYTES
        + num_rows * ROW_OVERHEAD_BYTES
        + num_tokens * TOKEN_ID_BYTES
        + context_bytes
    )


def _row_bytes(request: DraftRequest, row: int) -> int:
    tokens = len(request.context_tokens[row])
    return ROW_OVERHEAD_BYTES + tokens * TOKEN_ID_BYTES + request.context[row].nbytes


def _select_rows(request: DraftRequest, rows: list[int]) -> DraftRequest:
    return DraftRequest(
        slots=[request.slots[i] for i in rows],
        context_starts=[request.context_starts[i] for i in rows],
        context=[request.context[i] for i in rows],
        context_tokens=[request.context_tokens[i] for i in rows],
        last_tokens=[request.last_tokens[i] for i in rows],
    )


def split_request(request: DraftRequest, max_bytes: int) -> list[tuple[DraftRequest, bool]]:
    """Split a request into parts whose estimated serialized size is at most `max_bytes`.

    Returns `(part, keep)` pairs in the order they must run. Rows stay whole and in order
    where they fit. A row whose context alone is too large is sent as several one-row parts
    over consecutive token ranges, each appended at its own start. Only the last part's output
    is kept, because the earlier parts draft from a partial context. Concatenating the outputs
    of the kept parts gives the request's rows in order.
    """
    row_budget = max_bytes - MESSAGE_OVERHEAD_BYTES
    parts: list[tuple[DraftRequest, bool]] = []
    group: list[int] = []
    group_bytes = 0
    for row in range(len(request.slots)):
        if _row_bytes(request, row) > row_budget:
            if group:
                parts.append((_select_rows(request, group), True))
                group, group_bytes = [], 0
            *prefixes, last = _split_row(request, row, row_budget)
            parts.extend((prefix, False) for prefix in prefixes)
            parts.append((last, True))
            continue
        if group and group_bytes + _row_bytes(request, row) > row_budget:
            parts.append((_select_rows(request, group), True))
            group, group_bytes = [], 0
        group.append(row)
        group_bytes += _row_bytes(request, row)
    if group:
        parts.append((_select_rows(request, group), True))
    return parts


def _split_row(request: DraftRequest, row: int, row_budget: int) -> list[DraftRequest]:
    context = request.context[row]  # [new_tokens, n * hidden]
    token_bytes = context.nbytes // context.shape[0] + TOKEN_ID_BYTES
    tokens_per_part = (row_budget - ROW_OVERHEAD_BYTES) // token_bytes
    if tokens_per_part < 1:
        raise ValueError(
            f"one token's context ({token_bytes} bytes) is larger than the message limit of "
            f"{row_budget + MESSAGE_OVERHEAD_BYTES} bytes; raise input_buffer_bytes"
        )
    parts = []
    for begin in range(0, context.shape[0], tokens_per_part):
        end = begin + tokens_per_part
        part = DraftRequest(
            slots=[request.slots[row]],
            context_starts=[request.context_starts[row] + begin],
            # clone: a slice would pickle the whole prompt's storage.
            context=[context[begin:end].clone()],
            context_tokens=[request.context_tokens[row][begin:end]],
            last_tokens=[request.last_tokens[row]],
        )
        parts.append(part)
    return parts


class RemoteDrafter:
    """Implements the `Drafter` protocol by calling a DrafterActor once per step.

    `draft` raises DrafterError when the actor fails, dies or returns nothing within
    `timeout_s` (None waits until it returns or dies), and the engine loop fails that step's
    requests. `close` kills the actor; call it once `draft` is no longer called.
    """

    transport: DrafterTransport = "actor"

    def __init__(
        self,
        actor: ray.actor.ActorHandle,
        lm_head: nn.Linear,
        vocab_ids: tuple[int, ...] = (),
        timeout_s: float | None = None,
    ) -> None:
        self.actor = actor
        self.head = DraftHead(lm_head, vocab_ids)
        self.timeout_s = timeout_s
        self.block_size, self.target_layer_ids = ray.get(actor.config.remote())
        self.closed = False

    @torch.inference_mode()
    def draft(self, request: DraftRequest) -> torch.Tensor:
        if self.closed:
            raise DrafterError("the drafter is closed; the engine must not draft after close()")
        # NOTE: the engine does not fall back to plain decoding when the drafter fails.
        hidden = self.draft_hidden(compact_request(request))  # [batch, B - 1, hidden], CPU
        return self.head(hidden.to(self.head.weight.device))

    def draft_hidden(self, request: DraftRequest) -> torch.Tensor:
        """Return the actor's output states [batch, block_size - 1, hidden] for a request."""
        try:
            return ray.get(self.actor.draft_hidden.remote(request), timeout=self.timeout_s)
        except GetTimeoutError as error:
            raise DrafterError(
                f"the drafter actor did not return a draft within {self.timeout_s} s"
            ) from error
        except RayError as error:
            raise DrafterError(
                f"draft step failed in the drafter actor: {type(error).__name__}: {error}"
            ) from error

    def close(self) -> None:
        """Kill the drafter actor; calling it again does nothing."""
        if self.closed:
            return
        self.closed = True
        ray.kill(self.actor)
        logger.info("drafter actor killed (%s transport)", self.transport)


class CompiledGraphDrafter(RemoteDrafter):
    """Implements the `Drafter` protocol through a Ray Compiled Graph over a DrafterActor.

    The graph is one node, the actor's `draft_hidden`, fed by the graph's input. Ray's
    `CompiledDAG.execute` is not thread-safe, so the graph is compiled on the first `draft`
    call and only that thread (the engine's scheduler loop) may draft afterwards.

    Both channels live in Ray's shared-memory object store, one buffer each, allocated at
    compile time. The input has room for `input_buffer_bytes`, and larger requests are split
    (see `split_request`) because Ray 2.60 grows a channel for an oversized message but never
    frees the old buffer. The output has room for `output_buffer_bytes`, enough for every
    slot's states.

    After the actor dies, a channel fails or a step times out, the graph is unusable and every
    later `draft` raises DrafterError at once. An exception raised by the draft pass itself
    fails only that step.

    NOTE: on GPUs the output states could go over NCCL with `with_tensor_transport`, but not the
    input: Ray does not let a graph's input use NCCL, because the engine replica that executes
    the graph is not an actor of it. That needs the verifier actors to feed the drafter.
    """

    transport: DrafterTransport = "compiled"

    def __init__(
        self,
        actor: ray.actor.ActorHandle,
        lm_head: nn.Linear,
        vocab_ids: tuple[int, ...] = (),
        timeout_s: float | None = None,
        *,
        input_buffer_bytes: int,
        output_buffer_bytes: int,
    ) -> None:
        smallest = estimate_message_bytes(1, 1, 0)
        if input_buffer_bytes <= smallest:
            raise ValueError(
                f"input_buffer_bytes {input_buffer_bytes} leaves no room for context; "
                f"use more than {smallest} bytes plus one token's context"
            )
        super().__init__(actor, lm_head, vocab_ids, timeout_s)
        self.input_buffer_bytes = input_buffer_bytes
        self.output_buffer_bytes = output_buffer_bytes
        self.graph: CompiledDAG | None = None
        self.graph_thread: int | None = None  # threading.get_ident() of the compiling thread
        self.failure: str | None = None  # why the graph stopped, once it has

    def draft_hidden(self, request: DraftRequest) -> torch.Tensor:
        if self.failure is not None:
            raise DrafterError(f"the drafter's compiled graph failed earlier: {self.failure}")
        graph = self._graph_for_this_thread()
        outputs = []
        for part, keep in split_request(request, self.input_buffer_bytes):
            hidden = self._execute(graph, part)  # [rows, B - 1, hidden]
            if keep:
                outputs.append(hidden)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def close(self) -> None:
        """Tear down the compiled graph, then kill the drafter actor; calling it again does nothing.

        Call it from any thread once the scheduler loop has stopped drafting.
        """
        if self.closed:
            return
        self.teardown_graph()
        super().close()

    def teardown_graph(self) -> None:
        """Tear down the compiled graph and keep the actor; the next `draft` compiles a new one.

        In Ray 2.60 the actor's graph loop busy-waits for input and uses most of a CPU core even
        while the engine is idle, so an engine without work can call this to free that core.
        """
        if self.graph is None:
            return
        self.graph.teardown()
        self.graph = None
        self.graph_thread = None
        logger.info("drafter compiled graph torn down")

    def _graph_for_this_thread(self) -> CompiledDAG:
        thread = threading.get_ident()
        if self.graph is None:
            try:
                self.graph = self._compile()
            except RayError as error:
                self.failure = f"{type(error).__name__} while compiling: {error}"
                raise DrafterError(
                    f"compiling the drafter's graph failed: {self.failure}"
                ) from error
            self.graph_thread = thread
        elif thread != self.graph_thread:
            raise RuntimeError(
                f"the drafter's compiled graph was compiled in thread {self.graph_thread} and "
                f"only that thread may execute it, but draft was called from thread {thread}; "
                "call draft from the engine's scheduler loop only"
            )
        return self.graph

    def _compile(self) -> CompiledDAG:
        # Ray 2.60 sizes a channel from the DAGContext of the process that allocates it, the
        # writer's, and ignores the graph's own size: the actor's for the output, this
        # process's for the input, which is set only while compiling.
        ray.get(self.actor.set_channel_buffer_bytes.remote(self.output_buffer_bytes))
        with InputNode() as request:
            hidden = self.actor.draft_hidden.bind(request)
        context = DAGContext.get_current()
        default_bytes = context.buffer_size_bytes
        context.buffer_size_bytes = self.input_buffer_bytes
        try:
            # One execution in flight: each draft waits for its result before the next.
            graph = hidden.experimental_compile(_max_inflight_executions=1)
        finally:
            context.buffer_size_bytes = default_bytes
        logger.info(
            "drafter compiled graph ready: input channel %d bytes, output channel %d bytes",
            self.input_buffer_bytes,
            self.output_buffer_bytes,
        )
        return graph

    def _execute(self, graph: CompiledDAG, request: DraftRequest) -> torch.Tensor:
        try:
            # -1 waits until the result comes or Ray tears the graph down (the actor died).
            return graph.execute(request).get(
                timeout=-1 if self.timeout_s is None else self.timeout_s
            )
        except RayTaskError as error:
            # Raised by draft_hidden on the actor, which keeps running the graph.
            raise DrafterError(
                f"draft step failed in the drafter actor: {type(error).__name__}: {error}"
            ) from error
        except RayChannelTimeoutError as error:
            # The graph allows one execution in flight, and the late one is never read.
            self.failure = f"timed out after {self.timeout_s} s waiting for a draft"
            raise DrafterError(f"the drafter actor {self.failure}") from error
        except RayError as error:
            # The actor died or a channel closed, so Ray tears the graph down. A closed channel
            # hides the cause, which the actor's graph loop returns.
            cause = _graph_loop_error(graph) or error
            self.failure = f"{type(cause).__name__}: {cause}"
            raise DrafterError(
                f"draft step failed over the compiled graph: {self.failure}"
            ) from error


def _graph_loop_error(graph: CompiledDAG) -> RayError | None:
    """Return the error that ended the graph's loop on the actor, or None if it still runs."""
    loops = list(graph.worker_task_refs.values())
    finished, _ = ray.wait(loops, num_returns=len(loops), timeout=LOOP_ERROR_WAIT_S)
    for loop in finished:
        try:
            ray.get(loop)
        except RayError as error:
            return error
    return None


def channel_buffer_bytes(
    draft: DraftModel,
    target: TargetModel,
    *,
    num_slots: int,
    max_seq_len: int,
    block_size: int,
) -> tuple[int, int]:
    """Return the compiled graph's `(input, output)` channel sizes in bytes.

    The input has room for one row whose context is a whole `max_seq_len` prompt, up to
    MAX_CHANNEL_BUFFER_BYTES. The output has room for the draft's states of every slot.
    """
    context_bytes = max_seq_len * draft.fc.in_features * target.dtype.itemsize
    input_bytes = min(
        estimate_message_bytes(1, max_seq_len, context_bytes), MAX_CHANNEL_BUFFER_BYTES
    )
    # A slice of the draft's [batch, block_size, hidden] output pickles its whole storage.
    states_bytes = num_slots * block_size * draft.fc.out_features * draft.dtype.itemsize
    return input_bytes, MESSAGE_OVERHEAD_BYTES + states_bytes


def start_drafter_actor(
    draft: DraftModel,
    target: TargetModel,
    *,
    num_slots: int,
    max_seq_len: int,
    block_size: int | None,
    num_cpus: float,
    threads: int,
    transport: DrafterTransport = DEFAULT_TRANSPORT,
    timeout_s: float | None = None,
    input_buffer_bytes: int | None = None,
    num_gpus: float = 0,
) -> RemoteDrafter:
    """Create a DrafterActor for this draft and target, and return the Drafter that calls it.

    `transport` picks plain actor calls (`RemoteDrafter`) or a compiled graph
    (`CompiledGraphDrafter`, compiled on its first `draft` call). `timeout_s` bounds each draft
    step, None waits until the actor returns or dies. `input_buffer_bytes` overrides the
    compiled graph's input channel size (see `channel_buffer_bytes`). The draft weights and the
    embedding table are pickled to the actor once, here. Call `close()` on the result before
    the engine goes away. With `num_gpus` the actor reserves a GPU and runs the draft there.
    The draft and the embedding table are sent as CPU copies, so `draft` stays unchanged.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown drafter transport {transport!r}; use one of {TRANSPORTS}")
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
            num_gpus=num_gpus,
            scheduling_strategy=scheduling,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},
        )
        .remote(
            cpu_copy(draft),
            cpu_copy(target.embed_tokens),
            num_slots,
            max_seq_len,
            block_size,
            threads,
            logging.getLevelName(logger.getEffectiveLevel()),
            "cuda" if num_gpus else "cpu",
        )
    )
    logger.info(
        "started drafter actor (num_cpus %g, num_gpus %g, placement group %s, %s transport)",
        num_cpus,
        num_gpus,
        None if placement_group is None else placement_group.id.hex(),
        transport,
    )
    vocab_ids = draft.config.draft_vocab_ids
    if transport == "actor":
        return RemoteDrafter(actor, target.lm_head, vocab_ids, timeout_s)
    input_bytes, output_bytes = channel_buffer_bytes(
        draft,
        target,
        num_slots=num_slots,
        max_seq_len=max_seq_len,
        block_size=block_size or draft.config.block_size,
    )
    return CompiledGraphDrafter(
        actor,
        target.lm_head,
        vocab_ids,
        timeout_s,
        input_buffer_bytes=input_buffer_bytes or input_bytes,
        output_buffer_bytes=output_bytes,
    )
