import pytest
import torch

from dflash_core.draft import draft_config_for_target, new_draft_model
from dflash_core.drafting import DFlashDrafter
from dflash_core.engine import RequestTooLongError, SpeculativeEngine, accept_greedy
from dflash_core.sampling import SamplingParams
from tests.drafters import OracleDrafter
from tests.helpers import VOCAB, random_target

MAX_SEQ_LEN = 160


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return random_target(tmp_path_factory.mktemp("llama"), "llama", num_hidden_layers=6)


@pytest.fixture(scope="module")
def qwen_target(tmp_path_factory):
    return random_target(tmp_path_factory.mktemp("qwen3"), "qwen3", seed=1)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 24, (count,), generator=gen)
    return [torch.randint(0, VOCAB, (int(n),), generator=gen).tolist() for n in lengths]


def plain_output(target, prompt, max_new_tokens, stop_token_ids=()):
    engine = SpeculativeEngine(target, None, max_seq_len=MAX_SEQ_LEN)
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids)
    return engine.generate(prompt, params)


def random_drafter(
    target,
    block_size,
    mask_token_id=VOCAB - 1,
    seed=0,
    num_layers=2,
    num_slots=1,
    max_seq_len=MAX_SEQ_LEN,
):
    config = draft_config_for_target(
        target.config, num_layers=num_layers, block_size=16, mask_token_id=mask_token_id
    )
    # A larger init than training's makes the random draft's guesses more varied.
    model = new_draft_model(config, seed=seed, std=0.2)
    return DFlashDrafter.for_target(
        model, target, num_slots=num_slots, max_seq_len=max_seq_len, block_size=block_size
    )


def test_accept_greedy_counts_matching_prefix():
    drafts = torch.tensor([[5, 6, 7], [5, 6, 7], [1, 6, 7]])
    target = torch.tensor([[5, 6, 7, 8], [5, 9, 7, 8], [5, 6, 7, 8]])
    assert accept_greedy(drafts, target).tolist() == [3, 1, 0]


@pytest.mark.parametrize("block_size", [2, 4, 16])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_random_draft_output_equals_plain_greedy(target, qwen_target, block_size, family):
    model = target if family == "llama" else qwen_target
    engine = SpeculativeEngine(model, random_drafter(model, block_size), max_seq_len=MAX_SEQ_LEN)
    for prompt in prompts(6, seed=block_size):
        expected = plain_output(model, prompt, 40)
        result = engine.generate(prompt, SamplingParams(max_new_tokens=40))
        assert result.token_ids == expected.token_ids, f"prompt {prompt}"
        assert result.finish_reason == expected.finish_reason
        assert sum(result.acceptance_lengths) == len(result.token_ids) - 1
        assert all(1 <= n <= block_size for n in result.acceptance_lengths)


def test_oracle_drafter_accepts_whole_blocks(target):
    prompt = [3, 14, 15]
    reference = plain_output(target, prompt, 40).token_ids
    oracle = OracleDrafter(VOCAB, block_size=8)
    oracle.expect(0, len(prompt), reference)
    engine = SpeculativeEngine(target, oracle, max_seq_len=MAX_SEQ_LEN)
    result = engine.generate(prompt, SamplingParams(max_new_tokens=40))
    assert result.token_ids == reference
    # 1 token from prefill, then 39 in blocks of 8: 4 full steps and a last one cut to 7.
    assert result.acceptance_lengths == [8, 8, 8, 8, 7]


def test_oracle_wrong_drafts_set_acceptance(target):
    prompt = [7, 1]
    reference = plain_output(target, prompt, 20).token_ids
    oracle = OracleDrafter(VOCAB, block_size=4)
    oracle.expect(0, len(prompt), reference)
    oracle.wrong_after = {0: 0, 1: 2, 2: 1}
    result = SpeculativeEngine(target, oracle, max_seq_len=MAX_SEQ_LEN).generate(
        prompt, SamplingParams(max_new_tokens=20)
    )
    assert result.token_ids == reference
    assert result.acceptance_lengths[:3] == [1, 3, 2]


def test_stop_token_inside_accepted_block(target):
    prompt = [9, 2, 4, 4]
    reference = plain_output(target, prompt, 40).token_ids
    stop = reference[6]
    cut = reference.index(stop) + 1
    assert cut > 1, "the stop must land after the prefill token for this test to mean anything"
    oracle = OracleDrafter(VOCAB, block_size=16)
    oracle.expect(0, len(prompt), reference)
    result = SpeculativeEngine(target, oracle, max_seq_len=MAX_SEQ_LEN).generate(
        prompt, SamplingParams(max_new_tokens=40, stop_token_ids=(stop,))
    )
    assert result.token_ids == reference[:cut]
    assert result.finish_reason == "stop"
    assert result.acceptance_lengths == [cut - 1]
    assert result.token_ids == plain_output(target, prompt, 40, (stop,)).token_ids


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 16, 17, 18, 33])
def test_block_crossing_max_new_tokens_is_exact(target, max_new_tokens):
    prompt = [11, 12]
    reference = plain_output(target, prompt, 40).token_ids
    oracle = OracleDrafter(VOCAB, block_size=16)
    oracle.expect(0, len(prompt), reference)
    result = SpeculativeEngine(target, oracle, max_seq_len=MAX_SEQ_LEN).generate(
        prompt, SamplingParams(max_new_tokens=max_new_tokens)
    )
    assert result.token_ids == reference[:max_new_tokens]
    assert result.finish_reason == "length"
    assert sum(result.acceptance_lengths) == max_new_tokens - 1


def test_stop_and_length_in_same_block(target):
    prompt = [5, 5, 6]
    reference = plain_output(target, prompt, 40).token_ids
    stop = reference[4]
    cut = reference.index(stop) + 1
    oracle = OracleDrafter(VOCAB, block_size=16)
    oracle.expect(0, len(prompt), reference)
    result = SpeculativeEngine(target, oracle, max_seq_len=MAX_SEQ_LEN).generate(
        prompt, SamplingParams(max_new_tokens=cut, stop_token_ids=(stop,))
    )
    # The last allowed token is the stop token itself: the reason is "stop".
    assert result.token_ids == reference[:cut]
    assert result.finish_reason == "stop"


def test_generated_mask_tokens_are_kept(target):
    prompt = [1, 2, 3]
    reference = plain_output(target, prompt, 40).token_ids
    mask = max(set(reference[2:]), key=reference.count)  # a token the target emits
    engine = SpeculativeEngine(
        target, random_drafter(target, 8, mask_token_id=mask), max_seq_len=MAX_SEQ_LEN
    )
    result = engine.generate(prompt, SamplingParams(max_new_tokens=40))
    assert result.token_ids == reference
    assert mask in result.token_ids


def test_stop_id_equal_to_mask_id(target):
    prompt = [1, 2, 3]
    reference = plain_output(target, prompt, 40).token_ids
    mask = reference[5]
    cut = reference.index(mask) + 1
    engine = SpeculativeEngine(
        target, random_drafter(target, 8, mask_token_id=mask), max_seq_len=MAX_SEQ_LEN
    )
    result = engine.generate(prompt, SamplingParams(max_new_tokens=40, stop_token_ids=(mask,)))
    assert result.token_ids == reference[:cut]
    assert result.finish_reason == "stop"


def test_one_token_prompt(target):
    reference = plain_output(target, [42], 30).token_ids
    engine = SpeculativeEngine(target, random_drafter(target, 4), max_seq_len=MAX_SEQ_LEN)
    assert engine.generate([42], SamplingParams(max_new_tokens=30)).token_ids == reference


def test_max_new_tokens_one_takes_no_step(target):
    engine = SpeculativeEngine(target, random_drafter(target, 4), max_seq_len=MAX_SEQ_LEN)
    result = engine.generate([4, 5], SamplingParams(max_new_tokens=1))
    assert len(result.token_ids) == 1
    assert result.num_steps == 0
    assert result.finish_reason == "length"


def test_eos_ends_generation(target):
    prompt = [8, 8, 1]
    reference = plain_output(target, prompt, 40).token_ids
    eos = reference[3]
    engine = SpeculativeEngine(
        target, random_drafter(target, 4), max_seq_len=MAX_SEQ_LEN, eos_token_ids=(eos,)
    )
    result = engine.generate(prompt, SamplingParams(max_new_tokens=40))
    assert result.token_ids == reference[: reference.index(eos) + 1]
    assert result.finish_reason == "stop"


def test_request_too_long_is_rejected_with_numbers(target):
    engine = SpeculativeEngine(target, random_drafter(target, 16), max_seq_len=64)
    with pytest.raises(
        RequestTooLongError,
        match=r"40 tokens \+ max_new_tokens \(max_tokens\) 20 \+ block_size 16 = 76 exceeds max_seq_len 64",
    ):
        engine.generate(list(range(40)), SamplingParams(max_new_tokens=20))
    # The engine is still usable after a rejection.
    assert len(engine.generate([1, 2], SamplingParams(max_new_tokens=5)).token_ids) == 5


def test_invalid_requests_are_rejected(target):
    engine = SpeculativeEngine(target, None, max_seq_len=64)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([], SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match=r"outside the vocabulary 0..95"):
        engine.generate([1, VOCAB], SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        SamplingParams(max_new_tokens=0)


def test_slot_reused_after_long_request(target):
    engine = SpeculativeEngine(target, random_drafter(target, 4), max_seq_len=MAX_SEQ_LEN)
    engine.generate(prompts(1, seed=9)[0] * 3, SamplingParams(max_new_tokens=60))
    short = [3, 1, 4]
    assert (
        engine.generate(short, SamplingParams(max_new_tokens=12)).token_ids
        == plain_output(target, short, 12).token_ids
    )


@pytest.mark.parametrize("block_size", [2, 4, 16])
def test_partly_wrong_oracle_equals_plain_greedy(target, block_size):
    gen = torch.Generator().manual_seed(block_size)
    for prompt in prompts(8, seed=100 + block_size):
        reference = plain_output(target, prompt, 48).token_ids
        oracle = OracleDrafter(VOCAB, block_size=block_size)
        oracle.expect(0, len(prompt), reference)
        # Every step gets a wrong draft at a random place, so every acceptance length occurs.
        oracle.wrong_after = {
            step: int(torch.randint(0, block_size, (1,), generator=gen)) for step in range(64)
        }
        result = SpeculativeEngine(target, oracle, max_seq_len=MAX_SEQ_LEN).generate(
            prompt, SamplingParams(max_new_tokens=48)
        )
        assert result.token_ids == reference, f"prompt {prompt}"
        assert sum(result.acceptance_lengths) == len(reference) - 1


def test_failed_request_releases_its_slot(target):
    engine = SpeculativeEngine(target, random_drafter(target, 4), max_seq_len=MAX_SEQ_LEN)

    def broken_step(running):
        raise RuntimeError("step failed")

    engine.step = broken_step
    with pytest.raises(RuntimeError, match="step failed"):
        engine.generate([1, 2, 3], SamplingParams(max_new_tokens=10))
    assert engine.free_slots == [0]
    del engine.step
    assert len(engine.generate([1, 2, 3], SamplingParams(max_new_tokens=10)).token_ids) == 10


def test_finishing_twice_is_rejected(target):
    engine = SpeculativeEngine(target, None, max_seq_len=MAX_SEQ_LEN, num_slots=2)
    seq = engine.start("a", [1, 2], SamplingParams(max_new_tokens=3))
    engine.finish(seq)
    with pytest.raises(RuntimeError, match="slot 0 was already released"):
        engine.finish(seq)
    assert engine.free_slots == [0, 1]


def test_draft_vocabulary_limits_proposals_and_keeps_output_exact(target):
    vocab_ids = tuple(range(0, VOCAB, 3))
    config = draft_config_for_target(
        target.config,
        num_layers=1,
        block_size=4,
        mask_token_id=VOCAB - 1,
        draft_vocab_ids=vocab_ids,
    )
    drafter = DFlashDrafter.for_target(
        new_draft_model(config, seed=0, std=0.2), target, num_slots=1, max_seq_len=MAX_SEQ_LEN
    )
    proposals = []
    original = drafter.draft

    def recording_draft(request):
        logits = original(request)
        proposals.extend(logits.argmax(-1).flatten().tolist())
        outside = [t for t in range(VOCAB) if t not in vocab_ids]
        assert torch.isneginf(logits[..., outside]).all()
        return logits

    drafter.draft = recording_draft
    engine = SpeculativeEngine(target, drafter, max_seq_len=MAX_SEQ_LEN)
    for prompt in prompts(4, seed=7):
        expected = plain_output(target, prompt, 30)
        assert engine.generate(prompt, SamplingParams(max_new_tokens=30)).token_ids == (
            expected.token_ids
        )
    assert proposals and set(proposals) <= set(vocab_ids)
