"""The engine's own thread: requests reach it through a bounded FIFO queue, and it sends each
request's text pieces back through that request's callback (the server turns them into an
``asyncio.Queue`` per request).

One engine owns one KV cache, so today the worker runs one request at a time (``max_batch``
= 1); a batched engine would take up to ``max_batch`` queued jobs per pass here, and nothing
above this module would change. At most ``max_queue`` jobs wait besides the running one:
``submit`` raises ``QueueFull`` beyond that, at once.

Cancellation (client gone, shutdown) is a flag the worker reads after every pass: it closes the
engine's stream generator there, so the engine stops at the pass in flight and the next job
starts. A job cancelled while it waits never runs.

Events a job emits, in order: ``("piece", str)`` per pass (possibly ""; unless the job was
submitted with ``pieces=False``), then exactly one of
``("done", GenerationResult)``, ``("error", exception)``, ``("cancelled", None)``.
"""
from __future__ import annotations

import collections
import threading
import time
from contextlib import contextmanager
from typing import Callable, Optional

DEFAULT_MAX_QUEUE = 8


class QueueFull(Exception):
    """The engine is busy and ``max_queue`` jobs already wait."""


class Job:
    """One generation request: token ids and checked engine kwargs; ``emit`` gets its events
    (called on the worker thread: it must not block). ``pieces=False``: only the last event (a
    non-streamed answer needs no per-pass wake-up of its receiver)."""

    def __init__(self, prompt_ids: list, kwargs: dict, emit: Callable[[tuple], None], pieces: bool = True):
        self.prompt_ids, self.kwargs, self.emit, self.pieces = prompt_ids, kwargs, emit, pieces
        self._cancel = threading.Event()
        self.started = False
        self.finished = False

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class _Hold(Job):
    """Occupies the engine until released (``EngineWorker.hold``)."""

    def __init__(self):
        super().__init__([], {}, lambda event: None)
        self.running = threading.Event()
        self.release = threading.Event()


class EngineWorker:
    """``engine.stream`` driven on one thread, jobs in FIFO order."""

    def __init__(self, engine, max_queue: int = DEFAULT_MAX_QUEUE, max_batch: int = 1):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0, got {max_queue!r}")
        if max_batch != 1:
            raise ValueError(f"max_batch={max_batch!r}: this engine runs one request at a time (max_batch=1)")
        self.engine, self.max_queue, self.max_batch = engine, max_queue, max_batch
        self.counters = {"requests": 0, "completed": 0, "cancelled": 0, "rejected_queue_full": 0, "errors": 0}
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._running: Optional[Job] = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="specexec-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    @property
    def waiting(self) -> int:
        """Jobs queued, not yet running."""
        with self._cond:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._running is not None

    def submit(self, prompt_ids: list, kwargs: dict, emit: Callable[[tuple], None], pieces: bool = True) -> Job:
        """Queue a job; QueueFull when the engine is busy and ``max_queue`` jobs already wait."""
        return self._enqueue(Job(prompt_ids, kwargs, emit, pieces))

    def _enqueue(self, job: Job) -> Job:
        with self._cond:
            if self._stopping:
                raise QueueFull("the worker is shutting down")
            if (self._running is not None or self._queue) and len(self._queue) >= self.max_queue:
                self.counters["rejected_queue_full"] += 1
                raise QueueFull
            if not isinstance(job, _Hold):
                self.counters["requests"] += 1
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Stop ``job`` at its next pass (or drop it if it waits); counted once, and only if it
        had not finished."""
        with self._cond:
            if job.finished or job.cancelled:
                return
            job._cancel.set()
            self.counters["cancelled"] += 1
            if job in self._queue:          # never runs: finish it here
                self._queue.remove(job)
                job.finished = True
                self._cond.notify_all()
            else:
                return
        _emit(job, ("cancelled", None))

    def cancel_all(self) -> None:
        with self._cond:
            jobs = list(self._queue) + ([self._running] if self._running is not None else [])
        for job in jobs:
            self.cancel(job)

    @contextmanager
    def hold(self):
        """Occupy the engine (as a running request would) until the block ends: the queue and
        429 logic apply as under load. Raises QueueFull like ``submit``."""
        job = self._enqueue(_Hold())
        job.running.wait()
        try:
            yield
        finally:
            job.release.set()

    def idle(self, timeout: float) -> bool:
        """Wait until nothing runs and nothing waits; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._running is not None or self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Refuse new jobs, cancel the queued and the running one (it stops at its next pass),
        wait up to ``timeout`` s for the engine. Returns whether it went idle."""
        with self._cond:
            self._stopping = True
        self.cancel_all()
        idle = self.idle(timeout)
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=0.1 if not idle else timeout)
        return idle

    # ------------------------------------------------------------------ worker thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._running = job
                job.started = True
            last = None
            try:
                if isinstance(job, _Hold):
                    job.running.set()
                    job.release.wait()
                else:
                    last = self._run(job)
            finally:
                with self._cond:
                    # Finished before its last event goes out: a cancel() that races with the
                    # event is a no-op, not a cancellation of a completed request.
                    job.finished = True
                    self._running = None
                    if last is not None and last[0] in ("done", "error"):     # cancel() counted its own
                        self.counters["completed" if last[0] == "done" else "errors"] += 1
                    self._cond.notify_all()
            if last is not None:
                _emit(job, last)

    def _run(self, job: Job) -> tuple:
        """Drive the engine for ``job``, emitting its pieces -> its last event (not yet emitted)."""
        try:
            gen = self.engine.stream(job.prompt_ids, **job.kwargs)
            try:
                for piece in gen:
                    if job.cancelled:
                        return ("cancelled", None)
                    if job.pieces:
                        _emit(job, ("piece", piece))
            finally:
                gen.close()     # GeneratorExit at the engine's yield: the pass just done was its last
        except Exception as e:  # noqa: BLE001 - every failure is the request's answer, the worker lives on
            return ("error", e)
        if job.cancelled:
            return ("cancelled", None)
        return ("done", getattr(self.engine, "last_result", None))


def _emit(job: Job, event: tuple) -> None:
    try:
        job.emit(event)
    except Exception:   # noqa: BLE001 - the receiver is gone (its event loop closed): nobody to tell
        pass
