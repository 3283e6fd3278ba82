"""The request threads of a worker: made as requests come, up to a bound, with a bounded
wait for a free one.

::

    pool = RequestThreads(limit=1024, queue_timeout=10.0, refuse=answer_503)
    pool.submit(serve, conn)          # a thread serves it now, or it waits its turn
    pool.shutdown(wait=False)

Every request in progress holds a thread: while its upstream thinks (a slow report, a
long poll) and while a stream is relayed. So the bound is high (``threads``, 1024 by
default) and threads are made only when every one made so far is busy, and end after
``IDLE_TIMEOUT`` seconds without a request: an idle worker has a few, a worker that just
served 200 slow requests at once keeps 200 until they have been idle that long. What a waiting
request costs, and what the bound means, is in docs/performance.rst.

Compared with ``concurrent.futures.ThreadPoolExecutor`` (which gthread uses, and which
made threads as lazily): an idle thread waits on a lock of its own, and a request goes to
the thread that became idle last. A hand-over is one lock release (the executor's shared
queue and idle semaphore cost a few more contended locks per request), the threads that
serve a light load are the same few, hot in the CPU caches, and the rest sleep with their
stacks untouched. There are no futures: gthread's worker reads none.

When every thread is busy, a request waits in a queue, first come first served; one that
waited longer than ``queue_timeout`` when a thread takes it is not served but handed to
``refuse`` (the worker answers 503 ``overloaded``): a client is told at once that the
gateway is full, rather than waiting behind requests that will not be done in time.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("kproxy")

# A thread idle this long ends: a burst (a thousand WebSocket handshakes at once) leaves
# no thousand threads behind. The last idle thread takes the next request, so under a
# steady load the few hot threads never wait this long and are never remade.
IDLE_TIMEOUT = 10.0


class _Slot:
    """One thread's mailbox: its next job, and the lock it sleeps on until one comes."""

    __slots__ = ("job", "wake")

    def __init__(self) -> None:
        self.job: tuple[float, Callable[..., Any], tuple[Any, ...]] | None = None
        self.wake = threading.Lock()
        self.wake.acquire()  # held: the thread's acquire() sleeps until submit releases it


class RequestThreads:
    def __init__(self, limit: int, queue_timeout: float = 0.0,
                 refuse: Callable[..., Any] | None = None, name: str = "kproxy-request"):
        self.limit = limit
        self.queue_timeout = queue_timeout  # 0: wait however long it takes
        self.refuse = refuse  # called instead of the job, with its arguments, when it waited too long
        self.name = name
        self.idle_timeout = IDLE_TIMEOUT
        self.started = 0   # threads made so far (never more than limit)
        self._idle: list[_Slot] = []  # last idle last: the next to take a job
        self._queue: collections.deque[tuple[float, Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._lock = threading.Lock()
        self._stopping = False

    @property
    def queued(self) -> int:
        """Requests waiting for a thread."""
        return len(self._queue)

    @property
    def busy(self) -> int:
        """Threads serving a request."""
        return self.started - len(self._idle)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        job = (time.monotonic(), fn, args)
        with self._lock:
            if self._stopping:
                return
            if self._idle:
                slot = self._idle.pop()
                slot.job = job
            elif self.started < self.limit:
                self.started += 1
                slot = None
            else:
                self._queue.append(job)
                return
        if slot is not None:
            slot.wake.release()
            return
        try:
            threading.Thread(target=self._run, args=(job,), name=f"{self.name}-{self.started}", daemon=True).start()
        except RuntimeError:  # the system cannot make another thread (memory, a limit)
            log.exception("cannot start request thread %d; the request waits for a busy one", self.started)
            with self._lock:
                self.started -= 1
                self._queue.appendleft(job)

    def _run(self, job: tuple[float, Callable[..., Any], tuple[Any, ...]] | None) -> None:
        slot = _Slot()
        while job is not None:
            since, fn, args = job
            try:
                if self.queue_timeout and self.refuse is not None and time.monotonic() - since > self.queue_timeout:
                    self.refuse(*args)
                else:
                    fn(*args)
            except BaseException:  # a job's failure must not end the thread
                log.exception("request thread: unhandled error")
            job = args = fn = None  # the finished request's objects are not kept alive while idle
            with self._lock:
                if self._queue:
                    job = self._queue.popleft()
                    continue
                if self._stopping:
                    break
                self._idle.append(slot)
            if not slot.wake.acquire(timeout=self.idle_timeout):
                with self._lock:  # idle too long: this thread ends, unless a job came just now
                    if slot in self._idle:
                        self._idle.remove(slot)
                        break
                slot.wake.acquire()  # submit() chose this slot as the wait ended: take its job
            job, slot.job = slot.job, None
        with self._lock:
            self.started -= 1

    def shutdown(self, wait: bool = False) -> None:
        """Idle threads end; busy ones end after their request; queued requests are dropped
        (their connections are the worker's to close)."""
        with self._lock:
            self._stopping = True
            idle, self._idle = self._idle, []
            self._queue.clear()
        for slot in idle:
            slot.job = None
            slot.wake.release()
