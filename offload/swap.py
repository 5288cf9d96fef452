"""The swap manager: the one owner of the memory a wrapped model's chunks occupy, on every tier.

It holds the host pool, the device budget with its cache of device buffers, and the NVMe store (opened when a
placement first needs it, sized by one rule), and it owns every :class:`Chunk` that moves between the host and
the store: a unit's params and its fp32 grad buffer. Clients (the module hooks, the grad and update threads,
the optimizer, checkpoints, plan switches) ask it for a chunk's bytes; they never allocate tier memory or touch
a chunk's buffer in a state where somebody else may write it.

A chunk's state machine (:class:`ChunkState`), every transition made under the manager's one lock::

    EMPTY --use()--> DIRTY                      a fresh buffer, nothing to read (first grads of an accumulation)
    STORED --use()--> LOADING --read lands--> READY
    READY | DIRTY --write_back()--> WRITING --write lands--> STORED (evict) | READY
    READY --evict()--> STORED                    the buffer goes back to the pool; the store has the bytes
    any --drop()--> EMPTY                        the bytes are forgotten (grads consumed by a step)

A buffer is handed out only in READY or DIRTY: a read still landing (LOADING) or a write still reading the
buffer (WRITING) makes the caller wait on the manager's condition, so "a read into a buffer that a grad thread
adds into" cannot happen, whatever the timing. :meth:`SwapManager.use` pins the chunk while the caller works:
writers exclusively, readers shared, and no transition out of READY/DIRTY starts while it is pinned. A failed
write leaves the chunk DIRTY with its buffer (the store keeps the previous version); the error is raised to the
next caller of :meth:`SwapManager.settle` or :meth:`SwapManager.use` on it.

Device memory (:class:`DeviceCache`) is a :class:`~storage.TierBudget` plus, on a CPU device, the released
buffers kept for reuse, which give way whenever a reservation needs their room.
"""

from __future__ import annotations

import contextlib
import enum
import threading
from typing import Callable, Iterator

import torch

from storage import HostPool, NvmeStore, Tier, TierBudget
from storage.memory import aligned_empty


class ChunkState(enum.Enum):
    """Where a chunk's bytes are, and who may touch its host buffer."""

    EMPTY = "empty"
    """No bytes anywhere: no buffer, nothing in the store that counts."""
    STORED = "stored"
    """The bytes are in the store only; there is no host buffer."""
    LOADING = "loading"
    """A host buffer is being filled from the store: nobody may touch it until the read lands."""
    READY = "ready"
    """The host buffer holds the bytes, and so does the store (or the chunk lives on the host)."""
    DIRTY = "dirty"
    """The host buffer holds bytes the store does not have yet."""
    WRITING = "writing"
    """The host buffer is being written to the store: nobody may touch it until the write lands."""


_HAS_BUFFER = (ChunkState.READY, ChunkState.DIRTY)


class Chunk:
    """One named run of bytes that lives on the host (``home`` HOST: its buffer is permanent) or in the store
    (``home`` NVME: a host buffer only while it is used). Its fields are the manager's; clients read ``state``
    and ``nbytes`` and get the buffer from :meth:`SwapManager.use`."""

    __slots__ = ("key", "nbytes", "home", "state", "_tensor", "_release", "_readers", "_writer", "_error")

    def __init__(self, key: str, nbytes: int, home: Tier):
        self.key, self.nbytes, self.home = key, nbytes, home
        self.state = ChunkState.EMPTY
        self._tensor: torch.Tensor | None = None
        self._release: Callable[[], None] | None = None
        self._readers = 0
        self._writer: int | None = None  # the thread that holds the chunk for writing
        self._error: BaseException | None = None

    @property
    def pinned(self) -> bool:
        return self._readers > 0 or self._writer is not None

    def __repr__(self) -> str:
        return f"Chunk({self.key!r}, {self.nbytes} B, {self.home.value}, {self.state.value})"


class DeviceCache:
    """The device's byte budget and its buffers.

    CUDA's caching allocator reuses the blocks of released units, but on a CPU device torch hands large blocks
    back to the OS and the next fetch into fresh memory pays a page fault per 4 KiB. So released buffers are kept
    for the next request of the same size, as the caching allocator does: at most ``keep`` per size, and live
    plus spare bytes within the budget (spares go first when a reservation needs room)."""

    def __init__(self, device: torch.device, capacity_bytes: int, keep: int):
        self.device = device
        self.budget = TierBudget(Tier.DEVICE, capacity_bytes)
        self.keep = keep
        self._spare: dict[int, list[torch.Tensor]] = {}
        self._spare_bytes = 0
        self._lock = threading.Lock()

    @property
    def spare_bytes(self) -> int:
        """Bytes of released buffers kept for reuse (not counted by the budget)."""
        return self._spare_bytes

    def reserve(self, nbytes: int, what: str, *, trim: bool = True) -> None:
        """Count ``nbytes`` against the budget (raises :class:`TierFullError` when it does not fit); spares give way
        now, or with ``trim=False`` when :meth:`buffer` finds none of the size to reuse."""
        self.budget.reserve(nbytes, what=what)
        if trim:
            self.trim()

    def release(self, nbytes: int) -> None:
        self.budget.release(nbytes)

    def buffer(self, nbytes: int) -> torch.Tensor:
        """Memory for ``nbytes`` whose budget is already reserved: a spare of that size when there is one."""
        if self.device.type == "cuda":
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        with self._lock:
            free = self._spare.get(nbytes)
            if free:
                self._spare_bytes -= nbytes
                return free.pop()
        self.trim()
        return aligned_empty(nbytes)[:nbytes]

    def give_back(self, buf: torch.Tensor, nbytes: int) -> None:
        """A buffer whose reservation was released: kept as a spare (CPU device) while there is room."""
        if self.device.type == "cuda":
            return
        with self._lock:
            free = self._spare.setdefault(nbytes, [])
            if len(free) < self.keep and \
                    self.budget.used_bytes + self._spare_bytes + nbytes <= self.budget.capacity_bytes:
                free.append(buf)
                self._spare_bytes += nbytes

    def trim(self) -> None:
        """Drop spares (largest first) until live plus spare bytes fit the budget again."""
        with self._lock:
            room = self.budget.capacity_bytes - self.budget.used_bytes
            for size in sorted(self._spare, reverse=True):
                while self._spare[size] and self._spare_bytes > room:
                    self._spare[size].pop()
                    self._spare_bytes -= size


class SwapManager:
    """Owns the host pool, the device cache, the store and every :class:`Chunk` (see the module docstring).

    ``open_store``: makes the store the first time a chunk or a client needs it (the runtime's sizing rule)."""

    def __init__(self, pool: HostPool, device: DeviceCache, open_store: Callable[[], NvmeStore]):
        self.pool = pool
        self.device = device
        self._open_store = open_store
        self._store: NvmeStore | None = None
        self._cond = threading.Condition()
        self._chunks: list[Chunk] = []  # every chunk made here, for close()
        self.trace: Callable[[str, str, int], Callable[[], None]] | None = None
        """Called when a chunk read or write is issued, with (resource, key, bytes); what it returns is called on
        an I/O thread when the transfer lands (the runtime counts the bytes and draws it on its timeline)."""

    # -- the store -----------------------------------------------------------------------------------------------
    @property
    def store(self) -> NvmeStore:
        """The store, opened on first use."""
        if self._store is None:
            self._store = self._open_store()
        return self._store

    @property
    def store_open(self) -> bool:
        return self._store is not None

    # -- chunks --------------------------------------------------------------------------------------------------
    def chunk(self, key: str, nbytes: int, home: Tier) -> Chunk:
        """A new chunk, EMPTY; a HOST chunk gets its permanent buffer now (READY)."""
        if home not in (Tier.HOST, Tier.NVME):
            raise ValueError(f"chunk {key!r}: expected a host or nvme home, got {home.value}")
        c = Chunk(key, nbytes, home)
        if home is Tier.HOST:
            c._tensor, c._release = self._acquire(nbytes)
            c.state = ChunkState.READY
        self._chunks.append(c)
        return c

    def _acquire(self, nbytes: int) -> tuple[torch.Tensor, Callable[[], None]]:
        buf = self.pool.acquire(max(nbytes, 1))
        return buf.tensor[:nbytes], buf.release

    def _wait(self, c: Chunk) -> None:
        """Under the lock: until no I/O is in flight on ``c``; raises a failed write's error once."""
        while c.state in (ChunkState.LOADING, ChunkState.WRITING):
            self._cond.wait()
        if c._error is not None:
            err, c._error = c._error, None
            raise err

    @contextlib.contextmanager
    def use(self, c: Chunk, *, write: bool = False, load: bool = True) -> Iterator[torch.Tensor]:
        """``c``'s host buffer, pinned for the ``with`` block: loaded from the store first when STORED (the
        caller waits for the read), fresh when EMPTY. ``write``: the caller changes the bytes (exclusive: other
        users wait; the chunk is DIRTY afterwards). ``load=False``: the caller overwrites every byte, so a
        STORED chunk gets a fresh buffer instead of a read."""
        me = threading.get_ident()
        read = claimed = False
        with self._cond:
            while True:
                self._wait(c)
                busy = (c._writer is not None and c._writer != me) or (write and c._readers > 0)
                if busy:
                    self._cond.wait()
                    continue
                break
            if c.state in (ChunkState.STORED, ChunkState.EMPTY):
                read, claimed = load and c.state is ChunkState.STORED, True
                c.state = ChunkState.LOADING  # claimed: the buffer is this caller's to fill
            else:
                self._pin(c, write, me)
        if claimed:
            self._fill(c, read, write, me)
        try:
            yield c._tensor
        finally:
            with self._cond:
                if write:
                    c._writer = None
                    if c.state is ChunkState.READY and c.home is Tier.NVME:
                        c.state = ChunkState.DIRTY
                else:
                    c._readers -= 1
                self._cond.notify_all()

    @staticmethod
    def _pin(c: Chunk, write: bool, me: int) -> None:
        if write:
            c._writer = me
        else:
            c._readers += 1

    def _fill(self, c: Chunk, load: bool, write: bool, me: int) -> None:
        """The claimer of a LOADING chunk: a buffer, and the stored bytes read into it when ``load``; pinned for
        the claimer in the same step that makes it READY, so no transition slips in between."""
        try:
            tensor, release = self._acquire(c.nbytes)
        except BaseException:
            with self._cond:
                c.state = ChunkState.STORED if load else ChunkState.EMPTY
                self._cond.notify_all()
            raise
        try:
            if load:
                handle = self.store.read(c.key, out=tensor)
                self._trace(handle, "disk_read", c.key, c.nbytes)
                handle.wait()
        except BaseException:
            release()
            with self._cond:
                c.state = ChunkState.STORED
                self._cond.notify_all()
            raise
        with self._cond:
            c._tensor, c._release = tensor, release
            c.state = ChunkState.READY if load else ChunkState.DIRTY
            self._pin(c, write, me)
            self._cond.notify_all()

    def buffer(self, c: Chunk) -> torch.Tensor | None:
        """``c``'s host buffer when it has one with current bytes (READY or DIRTY, after any write in flight
        lands), else ``None``: for readers between the phases that change it."""
        with self._cond:
            self._wait(c)
            return c._tensor if c.state in _HAS_BUFFER else None

    def write_back(self, c: Chunk, *, evict: bool = True, wait: bool = False) -> None:
        """Write ``c``'s new bytes to the store (DIRTY -> WRITING -> STORED, or READY without ``evict``); a READY
        chunk has nothing new (the store holds its bytes) and is only evicted. Returns once the write is issued,
        or has landed with ``wait``."""
        with self._cond:
            self._wait_idle(c)
            if c.home is not Tier.NVME:
                raise AssertionError(f"write_back of {c!r}: only store chunks are written back")
            if c.state is ChunkState.READY and evict:
                self._let_go(c, ChunkState.STORED)
            if c.state is not ChunkState.DIRTY:
                return
            c.state = ChunkState.WRITING
        try:
            handle = self.store.write(c.key, c._tensor)
        except BaseException:  # not issued (a closed store, a full one): the bytes stay here
            with self._cond:
                c.state = ChunkState.DIRTY
                self._cond.notify_all()
            raise
        self._trace(handle, "disk_write", c.key, c.nbytes)

        def landed(f) -> None:
            with self._cond:
                if f.exception() is not None:  # the store kept the previous version: keep ours in memory
                    c.state, c._error = ChunkState.DIRTY, f.exception()
                elif evict:
                    self._let_go(c, ChunkState.STORED)
                else:
                    c.state = ChunkState.READY
                self._cond.notify_all()

        handle.future.add_done_callback(landed)
        if wait:
            self.settle(c)

    def settle(self, c: Chunk) -> None:
        """Wait for any I/O in flight on ``c``; raise a failed write's error."""
        with self._cond:
            self._wait(c)

    def evict(self, c: Chunk) -> None:
        """READY -> STORED: give the buffer back (the store has the same bytes). Any other state is left."""
        with self._cond:
            self._wait_idle(c)
            if c.state is ChunkState.READY and c.home is Tier.NVME:  # DIRTY keeps its bytes for a write_back
                self._let_go(c, ChunkState.STORED)

    def drop(self, c: Chunk) -> None:
        """Forget ``c``'s bytes (-> EMPTY): its buffer goes back to the pool, a HOST chunk keeps its own."""
        with self._cond:
            self._wait_idle(c)
            if c.home is not Tier.HOST:
                self._let_go(c, ChunkState.EMPTY)

    def _wait_idle(self, c: Chunk) -> None:
        """Under the lock: until no I/O is in flight on ``c`` and nobody holds it."""
        while True:
            self._wait(c)
            if not c.pinned:
                return
            self._cond.wait()

    @staticmethod
    def _let_go(c: Chunk, state: ChunkState) -> None:
        """Under the lock (or with no other user left): ``c``'s buffer back to the pool, and ``c`` is ``state``."""
        if c._release is not None:
            c._release()
        c._tensor, c._release = None, None
        c.state = state

    def rehome(self, c: Chunk, home: Tier, *, keep: bool = True) -> None:
        """Between iterations: move ``c`` to ``home`` (HOST or NVME), its bytes with it when ``keep`` (a store
        chunk's are read in first), else as nothing (EMPTY in the store, a fresh buffer on the host)."""
        if home is c.home:
            return
        self.settle(c)
        if home is Tier.NVME:
            has = keep and c.state in _HAS_BUFFER
            c.home = Tier.NVME
            if has:
                c.state = ChunkState.DIRTY
                self.write_back(c, wait=True)
            else:
                self.drop(c)
            return
        if keep and c.state is ChunkState.STORED:
            with self.use(c):
                pass
        elif c.state not in _HAS_BUFFER:
            c._tensor, c._release = self._acquire(c.nbytes)
        c.home = Tier.HOST
        c.state = ChunkState.READY
        if self._store is not None and c.key in self._store:
            self._store.delete(c.key)

    def copy(self, c: Chunk, out: torch.Tensor | None = None) -> torch.Tensor:
        """``c``'s bytes copied into ``out`` (or a new aligned tensor), from its buffer or straight from the
        store, without changing its state."""
        with self._cond:
            self._wait(c)
            tensor = c._tensor if c.state in _HAS_BUFFER else None
            if tensor is not None:
                c._readers += 1  # pinned while copied
        if out is None:
            out = aligned_empty(c.nbytes)[:c.nbytes]
        if tensor is None:
            handle = self.store.read(c.key, out=out)
            self._trace(handle, "disk_read", c.key, c.nbytes)
            handle.wait()
            return out
        try:
            out.copy_(tensor)
        finally:
            with self._cond:
                c._readers -= 1
                self._cond.notify_all()
        return out

    def free(self, c: Chunk) -> None:
        """The chunk is no longer used: its buffer back to the pool, its store copy (an NVMe chunk's) deleted."""
        with self._cond:
            self._wait_idle(c)
            stored = c.home is Tier.NVME and c.state is not ChunkState.EMPTY
            self._let_go(c, ChunkState.EMPTY)
        if stored and self._store is not None and c.key in self._store:
            self._store.delete(c.key)

    def _trace(self, handle, resource: str, key: str, nbytes: int) -> None:
        if self.trace is not None:
            done = self.trace(resource, key, nbytes)
            handle.future.add_done_callback(lambda _f: done())

    def close(self) -> None:
        """Wait for the I/O in flight, give every chunk's buffer back and the pool's empty slabs to the OS, and
        close the store (its files stay until the directory is removed)."""
        for c in self._chunks:
            with self._cond:
                while c.state in (ChunkState.LOADING, ChunkState.WRITING):
                    self._cond.wait()
                self._let_go(c, ChunkState.EMPTY)
        self._chunks.clear()
        self.pool.trim()
        if self._store is not None:
            self._store.close()
