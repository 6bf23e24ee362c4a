"""Continuous batching: requests join and leave the engine's running batch between steps."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from dflash_core.engine import SpeculativeEngine
from dflash_core.sampling import SamplingParams
from dflash_core.sequence import GenerationResult, Sequence

logger = logging.getLogger(__name__)

# Prefills that may run between two decode steps while other rows are running, so a burst
# of arrivals does not stall the rows already decoding.
DEFAULT_MAX_PREFILLS_PER_STEP = 1


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class Scheduler:
    """Runs queued requests over the engine's KV slots, admitting them as slots free up.

    A request is admitted when a slot is free; each slot holds `max_seq_len` tokens, so a
    request whose prompt + max_new_tokens + block_size does not fit is rejected at submit.
    """

    def __init__(
        self,
        engine: SpeculativeEngine,
        max_prefills_per_step: int = DEFAULT_MAX_PREFILLS_PER_STEP,
    ) -> None:
        self.engine = engine
        self.max_prefills_per_step = max_prefills_per_step
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []

    def submit(self, request: Request) -> None:
        """Queue a request; raises ValueError at once if it can never run."""
        self.engine.check_request(request.prompt_ids, request.params)
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[GenerationResult]:
        """Admit waiting requests, run one decode step, and return the requests that finished."""
        finished = self._admit()
        self.engine.step(self.running)
        for seq in [s for s in self.running if s.finish_reason is not None]:
            self.running.remove(seq)
            finished.append(self.engine.finish(seq))
        return finished

    def _admit(self) -> list[GenerationResult]:
        """Prefill waiting requests into free slots; returns those finished by prefill alone."""
        finished = []
        budget = self.max_prefills_per_step if self.running else self.engine.num_slots
        while self.waiting and self.engine.free_slots and budget > 0:
            request = self.waiting.popleft()
            seq = self.engine.start(request.request_id, request.prompt_ids, request.params)
            budget -= 1
            logger.debug("admitted request %s into slot %d", seq.request_id, seq.slot)
            if seq.finish_reason is not None:  # max_new_tokens 1 or a stop at the first token
                finished.append(self.engine.finish(seq))
            else:
                self.running.append(seq)
        return finished

    def run(self, requests: Iterable[Request]) -> list[GenerationResult]:
        """Run requests to completion; results come back in input order."""
        requests = list(requests)
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique within one run")
        for request in requests:
            self.submit(request)
        results: dict[str, GenerationResult] = {}
        while self.has_work:
            for result in self.step():
                results[result.request_id] = result
        return [results[r.request_id] for r in requests]
