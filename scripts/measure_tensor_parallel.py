"""Measure the per-step verify cost of the target whole (TP=1) against two tensor-parallel ranks.

One verify step is what the engine runs per decode step: a forward pass over a block of
`block_size` tokens per row, appended to each row's KV cache after a prefilled prompt, and the
fp32 logits of every block position. After each step the cache is cut back, as after a step
with no draft accepted, so every step runs at the same position. The two targets run in turns,
in one process: this process is rank 0 of the TP=2 group and a spawned process is rank 1, each
with one torch thread. Both must give the same greedy picks.

    python scripts/measure_tensor_parallel.py --model smollm2-135m-instruct --block-size 16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from dflash_core.pipeline import encode_prompt, load_target_and_tokenizer
from dflash_core.tensor_parallel import local_tensor_parallel

PROMPT = "Write a Python function that returns the n-th Fibonacci number."


@torch.inference_mode()
def verify_seconds(
    target, cache, block: torch.Tensor, slots: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """Time one verify step on the rows `slots`, then cut the cache back.

    Returns the seconds and the greedy picks [batch, block_size].
    """
    starts = cache.lengths[slots].clone()
    began = time.perf_counter()
    logits = target.logits(target(block, cache, slots).hidden)  # [batch, block_size, vocab]
    seconds = time.perf_counter() - began
    for slot, start in zip(slots.tolist(), starts.tolist()):
        cache.truncate(slot, start)
    return seconds, logits.argmax(-1)


def cpu_name() -> str:
    """Return the CPU model from /proc/cpuinfo, or the machine type where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="target model spec")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per row and step")
    parser.add_argument("--batch-sizes", default="1,4", help="rows per step, comma-separated")
    parser.add_argument(
        "--steps", type=int, default=20, help="measured steps per target and batch size"
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    loaded = load_target_and_tokenizer(args.model)
    whole = loaded.model
    prompt = torch.tensor(encode_prompt(loaded.tokenizer, PROMPT))
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    max_rows = max(batch_sizes)
    max_seq_len = len(prompt) + args.block_size
    generator = torch.Generator().manual_seed(0)
    print(
        f"{cpu_name()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, 1 thread per rank; {args.model}, prompt {len(prompt)} tokens, "
        f"block_size {args.block_size}, {args.steps} steps"
    )
    with local_tensor_parallel(whole, str(loaded.folder), world_size=2) as sharded:
        targets = {"TP=1": whole, "TP=2": sharded}
        caches = {}
        for name, target in targets.items():
            caches[name] = target.new_cache(max_rows, max_seq_len)
            for slot in range(max_rows):
                target(prompt[None], caches[name], torch.tensor([slot]))
        for batch in batch_sizes:
            slots = torch.arange(batch)
            times = {name: [] for name in targets}
            for step in range(args.steps + 1):  # step 0 is a warm-up
                block = torch.randint(
                    0, whole.config.vocab_size, (batch, args.block_size), generator=generator
                )
                picks = {}
                for name, target in targets.items():
                    seconds, picks[name] = verify_seconds(target, caches[name], block, slots)
                    if step:
                        times[name].append(seconds)
                if not torch.equal(picks["TP=1"], picks["TP=2"]):
                    raise SystemExit(f"TP=1 and TP=2 picked different tokens at step {step}")
            medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
            print(
                f"batch {batch}: TP=1 {medians['TP=1']:.1f} ms, TP=2 {medians['TP=2']:.1f} ms "
                f"per verify step (median), TP=2 / TP=1 = {medians['TP=2'] / medians['TP=1']:.2f}"
            )


if __name__ == "__main__":
    main()
