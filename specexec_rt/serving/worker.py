"""The engine's own thread for the server: it runs the engine's one scheduling loop
(``Engine.step``: the scheduler admits and plans, the runner runs the pass) and adds no
scheduling of its own. What it adds is the server's side: a bound on the engine's waiting
queue, and events. Each request's text comes back through that request's callback (the
server turns it into an ``asyncio.Queue`` per request).

Up to ``engine.max_batch`` requests share every pass (the engine's scheduler); at most
``max_queue`` more wait for a slot: ``submit`` raises ``QueueFull`` beyond that, at once.
Requests join and leave between passes.

Cancellation (client gone, shutdown) frees the request's slot at the engine's next pass; a job
cancelled while it waits never runs.

Events a job emits, in order: ``("piece", str)`` per pass (possibly ""; unless the job was
submitted with ``pieces=False``), then exactly one of
``("done", GenerationResult)``, ``("error", exception)``, ``("cancelled", None)``.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Optional

DEFAULT_MAX_QUEUE = 8


class QueueFull(Exception):
    """Every slot of the engine is busy and ``max_queue`` jobs already wait."""


class Job:
    """One generation request: token ids and checked engine kwargs; ``emit`` gets its events
    (called on the engine's thread, or the cancelling one: it must not block).
    ``pieces=False``: only the last event (a non-streamed answer needs no per-pass wake-up)."""

    def __init__(self, prompt_ids: list, kwargs: dict, emit: Callable[[tuple], None], pieces: bool = True):
        self.prompt_ids, self.kwargs, self.emit, self.pieces = prompt_ids, kwargs, emit, pieces
        self.handle = None
        self._cancel = threading.Event()
        self.finished = False

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class EngineWorker:
    """Runs ``engine.step()`` on one thread until shutdown; jobs in FIFO order (the engine's)."""

    def __init__(self, engine, max_queue: int = DEFAULT_MAX_QUEUE, max_batch: Optional[int] = None):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0, got {max_queue!r}")
        engine_batch = getattr(engine, "max_batch", 1)
        if max_batch is not None and max_batch != engine_batch:
            raise ValueError(f"max_batch={max_batch!r}, but the engine was built with max_batch={engine_batch}")
        self.engine, self.max_queue, self.max_batch = engine, max_queue, engine_batch
        self.counters = {"requests": 0, "completed": 0, "cancelled": 0, "rejected_queue_full": 0, "errors": 0,
                         "passes": 0, "batched_passes": 0}
        self._cond = threading.Condition()
        self._jobs: set = set()          # submitted, not finished
        self._holds = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="specexec-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    def _slots(self) -> tuple[int, int]:
        """(requests in passes or holding a slot, requests queued in the engine)."""
        active, queued = self.engine.pending_requests
        return active + self._holds, queued

    @property
    def waiting(self) -> int:
        """Jobs that wait for a free slot."""
        with self._cond:
            used, queued = self._slots()
            return max(0, queued - max(0, self.max_batch - used))

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._jobs) or self._holds > 0

    def submit(self, prompt_ids: list, kwargs: dict, emit: Callable[[tuple], None], pieces: bool = True) -> Job:
        """Queue a job; QueueFull when every slot is busy and ``max_queue`` jobs already wait.
        The engine's parameter errors propagate (nothing is queued then)."""
        job = Job(prompt_ids, kwargs, emit, pieces)
        with self._cond:
            if self._stopping:
                raise QueueFull("the worker is shutting down")
            used, queued = self._slots()
            if queued + 1 - max(0, self.max_batch - used) > self.max_queue:
                self.counters["rejected_queue_full"] += 1
                self._cond.notify_all()
                raise QueueFull
            # Held across the submission: the job's done-callback (engine thread) takes this
            # lock, so it cannot run before ``job.handle`` is set.
            job.handle = self.engine.submit(prompt_ids, on_update=lambda piece, done: self._update(job, piece, done),
                                            **kwargs)
            self.counters["requests"] += 1
            self._jobs.add(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Stop ``job`` at the engine's next pass (or drop it if it waits); counted once, and
        only if it had not finished."""
        with self._cond:
            if job.finished or job.cancelled or job.handle is None:
                return
            job._cancel.set()
            self.counters["cancelled"] += 1
            self._cond.notify_all()
        job.handle.cancel()

    def cancel_all(self) -> None:
        with self._cond:
            jobs = list(self._jobs)
        for job in jobs:
            self.cancel(job)

    @contextmanager
    def hold(self):
        """Occupy one slot and pause the passes until the block ends (the engine looks busy, so
        the queue and 429 logic apply as under load). Raises QueueFull when no slot is free."""
        with self._cond:
            used, queued = self._slots()
            if used + queued >= self.max_batch + self.max_queue:
                raise QueueFull
            self._holds += 1
            self.engine.scheduler.pause()
        try:
            yield
        finally:
            self.engine.scheduler.resume()
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    def idle(self, timeout: float) -> bool:
        """Wait until nothing runs and nothing waits; False on timeout."""
        return self.wait_for(lambda counters: not (self._jobs or self._holds), timeout)

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float) -> bool:
        """Wait until ``predicate(counters)`` holds (True) or ``timeout`` s pass (False); every
        change of the counters or the jobs wakes it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.counters):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Refuse new jobs, cancel the queued and the running ones (they stop at the next pass),
        wait up to ``timeout`` s. Returns whether the engine went idle."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.cancel_all()
        idle = self.idle(timeout)
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=0.1 if not idle else timeout)
        return idle

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        """The engine's loop on this thread, one pass per ``step`` (each waits up to 0.1 s for
        work, so a shutdown is seen within that), until shutdown has left no job."""
        while True:
            with self._cond:
                if self._stopping and not self._jobs:
                    return
            n = self.engine.step(timeout=0.1)
            if n:
                with self._cond:
                    self.counters["passes"] += 1
                    self.counters["batched_passes"] += n > 1
                    self._cond.notify_all()

    def _update(self, job: Job, piece: str, done: bool) -> None:
        """The engine's callback for ``job``: a pass's piece, or its end."""
        if not done:
            if job.pieces and not job.cancelled:
                _emit(job, ("piece", piece))
            return
        with self._cond:
            if job.finished:
                return
            job.finished = True
            self._jobs.discard(job)
            self._cond.notify_all()
        try:
            result = job.handle.result()       # done: returns at once, or raises the request's error
        except Exception as e:  # noqa: BLE001 - every failure is the request's answer, the worker lives on
            with self._cond:
                self.counters["errors"] += 1
                self._cond.notify_all()
            _emit(job, ("error", e))
            return
        if job.cancelled or result.stats.finish_reason == "cancelled":
            _emit(job, ("cancelled", None))
            return
        with self._cond:
            self.counters["completed"] += 1
            self._cond.notify_all()
        if job.pieces and piece:
            _emit(job, ("piece", piece))
        _emit(job, ("done", result))


def _emit(job: Job, event: tuple) -> None:
    try:
        job.emit(event)
    except Exception:   # noqa: BLE001 - the receiver is gone (its event loop closed): nobody to tell
        pass
