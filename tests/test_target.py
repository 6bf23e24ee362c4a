import pytest
import torch

from dflash_core.checkpoint import load_target
from tests.helpers import VOCAB, assert_close, save_random_hf_model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_full_pass_matches_transformers(tmp_path, family):
    reference = save_random_hf_model(tmp_path, family)
    model = load_target(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    expected = reference(ids).logits
    cache = model.new_cache(num_slots=2, max_seq_len=64)
    out = model(ids, cache, torch.tensor([0, 1]))
    assert_close(model.logits(out.hidden), expected, 1e-4, f"{family} logits")
    assert cache.lengths.tolist() == [23, 23]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cached_token_by_token_matches_transformers(tmp_path, family):
    reference = save_random_hf_model(tmp_path, family)
    model = load_target(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(2))
    expected = reference(ids).logits
    cache = model.new_cache(num_slots=3, max_seq_len=32)
    slot = torch.tensor([2])
    out = model(ids[:, :5], cache, slot)  # prefill, then one token at a time
    steps = [model.logits(out.hidden)]
    for i in range(5, 17):
        steps.append(model.logits(model(ids[:, i : i + 1], cache, slot).hidden))
    assert_close(torch.cat(steps, dim=1), expected, 1e-4, f"{family} cached logits")


def test_rows_at_different_lengths_match_single_rows(tmp_path):
    save_random_hf_model(tmp_path, "qwen3")
    model = load_target(tmp_path)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (1, n), generator=gen) for n in (3, 9)]
    block = torch.randint(0, VOCAB, (2, 4), generator=gen)

    batched = model.new_cache(num_slots=2, max_seq_len=32)
    for slot, prompt in enumerate(prompts):
        model(prompt, batched, torch.tensor([slot]))
    together = model.logits(model(block, batched, torch.tensor([0, 1])).hidden)

    for slot, prompt in enumerate(prompts):
        alone = model.new_cache(num_slots=1, max_seq_len=32)
        model(prompt, alone, torch.tensor([0]))
        single = model.logits(model(block[slot : slot + 1], alone, torch.tensor([0])).hidden)
        assert_close(together[slot], single[0], 1e-5, f"row {slot}")


def test_tapped_layer_ids_are_layer_outputs(tmp_path):
    reference = save_random_hf_model(tmp_path, "llama")
    model = load_target(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    # hidden_states[0] is the embedding output, so layer l's output is entry l + 1.
    expected = reference(ids, output_hidden_states=True).hidden_states
    out = model(ids, model.new_cache(1, 16), torch.tensor([0]), tap_layer_ids=(0, 2))
    assert out.tapped.shape == (1, 6, 2 * 64)
    assert_close(out.tapped[..., :64], expected[1], 1e-5, "layer 0 output")
    assert_close(out.tapped[..., 64:], expected[3], 1e-5, "layer 2 output")


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    reference = save_random_hf_model(tmp_path, "llama", rope_scaling=scaling, rope_theta=500000.0)
    model = load_target(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(5))
    logits = model.logits(model(ids, model.new_cache(1, 96), torch.tensor([0])).hidden)
    assert_close(logits, reference(ids).logits, 1e-4, "llama3 rope logits")


def test_bf16_close_to_fp32(tmp_path):
    save_random_hf_model(tmp_path, "qwen3")
    full = load_target(tmp_path)
    half = load_target(tmp_path, dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    expected = full.logits(full(ids, full.new_cache(1, 16), torch.tensor([0])).hidden)
    actual = half.logits(half(ids, half.new_cache(1, 16), torch.tensor([0])).hidden)
    assert_close(actual, expected, 0.1, "bf16 logits")


def test_truncate_and_reset(tmp_path):
    save_random_hf_model(tmp_path, "llama")
    model = load_target(tmp_path)
    cache = model.new_cache(2, 16)
    model(torch.tensor([[1, 2, 3, 4]]), cache, torch.tensor([1]))
    cache.truncate(1, 2)
    assert cache.lengths.tolist() == [0, 2]
    with pytest.raises(ValueError, match="cannot truncate slot 1 of length 2 to 3"):
        cache.truncate(1, 3)
    cache.reset(1)
    assert cache.lengths.tolist() == [0, 0]


def test_llama_attention_bias_loads(tmp_path):
    reference = save_random_hf_model(tmp_path, "llama", attention_bias=True)
    model = load_target(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(7))
    logits = model.logits(model(ids, model.new_cache(1, 16), torch.tensor([0])).hidden)
    assert_close(logits, reference(ids).logits, 1e-4, "logits with attention bias")
