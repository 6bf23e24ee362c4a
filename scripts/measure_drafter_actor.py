"""Measure the per-step cost of a drafter in a Ray actor against the colocated drafter.

Runs the same greedy request through two engines on one target: one with `DFlashDrafter` in
this process, one with `RemoteDrafter` calling a `DrafterActor` (plain actor calls, no
placement group). Both must produce the same tokens. Prints the mean decode step time of
each, their difference, and the round trip of an empty actor call, the floor of that
difference. Starts a local Ray cluster and stops it.

    python scripts/measure_drafter_actor.py --model smollm2-135m-instruct --block-size 16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import ray
import torch

from deployments.drafter import start_drafter_actor
from dflash_core.engine import SpeculativeEngine
from dflash_core.pipeline import build_draft, build_engine, encode_prompt, load_target_and_tokenizer
from dflash_core.sampling import SamplingParams

PROMPT = "Write a Python function that returns the n-th Fibonacci number."


@ray.remote(num_cpus=0.1)
class EmptyActor:
    def echo(self, value: object) -> object:
        return value


def step_seconds(engine: SpeculativeEngine, prompt_ids: list[int], max_tokens: int):
    result = engine.generate(prompt_ids, SamplingParams(max_new_tokens=max_tokens))
    return result.decode_seconds / result.num_steps, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="target model spec")
    parser.add_argument("--block-size", type=int, default=16, help="draft block size")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each engine")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2)
    try:
        target = load_target_and_tokenizer(args.model)
        draft = build_draft("random", target, block_size=args.block_size)
        max_seq_len = 1024
        prompt_ids = encode_prompt(target.tokenizer, PROMPT)
        colocated = build_engine(target, draft, max_seq_len=max_seq_len)
        remote = SpeculativeEngine(
            target.model,
            start_drafter_actor(
                draft,
                target.model,
                num_slots=1,
                max_seq_len=max_seq_len,
                block_size=None,
                num_cpus=0.1,
                threads=args.threads,
            ),
            max_seq_len=max_seq_len,
            eos_token_ids=target.eos_token_ids,
        )
        step_seconds(colocated, prompt_ids, 8)  # warm-up
        step_seconds(remote, prompt_ids, 8)
        timings: dict[str, list[float]] = {"colocated": [], "actor": []}
        outputs = {}
        for _ in range(args.repeats):
            for name, engine in (("colocated", colocated), ("actor", remote)):
                seconds, result = step_seconds(engine, prompt_ids, args.max_tokens)
                timings[name].append(seconds)
                outputs[name] = result.token_ids
        assert outputs["colocated"] == outputs["actor"], "the two drafters gave different tokens"

        echo = EmptyActor.remote()
        ray.get(echo.echo.remote(None))
        round_trips = []
        for _ in range(50):
            began = time.perf_counter()
            ray.get(echo.echo.remote(None))
            round_trips.append(time.perf_counter() - began)
    finally:
        ray.shutdown()

    colocated_ms = 1000 * statistics.median(timings["colocated"])
    actor_ms = 1000 * statistics.median(timings["actor"])
    print(
        f"model {args.model}, block_size {args.block_size}, {args.max_tokens} tokens, "
        f"{args.threads} thread(s), {os.cpu_count()} CPUs ({platform.processor() or 'cpu'})"
    )
    print(f"decode step, colocated drafter: {colocated_ms:.2f} ms (median of {args.repeats})")
    print(f"decode step, drafter actor:     {actor_ms:.2f} ms")
    print(f"actor overhead per step:        {actor_ms - colocated_ms:.2f} ms")
    print(f"empty actor call round trip:    {1000 * statistics.median(round_trips):.2f} ms")


if __name__ == "__main__":
    main()
