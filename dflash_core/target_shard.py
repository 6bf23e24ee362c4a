"""One tensor-parallel rank's part of the target (Megatron-style sharding).

A rank holds:
- attention split by key/value head: some key/value heads and the query heads that read them
  (grouped-query attention), so its KV cache holds only its own heads;
- q/k/v and the MLP's gate/up projections column-parallel (a slice of the weight's rows);
- o_proj and down_proj row-parallel (a slice of its columns). An all-reduce after each sums
  the ranks' partial outputs, so every rank continues with the full hidden state;
- the embedding table, the norms and RoPE whole;
- the LM head vocabulary-parallel: a slice of its rows, whose fp32 logits rank 0 gathers.
Counts that do not divide by the number of ranks are split with the first ranks taking one more
(SmolLM2's 3 key/value heads over 2 ranks: 2 and 1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from dflash_core.checkpoint import load_weights
from dflash_core.config import DecoderConfig
from dflash_core.kv_cache import KVCache
from dflash_core.target import TargetLayer, TargetModel


def split_range(total: int, parts: int) -> list[tuple[int, int]]:
    """Split range(total) into `parts` contiguous [start, stop) pieces, the first ones larger."""
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for part in range(parts):
        stop = start + base + (1 if part < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass(frozen=True)
class RankShard:
    """The part of the target that one rank keeps. Each range is [start, stop)."""

    rank: int
    world_size: int
    kv_heads: tuple[int, int]
    heads: tuple[int, int]  # the query heads that read this rank's key/value heads
    intermediate: tuple[int, int]  # MLP channels
    vocab: tuple[int, int]  # LM head rows

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def num_heads(self) -> int:
        return self.heads[1] - self.heads[0]


def plan_shards(config: DecoderConfig, world_size: int) -> list[RankShard]:
    """Return the shard of each of `world_size` ranks, or raise ValueError if none fits."""
    if world_size < 1:
        raise ValueError(f"tp={world_size} is invalid: use 1 or more tensor-parallel ranks")
    if world_size > config.num_kv_heads:
        raise ValueError(
            f"tp={world_size} is larger than the target's {config.num_kv_heads} key/value heads; "
            f"attention is split by key/value head, so use tp={config.num_kv_heads} or less"
        )
    group_size = config.num_heads // config.num_kv_heads  # query heads per key/value head
    kv_heads = split_range(config.num_kv_heads, world_size)
    intermediate = split_range(config.intermediate_size, world_size)
    vocab = split_range(config.vocab_size, world_size)
    return [
        RankShard(
            rank=rank,
            world_size=world_size,
            kv_heads=kv_heads[rank],
            heads=(kv_heads[rank][0] * group_size, kv_heads[rank][1] * group_size),
            intermediate=intermediate[rank],
            vocab=vocab[rank],
        )
        for rank in range(world_size)
    ]


def shard_state_dict(
    tensors: dict[str, torch.Tensor], config: DecoderConfig, shard: RankShard
) -> dict[str, torch.Tensor]:
    """Cut a whole target's state dict down to one rank's shard.

    Sliced tensors are copies, so the whole model can be freed. The LM head of a tied model is
    a view of the embedding table, which every rank keeps whole.
    """
    dim = config.head_dim
    q_rows = slice(shard.heads[0] * dim, shard.heads[1] * dim)
    kv_rows = slice(shard.kv_heads[0] * dim, shard.kv_heads[1] * dim)
    channels = slice(*shard.intermediate)
    out = {}
    for name, tensor in tensors.items():
        kind = name.rsplit(".", 2)[-2] if name.startswith("layers.") else None
        if kind == "q_proj":
            tensor = tensor[q_rows].clone()
        elif kind in ("k_proj", "v_proj"):
            tensor = tensor[kv_rows].clone()
        elif name.endswith("o_proj.weight"):
            tensor = tensor[:, q_rows].contiguous()
        elif name.endswith("o_proj.bias"):
            if shard.rank != 0:
                continue  # added once, by rank 0, before the all-reduce sums the ranks
        elif kind in ("gate_proj", "up_proj"):
            tensor = tensor[channels].clone()
        elif kind == "down_proj":
            tensor = tensor[:, channels].contiguous()
        elif name == "lm_head.weight":
            rows = tensor[slice(*shard.vocab)]
            tensor = rows if config.tie_word_embeddings else rows.clone()
        out[name] = tensor
    return out


class ShardedTargetLayer(TargetLayer):
    """A decoder layer with this rank's heads and MLP channels, summing partial outputs over ranks."""

    def __init__(
        self, config: DecoderConfig, shard: RankShard, group: dist.ProcessGroup | None
    ) -> None:
        start, stop = shard.intermediate
        super().__init__(config, shard.num_heads, shard.num_kv_heads, stop - start)
        self.group = group

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(partial, group=self.group)
        return partial


class TargetShard(TargetModel):
    """One rank's part of a target: its forward pass and logits, over a cache of its heads.

    Build it with `shard_target`: the constructor first makes the whole layers of
    `TargetModel`, which costs nothing only on the meta device.
    """

    def __init__(
        self, config: DecoderConfig, shard: RankShard, group: dist.ProcessGroup | None
    ) -> None:
        super().__init__(config)
        self.shard = shard
        # Only rank 0 adds o_proj's bias, so the all-reduce sums it in once.
        layer_config = config if shard.rank == 0 else replace(config, output_bias=False)
        self.layers = nn.ModuleList(
            ShardedTargetLayer(layer_config, shard, group) for _ in range(config.num_layers)
        )
        start, stop = shard.vocab
        self.lm_head = nn.Linear(config.hidden_size, stop - start, bias=False)

    def new_cache(self, num_slots: int, max_seq_len: int) -> KVCache:
        cfg = self.config
        return KVCache(
            cfg.num_layers,
            num_slots,
            self.shard.num_kv_heads,
            max_seq_len,
            cfg.head_dim,
            dtype=self.dtype,
            device=self.device,
        )


def shard_target(
    model: TargetModel, shard: RankShard, group: dist.ProcessGroup | None
) -> TargetShard:
    """Return this rank's shard of a whole loaded target, on the model's device and dtype."""
    tensors = shard_state_dict(model.state_dict(), model.config, shard)
    with torch.device("meta"):
        sharded = TargetShard(model.config, shard, group)
    load_weights(sharded, tensors, f"tensor-parallel rank {shard.rank}", assign=True)
    return sharded.eval()
