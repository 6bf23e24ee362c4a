"""Training-time draft forward over many blocks of one sequence at once.

Each anchor `a` opens a block `[x_a, MASK, ..., MASK]` at positions `a .. a + B - 1` whose
slot `k` learns to predict `x_{a+k}`. A block's queries see the context features of tokens
strictly before its anchor and every position of its own block, and nothing of other blocks:
the same view the drafter has at inference when `a` tokens are committed.
"""

from __future__ import annotations

import torch

from dflash_core.draft import DraftModel


def sample_anchors(
    num_tokens: int,
    response_start: int,
    max_anchors: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw up to `max_anchors` distinct anchor positions, sorted, from the response.

    An anchor needs at least one token after it to predict, so anchors lie in
    [max(response_start, 1), num_tokens - 2]; position 0 has no context to condition on.
    """
    low = max(response_start, 1)
    high = num_tokens - 2
    if high < low:
        return torch.empty(0, dtype=torch.long)
    candidates = torch.arange(low, high + 1)
    if len(candidates) > max_anchors:
        pick = torch.randperm(len(candidates), generator=generator)[:max_anchors]
        candidates = candidates[pick]
    return candidates.sort().values


def block_attention_mask(anchors: torch.Tensor, block_size: int, num_context: int) -> torch.Tensor:
    """Boolean mask [num_blocks * block_size, num_context + num_blocks * block_size].

    Row `j * B + k` (block j, slot k) may attend to context position `c` iff `c < anchors[j]`,
    and to block position `i * B + m` iff `i == j`.
    """
    num_blocks = len(anchors)
    block_of_query = torch.arange(num_blocks).repeat_interleave(block_size)  # [A * B]
    context = torch.arange(num_context)[None, :] < anchors[block_of_query][:, None]
    same_block = block_of_query[:, None] == block_of_query[None, :]
    return torch.cat([context, same_block], dim=1)


def slot_weights(block_size: int, gamma: float) -> torch.Tensor:
    """Loss weight per slot: 0 for slot 0, exp(-(k - 1) / gamma) for slots k >= 1."""
    k = torch.arange(block_size, dtype=torch.float32)
    weights = torch.exp(-(k - 1) / gamma)
    weights[0] = 0.0
    return weights


# Slot-weight decay of the published recipe per block size; other sizes interpolate linearly.
PUBLISHED_GAMMA = {8: 4.0, 10: 5.0, 16: 7.0}


def default_gamma(block_size: int) -> float:
    """Decay of the slot weights for a block size (7 for 16, 5 for 10, 4 for 8)."""
    if block_size in PUBLISHED_GAMMA:
        return PUBLISHED_GAMMA[block_size]
    if block_size < 8:
        return block_size / 2
    if block_size < 10:
        return 4.0 + (block_size - 8) / 2
    if block_size < 16:
        return 5.0 + (block_size - 10) / 3
    return 7.0 * block_size / 16


def draft_blocks_forward(
    model: DraftModel,
    block_embeds: torch.Tensor,
    block_positions: torch.Tensor,
    context: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Run the draft layers over many blocks; returns normed hidden states [A * B, hidden].

    block_embeds: [A * B, hidden] token embeddings of all blocks; block_positions: [A * B];
    context: [T, hidden] context features of the whole sequence (positions 0 .. T - 1);
    mask: from `block_attention_mask`.
    """
    num_context = context.shape[0]
    context_positions = torch.arange(num_context, device=context.device)
    ctx_cos, ctx_sin = model.rotary(context_positions[None], context.dtype)
    blk_cos, blk_sin = model.rotary(block_positions[None], context.dtype)
    x = block_embeds[None].to(model.dtype)  # [1, A * B, hidden]
    ctx = context[None]
    attn_mask = mask[None, None]
    for layer in model.layers:
        h = layer.input_layernorm(x)
        q = layer.self_attn.queries(h, blk_cos, blk_sin)
        ctx_k, ctx_v = layer.self_attn.keys_values(ctx, ctx_cos, ctx_sin)
        blk_k, blk_v = layer.self_attn.keys_values(h, blk_cos, blk_sin)
        keys = torch.cat([ctx_k, blk_k], dim=2)
        values = torch.cat([ctx_v, blk_v], dim=2)
        x = x + layer.self_attn.attend(q, keys, values, attn_mask)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.norm(x)[0]


def accepted_draft_tokens(correct: torch.Tensor) -> torch.Tensor:
    """Return, per block, the proposals a greedy verify step would accept.

    `correct` is [A, B], and slot 0 (the known anchor token) is ignored. A block's count is the
    number of slots from 1 on that are correct before the first wrong one.
    """
    return correct[:, 1:].long().cumprod(1).sum(1)
