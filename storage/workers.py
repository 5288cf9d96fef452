"""Worker threads that serve reads before writes, and the reads compute waits for before read-ahead.

A read is on someone's critical path: a training step waits for the state or weights it brings. A write is
write-back: it only has to finish before its buffer is needed again. Served first-come first-served, a read
issued behind a few chunk writes waits for all of their blocks, and what waits on it (an update, a forward)
waits too, while the disk is no busier. Linux's I/O schedulers favour reads for the same reason (deadline gives
reads a 500 ms deadline, writes 5 s).

Among reads the same holds one level up: a forward or backward waits for the weights it fetches, while the
optimizer's state read-ahead only has to land before the update thread reaches that unit. Behind a unit's state
(hundreds of MB for an embedding) a weight fetch would stall compute with the disk no busier.

So the pool keeps one FIFO per priority, and a free thread takes the oldest task of the most urgent non-empty
one. Writes are not starved in practice: whoever issues reads waits for them, so reads arrive in bounded bursts
(the optimizer's read-ahead is capped by its buffers), and every write is served in the gaps between.
"""

from __future__ import annotations

import atexit
import collections
import threading
import weakref
from typing import Callable

URGENT = 0
"""Reads compute waits for (and checking what they brought): weights for a forward or backward."""
READAHEAD = 1
"""Reads ahead of their use (and checking them): optimizer state, grads read back for a redo."""
BACKGROUND = 2
"""Writes (and hashing what a write sends): they only have to finish before their memory is reused."""
PRIORITIES = (URGENT, READAHEAD, BACKGROUND)


_LIVE: weakref.WeakSet = weakref.WeakSet()


def _drain_at_exit() -> None:
    # Queued writes of a store the program forgot to close still finish, and the threads end, before the
    # interpreter joins its threads and finalizes (as ThreadPoolExecutor does, through the same hook): a thread
    # still inside torch's C++ code while the interpreter tears down can abort the process.
    for pool in list(_LIVE):
        pool.shutdown(wait=True)


try:  # runs before threading joins non-daemon threads at exit (CPython >= 3.9); plain atexit runs after
    threading._register_atexit(_drain_at_exit)
except AttributeError:  # pragma: no cover - other interpreters
    atexit.register(_drain_at_exit)


class PriorityWorkers:
    """A fixed-size thread pool with one FIFO queue per priority: :data:`URGENT`, then :data:`READAHEAD`, then
    :data:`BACKGROUND`.

    Threads start on demand, up to ``threads``, and end at ``shutdown`` (at the latest when the interpreter
    exits). A task must handle its own errors (the store's tasks hand them to their handle): one that raises
    anyway is dropped, and its thread lives on.
    """

    def __init__(self, threads: int, name: str):
        if threads < 1:
            raise ValueError(f"PriorityWorkers: expected >= 1 thread, got {threads}")
        self._max = threads
        self._name = name
        self._queues = tuple(collections.deque() for _ in PRIORITIES)
        self._cv = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._shutdown = False
        _LIVE.add(self)

    def submit(self, fn: Callable, *args, priority: int = BACKGROUND) -> None:
        with self._cv:
            if self._shutdown:
                raise RuntimeError(f"{self._name}: cannot submit after shutdown")
            self._queues[priority].append((fn, args))
            # Each sleeping thread takes one queued task when it wakes; ``_idle`` counts those notified but not
            # yet awake too. Tasks beyond them need new threads: counting "some thread is idle" instead left a
            # task behind blocked ones (a write behind reads held by a slow disk) with the pool below its size.
            if sum(len(q) for q in self._queues) > self._idle and len(self._threads) < self._max:
                t = threading.Thread(target=self._run, name=f"{self._name}_{len(self._threads)}")
                self._threads.append(t)
                t.start()
            else:
                self._cv.notify()

    @property
    def threads(self) -> int:
        """The most threads this pool runs."""
        return self._max

    def pending(self) -> int:
        """Tasks queued and not yet started."""
        with self._cv:
            return sum(len(q) for q in self._queues)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (any(self._queues) or self._shutdown):
                    self._idle += 1
                    self._cv.wait()
                    self._idle -= 1
                q = next((q for q in self._queues if q), None)
                if q is None:  # shut down and nothing left
                    return
                fn, args = q.popleft()
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001 - a task reports its own errors; keep the thread serving
                pass
            # An idle thread must not keep the last task's objects alive (a bound method holds its store, whose
            # __del__ releases the files of a store the program forgot to close).
            fn = args = None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks. ``cancel_futures``: drop the queued ones (what ``kill -9`` would leave undone);
        otherwise they run first. ``wait``: return when the threads have finished."""
        with self._cv:
            self._shutdown = True
            if cancel_futures:
                for q in self._queues:
                    q.clear()
            self._cv.notify_all()
            threads = list(self._threads)
        if wait:
            for t in threads:
                if t is not threading.current_thread():
                    t.join()
