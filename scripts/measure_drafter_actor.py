"""Measure the per-step cost of a drafter in a Ray actor, per transport, against the colocated one.

For each block size, runs the same greedy request through three engines on one target. The
first has `DFlashDrafter` in this process, the second calls a `DrafterActor` with plain actor
calls, and the third calls another `DrafterActor` through a Ray Compiled Graph (no placement
group). All three must produce the same tokens. The runs of every engine and block size are
interleaved and repeated, so load from other jobs spreads over all of them. The script reports
medians, with the CPU time per step of this process and of the drafter actors. It also times
the round trip of an empty message over each transport, the floor of its overhead, and the
CPU time that an idle compiled graph's actor uses. Starts a local Ray cluster and stops it.
Needs psutil (a dependency of the project).

A compiled graph's actor busy-waits for input in Ray 2.60, so each compiled graph exists only
during its own runs: it is compiled by a short untimed run before each timed one and torn
down after it. Every engine gets the same untimed run, so all are treated alike.

    python scripts/measure_drafter_actor.py --model smollm2-135m-instruct --block-size 8 16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import defaultdict

import psutil
import ray
import torch
from ray.dag import InputNode

from deployments.drafter import CompiledGraphDrafter, start_drafter_actor
from dflash_core.engine import SpeculativeEngine
from dflash_core.pipeline import (
    LoadedTarget,
    build_draft,
    build_engine,
    encode_prompt,
    load_target_and_tokenizer,
)
from dflash_core.sampling import SamplingParams

PROMPT = "Write a Python function that returns the n-th Fibonacci number."
ENGINES = ("colocated", "actor", "compiled")
MAX_SEQ_LEN = 1024
ACTOR_NUM_CPUS = 0.1
ROUND_TRIP_BLOCKS = 4
ROUND_TRIPS_PER_BLOCK = 50
IDLE_SECONDS = 2.0


@ray.remote(num_cpus=ACTOR_NUM_CPUS)
class EmptyActor:
    def echo(self, value: object) -> object:
        return value

    def pid(self) -> int:
        return os.getpid()


def step_seconds(engine: SpeculativeEngine, prompt_ids: list[int], max_tokens: int):
    result = engine.generate(prompt_ids, SamplingParams(max_new_tokens=max_tokens))
    return result.decode_seconds / result.num_steps, result


def cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in processes)


def drafter_actor_processes() -> list[psutil.Process]:
    """Worker processes of drafter actors, found by the title Ray gives them."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any("ray::DrafterActor" in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def build_engines(
    target: LoadedTarget, block_size: int, threads: int
) -> tuple[dict[str, SpeculativeEngine], list]:
    """Return the three engines for one block size, and the remote drafters to close."""
    draft = build_draft("random", target, block_size=block_size)
    engines = {"colocated": build_engine(target, draft, max_seq_len=MAX_SEQ_LEN)}
    drafters = []
    for transport in ("actor", "compiled"):
        drafter = start_drafter_actor(
            draft,
            target.model,
            num_slots=1,
            max_seq_len=MAX_SEQ_LEN,
            block_size=None,
            num_cpus=ACTOR_NUM_CPUS,
            threads=threads,
            transport=transport,
        )
        drafters.append(drafter)
        engines[transport] = SpeculativeEngine(
            target.model, drafter, max_seq_len=MAX_SEQ_LEN, eos_token_ids=target.eos_token_ids
        )
    return engines, drafters


def empty_round_trips() -> tuple[dict[str, list[float]], float]:
    """Time empty messages over each transport, in alternating blocks.

    Returns the round trips by transport, and the CPU seconds per second that the actor of an
    idle compiled graph uses.
    """
    by_call = EmptyActor.remote()
    by_graph = EmptyActor.remote()
    graph_actor = psutil.Process(ray.get(by_graph.pid.remote()))
    ray.get(by_call.echo.remote(None))
    seconds: dict[str, list[float]] = {"actor": [], "compiled": []}
    idle_cpu = []
    for _ in range(ROUND_TRIP_BLOCKS):
        for _ in range(ROUND_TRIPS_PER_BLOCK):
            began = time.perf_counter()
            ray.get(by_call.echo.remote(None))
            seconds["actor"].append(time.perf_counter() - began)

        with InputNode() as value:
            echo = by_graph.echo.bind(value)
        graph = echo.experimental_compile(_max_inflight_executions=1)
        try:
            graph.execute(None).get()
            for _ in range(ROUND_TRIPS_PER_BLOCK):
                began = time.perf_counter()
                graph.execute(None).get()
                seconds["compiled"].append(time.perf_counter() - began)
            used = cpu_seconds([graph_actor])
            time.sleep(IDLE_SECONDS)
            idle_cpu.append((cpu_seconds([graph_actor]) - used) / IDLE_SECONDS)
        finally:
            graph.teardown()
    return seconds, statistics.median(idle_cpu)


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="target model spec")
    parser.add_argument(
        "--block-size", type=int, nargs="+", default=[16], help="draft block sizes to measure"
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each engine")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2)
    drafters = []
    try:
        target = load_target_and_tokenizer(args.model)
        prompt_ids = encode_prompt(target.tokenizer, PROMPT)
        configs = {}  # (block_size, engine name) -> engine
        for block_size in args.block_size:
            engines, remote = build_engines(target, block_size, args.threads)
            drafters.extend(remote)
            configs.update({(block_size, name): engine for name, engine in engines.items()})
        this_process = [psutil.Process()]
        actor_processes = drafter_actor_processes()

        timings: dict[tuple[int, str], list[float]] = defaultdict(list)
        engine_cpu: dict[tuple[int, str], list[float]] = defaultdict(list)
        actor_cpu: dict[tuple[int, str], list[float]] = defaultdict(list)
        outputs = {}
        order = list(configs)
        for repeat in range(args.repeats):
            # Rotate the order so no configuration always runs right after the same one.
            shift = repeat % len(order)
            for key in order[shift:] + order[:shift]:
                engine = configs[key]
                step_seconds(engine, prompt_ids, 4)  # untimed: warms up, compiles a graph
                engine_used = cpu_seconds(this_process)
                actor_used = cpu_seconds(actor_processes)
                seconds, result = step_seconds(engine, prompt_ids, args.max_tokens)
                engine_cpu[key].append((cpu_seconds(this_process) - engine_used) / result.num_steps)
                actor_cpu[key].append(
                    (cpu_seconds(actor_processes) - actor_used) / result.num_steps
                )
                if isinstance(engine.drafter, CompiledGraphDrafter):
                    engine.drafter.teardown_graph()
                timings[key].append(seconds)
                outputs[key] = result.token_ids
        for block_size in args.block_size:
            for name in ENGINES[1:]:
                assert outputs[block_size, name] == outputs[block_size, "colocated"], (
                    f"block size {block_size}: the {name} drafter gave different tokens"
                )
        round_trips, idle_graph_cpu = empty_round_trips()
    finally:
        for drafter in drafters:
            drafter.close()
        ray.shutdown()
    load_after = os.getloadavg()

    for block_size in args.block_size:
        colocated_ms = median_ms(timings[block_size, "colocated"])
        actor_ms = median_ms(timings[block_size, "actor"])
        compiled_ms = median_ms(timings[block_size, "compiled"])
        print(
            f"model {args.model}, block_size {block_size}, {args.max_tokens} tokens, "
            f"{args.threads} thread(s), {os.cpu_count()} CPUs ({platform.processor() or 'cpu'})"
        )
        print(f"decode step, colocated drafter: {colocated_ms:.2f} ms (median of {args.repeats})")
        print(f"decode step, drafter actor:     {actor_ms:.2f} ms")
        print(f"actor overhead per step:        {actor_ms - colocated_ms:.2f} ms")
        print(f"decode step, compiled graph:    {compiled_ms:.2f} ms")
        print(f"compiled overhead per step:     {compiled_ms - colocated_ms:.2f} ms")
    print(f"empty actor call round trip:    {median_ms(round_trips['actor']):.2f} ms")
    print(f"empty compiled graph round trip: {median_ms(round_trips['compiled']):.2f} ms")
    print(f"CPU use of an idle compiled graph's actor: {idle_graph_cpu:.2f} cores")
    print(
        f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f}, "
        f"on {os.cpu_count()} CPUs"
    )

    print(
        "\n| block size | drafter | median step (ms) | min .. max (ms) | "
        "CPU per step, engine / drafter actors (ms) |"
    )
    print("|---|---|---|---|---|")
    for block_size in args.block_size:
        for name in ENGINES:
            samples = timings[block_size, name]
            low, high = 1000 * min(samples), 1000 * max(samples)
            engine_ms = median_ms(engine_cpu[block_size, name])
            actor_ms = median_ms(actor_cpu[block_size, name])
            print(
                f"| {block_size} | {name} | {median_ms(samples):.1f} | {low:.1f} .. {high:.1f} "
                f"| {engine_ms:.1f} / {actor_ms:.1f} |"
            )


if __name__ == "__main__":
    main()
