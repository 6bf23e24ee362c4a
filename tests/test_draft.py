import json

import pytest
import torch
import torch.nn.functional as F

from dflash_core.checkpoint import load_draft, save_draft
from dflash_core.config import ConfigError
from dflash_core.draft import (
    DraftConfig,
    default_target_layer_ids,
    draft_config_for_target,
    new_draft_model,
)
from dflash_core.drafting import DFlashDrafter, DraftHead, DraftRequest
from dflash_core.layers import apply_rope
from tests.helpers import VOCAB, assert_close, random_target


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return random_target(tmp_path_factory.mktemp("target"), "llama", num_hidden_layers=6)


def make_draft(target, seed=0, **overrides):
    options = dict(num_layers=2, block_size=8, mask_token_id=VOCAB - 1)
    options.update(overrides)
    return new_draft_model(draft_config_for_target(target.config, **options), seed=seed, std=0.1)


def test_default_layer_rule():
    assert default_target_layer_ids(36, 5) == (1, 9, 17, 25, 33)
    assert default_target_layer_ids(30, 1) == (15,)
    assert default_target_layer_ids(6, 2) == (1, 3)


def test_checkpoint_round_trip(tmp_path, target):
    model = make_draft(target, target_layer_ids=(0, 2, 5))
    save_draft(model, tmp_path)
    loaded = load_draft(tmp_path)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["dflash_config"] == {
        "block_size": 8,
        "mask_token_id": VOCAB - 1,
        "target_layer_ids": [0, 2, 5],
    }
    assert saved["architectures"] == ["DFlashDraftModel"]


def published_style_config(**changes):
    config = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "num_target_layers": 36,
        "block_size": 16,
        "dflash_config": {"mask_token_id": 7},
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
    }
    config.update(changes)
    return config


def test_config_block_size_nested_wins_and_default_ids():
    config = DraftConfig.from_hf(
        published_style_config(dflash_config={"mask_token_id": 7, "block_size": 10})
    )
    assert config.block_size == 10
    assert config.target_layer_ids == (1, 33)  # default rule with one id per draft layer
    assert DraftConfig.from_hf(published_style_config()).block_size == 16


def test_sliding_window_draft_is_rejected():
    config = published_style_config(
        layer_types=["sliding_attention", "full_attention"], sliding_window=2048
    )
    with pytest.raises(ConfigError, match="sliding-window attention"):
        DraftConfig.from_hf(config)


def test_missing_mask_token_is_rejected():
    with pytest.raises(ConfigError, match="missing dflash_config.mask_token_id"):
        DraftConfig.from_hf(published_style_config(dflash_config={}))


def test_draft_that_does_not_fit_target_is_rejected(tmp_path, target):
    other = random_target(tmp_path, "llama", num_hidden_layers=4)
    with pytest.raises(ConfigError, match="num_target_layers 6 != target layers 4"):
        DFlashDrafter.for_target(make_draft(target), other, num_slots=1, max_seq_len=32)


@torch.inference_mode()
def reference_draft_logits(model, target, tapped, block_ids, start):
    """Recompute the draft without a cache, following the block-attention definition."""
    dec = model.config.decoder
    context = model.context_features(tapped)  # [1, n, hidden]
    n = context.shape[1]
    x = target.embed_tokens(block_ids)
    positions = torch.arange(start, start + block_ids.shape[1])[None]
    ctx_positions = torch.arange(n)[None]
    for layer in model.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        both = torch.cat([context, h], dim=1)
        cos, sin = model.rotary(torch.cat([ctx_positions, positions], dim=1), x.dtype)
        q = attn.q_norm(attn.q_proj(h).view(1, -1, dec.num_heads, dec.head_dim))
        q = apply_rope(q.transpose(1, 2), cos[:, :, n:], sin[:, :, n:])
        k = attn.k_norm(attn.k_proj(both).view(1, -1, dec.num_kv_heads, dec.head_dim))
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = attn.v_proj(both).view(1, -1, dec.num_kv_heads, dec.head_dim).transpose(1, 2)
        groups = dec.num_heads // dec.num_kv_heads
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        out = F.softmax(q @ k.transpose(-1, -2) / dec.head_dim**0.5, dim=-1) @ v
        x = x + attn.o_proj(out.transpose(1, 2).reshape(1, -1, dec.num_heads * dec.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return target.lm_head(model.norm(x)[:, 1:])


def test_incremental_draft_matches_reference(target):
    model = make_draft(target, target_layer_ids=(1, 4))
    drafter = DFlashDrafter.for_target(model, target, num_slots=3, max_seq_len=64)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    out = target(ids, target.new_cache(1, 64), torch.tensor([0]), (1, 4))
    tapped = out.tapped[0]  # [20, 2 * hidden]
    # Feed the context in three uneven pieces, as decode steps would.
    start = 0
    for end in (9, 10, 17):
        request = DraftRequest(
            slots=[2],
            context_starts=[start],
            context=[tapped[start:end]],
            context_tokens=[ids[0, start:end].tolist()],
            last_tokens=[int(ids[0, end])],
        )
        logits = drafter.draft(request)
        start = end
    block = torch.tensor([[int(ids[0, 17])] + [VOCAB - 1] * 7])
    expected = reference_draft_logits(model, target, tapped[None, :17], block, 17)
    assert_close(logits[0], expected[0], 1e-4, "draft logits")


def test_draft_rows_are_independent(target):
    model = make_draft(target)
    drafter = DFlashDrafter.for_target(model, target, num_slots=2, max_seq_len=64)
    gen = torch.Generator().manual_seed(1)
    contexts = [torch.randn(n, model.fc.in_features, generator=gen) for n in (3, 11)]
    tokens = [[1] * len(c) for c in contexts]
    together = drafter.draft(DraftRequest([0, 1], [0, 0], contexts, tokens, [5, 6]))
    for row in range(2):
        alone = drafter.draft(DraftRequest([row], [0], [contexts[row]], [tokens[row]], [5 + row]))
        assert_close(together[row], alone[0], 1e-5, f"row {row}")


def test_config_missing_field_is_named():
    config = published_style_config()
    del config["num_attention_heads"]
    with pytest.raises(ConfigError, match="missing num_attention_heads"):
        DraftConfig.from_hf(config)


def test_broken_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3",')
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_draft(tmp_path)


def test_mistral_sliding_window_is_rejected():
    from dflash_core.config import DecoderConfig

    config = published_style_config(model_type="mistral", sliding_window=4096)
    with pytest.raises(ConfigError, match="sliding-window"):
        DecoderConfig.from_hf(config)
    assert DecoderConfig.from_hf(published_style_config(model_type="mistral", sliding_window=None))


def test_draft_vocabulary_round_trip_and_bounds(tmp_path, target):
    model = make_draft(target, draft_vocab_ids=(2, 3, 50))
    save_draft(model, tmp_path)
    assert load_draft(tmp_path).config.draft_vocab_ids == (2, 3, 50)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["dflash_config"]["draft_vocab_ids"] == [2, 3, 50]
    with pytest.raises(ConfigError, match=rf"draft_vocab_ids contains \[{VOCAB}\].*size {VOCAB}"):
        make_draft(target, draft_vocab_ids=(1, VOCAB))


def test_draft_head_scores_only_its_vocabulary(target):
    hidden = torch.randn(2, 3, target.config.hidden_size)
    full = DraftHead(target.lm_head)(hidden)
    limited = DraftHead(target.lm_head, (1, 4, 9))(hidden)
    assert_close(limited[..., [1, 4, 9]], full[..., [1, 4, 9]], 1e-5, "draft head rows")
    others = [t for t in range(VOCAB) if t not in (1, 4, 9)]
    assert torch.isneginf(limited[..., others]).all()


@pytest.mark.parametrize("bad", ["123", [1.5, 2], [1, "2"]])
def test_draft_vocabulary_must_be_int_list(bad):
    config = published_style_config(dflash_config={"mask_token_id": 7, "draft_vocab_ids": bad})
    with pytest.raises(ConfigError, match="draft_vocab_ids must be a list of integer token ids"):
        DraftConfig.from_hf(config)
