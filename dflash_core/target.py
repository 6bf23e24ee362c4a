"""Target model: a Llama/Qwen3-family decoder that runs over a slotted KV cache.

The forward pass returns the final hidden states (the LM head is a separate call, so
callers compute logits only where they need them) and the outputs of the requested
`target_layer_ids`: layer id `l` is the hidden state after decoder layer `l`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dflash_core.config import DecoderConfig
from dflash_core.kv_cache import KVCache
from dflash_core.layers import AttentionProjections, RMSNorm, RotaryEmbedding, SwiGLU


@dataclass(frozen=True)
class TargetOutput:
    hidden: torch.Tensor  # [batch, seq, hidden], after the final norm
    tapped: torch.Tensor  # [batch, seq, len(tap_layer_ids) * hidden]; last dim 0 with no ids


class TargetLayer(nn.Module):
    """One decoder layer. A tensor-parallel shard passes its share of the heads and of the MLP
    width, and overrides `reduce` to sum the partial outputs of the ranks."""

    def __init__(
        self,
        config: DecoderConfig,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        intermediate_size: int | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = AttentionProjections(config, num_heads, num_kv_heads)
        self.mlp = SwiGLU(config.hidden_size, intermediate_size or config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        layer_index: int,
        slots: torch.Tensor,
        starts: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        cos, sin = rope
        h = self.input_layernorm(x)
        q = self.self_attn.queries(h, cos, sin)
        k, v = self.self_attn.keys_values(h, cos, sin)
        cache.write(layer_index, slots, starts, k, v)
        keys, values = cache.read(layer_index, slots, mask.shape[-1])
        x = x + self.reduce(self.self_attn.attend(q, keys, values, mask))
        return x + self.reduce(self.mlp(self.post_attention_layernorm(x)))

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum the outputs of o_proj or down_proj over tensor-parallel ranks (here: one rank)."""
        return partial


def causal_cache_mask(starts: torch.Tensor, seq_len: int, key_len: int) -> torch.Tensor:
    """Boolean mask [batch, 1, seq, key_len]: query i of a row may attend to keys up to starts + i."""
    query_pos = starts[:, None] + torch.arange(seq_len, device=starts.device)  # [batch, seq]
    key_pos = torch.arange(key_len, device=starts.device)
    return (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]


class TargetModel(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TargetLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.rope, config.head_dim)
        self._lm_head_fp32: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, num_slots: int, max_seq_len: int) -> KVCache:
        cfg = self.config
        return KVCache(
            cfg.num_layers,
            num_slots,
            cfg.num_kv_heads,
            max_seq_len,
            cfg.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        tap_layer_ids: tuple[int, ...] = (),
    ) -> TargetOutput:
        """Run input_ids [batch, seq] appended after each slot's cached tokens.

        Every row appends `seq` entries to its slot and its length grows by `seq`; callers
        that padded a row truncate it back afterwards.
        """
        batch, seq_len = input_ids.shape
        starts = cache.lengths[slots]  # [batch]
        positions = starts[:, None] + torch.arange(seq_len, device=input_ids.device)
        key_len = int(starts.max()) + seq_len
        mask = causal_cache_mask(starts, seq_len, key_len)
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        wanted = set(tap_layer_ids)
        tapped: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            x = layer(x, rope, cache, index, slots, starts, mask)
            if index in wanted:
                tapped[index] = x
        cache.lengths[slots] = starts + seq_len
        features = (
            torch.cat([tapped[i] for i in tap_layer_ids], dim=-1)
            if tap_layer_ids
            else x.new_empty(batch, seq_len, 0)
        )
        return TargetOutput(hidden=self.norm(x), tapped=features)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the LM head in fp32; returns fp32 logits.

        A bf16 head rounds logits near 20 to steps of 0.125, which turns close calls into exact
        ties whose pick then depends on the batch shape. For low-precision models an fp32 copy
        of the head weight is kept (vocab * hidden * 4 bytes), made on first use.
        """
        weight = self.lm_head.weight
        if weight.dtype == torch.float32:
            return F.linear(hidden.float(), weight)
        if self._lm_head_fp32 is None or self._lm_head_fp32.device != weight.device:
            self._lm_head_fp32 = weight.detach().float()
        return F.linear(hidden.float(), self._lm_head_fp32)
