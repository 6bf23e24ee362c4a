"""Generate training data: the target answers training prompts, stored as token ids.

Each finished response is appended to a JSONL file at once, so an interrupted run resumes by
skipping the record ids already written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from dflash_core.engine import SpeculativeEngine
from dflash_core.sampling import SamplingParams
from dflash_core.scheduler import Request, Scheduler
from dflash_core.training.target_states import StateRecorder

logger = logging.getLogger(__name__)


def done_record_ids(path: Path) -> set[str]:
    """Record ids already in an output file; a truncated last line is dropped."""
    if not path.is_file():
        return set()
    done = set()
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for number, line in enumerate(lines):
        try:
            done.add(json.loads(line)["record_id"])
        except (json.JSONDecodeError, KeyError):
            if number != len(lines) - 1:
                message = f"{path} line {number + 1} is corrupt; remove it to resume"
                raise ValueError(message) from None
            # An interrupted write: rewrite the file without its last line.
            path.write_text("".join(lines[:-1]), encoding="utf-8")
    return done


# Finished responses between two saves of the recorded target states.
STATES_SAVE_EVERY = 256


@contextlib.contextmanager
def sigterm_raises_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit in the main thread while the block runs.

    Python's default SIGTERM action ends the process without running `finally` blocks, so a
    job scheduler that stops datagen would lose the target states not yet saved.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        logger.warning("datagen received signal %d: saving what is done, then exiting", signum)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        # None means the earlier handler was not set from Python and cannot be put back.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def generate_responses(
    engine: SpeculativeEngine,
    prompts: Iterable[tuple[str, list[int]]],
    out_path: str | Path,
    params: SamplingParams,
    recorder: StateRecorder | None = None,
) -> int:
    """Answer (record_id, prompt_ids) pairs with the engine; returns how many were written.

    A `recorder` must also be the engine's `on_tapped` hook. It then saves the tapped target
    states of each finished response, every STATES_SAVE_EVERY responses and at the end.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = done_record_ids(out_path)
    todo = [(rid, ids) for rid, ids in prompts if rid not in done]
    if done:
        logger.info(
            "resuming: %d responses already in %s, %d to go", len(done), out_path, len(todo)
        )
    prompt_ids = dict(todo)
    scheduler = Scheduler(engine, max_prefills_per_step=engine.num_slots)
    for record_id, ids in todo:
        scheduler.submit(Request(record_id, ids, params))
    written = 0
    with (
        open(out_path, "a", encoding="utf-8") as handle,
        tqdm(total=len(todo), desc="generating responses", unit="prompt") as progress,
        sigterm_raises_exit(),
    ):
        try:
            while scheduler.has_work:
                for result in scheduler.step():
                    record = {
                        "record_id": result.request_id,
                        "prompt_ids": prompt_ids[result.request_id],
                        "response_ids": result.token_ids,
                        "finish_reason": result.finish_reason,
                    }
                    handle.write(json.dumps(record) + "\n")
                    handle.flush()
                    written += 1
                    progress.update(1)
                    if recorder is not None:
                        tokens = record["prompt_ids"] + result.token_ids
                        recorder.finish(result.request_id, tokens)
                        if recorder.unsaved >= STATES_SAVE_EVERY:
                            recorder.save()
        finally:
            # Responses already written keep their states even when the run is interrupted.
            if recorder is not None:
                recorder.save()
    return written
