"""DFlash draft model: proposes a whole block of tokens in one non-causal forward pass.

The draft has no embedding or LM head of its own (it borrows the target's). Its input is
the block `[newest token, MASK, ..., MASK]`. In every layer the block's queries attend, with no
causal mask, to keys/values computed from the context features of all committed tokens (kept
in a draft KV cache) and from the block itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from dflash_core.config import ConfigError, DecoderConfig
from dflash_core.kv_cache import KVCache
from dflash_core.layers import AttentionProjections, RMSNorm, RotaryEmbedding, SwiGLU


def default_target_layer_ids(num_target_layers: int, num_ids: int) -> tuple[int, ...]:
    """Space `num_ids` tapped layers evenly from layer 1 to layer L - 3 (one id: L // 2)."""
    if num_ids < 1:
        raise ConfigError(f"the number of tapped target layers must be >= 1, got {num_ids}")
    if num_ids == 1:
        return (num_target_layers // 2,)
    first, last = 1, num_target_layers - 3
    step = (last - first) / (num_ids - 1)
    return tuple(int(round(first + i * step)) for i in range(num_ids))


@dataclass(frozen=True)
class DraftConfig:
    decoder: DecoderConfig  # the draft's own layers (hidden size equals the target's)
    block_size: int
    mask_token_id: int
    num_target_layers: int
    target_layer_ids: tuple[int, ...] = field(default=())
    # Tokens the draft may propose (empty: the whole vocabulary). A draft trained over the
    # tokens of its data keeps that list, and the drafter scores only those rows of the LM head.
    draft_vocab_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ConfigError(f"block_size must be >= 2, got {self.block_size}")
        if not self.target_layer_ids:
            ids = default_target_layer_ids(self.num_target_layers, self.decoder.num_layers)
            object.__setattr__(self, "target_layer_ids", ids)
        bad = [i for i in self.target_layer_ids if not 0 <= i < self.num_target_layers]
        if bad:
            raise ConfigError(
                f"target_layer_ids {list(self.target_layer_ids)} include {bad}, outside the "
                f"target's layers 0..{self.num_target_layers - 1}"
            )
        if not 0 <= self.mask_token_id < self.decoder.vocab_size:
            raise ConfigError(
                f"mask_token_id {self.mask_token_id} is outside the vocabulary "
                f"(size {self.decoder.vocab_size})"
            )
        outside = [i for i in self.draft_vocab_ids if not 0 <= i < self.decoder.vocab_size]
        if outside:
            raise ConfigError(
                f"dflash_config.draft_vocab_ids contains {outside[:5]}, outside the vocabulary "
                f"(size {self.decoder.vocab_size})"
            )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> DraftConfig:
        dflash = cfg.get("dflash_config") or {}
        block_size = dflash.get("block_size", cfg.get("block_size"))
        mask_token_id = dflash.get("mask_token_id", cfg.get("mask_token_id"))
        missing = [
            name
            for name, value in (
                ("block_size", block_size),
                ("dflash_config.mask_token_id", mask_token_id),
                ("num_target_layers", cfg.get("num_target_layers")),
            )
            if value is None
        ]
        if missing:
            raise ConfigError(f"draft config.json is missing {', '.join(missing)}")
        return cls(
            decoder=DecoderConfig.from_hf({**cfg, "model_type": cfg.get("model_type", "qwen3")}),
            block_size=int(block_size),
            mask_token_id=int(mask_token_id),
            num_target_layers=int(cfg["num_target_layers"]),
            target_layer_ids=tuple(int(i) for i in dflash.get("target_layer_ids") or ()),
            draft_vocab_ids=read_id_list(dflash, "draft_vocab_ids"),
        )

    def to_hf(self) -> dict[str, Any]:
        dflash: dict[str, Any] = {
            "block_size": self.block_size,
            "mask_token_id": self.mask_token_id,
            "target_layer_ids": list(self.target_layer_ids),
        }
        if self.draft_vocab_ids:
            dflash["draft_vocab_ids"] = list(self.draft_vocab_ids)
        return {
            **self.decoder.to_hf(),
            "architectures": ["DFlashDraftModel"],
            "num_target_layers": self.num_target_layers,
            "block_size": self.block_size,
            "dflash_config": dflash,
        }


def read_id_list(dflash: dict[str, Any], key: str) -> tuple[int, ...]:
    """Return `dflash_config[key]` as token ids; raise ConfigError unless it is a list of ints."""
    value = dflash.get(key) or []
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        raise ConfigError(
            f"dflash_config.{key} must be a list of integer token ids, got {str(value)[:60]!r}; "
            "fix the draft's config.json or remove the key"
        )
    return tuple(value)


def draft_config_for_target(
    target: DecoderConfig,
    *,
    num_layers: int = 1,
    block_size: int = 16,
    mask_token_id: int,
    target_layer_ids: tuple[int, ...] = (),
    intermediate_size: int | None = None,
    draft_vocab_ids: tuple[int, ...] = (),
) -> DraftConfig:
    """Build a draft configuration that fits `target` (same hidden size and vocabulary)."""
    decoder = replace(
        target,
        num_layers=num_layers,
        intermediate_size=intermediate_size or target.intermediate_size,
        qk_norm=True,
        attention_bias=False,
        tie_word_embeddings=False,
        model_type="qwen3",
    )
    return DraftConfig(
        decoder=decoder,
        block_size=block_size,
        mask_token_id=mask_token_id,
        num_target_layers=target.num_layers,
        target_layer_ids=target_layer_ids,
        draft_vocab_ids=draft_vocab_ids,
    )


class DraftLayer(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.self_attn = AttentionProjections(config)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context_kv: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        cos, sin = rope
        h = self.input_layernorm(x)
        q = self.self_attn.queries(h, cos, sin)
        block_k, block_v = self.self_attn.keys_values(h, cos, sin)
        keys = torch.cat([context_kv[0], block_k], dim=2)
        values = torch.cat([context_kv[1], block_v], dim=2)
        x = x + self.self_attn.attend(q, keys, values, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DraftModel(nn.Module):
    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.config = config
        dec = config.decoder
        num_tapped = len(config.target_layer_ids)
        self.fc = nn.Linear(num_tapped * dec.hidden_size, dec.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(dec.hidden_size, dec.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(dec) for _ in range(dec.num_layers))
        self.norm = RMSNorm(dec.hidden_size, dec.rms_norm_eps)
        self.rotary = RotaryEmbedding(dec.rope, dec.head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def new_cache(self, num_slots: int, max_seq_len: int) -> KVCache:
        dec = self.config.decoder
        return KVCache(
            dec.num_layers,
            num_slots,
            dec.num_kv_heads,
            max_seq_len,
            dec.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def context_features(self, tapped: torch.Tensor) -> torch.Tensor:
        """Project tapped target states [batch, seq, n * hidden] to features [batch, seq, hidden]."""
        return self.hidden_norm(self.fc(tapped.to(self.dtype)))

    @torch.inference_mode()
    def append_context(
        self, cache: KVCache, slots: torch.Tensor, tapped: torch.Tensor, counts: torch.Tensor
    ) -> None:
        """Cache the per-layer keys/values of newly committed tokens.

        tapped: [batch, seq, n * hidden], right-padded; counts: [batch] valid tokens per row.
        """
        _, seq_len, _ = tapped.shape
        starts = cache.lengths[slots]
        positions = starts[:, None] + torch.arange(seq_len, device=tapped.device)
        features = self.context_features(tapped)
        cos, sin = self.rotary(positions, features.dtype)
        for index, layer in enumerate(self.layers):
            k, v = layer.self_attn.keys_values(features, cos, sin)
            cache.write(index, slots, starts, k, v)
        cache.lengths[slots] = starts + counts

    @torch.inference_mode()
    def forward(
        self, block_embeds: torch.Tensor, cache: KVCache, slots: torch.Tensor
    ) -> torch.Tensor:
        """Run the block embeddings [batch, block, hidden]; returns normed hidden states of the same shape.

        The block sits right after each slot's cached context: positions len .. len + block - 1.
        """
        batch, block_size, _ = block_embeds.shape
        starts = cache.lengths[slots]
        context_len = int(starts.max())
        positions = starts[:, None] + torch.arange(block_size, device=block_embeds.device)
        # Non-causal: each block position attends to the row's context and the whole block.
        context_visible = torch.arange(context_len, device=starts.device)[None, :] < starts[:, None]
        block_visible = torch.ones(batch, block_size, dtype=torch.bool, device=starts.device)
        mask = torch.cat([context_visible, block_visible], dim=1)[:, None, None, :]
        x = block_embeds.to(self.dtype)
        rope = self.rotary(positions, x.dtype)
        for index, layer in enumerate(self.layers):
            x = layer(x, rope, cache.read(index, slots, context_len), mask)
        return self.norm(x)


def new_draft_model(config: DraftConfig, seed: int = 0, std: float = 0.02) -> DraftModel:
    """Build a freshly initialised draft: linear weights ~ N(0, std), norms at one."""
    generator = torch.Generator().manual_seed(seed)
    model = DraftModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def check_draft_fits_target(draft: DraftConfig, target: DecoderConfig) -> None:
    """Raise ConfigError if the draft was not built for a target of this shape."""
    problems = []
    if draft.decoder.hidden_size != target.hidden_size:
        problems.append(f"hidden_size {draft.decoder.hidden_size} != target {target.hidden_size}")
    if draft.num_target_layers != target.num_layers:
        problems.append(
            f"num_target_layers {draft.num_target_layers} != target layers {target.num_layers}"
        )
    if draft.decoder.vocab_size != target.vocab_size:
        problems.append(f"vocab_size {draft.decoder.vocab_size} != target {target.vocab_size}")
    if problems:
        raise ConfigError(
            "the draft does not fit the target model: "
            + "; ".join(problems)
            + ". Use a draft trained for this target."
        )
