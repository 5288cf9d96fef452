"""The swap manager: the one owner of the memory a wrapped model's chunks occupy, on every tier.

It holds the host pool, the device budget with its cache of device buffers, and the NVMe store (opened when a
placement first needs it, sized by one rule), and it owns every :class:`Chunk`: a unit's params between uses, its fp32 grad buffer, and each optimizer
subgroup's state (with its fp32 masters), whether that lives in device memory, in a host buffer or in the store.
Clients (the module hooks, the grad and update threads, the optimizer, checkpoints, plan switches) ask it for a
chunk's bytes, and for scratch memory (:meth:`SwapManager.scratch`); they never allocate tier memory themselves
or touch a chunk's buffer in a state where somebody else may write it. It also keeps the one set of per-link
byte counters (:meth:`SwapManager.count`, :meth:`SwapManager.moved`), by what moved (params, grads, state).

A chunk's state machine (:class:`ChunkState`), every transition made under the manager's one lock::

    EMPTY --use()--> DIRTY                      a fresh buffer, nothing to read (first grads of an accumulation)
    STORED --use() | prefetch()--> LOADING --read lands--> READY
    any --resize()--> READY (host, device) | DIRTY (store)   new bytes in a new buffer (a re-packed state chunk)
    READY | DIRTY --write_back()--> WRITING --write lands--> STORED (evict) | READY
    READY --evict()--> STORED                    the buffer goes back to the pool; the store has the bytes
    STORED --keep_copy()--> READY                 a copy of bytes the caller vouches equal the stored ones
    any --drop()--> EMPTY                        the bytes are forgotten (grads consumed by a step)

A READY store chunk may be kept (:meth:`SwapManager.keep`, and ``keep_copy``): its buffer waits for a later user
instead of going back to the pool, counted by the pool as cached, not needed, until a writer takes it or it is
let go.

A buffer is handed out only in READY or DIRTY: a read still landing (LOADING) or a write still reading the
buffer (WRITING) makes the caller wait on the manager's condition (except a reader of a buffer whose write keeps
it, ``write_back(evict=False)``: both only read it), so "a read into a buffer that a grad thread
adds into" cannot happen, whatever the timing. :meth:`SwapManager.use` pins the chunk while the caller works:
writers exclusively, readers shared, and no transition out of READY/DIRTY starts while it is pinned. A failed
write leaves the chunk DIRTY with its buffer (the store keeps the previous version); the error is raised to the
next caller of :meth:`SwapManager.settle` or :meth:`SwapManager.use` on it.

A transaction (:meth:`SwapManager.begin`) makes a run of changes undoable exactly: a writer calls
:meth:`SwapManager.preserve` before it changes a chunk (or :meth:`SwapManager.preserve_tensor` for memory that is
not a chunk), which keeps the chunk's bytes as they were: a copy in host memory (from the pool, so counted) of a
HOST or DEVICE buffer, the committed store version held on disk (:meth:`storage.NvmeStore.hold`) of a store chunk.
:meth:`SwapManager.abort` puts every pre-image back, :meth:`SwapManager.commit` lets them go.

A chunk whose home is HOST or DEVICE has a permanent buffer (always READY); only a STORE (``Tier.NVME``) chunk
moves through the other states. Device memory (:class:`DeviceCache`) is a :class:`~storage.TierBudget` plus, on a CPU device, the released
buffers kept for reuse, which give way whenever a reservation needs their room.
"""

from __future__ import annotations

import contextlib
import enum
import threading
from typing import Callable, Iterator

import torch

from storage import HostPool, NvmeStore, StoreVersion, Tier, TierBudget, TierFullError
from storage.alloc import round_up
from storage.memory import aligned_empty
from storage.workers import READAHEAD, URGENT


_CAN_SWAP_STORAGE = hasattr(torch.UntypedStorage, "_swap_data_ptr_")
"""Whether a storage's memory can be exchanged with another's (:meth:`DeviceCache.fill`); else it is freed and
allocated again (correct, but a CPU device then pays page faults on every fetch)."""


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


KINDS = ("params", "grads", "state")
"""What a chunk holds, for the per-link byte counters."""
LINKS = ("h2d", "d2h", "disk_read", "disk_write")


def _read_priority(c: "Chunk") -> int:
    """Weights are read for a forward or backward that waits for them; state and grads for the update thread,
    which reads ahead: behind a unit's state a weight fetch would stall compute (storage/workers.py)."""
    return URGENT if c.kind == "params" else READAHEAD


class Chunk:
    """One named run of bytes that lives in device memory or on the host (``home`` DEVICE or HOST: its buffer is
    permanent) or in the store (``home`` NVME: a host buffer only while it is used). ``kind`` is one of
    :data:`KINDS`. Its fields are the manager's; clients read ``state`` and ``nbytes`` and get the buffer from
    :meth:`SwapManager.use`."""

    __slots__ = ("key", "kind", "nbytes", "home", "state", "_tensor", "_extra", "_release", "_readers", "_writer",
                 "_error", "_kept", "_stays", "_evict_landed")

    def __init__(self, key: str, kind: str, nbytes: int, home: Tier):
        self.key, self.kind, self.nbytes, self.home = key, kind, nbytes, home
        self.state = ChunkState.EMPTY
        self._tensor: torch.Tensor | None = None
        self._extra: torch.Tensor | None = None  # working memory that came with the buffer (see use(extra=))
        self._release: Callable[[], None] | None = None
        self._readers = 0
        self._writer: int | None = None  # the thread that holds the chunk for writing
        self._error: BaseException | None = None
        self._kept = 0  # pool bytes its READY buffer holds as a kept copy (SwapManager.keep), else 0
        self._stays = False  # WRITING: the buffer stays when the write lands, so readers may share it meanwhile
        self._evict_landed = False  # WRITING: evict() came; the buffer goes when the write lands (SwapManager.evict)

    @property
    def kept(self) -> bool:
        """Whether its buffer is a copy kept for a later user (:meth:`SwapManager.keep`)."""
        return self._kept > 0

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

    def fill(self, t: torch.Tensor, nbytes: int) -> None:
        """Give memory back to ``t``, a buffer of ``nbytes`` from :meth:`buffer` that :meth:`empty` emptied (its
        budget is already reserved again), in the same storage: views of ``t`` made before it was emptied (the
        weights autograd saved in forward, such as the ``weight.t()`` a linear layer keeps) see the bytes written
        into ``t`` now. FSDP frees and refills its unsharded params the same way, for the same reason."""
        if self.device.type == "cuda" or not _CAN_SWAP_STORAGE:
            t.untyped_storage().resize_(t.storage_offset() + nbytes)
            return
        src = self.buffer(nbytes)  # a spare of this size (a storage like t's), or fresh memory
        t.untyped_storage()._swap_data_ptr_(src.untyped_storage())

    def empty(self, t: torch.Tensor, nbytes: int) -> None:
        """Take ``t``'s memory (``nbytes`` from :meth:`buffer`, its reservation released) out of its storage, which
        keeps existing with no bytes, and keep the memory as a spare: see :meth:`fill`."""
        if self.device.type == "cuda" or not _CAN_SWAP_STORAGE:
            t.untyped_storage().resize_(0)
            return
        holder = torch.empty(0, dtype=torch.uint8)
        t.untyped_storage()._swap_data_ptr_(holder.untyped_storage())
        holder.set_(holder.untyped_storage(), t.storage_offset(), (nbytes,), (1,))
        self.give_back(holder, nbytes)

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

    ``open_store``: makes the store the first time a chunk or a client needs it (the owner's sizing rule)."""

    def __init__(self, pool: HostPool, device: DeviceCache, open_store: Callable[[], NvmeStore]):
        self.pool = pool
        self.device = device
        self._open_store = open_store
        self._store: NvmeStore | None = None
        self._cond = threading.Condition()
        self._chunks: list[Chunk] = []  # every chunk made here, for close()
        self._moved = {kind: dict.fromkeys(LINKS, 0) for kind in KINDS}
        self._tx: dict[int, tuple] | None = None  # the open transaction's pre-images, by id of what they keep
        self._tx_limit: int | None = None
        self.tx_bytes = 0  # host bytes the open transaction's copies hold (its peak: tx_peak_bytes)
        self.tx_peak_bytes = 0
        self.trace: Callable[[str, Chunk], Callable[[], None]] | None = None
        """Called when a chunk read or write is issued, with (resource, chunk); what it returns is called on an
        I/O thread when the transfer lands (the runtime draws it on its timeline)."""

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

    # -- byte counters -------------------------------------------------------------------------------------------
    def count(self, kind: str, link: str, nbytes: int) -> None:
        """Count ``nbytes`` of ``kind`` moved over ``link`` (a client's own host<->device copies; the store
        transfers of chunks are counted here when issued)."""
        self._moved[kind][link] += nbytes

    def moved(self, kind: str | None = None) -> dict[str, int]:
        """Bytes moved so far per link: of one kind, or of all together."""
        if kind is not None:
            return dict(self._moved[kind])
        return {link: sum(m[link] for m in self._moved.values()) for link in LINKS}

    # -- memory that is not a chunk ------------------------------------------------------------------------------
    def scratch(self, nbytes: int, tier: Tier, *, wait: bool = True) -> tuple[torch.Tensor, Callable[[], None]]:
        """Working memory for the length of one operation (an update's fp32 grads, a chunk's copy on the
        device): ``nbytes`` from the host pool or the device budget, and its release. ``wait=False`` raises
        :class:`~storage.TierFullError` instead of waiting for host budget."""
        if tier is Tier.DEVICE:
            return self._device_buffer(nbytes)
        return self._acquire(nbytes, wait=wait)

    def _device_buffer(self, nbytes: int) -> tuple[torch.Tensor, Callable[[], None]]:
        if not nbytes:
            return torch.empty(0, dtype=torch.uint8, device=self.device.device), _nothing
        self.device.reserve(nbytes, what="device chunk")
        buf = self.device.buffer(nbytes)

        def release() -> None:
            self.device.release(nbytes)
            self.device.give_back(buf, nbytes)
        return buf, release

    def _acquire(self, nbytes: int, *, wait: bool = True) -> tuple[torch.Tensor, Callable[[], None]]:
        if not nbytes:
            return torch.empty(0, dtype=torch.uint8), _nothing
        buf = self.pool.acquire(nbytes, wait=wait)
        return buf.tensor[:nbytes], buf.release

    def _acquire_with_extra(self, c: Chunk, extra: int, wait: bool) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                          Callable[[], None]]:
        """A host buffer for ``c``'s bytes, plus ``extra`` bytes of working memory after them (4 KiB-aligned)."""
        if not extra:
            tensor, release = self._acquire(c.nbytes, wait=wait)
            return tensor, None, release
        start = (c.nbytes + 4095) // 4096 * 4096
        buf = self.pool.acquire(start + extra, wait=wait)
        return buf.tensor[:c.nbytes], buf.tensor[start:start + extra], buf.release

    # -- chunks --------------------------------------------------------------------------------------------------
    def chunk(self, key: str, nbytes: int, home: Tier, kind: str = "params") -> Chunk:
        """A new chunk: EMPTY in the store, or READY with its permanent buffer (uninitialized) on the host or the
        device."""
        if kind not in KINDS:
            raise ValueError(f"chunk {key!r}: expected a kind in {KINDS}, got {kind!r}")
        c = Chunk(key, kind, nbytes, home)
        if home is not Tier.NVME:
            c._tensor, c._release = self._home_buffer(nbytes, home)
            c.state = ChunkState.READY
        self._chunks.append(c)
        return c

    def _home_buffer(self, nbytes: int, home: Tier) -> tuple[torch.Tensor, Callable[[], None]]:
        """A permanent buffer of a HOST or DEVICE chunk."""
        if home is Tier.DEVICE:
            return self._device_buffer(nbytes)
        return self._acquire(nbytes)

    def _wait(self, c: Chunk) -> None:
        """Under the lock: until no I/O is in flight on ``c``; raises a failed transfer's error once."""
        while c.state in (ChunkState.LOADING, ChunkState.WRITING):
            self._cond.wait()
        if c._error is not None:
            err, c._error = c._error, None
            raise err

    @contextlib.contextmanager
    def use(self, c: Chunk, *, write: bool = False, load: bool = True, extra: int = 0) -> Iterator[torch.Tensor]:
        """``c``'s buffer, pinned for the ``with`` block: loaded from the store first when STORED (the caller
        waits for the read), fresh when EMPTY. ``write``: the caller changes the bytes (exclusive: other users
        wait; a store chunk is DIRTY afterwards). ``load=False``: the caller overwrites every byte, so a STORED
        chunk gets a fresh buffer instead of a read. ``extra``: when a buffer is made now, ``extra`` bytes of
        working memory come with it (:meth:`extra`)."""
        me = threading.get_ident()
        read = claimed = False
        with self._cond:
            while True:
                if not (c._stays and not write and c.state is ChunkState.WRITING):
                    self._wait(c)  # (a reader shares a buffer being written that stays: both only read it)
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
                if write:
                    self._unkeep(c)  # the kept copy is the writer's working buffer now
        if claimed:
            self._fill(c, read, write, me, extra)
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
                    if c._evict_landed and c.state is ChunkState.READY and not c.pinned:
                        self._let_go(c, ChunkState.STORED)  # its write landed while read: the eviction it waited for
                self._cond.notify_all()

    def extra(self, c: Chunk) -> torch.Tensor | None:
        """The working memory that came with ``c``'s buffer (``use(extra=)``, ``prefetch(extra=)``), or ``None``:
        for the caller that holds ``c`` pinned."""
        return c._extra

    @staticmethod
    def _pin(c: Chunk, write: bool, me: int) -> None:
        if write:
            c._writer = me
        else:
            c._readers += 1

    def _fill(self, c: Chunk, load: bool, write: bool, me: int, extra: int) -> None:
        """The claimer of a LOADING chunk: a buffer, and the stored bytes read into it when ``load``; pinned for
        the claimer in the same step that makes it READY, so no transition slips in between."""
        try:
            tensor, spare, release = self._acquire_with_extra(c, extra, wait=True)
        except BaseException:
            with self._cond:
                c.state = ChunkState.STORED if load else ChunkState.EMPTY
                self._cond.notify_all()
            raise
        try:
            if load:
                handle = self.store.read(c.key, out=tensor, priority=_read_priority(c))
                self._trace(handle, "disk_read", c)
                handle.wait()
        except BaseException:
            release()
            self._set_state(c, ChunkState.STORED)
            raise
        with self._cond:
            c._tensor, c._extra, c._release = tensor, spare, release
            c.state = ChunkState.READY if load else ChunkState.DIRTY
            self._pin(c, write, me)
            self._cond.notify_all()

    def prefetch(self, c: Chunk, *, extra: int = 0) -> bool:
        """Start reading a STORED chunk into a new host buffer (with ``extra`` bytes of working memory), without
        waiting: for the read itself, or for host budget. Returns False when the budget has no room now; True
        when the read was issued or the chunk needs none (it has a buffer, or a transfer is under way). A read
        that fails leaves the chunk STORED, and its error goes to the next :meth:`use`."""
        with self._cond:
            if c.state is not ChunkState.STORED or c.pinned:
                return c.state is not ChunkState.EMPTY
            c.state = ChunkState.LOADING
        try:
            tensor, spare, release = self._acquire_with_extra(c, extra, wait=False)
        except TierFullError:
            self._set_state(c, ChunkState.STORED)
            return False
        try:
            handle = self.store.read(c.key, out=tensor, priority=_read_priority(c))
        except BaseException:
            release()
            self._set_state(c, ChunkState.STORED)
            raise
        self._trace(handle, "disk_read", c)

        def landed(f) -> None:
            with self._cond:
                if f.exception() is not None:
                    release()
                    c.state, c._error = ChunkState.STORED, f.exception()
                else:
                    c._tensor, c._extra, c._release = tensor, spare, release
                    c.state = ChunkState.READY
                self._cond.notify_all()

        handle.future.add_done_callback(landed)
        return True

    def keep(self, c: Chunk) -> bool:
        """Keep ``c``'s READY buffer for a later user instead of evicting it: its pool bytes count as cached
        (:meth:`storage.HostPool.mark_cached`) until a writer takes it (:meth:`use` with ``write``) or it is let go
        (:meth:`evict`, ...). False when ``c`` is not a READY store chunk with a plain buffer."""
        with self._cond:
            if c.state is not ChunkState.READY or c.home is not Tier.NVME or c._extra is not None or c._kept:
                return False
            self._mark_kept(c)
            return True

    def _mark_kept(self, c: Chunk) -> None:
        """Under the lock: ``c``'s READY buffer (a plain one, no working memory) is a kept copy now."""
        if not c._kept and c._extra is None:
            c._kept = round_up(c.nbytes)  # what the pool charged for it (_acquire)
            self.pool.mark_cached(c._kept)

    def _unkeep(self, c: Chunk) -> None:
        """Under the lock: ``c``'s buffer is no longer a kept copy."""
        if c._kept:
            self.pool.mark_cached(-c._kept)
            c._kept = 0

    def keep_copy(self, c: Chunk, src: torch.Tensor) -> bool:
        """STORED -> READY, kept (:meth:`keep`): a new host buffer holding a copy of ``src``, which the caller vouches
        equals the stored bytes (the device copy of what was read from the store), so that the next :meth:`use`
        reads nothing. Returns False, doing nothing, when ``c`` is not STORED and idle or the pool has no room."""
        with self._cond:
            if c.state is not ChunkState.STORED or c.pinned or c.home is not Tier.NVME:
                return False
            c.state = ChunkState.LOADING  # claimed: nobody touches the buffer until the copy is in
        try:
            tensor, release = self._acquire(c.nbytes, wait=False)
        except TierFullError:
            self._set_state(c, ChunkState.STORED)
            return False
        try:
            tensor.copy_(src.reshape(-1).view(torch.uint8)[:c.nbytes])
        except BaseException:
            release()
            self._set_state(c, ChunkState.STORED)
            raise
        with self._cond:
            c._tensor, c._extra, c._release = tensor, None, release
            c.state = ChunkState.READY
            self._mark_kept(c)
            self._cond.notify_all()
        return True

    def _set_state(self, c: Chunk, state: ChunkState) -> None:
        """``c`` is ``state`` now (a transfer that was not issued goes back), and its waiters are told."""
        with self._cond:
            c.state = state
            self._cond.notify_all()

    def wait_any(self, chunks: list[Chunk]) -> None:
        """Until one of ``chunks`` has no transfer in flight (at once when one has none)."""
        with self._cond:
            while chunks and all(c.state in (ChunkState.LOADING, ChunkState.WRITING) for c in chunks):
                self._cond.wait()

    def buffer(self, c: Chunk) -> torch.Tensor | None:
        """``c``'s buffer when it has one with current bytes (READY or DIRTY, after any transfer in flight
        lands), else ``None``: for readers between the phases that change it."""
        with self._cond:
            self._wait(c)
            return c._tensor if c.state in _HAS_BUFFER else None

    def resize(self, c: Chunk, nbytes: int, fill: Callable[[torch.Tensor], None], *, home: Tier | None = None
               ) -> None:
        """Give ``c`` new bytes in a new buffer of ``nbytes`` (in its memory, or ``home``'s when given: a chunk
        that moves to another tier): ``fill(new)`` writes them, and may read the old buffer, which is given back
        afterwards. A store chunk is DIRTY afterwards (write it back), a HOST or DEVICE one READY, and a chunk
        that leaves the store has its stored copy deleted. The caller holds ``c`` for writing, or nobody holds
        it; no transfer may be in flight."""
        me = threading.get_ident()
        with self._cond:
            self._wait(c)
            if c._readers or c._writer not in (None, me):
                raise AssertionError(f"resize of {c!r}: held by another user")
        home = c.home if home is None else home
        if home is Tier.NVME:
            tensor, release = self._acquire(nbytes) if nbytes else (None, None)
        else:
            tensor, release = self._home_buffer(nbytes, home)
        try:
            if tensor is not None:
                fill(tensor)
        except BaseException:
            if release is not None:
                release()
            raise
        left_store = c.home is Tier.NVME and home is not Tier.NVME
        with self._cond:
            self._unkeep(c)
            if c._release is not None:
                c._release()
            c._tensor, c._extra, c._release = tensor, None, release
            c.nbytes, c.home = nbytes, home
            if home is not Tier.NVME:
                c.state = ChunkState.READY
            else:
                c.state = ChunkState.DIRTY if tensor is not None else ChunkState.EMPTY
            self._cond.notify_all()
        if (left_store or (home is Tier.NVME and not nbytes)) and self._store is not None and c.key in self._store:
            self._store.delete(c.key)

    def write_back(self, c: Chunk, *, evict: bool = True, wait: bool = False, keep: bool = False,
                   on_landed: Callable[[], None] | None = None) -> None:
        """Write ``c``'s new bytes to the store (DIRTY -> WRITING -> STORED, or READY without ``evict``); a READY
        chunk has nothing new (the store holds its bytes) and is only evicted. Returns once the write is issued,
        or has landed with ``wait``. ``keep``: the buffer stays as a kept copy (:meth:`keep`) once the write
        lands. Without ``evict``, readers may use the buffer while the write is in flight (it only reads it).
        ``on_landed``: called on an I/O thread once the write landed (or failed) and ``c`` changed state."""
        evict = evict and not keep
        with self._cond:
            self._wait_idle(c)
            if c.home is not Tier.NVME:
                raise AssertionError(f"write_back of {c!r}: only store chunks are written back")
            if c.state is ChunkState.READY and evict:
                self._let_go(c, ChunkState.STORED)
            if c.state is ChunkState.READY and keep:
                self._mark_kept(c)
            if c.state is not ChunkState.DIRTY:
                return
            c.state, c._stays, c._evict_landed = ChunkState.WRITING, not evict, False
        try:
            handle = self.store.write(c.key, c._tensor)
        except BaseException:  # not issued (a closed store, a full one): the bytes stay here
            self._set_state(c, ChunkState.DIRTY)
            raise
        self._trace(handle, "disk_write", c)

        def landed(f) -> None:
            with self._cond:
                c._stays = False
                if f.exception() is not None:  # the store kept the previous version: keep ours in memory
                    c.state, c._error, c._evict_landed = ChunkState.DIRTY, f.exception(), False
                elif evict or (c._evict_landed and not c.pinned):
                    self._let_go(c, ChunkState.STORED)
                else:
                    c.state = ChunkState.READY
                    if keep and not c._evict_landed:
                        self._mark_kept(c)
                self._cond.notify_all()

        handle.future.add_done_callback(landed)
        if on_landed is not None:
            handle.future.add_done_callback(lambda _f: on_landed())
        if wait:
            self.settle(c)

    def settle(self, c: Chunk) -> None:
        """Wait for any I/O in flight on ``c``; raise a failed transfer's error."""
        with self._cond:
            self._wait(c)

    def evict(self, c: Chunk) -> None:
        """READY -> STORED: give the buffer back (the store has the same bytes). Any other state is left. A chunk
        whose write is in flight with its buffer staying (``write_back`` without ``evict``) is not waited for: its
        buffer goes when the write lands (or when the last reader then lets go)."""
        with self._cond:
            if c.state is ChunkState.WRITING and c._stays:
                c._evict_landed = True
                return
            self._wait_idle(c)
            if c.state is ChunkState.READY and c.home is Tier.NVME:  # DIRTY keeps its bytes for a write_back
                self._let_go(c, ChunkState.STORED)

    def drop(self, c: Chunk) -> None:
        """Forget ``c``'s bytes (-> EMPTY): its buffer goes back to the pool, a HOST chunk keeps its own."""
        with self._cond:
            self._wait_idle(c)
            if c.home is Tier.NVME:
                self._let_go(c, ChunkState.EMPTY)

    def _wait_idle(self, c: Chunk) -> None:
        """Under the lock: until no I/O is in flight on ``c`` and nobody holds it."""
        while True:
            self._wait(c)
            if not c.pinned:
                return
            self._cond.wait()

    def _let_go(self, c: Chunk, state: ChunkState) -> None:
        """Under the lock (or with no other user left): ``c``'s buffer given back, and ``c`` is ``state``."""
        c._evict_landed = False
        self._unkeep(c)
        if c._release is not None:
            c._release()
        c._tensor, c._extra, c._release = None, None, None
        c.state = state

    def rehome(self, c: Chunk, home: Tier, *, keep: bool = True) -> None:
        """Between iterations: move ``c`` between HOST and NVME, its bytes with it when ``keep`` (a store
        chunk's are read in first), else as nothing (EMPTY in the store, a fresh buffer on the host)."""
        if home is c.home:
            return
        if Tier.DEVICE in (home, c.home):
            raise AssertionError(f"rehome of {c!r} to {home.value}: device chunks move with resize()")
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
        with self._cond:
            self._unkeep(c)  # its buffer is the chunk's own now
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
            self._trace(handle, "disk_read", c)
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
        """The chunk is no longer used: its buffer given back, its store copy (a store chunk's) deleted."""
        with self._cond:
            self._wait_idle(c)
            stored = c.home is Tier.NVME and c.state is not ChunkState.EMPTY
            self._let_go(c, ChunkState.EMPTY)
        if stored and self._store is not None and c.key in self._store:
            self._store.delete(c.key)

    # -- transactions --------------------------------------------------------------------------------------------
    def begin(self, host_limit_bytes: int | None = None) -> None:
        """Open a transaction: from now on :meth:`preserve` keeps pre-images, until :meth:`commit` or
        :meth:`abort`. ``host_limit_bytes``: the most its host copies may take (a copy beyond it raises
        :class:`~storage.TierFullError`), so that they never take the buffers the work in flight needs: those
        wait for memory, and the copies are freed only when that work is done."""
        if self._tx is not None:
            raise AssertionError("swap transaction: one is already open")
        self._tx = {}
        self._tx_limit = host_limit_bytes

    @property
    def in_transaction(self) -> bool:
        return self._tx is not None

    def preserve(self, c: Chunk) -> None:
        """Before ``c``'s bytes change in the open transaction (no-op outside one, or once preserved): keep them.
        The caller holds ``c`` for writing (or nobody else can reach it)."""
        tx = self._tx
        if tx is None or id(c) in tx:
            return
        with self._cond:
            self._wait(c)
            state, tensor = c.state, c._tensor
        if c.home is Tier.NVME and state is not ChunkState.DIRTY:
            # The store has the bytes (READY: the same as the buffer; STORED: only there): hold its version.
            version = self.store.hold(c.key) if state is not ChunkState.EMPTY and c.key in self.store else None
            tx[id(c)] = ("stored", c, version, c.nbytes)
            return
        copy, release = self._copy_out(tensor if tensor is not None else torch.empty(0, dtype=torch.uint8))
        tx[id(c)] = ("copy", c, (copy, release, state), c.nbytes)

    def preserve_tensor(self, t: torch.Tensor) -> None:
        """Before ``t`` (memory that is not a chunk: a unit's params on the device) changes in the open
        transaction: keep a host copy of it."""
        tx = self._tx
        if tx is None or id(t) in tx:
            return
        tx[id(t)] = ("tensor", t, self._copy_out(t), 0)

    def _copy_out(self, t: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
        """A host copy of ``t`` from the pool; raises :class:`~storage.TierFullError` at once when the budget has
        no room (a pre-image must not wait for memory that only the end of the transaction frees)."""
        nbytes = t.numel() * t.element_size()
        rounded = (nbytes + 4095) // 4096 * 4096
        if self._tx_limit is not None and self.tx_bytes + rounded > self._tx_limit:
            raise TierFullError("host", "a pre-update copy (within the transaction's host limit)", rounded,
                                self.tx_bytes, self._tx_limit)
        buf, release = self._acquire(nbytes, wait=False)
        if nbytes:
            buf.view(t.dtype).view(t.shape).copy_(t)
        self.tx_bytes += rounded
        self.tx_peak_bytes = max(self.tx_peak_bytes, self.tx_bytes)
        return buf.view(t.dtype).view(t.shape) if nbytes else buf, release

    def commit(self) -> None:
        """Close the transaction keeping every change: the pre-images are let go."""
        tx, self._tx = self._tx, None
        self._let_go_pre_images(tx)

    def _let_go_pre_images(self, tx: dict | None) -> None:
        """A closed transaction's host copies back to the pool, its held store versions released."""
        for kind, _what, keep, _n in (tx or {}).values():
            if kind == "stored":
                if keep is not None:
                    self.store.release(keep)
            else:
                keep[1]()
        self.tx_bytes = 0

    def abort(self) -> None:
        """Close the transaction undoing every change: each preserved chunk and tensor has its bytes as they were
        when preserved (a store chunk its held version, committed again, and no buffer). Nobody may hold them."""
        tx, self._tx = self._tx, None
        try:
            for kind, what, keep, nbytes in (tx or {}).values():
                if kind == "tensor":
                    if what.numel():
                        what.copy_(keep[0])
                    continue
                c = what
                with self._cond:
                    self._wait_idle(c)
                if kind == "stored":
                    version: StoreVersion | None = keep
                    with self._cond:
                        self._let_go(c, ChunkState.STORED if version is not None else ChunkState.EMPTY)
                        c.nbytes = nbytes
                    if version is not None:
                        self.store.restore(version)
                    elif self._store is not None and c.key in self._store:
                        self._store.delete(c.key)
                    continue
                copy, _release, state = keep
                if c._tensor is None or c.nbytes != nbytes:
                    # Re-sized (a first step packed new state) or written out since: a buffer of the old size.
                    if c.home is Tier.NVME:
                        tensor, release = self._acquire(nbytes)
                    else:
                        tensor, release = self._home_buffer(nbytes, c.home)
                    with self._cond:
                        self._unkeep(c)
                        if c._release is not None:
                            c._release()
                        c._tensor, c._extra, c._release, c.nbytes = tensor, None, release, nbytes
                if nbytes:
                    c._tensor.copy_(copy)
                self._set_state(c, state)
        finally:
            self._let_go_pre_images(tx)

    def _trace(self, handle, resource: str, c: Chunk) -> None:
        self._moved[c.kind][resource] += c.nbytes
        if self.trace is not None:
            done = self.trace(resource, c)
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


def _nothing() -> None:
    pass
