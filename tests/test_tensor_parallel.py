"""Tensor parallelism of the target against the whole model, over two gloo ranks on this machine.

This process is rank 0; `local_tensor_parallel` starts rank 1 as a spawned process. The uneven
model splits 3 key/value heads, 129 MLP channels and 97 vocabulary rows over 2 ranks. It has
attention biases, so o_proj's bias must be added once. The even one is a Qwen3 with q/k norms
and a tied LM head.
"""

from __future__ import annotations

import logging
import multiprocessing
import time

import pytest
import torch

from dflash_core.checkpoint import load_target
from dflash_core.config import DecoderConfig
from dflash_core.draft import draft_config_for_target, new_draft_model
from dflash_core.drafting import DFlashDrafter
from dflash_core.engine import SpeculativeEngine
from dflash_core.sampling import SamplingParams
from dflash_core.scheduler import Request, Scheduler
from dflash_core.tensor_parallel import local_tensor_parallel, plan_shards
from tests.drafters import TargetAsDrafter
from tests.helpers import VOCAB, assert_close, save_random_hf_model

MAX_SEQ_LEN = 96
MODELS = {
    "uneven": dict(
        family="llama",
        num_attention_heads=6,
        num_key_value_heads=3,
        hidden_size=96,
        intermediate_size=129,
        vocab_size=97,
        attention_bias=True,
    ),
    "even": dict(family="qwen3", tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tp-{request.param}")
    options = dict(MODELS[request.param])
    save_random_hf_model(folder, options.pop("family"), seed=3, **options)
    return folder


def smollm2_config() -> DecoderConfig:
    return DecoderConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        vocab_size=49152,
    )


def test_plan_splits_smollm2_heads_unevenly():
    first, second = plan_shards(smollm2_config(), 2)
    assert (first.kv_heads, second.kv_heads) == ((0, 2), (2, 3))
    assert (first.heads, second.heads) == ((0, 6), (6, 9))
    assert (first.intermediate, second.intermediate) == ((0, 768), (768, 1536))
    assert (first.vocab, second.vocab) == ((0, 24576), (24576, 49152))


def test_plan_rejects_tp_above_kv_heads():
    with pytest.raises(ValueError, match=r"tp=4 is larger than the target's 3 key/value heads"):
        plan_shards(smollm2_config(), 4)
    with pytest.raises(ValueError, match="use tp=3 or less"):
        plan_shards(smollm2_config(), 4)
    with pytest.raises(ValueError, match="tp=0 is invalid"):
        plan_shards(smollm2_config(), 0)


def test_tp2_logits_equal_whole_model(model_folder, caplog):
    whole = load_target(model_folder)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, VOCAB, (2, 11), generator=gen)
    steps = torch.randint(0, VOCAB, (2, 5), generator=gen)
    tap = (0, 2)

    def run(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Prefill two slots, then feed tokens one by one, with a rewind in the middle."""
        cache = model.new_cache(num_slots=3, max_seq_len=32)
        slots = torch.tensor([2, 0])
        out = model(prompts, cache, slots, tap)
        logits, tapped = [model.logits(out.hidden)], [out.tapped]
        for i in range(steps.shape[1]):
            if i == 3:
                cache.truncate(0, int(cache.lengths[0]) - 2)  # rank 0 alone cuts slot 0 back
            out = model(steps[:, i : i + 1], cache, slots, tap)
            logits.append(model.logits(out.hidden))
            tapped.append(out.tapped)
        logits.append(model.logits(out.hidden[0, -1:]))  # one row, as a prefill requests
        return logits, tapped

    expected_logits, expected_tapped = run(whole)
    with local_tensor_parallel(whole, model_folder, world_size=2) as target:
        actual_logits, actual_tapped = run(target)
        # The whole head that a drafter borrows equals the model's; a tied one is the
        # embedding table itself, not a second copy.
        assert torch.equal(target.lm_head.weight, whole.lm_head.weight)
        if whole.config.tie_word_embeddings:
            assert target.lm_head.weight is target.embed_tokens.weight
    for step, (actual, expected) in enumerate(zip(actual_logits, expected_logits)):
        assert actual.dtype == torch.float32
        assert actual.shape == expected.shape
        assert_close(actual, expected, 1e-4, f"logits of step {step}")
    for step, (actual, expected) in enumerate(zip(actual_tapped, expected_tapped)):
        assert_close(actual, expected, 1e-4, f"tapped states of step {step}")
    # The follower process stopped on the shutdown command, with exit code 0.
    assert [r.message for r in caplog.records if r.levelno >= logging.WARNING] == []


def random_dflash_drafter(target, num_slots: int) -> DFlashDrafter:
    config = draft_config_for_target(
        target.config, num_layers=1, block_size=4, mask_token_id=VOCAB - 1
    )
    draft = new_draft_model(config, seed=5, std=0.2)
    return DFlashDrafter.for_target(draft, target, num_slots=num_slots, max_seq_len=MAX_SEQ_LEN)


def generate_all(target, drafter, num_slots: int) -> list:
    gen = torch.Generator().manual_seed(7)
    requests = []
    for i, length in enumerate([3, 17, 8, 1, 12]):
        params = SamplingParams(max_new_tokens=20)
        if i == 2:
            params = SamplingParams(max_new_tokens=20, temperature=0.8, seed=11)
        prompt = torch.randint(0, VOCAB, (length,), generator=gen).tolist()
        requests.append(Request(f"r{i}", prompt, params))
    engine = SpeculativeEngine(target, drafter, max_seq_len=MAX_SEQ_LEN, num_slots=num_slots)
    return Scheduler(engine).run(requests)


def test_tp2_speculative_output_equals_tp1(model_folder):
    """Greedy and seeded sampled requests, batched over 3 slots, with two kinds of drafter.

    The noisy target drafter gets whole blocks, partial blocks and no drafts accepted, so rank
    0 truncates its cache by varying amounts. The random DFlash draft reads tapped states.
    """
    whole = load_target(model_folder)
    num_slots = 3

    def drafters(target) -> dict[str, object]:
        return {
            "random draft": random_dflash_drafter(target, num_slots),
            # The whole model drafts for both engines, so only the verifier differs.
            "noisy target": TargetAsDrafter(whole, 4, num_slots, MAX_SEQ_LEN, noise=0.5, seed=3),
        }

    expected = {name: generate_all(whole, d, num_slots) for name, d in drafters(whole).items()}
    with local_tensor_parallel(whole, model_folder, world_size=2) as target:
        actual = {name: generate_all(target, d, num_slots) for name, d in drafters(target).items()}
    for name in expected:
        for result, reference in zip(actual[name], expected[name]):
            what = f"{name}, request {result.request_id}"
            assert result.token_ids == reference.token_ids, what
            assert result.acceptance_lengths == reference.acceptance_lengths, what
    steps = {n for result in expected["noisy target"] for n in result.acceptance_lengths}
    assert {1, 4} <= steps, f"expected partial and whole blocks accepted, got {sorted(steps)}"


def test_dead_follower_fails_fast(tmp_path, caplog):
    """A follower that dies makes the next call raise at once, and every later call too."""
    save_random_hf_model(tmp_path, "llama")
    whole = load_target(tmp_path)
    with local_tensor_parallel(whole, tmp_path, world_size=2) as target:
        cache = target.new_cache(num_slots=1, max_seq_len=16)
        target(torch.tensor([[1, 2, 3]]), cache, torch.tensor([0]))
        (follower,) = [p for p in multiprocessing.active_children() if p.name == "dflash-tp-rank-1"]
        follower.kill()
        follower.join()
        began = time.monotonic()
        with pytest.raises(RuntimeError, match="Connection closed by peer"):
            target(torch.tensor([[4]]), cache, torch.tensor([0]))
        assert time.monotonic() - began < 10
        with pytest.raises(RuntimeError, match="tensor-parallel target failed earlier"):
            target.logits(torch.zeros(1, whole.config.hidden_size))
    assert "exited with code -9" in caplog.text
