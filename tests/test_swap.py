"""The swap manager's chunk states on their own: reads ahead, write-backs, re-packing, device chunks, counters."""

from __future__ import annotations

import threading

import pytest
import torch

from offload.swap import ChunkState, DeviceCache, SwapManager
from storage import HostPool, NvmeStore, Tier, TierFullError

MiB = 1 << 20


@pytest.fixture
def swap(tmp_path):
    s = SwapManager(HostPool(budget_bytes=8 * MiB, slab_bytes=MiB), DeviceCache(torch.device("cpu"), 4 * MiB, keep=2),
                    lambda: NvmeStore([str(tmp_path)], 64 * MiB, reset=True))
    yield s
    s.close()


def stored_chunk(swap, key="c", nbytes=MiB, value=7, kind="state"):
    c = swap.chunk(key, nbytes, Tier.NVME, kind=kind)
    with swap.use(c, write=True, load=False) as buf:
        buf.fill_(value)
    swap.write_back(c, wait=True)
    assert c.state is ChunkState.STORED
    return c


def test_prefetch_reads_ahead_and_use_takes_the_read(swap):
    c = stored_chunk(swap)
    assert swap.prefetch(c)
    assert c.state in (ChunkState.LOADING, ChunkState.READY)
    with swap.use(c) as buf:  # waits for the read instead of reading again
        assert c.state is ChunkState.READY and bool((buf == 7).all())
    assert swap.moved("state")["disk_read"] == MiB  # one read, not two
    swap.evict(c)
    assert c.state is ChunkState.STORED and swap.pool.in_use_bytes == 0


def test_weight_reads_go_before_state_read_ahead(swap, monkeypatch):
    """The store serves weight reads (compute waits for them) before state and grads read ahead for the update
    thread, whichever way they are issued (prefetch or use)."""
    from storage.workers import READAHEAD, URGENT

    chunks = [stored_chunk(swap, k, kind=k) for k in ("params", "state", "grads")]
    seen, read = [], swap.store.read
    monkeypatch.setattr(swap.store, "read", lambda key, out=None, *, priority=URGENT: (
        seen.append((key, priority)), read(key, out, priority=priority))[1])
    for c in chunks:
        assert swap.prefetch(c)
        with swap.use(c) as buf:
            assert bool((buf == 7).all())
        swap.evict(c)
        with swap.use(c):  # a read on use, not ahead
            pass
        swap.evict(c)
    expect = {"params": URGENT, "state": READAHEAD, "grads": READAHEAD}
    assert seen == [(k, expect[k]) for k in ("params", "state", "grads") for _ in range(2)]
    with pytest.raises(ValueError, match="expected priority URGENT or READAHEAD"):
        swap.store.read("params", priority=7)


def test_prefetch_does_not_wait_for_host_budget(swap):
    c = stored_chunk(swap)
    hog = swap.pool.acquire(8 * MiB)
    assert not swap.prefetch(c)  # no room now: says so instead of waiting
    assert c.state is ChunkState.STORED
    hog.release()
    assert swap.prefetch(c)
    swap.settle(c)
    assert c.state is ChunkState.READY


def test_keep_copy_makes_a_stored_chunk_ready_without_a_read(swap):
    """A copy the caller vouches equals the stored bytes (a device copy of what was read) becomes the chunk's
    READY buffer: the next use reads nothing, and evict gives it back. Nothing happens to a chunk that is not
    STORED, or when the pool has no room."""
    c = stored_chunk(swap, kind="params")
    src = torch.full((MiB,), 7, dtype=torch.uint8)
    read = swap.moved("params")["disk_read"]
    assert swap.keep_copy(c, src) and c.state is ChunkState.READY
    with swap.use(c, write=True) as buf:
        assert bool((buf == 7).all())
        assert buf.data_ptr() != src.data_ptr()  # a copy: the caller's memory stays the caller's
    assert swap.moved("params")["disk_read"] == read
    assert not swap.keep_copy(c, src)  # DIRTY now: its buffer holds the newest bytes
    swap.write_back(c, wait=True)
    full = [swap.pool.acquire(MiB) for _ in range(8)]
    assert not swap.keep_copy(c, src) and c.state is ChunkState.STORED
    for b in full:
        b.release()
    assert swap.keep_copy(c, src)
    swap.evict(c)
    assert c.state is ChunkState.STORED and swap.pool.in_use_bytes == 0


def test_use_with_extra_brings_working_memory_after_the_bytes(swap):
    c = stored_chunk(swap, nbytes=5000)
    with swap.use(c, write=True, extra=3 * 4096) as buf:
        extra = swap.extra(c)
        assert buf.numel() == 5000 and extra.numel() == 3 * 4096
        assert extra.data_ptr() - buf.data_ptr() == 8192  # the chunk's bytes rounded up to 4 KiB, then the extra
        extra.fill_(1)  # the caller's scratch: the chunk's bytes stay
        assert bool((buf == 7).all())


def test_resize_gives_new_bytes_and_the_store_gets_them_on_write_back(swap):
    c = stored_chunk(swap, nbytes=4096)
    with swap.use(c, write=True) as old:
        swap.resize(c, 3 * 4096, lambda new: (new.fill_(0), new[:4096].copy_(old)))
    assert c.state is ChunkState.DIRTY and c.nbytes == 3 * 4096
    swap.write_back(c, wait=True)
    got = swap.copy(c)
    assert bool((got[:4096] == 7).all()) and bool((got[4096:] == 0).all())


def test_resize_to_another_home_deletes_the_stored_copy(swap):
    c = stored_chunk(swap, nbytes=4096)
    with swap.use(c, write=True) as old:
        swap.resize(c, 4096, lambda new: new.copy_(old), home=Tier.HOST)
    assert c.home is Tier.HOST and c.state is ChunkState.READY
    assert c.key not in swap.store
    assert bool((swap.buffer(c) == 7).all())


def test_resize_of_a_chunk_someone_else_holds_is_refused(swap):
    c = stored_chunk(swap, nbytes=4096)
    held, release = threading.Event(), threading.Event()

    def reader():
        with swap.use(c):
            held.set()
            release.wait(30)

    t = threading.Thread(target=reader)
    t.start()
    assert held.wait(30)
    try:
        with pytest.raises(AssertionError, match="held by another user"):
            swap.resize(c, 8192, lambda new: None)
    finally:
        release.set()
        t.join(30)


def test_device_chunks_live_within_the_device_budget(swap):
    a = swap.chunk("a", 3 * MiB, Tier.DEVICE, kind="state")
    assert a.state is ChunkState.READY and swap.device.budget.used_bytes == 3 * MiB
    with pytest.raises(TierFullError):
        swap.chunk("b", 2 * MiB, Tier.DEVICE, kind="state")
    swap.free(a)
    assert swap.device.budget.used_bytes == 0
    b = swap.chunk("b", 2 * MiB, Tier.DEVICE, kind="state")
    with pytest.raises(AssertionError, match="only store chunks"):
        swap.write_back(b)


def test_failed_write_keeps_the_bytes_and_raises_once(swap, monkeypatch):
    import errno
    import os

    c = stored_chunk(swap, nbytes=4096)
    with swap.use(c, write=True) as buf:
        buf.fill_(9)
    real = os.pwritev

    def full(fd, bufs, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    swap.write_back(c)  # issued; fails on the store's thread
    with pytest.raises(Exception, match="disk full"):
        swap.settle(c)
    assert c.state is ChunkState.DIRTY  # the store kept the old version: the new bytes stay in memory
    swap.settle(c)  # raised once
    monkeypatch.setattr(os, "pwritev", real)
    swap.write_back(c, wait=True)
    assert c.state is ChunkState.STORED and bool((swap.copy(c) == 9).all())


def test_bytes_moved_are_counted_by_kind_and_link(swap):
    stored_chunk(swap, "p", 4096, kind="params")
    c = stored_chunk(swap, "s", 8192, kind="state")
    with swap.use(c):
        pass
    swap.count("params", "h2d", 100)
    assert swap.moved("params") == {"h2d": 100, "d2h": 0, "disk_read": 0, "disk_write": 4096}
    assert swap.moved("state") == {"h2d": 0, "d2h": 0, "disk_read": 8192, "disk_write": 8192}
    assert swap.moved() == {"h2d": 100, "d2h": 0, "disk_read": 8192, "disk_write": 12288}


def test_wait_any_returns_once_one_transfer_lands(swap):
    a, b = stored_chunk(swap, "a"), stored_chunk(swap, "b")
    assert swap.prefetch(a) and swap.prefetch(b)
    swap.wait_any([a, b])
    assert ChunkState.READY in (a.state, b.state)
    swap.settle(a)
    swap.settle(b)


def test_device_buffer_emptied_and_filled_keeps_its_storage_for_older_views():
    """A released device buffer's memory becomes a spare that others take and overwrite; filled again, the buffer
    has its own storage back with new memory, so a view made before it was emptied (what autograd saved) reads
    what is written into the buffer now, not what the spare's new owner wrote."""
    dev = DeviceCache(torch.device("cpu"), 4 * MiB, keep=2)
    a = dev.buffer(MiB)
    a.fill_(1)
    saved = a[4096:8192].view(torch.float32)
    dev.empty(a, MiB)
    assert a.untyped_storage().nbytes() == 0 and dev.spare_bytes == MiB
    b = dev.buffer(MiB)  # the spare: a's old memory
    assert dev.spare_bytes == 0
    b.fill_(0xFF)
    dev.fill(a, MiB)
    a.fill_(3)
    assert bool((saved == torch.tensor([3], dtype=torch.uint8).repeat(4).view(torch.float32)).all())
    assert bool((b == 0xFF).all())  # b keeps its memory: a got fresh memory, not b's


class WriteGate:
    """Once ``held()``, the store's writes wait until ``land()``: a write held in flight, from no timing."""

    def __init__(self):
        self.holding, self.open = threading.Event(), threading.Event()

    def held(self) -> None:
        self.holding.set()

    def land(self) -> None:
        self.open.set()


@pytest.fixture
def gated_writes(monkeypatch):
    import os

    gate, real = WriteGate(), os.pwritev

    def pwritev(fd, bufs, offset):
        if gate.holding.is_set():
            assert gate.open.wait(30), "a test never let its writes land"
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    yield gate
    gate.land()


def dirty_chunk(swap, value):
    c = stored_chunk(swap)
    with swap.use(c, write=True) as buf:
        buf.fill_(value)
    return c


def test_readers_share_a_buffer_being_written_that_stays(swap, gated_writes):
    """A write that keeps its buffer (``evict=False``, ``keep``) lets readers use it while it is in flight (both
    only read it: the next forward fetches the last step's new weights before their write lands); a writer
    waits for the write. Once landed, a ``keep`` buffer is a kept copy, counted as cached."""
    c = dirty_chunk(swap, 5)
    gated_writes.held()
    swap.write_back(c, keep=True)
    assert c.state is ChunkState.WRITING
    with swap.use(c) as buf:  # does not wait for the write
        assert c.state is ChunkState.WRITING and bool((buf == 5).all())
    wrote = threading.Event()

    def writer():
        with swap.use(c, write=True) as buf:
            buf.fill_(6)
        wrote.set()

    t = threading.Thread(target=writer)
    t.start()
    assert not wrote.wait(0.05)  # the writer waits for the write in flight (no time needed to be sure: it is held)
    assert c.state is ChunkState.WRITING
    gated_writes.land()
    t.join(30)
    assert wrote.is_set() and c.state is ChunkState.DIRTY  # it took the kept copy as its working buffer
    assert swap.pool.stats()["cached_bytes"] == 0
    swap.write_back(c, keep=True, wait=True)
    assert c.state is ChunkState.READY and c.kept and swap.pool.stats()["cached_bytes"] > 0
    assert bool((swap.copy(c) == 6).all())


def test_evict_during_a_write_that_stays_lets_go_when_it_lands(swap, gated_writes):
    """``evict`` of a chunk whose write keeps its buffer does not wait for the write: the buffer goes when it
    lands, or, with a reader holding it then, when the last reader lets go."""
    a, b = dirty_chunk(swap, 1), stored_chunk(swap, "b")
    with swap.use(b, write=True) as buf:
        buf.fill_(2)
    gated_writes.held()
    swap.write_back(a, evict=False)
    swap.write_back(b, evict=False)
    swap.evict(a)  # returns at once: the write is held in flight
    assert a.state is ChunkState.WRITING
    reading = swap.use(b)
    buf_b = reading.__enter__()
    swap.evict(b)
    gated_writes.land()
    swap.settle(a)
    swap.settle(b)
    assert a.state is ChunkState.STORED  # let go as its write landed
    assert b.state is ChunkState.READY and bool((buf_b == 2).all())  # a reader held it: kept until it lets go
    reading.__exit__(None, None, None)
    assert b.state is ChunkState.STORED and swap.pool.in_use_bytes == 0
    assert bool((swap.copy(a) == 1).all()) and bool((swap.copy(b) == 2).all())
