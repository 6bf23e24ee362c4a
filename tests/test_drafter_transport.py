"""The drafter actor's two transports, plain actor calls and a Ray Compiled Graph, on CPU.

A local Ray cluster with fractional CPUs runs the drafter actors of a tiny random target. Every
transport must give the same greedy tokens as the drafter in this process, and a dead actor
must fail the draft with DrafterError, not hang.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch

from deployments.drafter import (
    MESSAGE_OVERHEAD_BYTES,
    DrafterError,
    RemoteDrafter,
    compact_request,
    copy_module_to,
    cpu_copy,
    estimate_message_bytes,
    split_request,
    start_drafter_actor,
)
from deployments.engine_loop import EngineLoop
from deployments.schemas import EngineStepError
from dflash_core.draft import draft_config_for_target, new_draft_model
from dflash_core.drafting import DFlashDrafter, DraftRequest
from dflash_core.engine import SpeculativeEngine
from dflash_core.sampling import SamplingParams
from dflash_core.scheduler import Request, Scheduler
from tests.helpers import VOCAB, random_target

MAX_SEQ_LEN = 1400
NUM_SLOTS = 3
BLOCK_SIZE = 4
MAX_TOKENS = 16
# 1200 tokens of 2 tapped layers x 128 floats: a 1.2 MB message, above Ray's default 1 MB
# channel buffer.
LONG_PROMPT_LEN = 1200
# Fails a test that hangs instead of raising.
HANG_TIMEOUT_S = 60


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024**2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return random_target(
        tmp_path_factory.mktemp("llama"),
        "llama",
        hidden_size=128,
        intermediate_size=256,
        max_position_embeddings=MAX_SEQ_LEN,
    )


@pytest.fixture(scope="module")
def draft(target):
    config = draft_config_for_target(
        target.config, num_layers=2, block_size=BLOCK_SIZE, mask_token_id=VOCAB - 1
    )
    # A larger init than training's makes the random draft's guesses more varied.
    return new_draft_model(config, seed=0, std=0.2)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 17, 40, LONG_PROMPT_LEN]
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def start(draft, target, transport: str, **options) -> RemoteDrafter:
    return start_drafter_actor(
        draft,
        target,
        num_slots=NUM_SLOTS,
        max_seq_len=MAX_SEQ_LEN,
        block_size=None,
        num_cpus=0.1,
        threads=1,
        transport=transport,
        **options,
    )


def engine_with(target, drafter) -> SpeculativeEngine:
    return SpeculativeEngine(target, drafter, max_seq_len=MAX_SEQ_LEN, num_slots=NUM_SLOTS)


def greedy_outputs(engine: SpeculativeEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=MAX_TOKENS)
    return [engine.generate(prompt, params).token_ids for prompt in prompts]


def batched_outputs(engine: SpeculativeEngine, prompts: list[list[int]]) -> list[list[int]]:
    requests = [
        Request(str(i), prompt, SamplingParams(max_new_tokens=MAX_TOKENS - i))
        for i, prompt in enumerate(prompts)
    ]
    return [result.token_ids for result in Scheduler(engine).run(requests)]


@pytest.fixture(scope="module")
def colocated(target, draft) -> SpeculativeEngine:
    drafter = DFlashDrafter.for_target(draft, target, NUM_SLOTS, MAX_SEQ_LEN)
    return engine_with(target, drafter)


@pytest.fixture(scope="module")
def remote_drafters(target, draft):
    drafters = {transport: start(draft, target, transport) for transport in ("actor", "compiled")}
    yield drafters
    for drafter in drafters.values():
        drafter.close()


def draft_request(prompt: list[int], slot: int = 0) -> DraftRequest:
    """A request that opens a sequence: the prompt's context features are random."""
    width = 2 * 128  # two tapped target layers of hidden size 128
    return DraftRequest(
        slots=[slot],
        context_starts=[0],
        context=[torch.randn(len(prompt), width)],
        context_tokens=[prompt],
        last_tokens=[prompt[-1]],
    )


def actor_died(actor: ray.actor.ActorHandle) -> bool:
    """Wait for a killed actor to go: ray.kill returns before it is gone."""
    deadline = time.monotonic() + HANG_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            ray.get(actor.config.remote(), timeout=HANG_TIMEOUT_S)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.1)
    return False


def test_transports_match_colocated_greedy(target, colocated, remote_drafters, prompts):
    expected = greedy_outputs(colocated, prompts)
    for transport, drafter in remote_drafters.items():
        outputs = greedy_outputs(engine_with(target, drafter), prompts)
        for prompt, output, reference in zip(prompts, outputs, expected):
            assert output == reference, f"{transport} transport, prompt of {len(prompt)} tokens"


def test_transports_match_colocated_batched(target, colocated, remote_drafters, prompts):
    expected = batched_outputs(colocated, prompts)
    for transport, drafter in remote_drafters.items():
        outputs = batched_outputs(engine_with(target, drafter), prompts)
        assert outputs == expected, f"{transport} transport"


def test_compiled_graph_keeps_buffer_on_long_prompt(remote_drafters, prompts):
    drafter = remote_drafters["compiled"]
    assert drafter.input_buffer_bytes > 1_000_000, "the long prompt must need more than 1 MB"
    parts = split_request(compact_request(draft_request(prompts[-1])), drafter.input_buffer_bytes)
    assert len(parts) == 1, "a whole max_seq_len prompt fits the sized input channel"


@pytest.mark.slow
def test_small_channel_splits_and_matches(target, draft, colocated, prompts):
    # 64 KiB of message overhead plus 200 tokens of 1 KiB: the long prompt takes 7 parts.
    drafter = start(draft, target, "compiled", input_buffer_bytes=MESSAGE_OVERHEAD_BYTES + 210_000)
    try:
        assert batched_outputs(engine_with(target, drafter), prompts) == batched_outputs(
            colocated, prompts
        )
    finally:
        drafter.close()


def test_split_request_parts_in_order():
    rows = [[1, 2, 3], list(range(100)), [4, 5]]
    requests = [draft_request(prompt, slot) for slot, prompt in enumerate(rows)]
    request = DraftRequest(
        slots=[0, 1, 2],
        context_starts=[0, 7, 0],
        context=[r.context[0] for r in requests],
        context_tokens=rows,
        last_tokens=[3, 99, 5],
    )
    max_bytes = estimate_message_bytes(1, 30, 30 * 256 * 4)
    parts = split_request(request, max_bytes)
    assert [(part.slots, keep) for part, keep in parts] == [
        ([0], True),
        ([1], False),
        ([1], False),
        ([1], False),
        ([1], True),
        ([2], True),
    ]
    long_parts = [part for part, _ in parts if part.slots == [1]]
    assert [part.context_starts[0] for part in long_parts] == [7, 37, 67, 97]
    assert torch.equal(torch.cat([part.context[0] for part in long_parts]), request.context[1])
    assert sum((part.context_tokens[0] for part in long_parts), []) == rows[1]
    for part, _ in parts:
        tokens = sum(len(t) for t in part.context_tokens)
        context_bytes = sum(c.nbytes for c in part.context)
        assert estimate_message_bytes(len(part.slots), tokens, context_bytes) <= max_bytes


def test_message_estimate_bounds_ray_serialization(prompts):
    # A channel grows, and leaks its old buffer, only when Ray's serialized message is larger
    # than the buffer, so the estimate that splits requests must bound it.
    serializer = ray._private.worker.global_worker.get_serialization_context()
    rows = [draft_request(prompt, slot) for slot, prompt in enumerate(prompts[:3])]
    batch = DraftRequest(
        slots=[0, 1, 2],
        context_starts=[5, 9, 0],
        context=[r.context[0] for r in rows],
        context_tokens=[r.context_tokens[0] for r in rows],
        last_tokens=[1, 2, 3],
    )
    for request in (draft_request(prompts[-1]), batch):
        serialized = serializer.serialize(compact_request(request))
        size = serialized.total_bytes + len(serialized.metadata)
        tokens = sum(len(t) for t in request.context_tokens)
        context_bytes = sum(c.nbytes for c in request.context)
        assert size <= estimate_message_bytes(len(request.slots), tokens, context_bytes)


def test_compact_request_copies_views_only():
    verified = torch.randn(2, 4, 8)  # [batch, block_size, n * hidden], as the verify pass gives
    own = torch.randn(3, 8)
    request = DraftRequest([0, 1], [0, 0], [verified[1, :2], own], [[1, 2], [3, 4, 5]], [2, 5])
    compact = compact_request(request)
    assert compact.context[0].untyped_storage().nbytes() == 2 * 8 * 4
    assert torch.equal(compact.context[0], verified[1, :2])
    assert compact.context[1] is own


def test_copy_module_to_leaves_the_original(draft):
    copied = copy_module_to(draft, "cpu")
    assert copied is not draft
    assert copied.config == draft.config
    originals = dict(draft.named_parameters())
    for name, param in copied.named_parameters():
        assert torch.equal(param, originals[name]), name
        assert param.data_ptr() != originals[name].data_ptr(), name  # its own storage
    with torch.no_grad():
        next(copied.parameters()).add_(1.0)
    assert not torch.equal(next(copied.parameters()), next(draft.parameters()))
    assert cpu_copy(draft) is draft  # already on the CPU: sent as it is


def test_failed_draft_pass_keeps_compiled_graph(remote_drafters, prompts):
    drafter = remote_drafters["compiled"]
    with pytest.raises(DrafterError, match="failed in the drafter actor"):
        drafter.draft(draft_request(prompts[0], slot=NUM_SLOTS + 5))
    logits = drafter.draft(draft_request(prompts[0]))
    assert logits.shape == (1, BLOCK_SIZE - 1, VOCAB)


def test_compiled_draft_from_other_thread_rejected(remote_drafters, prompts):
    drafter = remote_drafters["compiled"]
    drafter.draft(draft_request(prompts[0]))  # compiled in this thread, if not yet
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(drafter.draft, draft_request(prompts[0]))
        with pytest.raises(RuntimeError, match="only that thread may execute it"):
            future.result(timeout=HANG_TIMEOUT_S)


def test_teardown_graph_then_draft_recompiles(remote_drafters, prompts):
    drafter = remote_drafters["compiled"]
    request = draft_request(prompts[1])
    before = drafter.draft(request)
    graph = drafter.graph
    drafter.teardown_graph()
    assert graph.is_teardown
    assert drafter.graph is None
    after = drafter.draft(request)
    assert drafter.graph is not None
    assert torch.equal(after, before)


def test_close_tears_down_graph_then_actor(target, draft, prompts):
    drafter = start(draft, target, "compiled")
    drafter.draft(draft_request(prompts[0]))
    graph = drafter.graph
    drafter.close()
    assert drafter.graph is None
    assert graph.is_teardown
    loops = list(graph.worker_task_refs.values())
    finished, _ = ray.wait(loops, num_returns=len(loops), timeout=HANG_TIMEOUT_S)
    assert len(finished) == len(loops), "the actor's graph loop is still running"
    assert actor_died(drafter.actor), "close() must kill the actor"
    with pytest.raises(DrafterError, match="closed"):
        drafter.draft(draft_request(prompts[0]))
    drafter.close()  # a second close does nothing


@pytest.mark.parametrize("transport", ["actor", "compiled"])
def test_killed_actor_raises_drafter_error(target, draft, prompts, transport):
    drafter = start(draft, target, transport)
    request = draft_request(prompts[0])
    # One thread for every draft call: the compiled graph runs only in the thread that compiled it.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(drafter.draft, request).result(timeout=HANG_TIMEOUT_S)
        ray.kill(drafter.actor, no_restart=True)
        deadline = time.monotonic() + HANG_TIMEOUT_S
        # ray.kill returns before the actor is gone, so a draft may still succeed meanwhile.
        while True:
            assert time.monotonic() < deadline, "drafting kept working after the kill"
            try:
                pool.submit(drafter.draft, request).result(timeout=HANG_TIMEOUT_S)
            except DrafterError as error:
                assert "ActorDiedError" in str(error), str(error)
                break
        with pytest.raises(DrafterError):
            pool.submit(drafter.draft, request).result(timeout=HANG_TIMEOUT_S)
    drafter.close()


@pytest.mark.slow
def test_engine_loop_fails_requests_of_dead_compiled_drafter(target, draft, prompts):
    drafter = start(draft, target, "compiled")
    loop = EngineLoop(Scheduler(engine_with(target, drafter)))

    async def generate(request_id: str) -> list:
        request = Request(request_id, prompts[1], SamplingParams(max_new_tokens=MAX_TOKENS))
        return [chunk async for chunk in loop.stream(request_id, lambda: request)]

    try:
        chunks = asyncio.run(asyncio.wait_for(generate("before"), HANG_TIMEOUT_S))
        assert chunks[-1].result is not None, "the first request must finish"
        assert drafter.graph is not None, "the loop thread compiled the graph"
        ray.kill(drafter.actor, no_restart=True)
        with pytest.raises(EngineStepError, match="DrafterError"):
            for attempt in range(20):  # the actor may take a moment to die
                asyncio.run(asyncio.wait_for(generate(f"after-{attempt}"), HANG_TIMEOUT_S))
                time.sleep(0.2)
        loop.check_alive()  # the loop keeps serving after a failed step
    finally:
        loop.stop()
        drafter.close()
