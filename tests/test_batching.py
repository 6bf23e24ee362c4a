import pytest
import torch

from dflash_core.checkpoint import load_target
from dflash_core.drafting import DFlashDrafter
from dflash_core.engine import SpeculativeEngine
from dflash_core.sampling import SamplingParams
from dflash_core.scheduler import Request, Scheduler
from tests.drafters import TargetAsDrafter
from tests.helpers import random_target, save_random_hf_model
from tests.test_engine import plain_output, prompts, random_drafter

MAX_SEQ_LEN = 160


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return random_target(tmp_path_factory.mktemp("llama"), "llama", num_hidden_layers=6)


def mixed_requests(count: int, seed: int) -> list[Request]:
    gen = torch.Generator().manual_seed(seed)
    return [
        Request(
            str(i),
            prompt,
            SamplingParams(max_new_tokens=int(torch.randint(1, 50, (1,), generator=gen))),
        )
        for i, prompt in enumerate(prompts(count, seed=seed))
    ]


@pytest.mark.parametrize("block_size", [2, 16])
@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_batched_greedy_equals_plain_per_request(target, block_size, noise):
    requests = mixed_requests(9, seed=block_size)
    drafter = TargetAsDrafter(target, block_size, num_slots=3, max_seq_len=MAX_SEQ_LEN, noise=noise)
    engine = SpeculativeEngine(target, drafter, max_seq_len=MAX_SEQ_LEN, num_slots=3)
    results = Scheduler(engine).run(requests)
    accepted = []
    for request, result in zip(requests, results):
        expected = plain_output(target, request.prompt_ids, request.params.max_new_tokens)
        assert result.request_id == request.request_id
        assert result.token_ids == expected.token_ids, f"request {request.request_id}"
        assert result.finish_reason == expected.finish_reason
        assert sum(result.acceptance_lengths) == len(result.token_ids) - 1
        accepted += result.acceptance_lengths
    if block_size > 2:
        # The batch really mixed acceptance lengths, so rows advanced at different rates.
        assert len(set(accepted)) > 2, accepted


def test_requests_join_and_leave_between_steps(target):
    requests = mixed_requests(7, seed=5)
    drafter = TargetAsDrafter(target, 4, num_slots=2, max_seq_len=MAX_SEQ_LEN, noise=0.2)
    scheduler = Scheduler(SpeculativeEngine(target, drafter, max_seq_len=MAX_SEQ_LEN, num_slots=2))
    for request in requests:
        scheduler.submit(request)
    seen_batches = set()
    finished = {}
    while scheduler.has_work:
        for result in scheduler.step():
            finished[result.request_id] = result
        seen_batches.add(tuple(sorted(seq.request_id for seq in scheduler.running)))
        assert len(scheduler.running) <= 2
    assert len(seen_batches) > 3, "requests should share the batch in changing combinations"
    for request in requests:
        expected = plain_output(target, request.prompt_ids, request.params.max_new_tokens)
        assert finished[request.request_id].token_ids == expected.token_ids


def test_identical_requests_in_one_batch_match(target):
    prompt = prompts(1, seed=11)[0]
    requests = [Request(str(i), prompt, SamplingParams(max_new_tokens=30)) for i in range(4)]
    engine = SpeculativeEngine(
        target,
        TargetAsDrafter(target, 8, num_slots=4, max_seq_len=MAX_SEQ_LEN, noise=0.2),
        max_seq_len=MAX_SEQ_LEN,
        num_slots=4,
    )
    results = Scheduler(engine).run(requests)
    assert len({tuple(r.token_ids) for r in results}) == 1


def test_dflash_drafter_in_batch_equals_plain(target):
    requests = mixed_requests(6, seed=21)
    model = random_drafter(target, 4).model
    drafter = DFlashDrafter.for_target(
        model, target, num_slots=3, max_seq_len=MAX_SEQ_LEN, block_size=4
    )
    engine = SpeculativeEngine(target, drafter, max_seq_len=MAX_SEQ_LEN, num_slots=3)
    for request, result in zip(requests, Scheduler(engine).run(requests)):
        expected = plain_output(target, request.prompt_ids, request.params.max_new_tokens)
        assert result.token_ids == expected.token_ids


def test_stop_inside_accepted_block_in_batch(target):
    requests = mixed_requests(4, seed=31)
    stopped = []
    for request in requests:
        reference = plain_output(target, request.prompt_ids, 40).token_ids
        stop = reference[5]
        params = SamplingParams(max_new_tokens=40, stop_token_ids=(stop,))
        stopped.append((Request(request.request_id, request.prompt_ids, params), reference, stop))
    drafter = TargetAsDrafter(target, 16, num_slots=4, max_seq_len=MAX_SEQ_LEN)
    engine = SpeculativeEngine(target, drafter, max_seq_len=MAX_SEQ_LEN, num_slots=4)
    results = Scheduler(engine).run([r for r, _, _ in stopped])
    for (_, reference, stop), result in zip(stopped, results):
        cut = reference.index(stop) + 1
        assert result.token_ids == reference[:cut]
        assert result.finish_reason == "stop"
        assert sum(result.acceptance_lengths) == cut - 1


def test_request_too_long_rejected_at_submit(target):
    engine = SpeculativeEngine(target, random_drafter(target, 16), max_seq_len=64)
    scheduler = Scheduler(engine)
    with pytest.raises(ValueError, match="= 86 exceeds max_seq_len 64"):
        scheduler.submit(Request("big", list(range(50)), SamplingParams(max_new_tokens=20)))
    assert not scheduler.has_work


def test_waiting_requests_wait_for_a_slot(target):
    requests = mixed_requests(5, seed=41)
    engine = SpeculativeEngine(target, random_drafter(target, 4), max_seq_len=MAX_SEQ_LEN)
    scheduler = Scheduler(engine)
    for request in requests:
        scheduler.submit(request)
    scheduler.step()
    assert len(scheduler.running) + len(scheduler.waiting) >= 4
    assert len(scheduler.running) <= 1


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_divergence_only_at_near_ties(tmp_path, seed):
    """bf16 speculative output may differ from bf16 plain decoding only where the top two
    target logits are within MARGIN of each other (rounding can flip such a pick)."""
    margin = 0.25
    save_random_hf_model(tmp_path, "qwen3", seed=seed)
    model = load_target(tmp_path, dtype=torch.bfloat16)
    drafter = TargetAsDrafter(model, 8, num_slots=3, max_seq_len=MAX_SEQ_LEN, noise=0.2)
    engine = SpeculativeEngine(model, drafter, max_seq_len=MAX_SEQ_LEN, num_slots=3)
    requests = mixed_requests(6, seed=50 + seed)
    for request, result in zip(requests, Scheduler(engine).run(requests)):
        expected = plain_output(model, request.prompt_ids, request.params.max_new_tokens)
        if result.token_ids == expected.token_ids:
            continue
        at = next(i for i, (a, b) in enumerate(zip(result.token_ids, expected.token_ids)) if a != b)
        prefix = request.prompt_ids + expected.token_ids[:at]
        logits = model.logits(
            model(
                torch.tensor([prefix]), model.new_cache(1, MAX_SEQ_LEN), torch.tensor([0])
            ).hidden[0, -1]
        )
        top2 = logits.topk(2).values
        gap = float(top2[0] - top2[1])
        assert gap <= margin, f"request {request.request_id} diverged at {at} with logit gap {gap}"
