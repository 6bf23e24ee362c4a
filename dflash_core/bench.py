"""Benchmark: the same prompts with and without the draft on one target, interleaved.

Each prompt runs plain decoding and speculative decoding back to back, so both modes see the
same machine load. Reported per dataset: mean acceptance length tau (committed tokens per
verify step), decode tokens/s of each mode, and their ratio, the speedup.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tqdm import tqdm

from dflash_core.datasets import load_prompts
from dflash_core.draft import DraftModel
from dflash_core.engine import DEFAULT_PROPOSAL
from dflash_core.pipeline import LoadedTarget, build_engine, encode_prompt
from dflash_core.sampling import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_BENCH_LIMIT = 30
DEFAULT_BENCH_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class BenchReport:
    dataset: str
    num_prompts: int
    block_size: int
    temperature: float
    proposal: str
    mean_acceptance_length: float  # tau: committed tokens per verify step, over all steps
    plain_tokens_per_second: float
    speculative_tokens_per_second: float
    speedup: float
    identical_outputs: int  # prompts whose two outputs match token for token
    wall_seconds: float


def run_bench(
    target: LoadedTarget,
    draft: DraftModel,
    dataset: str,
    *,
    limit: int = DEFAULT_BENCH_LIMIT,
    block_size: int | None = None,
    params: SamplingParams,
    proposal: str = DEFAULT_PROPOSAL,
) -> BenchReport:
    """Run `limit` eval prompts of a dataset in both modes (first user turn of each)."""
    began = time.perf_counter()
    records = load_prompts(dataset, "eval", limit)
    prompts = [encode_prompt(target.tokenizer, record.turns[0]) for record in records]
    block = block_size or draft.config.block_size
    max_seq_len = max(len(p) for p in prompts) + params.max_new_tokens + block
    speculative = build_engine(
        target, draft, max_seq_len=max_seq_len, block_size=block_size, proposal=proposal
    )
    plain = build_engine(target, None, max_seq_len=max_seq_len)
    steps = committed = identical = 0
    plain_tokens = plain_seconds = spec_tokens = spec_seconds = 0.0
    for record, prompt_ids in tqdm(
        list(zip(records, prompts)), desc=f"bench {dataset}", unit="prompt"
    ):
        base = plain.generate(prompt_ids, params, request_id=record.record_id)
        fast = speculative.generate(prompt_ids, params, request_id=record.record_id)
        plain_tokens += sum(base.acceptance_lengths)
        plain_seconds += base.decode_seconds
        spec_tokens += sum(fast.acceptance_lengths)
        spec_seconds += fast.decode_seconds
        steps += fast.num_steps
        committed += sum(fast.acceptance_lengths)
        identical += base.token_ids == fast.token_ids
    plain_rate = plain_tokens / plain_seconds if plain_seconds else 0.0
    spec_rate = spec_tokens / spec_seconds if spec_seconds else 0.0
    return BenchReport(
        dataset=dataset,
        num_prompts=len(records),
        block_size=speculative.block_size,
        temperature=params.temperature,
        proposal=proposal,
        mean_acceptance_length=committed / steps if steps else 0.0,
        plain_tokens_per_second=plain_rate,
        speculative_tokens_per_second=spec_rate,
        speedup=spec_rate / plain_rate if plain_rate else 0.0,
        identical_outputs=identical,
        wall_seconds=time.perf_counter() - began,
    )
