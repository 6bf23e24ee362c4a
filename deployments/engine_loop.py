"""The continuous-batching loop of one engine replica, run in a background thread.

The loop thread owns the `Scheduler` and its engine: only it submits, steps and cancels, so the
core library needs no locks. Requests reach it through an inbox of commands, and each request
gets its own asyncio queue of `StreamChunk`s (or one exception) on the event loop of the
caller. This module imports neither Ray nor gRPC, so it can be tested alone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from deployments.schemas import (
    EngineStepError,
    EngineStoppedError,
    InvalidRequestError,
    StreamChunk,
)
from dflash_core.scheduler import Request, Scheduler
from dflash_core.sequence import GenerationResult, Sequence

logger = logging.getLogger(__name__)

# How often an idle loop thread wakes up to check whether it should stop, in seconds.
IDLE_POLL_SECONDS = 0.5
# Seconds without work after which the loop calls its on_idle hook.
DEFAULT_IDLE_SECONDS = 30.0
CANCELLED = "cancelled"


@dataclass
class _Stream:
    """Delivery state of one request: its queue and how much was already sent."""

    event_loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue  # StreamChunk items, or one exception that ends the stream
    submitted: bool = False  # handed to the scheduler (so a failed step affects it)
    sent_text_len: int = 0
    sent_num_tokens: int = 0


class EngineLoop:
    """Runs `Scheduler.step` in a thread and streams each request's committed output."""

    def __init__(
        self,
        scheduler: Scheduler,
        on_idle: Callable[[], None] | None = None,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
    ) -> None:
        """`on_idle` runs in the loop thread once the loop has had no work for `idle_seconds`,
        and again after each later stretch of work."""
        self.scheduler = scheduler
        self._on_idle = on_idle
        self._idle_seconds = idle_seconds
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._stopping = threading.Event()
        self.num_cancelled = 0  # requests dropped before they finished, read for monitoring
        self._thread = threading.Thread(target=self._run, name="dflash-engine-loop", daemon=True)
        self._thread.start()

    # ---- called from the replica's event loop -------------------------------------------

    async def stream(
        self, request_id: str, make_request: Callable[[], Request]
    ) -> AsyncIterator[StreamChunk]:
        """Submit a request and yield its chunks; the last one carries the result.

        `make_request` runs in the loop thread, because it tokenizes and the tokenizer is
        also used there to decode output text. A ValueError from it or from
        `Scheduler.submit` ends the stream with InvalidRequestError. A failed decode step
        ends it with EngineStepError, a stopped loop with EngineStoppedError. Closing the
        generator early (a client that went away) cancels the request and frees its slot.
        """
        chunks = self._register(request_id)
        self._inbox.put(lambda: self._submit(request_id, make_request))
        done = False
        try:
            while True:
                item = await chunks.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                # Set before the yield: a caller may close the generator at the last chunk.
                done = item.result is not None
                yield item
                if done:
                    return
        finally:
            if not done:
                logger.info("request %s cancelled by the caller", request_id)
                self._inbox.put(lambda: self._cancel(request_id))

    def check_alive(self) -> None:
        """Raise EngineStoppedError if the loop thread is not running."""
        if not self._thread.is_alive() or self._stopping.is_set():
            raise EngineStoppedError("the engine's decode loop is not running")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop thread; requests still in flight fail with EngineStoppedError."""
        self._stopping.set()
        self._inbox.put(lambda: None)  # wake an idle loop
        self._thread.join(timeout)

    @property
    def num_requests(self) -> int:
        """Requests registered and not finished: queued, waiting for a slot or running."""
        with self._streams_lock:
            return len(self._streams)

    def _register(self, request_id: str) -> asyncio.Queue:
        self.check_alive()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._streams_lock:
            if request_id in self._streams:
                raise InvalidRequestError(
                    f"request_id {request_id!r} is already in flight; use a unique request_id"
                )
            self._streams[request_id] = stream
        return stream.chunks

    # ---- the loop thread ------------------------------------------------------------------

    def _run(self) -> None:
        last_work = time.monotonic()
        idle_hook_due = self._on_idle is not None
        try:
            while not self._stopping.is_set():
                self._run_commands(wait=not self.scheduler.has_work)
                if self.scheduler.has_work and not self._stopping.is_set():
                    self._step()
                    last_work = time.monotonic()
                    idle_hook_due = self._on_idle is not None
                elif idle_hook_due and time.monotonic() - last_work >= self._idle_seconds:
                    idle_hook_due = False
                    self._call_idle_hook()
        except BaseException:
            # Logged here and not re-raised: the thread ends, check_health then fails, and
            # Serve replaces the replica.
            logger.exception("the engine's decode loop crashed")
        finally:
            self._stopping.set()
            self._fail_streams(
                lambda _: True, EngineStoppedError("the engine's decode loop stopped")
            )

    def _call_idle_hook(self) -> None:
        try:
            self._on_idle()
        except Exception:
            # The hook only frees resources; the engine goes on without that.
            logger.exception("the engine loop's idle hook failed")

    def _run_commands(self, wait: bool) -> None:
        """Run queued commands; when `wait`, block up to IDLE_POLL_SECONDS for the first."""
        try:
            command = (
                self._inbox.get(timeout=IDLE_POLL_SECONDS) if wait else self._inbox.get_nowait()
            )
        except queue.Empty:
            return
        while True:
            command()
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _submit(self, request_id: str, make_request: Callable[[], Request]) -> None:
        stream = self._stream(request_id)
        if stream is None:
            return  # cancelled before the loop saw it
        try:
            self.scheduler.submit(make_request())
        except ValueError as error:
            logger.warning("request %s rejected: %s", request_id, error)
            self._finish_stream(request_id, InvalidRequestError(str(error)))
            return
        stream.submitted = True

    def _cancel(self, request_id: str) -> None:
        """Drop a request: out of the waiting queue, or marked finished so the next step frees it."""
        with self._streams_lock:
            self._streams.pop(request_id, None)
        for request in self.scheduler.waiting:
            if request.request_id == request_id:
                self.scheduler.waiting.remove(request)
                self.num_cancelled += 1
                return
        for seq in self.scheduler.running:
            if seq.request_id == request_id and seq.finish_reason is None:
                seq.finish_reason = CANCELLED
                self.num_cancelled += 1

    def _step(self) -> None:
        try:
            finished = self.scheduler.step()
        except Exception as error:
            self._fail_step(error)
            return
        for seq in self.scheduler.running:
            self._send_delta(seq)
        for result in finished:
            self._send_result(result)

    def _send_delta(self, seq: Sequence) -> None:
        stream = self._stream(seq.request_id)
        if stream is None:
            return
        text = seq.text.stable_text() if seq.text is not None else ""
        chunk = StreamChunk(
            text=text[stream.sent_text_len :],
            token_ids=seq.output_ids[stream.sent_num_tokens :],
        )
        if not chunk.text and not chunk.token_ids:
            return
        stream.sent_text_len = len(text)
        stream.sent_num_tokens = len(seq.output_ids)
        self._deliver(stream, chunk)

    def _send_result(self, result: GenerationResult) -> None:
        stream = self._stream(result.request_id)
        if stream is None:
            return  # cancelled
        text = result.text or ""
        chunk = StreamChunk(
            text=text[stream.sent_text_len :],
            token_ids=result.token_ids[stream.sent_num_tokens :],
            result=result,
        )
        self._finish_stream(result.request_id, chunk)

    def _fail_step(self, error: Exception) -> None:
        """Fail every request the step touched, release their slots and keep serving.

        Requests still waiting for a slot were not part of the step and stay queued.
        """
        waiting = {request.request_id for request in self.scheduler.waiting}
        with self._streams_lock:
            affected = [
                rid for rid, s in self._streams.items() if s.submitted and rid not in waiting
            ]
        logger.error(
            "decode step failed for request(s) %s: %s", ", ".join(affected), error, exc_info=error
        )
        for seq in self.scheduler.running:
            if seq.slot not in self.scheduler.engine.free_slots:
                self.scheduler.engine.finish(seq)
        self.scheduler.running.clear()
        failure = EngineStepError(f"decode step failed: {type(error).__name__}: {error}")
        self._fail_streams(lambda request_id: request_id in affected, failure)

    def _fail_streams(self, selected: Callable[[str], bool], error: Exception) -> None:
        with self._streams_lock:
            request_ids = [request_id for request_id in self._streams if selected(request_id)]
        for request_id in request_ids:
            self._finish_stream(request_id, error)

    def _stream(self, request_id: str) -> _Stream | None:
        with self._streams_lock:
            return self._streams.get(request_id)

    def _finish_stream(self, request_id: str, item: StreamChunk | BaseException) -> None:
        with self._streams_lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._deliver(stream, item)

    @staticmethod
    def _deliver(stream: _Stream, item: StreamChunk | BaseException) -> None:
        try:
            stream.event_loop.call_soon_threadsafe(stream.chunks.put_nowait, item)
        except RuntimeError:
            pass  # the caller's event loop is closed, so the stream has no reader
