"""NvmeStore on a real directory: round trips, striping, persistence, ordering, corruption, and every error a
person can meet (type, and a message that names the problem and the fix)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from conftest import SMALL, mounted
from storage import (ChecksumError, ChunkKeyError, ChunkMismatchError, NvmeStore, StoreConfig, StoreCorruptError,
                     StoreError, StoreFullError, StoreLockedError, StoreOpenError, aligned_empty)
from storage.nvme import CHECKSUMS, DATA, MANIFEST

ROOT = Path(__file__).resolve().parent.parent

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128]
DTYPES += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                       "float8_e8m0fnu", "uint16", "uint32", "uint64") if hasattr(torch, n)]


def random_tensor(shape, dtype, seed=0) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaNs and all: the store moves bytes, not numbers)."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for s in shape:
        numel *= s
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=g).bool().view(shape)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=g).view(dtype).view(shape)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal, dtype and shape too (== is wrong for NaN and missing for float8)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def aligned_like(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in 4 KiB-aligned memory: the store's no-copy path."""
    nbytes = t.numel() * t.element_size()
    out = aligned_empty(nbytes)[:nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


# -- round trips ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aligned", [False, True], ids=["staged", "no-copy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_round_trip_every_dtype(store, dtype, aligned):
    t = random_tensor((37, 129), dtype, seed=1)  # 4773 elements: never a multiple of 4 KiB, several blocks
    if aligned:
        t = aligned_like(t)
    info = store.write("t", t).wait()
    assert (info.dtype, info.shape, info.nbytes) == (dtype, (37, 129), t.numel() * t.element_size())
    back = store.read("t").wait()
    assert same(back, t)
    out = aligned_like(torch.zeros_like(t)) if aligned else torch.zeros_like(t)
    assert store.read("t", out=out).wait() is out
    assert same(out, t)


@pytest.mark.parametrize("nbytes", [1, 4095, 4096, 4097, (16 << 10) - 1, 16 << 10, (16 << 10) + 1, 100_003, 1 << 20])
def test_round_trip_sizes(store_dir, nbytes):
    t = random_tensor((nbytes,), torch.uint8, seed=nbytes)
    with NvmeStore(store_dir, capacity_bytes=4 << 20, config=SMALL) as s:
        s.write("k", t).wait()
        assert len(s._index["k"].blocks) == -(-nbytes // (16 << 10))
        assert same(s.read("k").wait(), t)
    with NvmeStore(store_dir, config=SMALL) as s:  # and from disk, after a reopen
        assert same(s.read("k").wait(), t)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0, 2), ()], ids=str)
def test_empty_and_scalar_tensors(store_dir, shape):
    t = random_tensor(shape, torch.float32, seed=3)
    with NvmeStore(store_dir, capacity_bytes=1 << 20, config=SMALL) as s:
        s.write("e", t).wait()
        assert s.info("e").shape == shape
        assert same(s.read("e").wait(), t)
    with NvmeStore(store_dir) as s:
        assert same(s.read("e").wait(), t)
        out = torch.empty(shape)
        assert same(s.read("e", out=out).wait(), t)


def test_non_contiguous_write_and_non_contiguous_out(store):
    base = torch.randn(64, 96, generator=torch.Generator().manual_seed(4))
    src = base.t()  # transposed
    strided = base[:, ::3]  # every third column
    assert not src.is_contiguous() and not strided.is_contiguous()
    store.write("t", src).wait()
    store.write("s", strided).wait()
    assert store.info("t").shape == (96, 64)
    assert same(store.read("t").wait(), src.contiguous())
    assert same(store.read("s").wait(), strided.contiguous())
    out = torch.full((64, 96), -1.0).t()  # non-contiguous destination, same shape
    store.read("t", out=out).wait()
    assert torch.equal(out, src)
    flat = torch.empty(96 * 64)  # another shape with the same number of elements: filled in row-major order
    store.read("t", out=flat).wait()
    assert torch.equal(flat, src.reshape(-1))
    unaligned = torch.empty(96 * 64 + 1)[1:]  # contiguous but not 4 KiB-aligned: goes through staging
    store.read("t", out=unaligned).wait()
    assert torch.equal(unaligned, src.reshape(-1))


def test_the_callers_tensor_is_free_after_a_staged_write(store):
    t = random_tensor((5001,), torch.int32, seed=5)[1:]  # 4 bytes past an allocation: never 4 KiB-aligned
    assert t.data_ptr() % 4096  # (a fresh tensor may happen to be aligned, and is then written in place)
    expect = t.clone()
    h = store.write("t", t)  # unaligned: copied at once, so changing t afterwards is allowed
    t.zero_()
    h.wait()
    assert same(store.read("t").wait(), expect)


def test_requires_grad_tensors_are_stored_detached(store):
    w = torch.randn(300, requires_grad=True)
    store.write("w", w * 2).wait()
    back = store.read("w").wait()
    assert not back.requires_grad and torch.equal(back, (w * 2).detach())


def test_odd_keys_survive_reopen(store_dir):
    keys = ["a/b.c", "layer 0 ✓", "new\nline", '"quoted"', "x" * 300]
    with NvmeStore(store_dir, capacity_bytes=1 << 20, config=SMALL) as s:
        for i, k in enumerate(keys):
            s.write(k, torch.full((10,), i)).wait()
    with NvmeStore(store_dir) as s:
        assert sorted(s.keys()) == sorted(keys)
        for i, k in enumerate(keys):
            assert torch.equal(s.read(k).wait(), torch.full((10,), i))


# -- striping ------------------------------------------------------------------------------------------------------
def test_striping_over_three_directories(tmp_path):
    dirs = [tmp_path / f"d{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    t = random_tensor((300_000,), torch.uint8, seed=6)  # 19 blocks of 16 KiB
    with NvmeStore(dirs, capacity_bytes=3 << 20, config=SMALL) as s:
        assert s.capacity_bytes == 3 << 20
        s.write("t", t).wait()
        files = [b.file for b in s._index["t"].blocks]
        assert sorted(set(files)) == [0, 1, 2]
        assert max(files.count(f) for f in range(3)) - min(files.count(f) for f in range(3)) <= 1, files
        assert same(s.read("t").wait(), t)
    for d in dirs:
        assert os.path.getsize(d / DATA) == 1 << 20
    with NvmeStore(dirs) as s:
        assert same(s.read("t").wait(), t)
    with pytest.raises(StoreOpenError) as e:
        NvmeStore([dirs[1], dirs[0], dirs[2]])
    assert "holds stripe 1 of 3" in str(e.value) and "in the same order" in str(e.value)
    with pytest.raises(StoreOpenError, match="in the same order"):
        NvmeStore(dirs[:2])  # a directory left out
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreOpenError, match=r"has no store manifest .* pass the same directories"):
        NvmeStore([dirs[0], empty, dirs[2]])
    with NvmeStore(dirs) as s:  # the failed opens left it intact and unlocked
        assert same(s.read("t").wait(), t)


def test_same_directory_twice_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="listed twice"):
        NvmeStore([tmp_path, tmp_path / "." ], capacity_bytes=1 << 20)
    with pytest.raises(ValueError, match="at least one directory"):
        NvmeStore([], capacity_bytes=1 << 20)


# -- persistence and ordering ---------------------------------------------------------------------------------------
def test_reopen_keeps_every_chunk(store_dir):
    tensors = {f"k{i}": random_tensor((1000 * (i + 1),), DTYPES[i], seed=i) for i in range(6)}
    with NvmeStore(store_dir, capacity_bytes=2 << 20, config=SMALL) as s:
        handles = [s.write(k, t) for k, t in tensors.items()]
        s.write("k0", tensors["k0"] + 1)  # overwritten...
        s.write("k0", tensors["k0"]).wait()  # ...and back
        s.write("gone", torch.ones(10)).wait()
        s.delete("gone")
        for h in handles:  # committed before their versions are read (several threads: any order)
            h.wait()
        versions = {k: s.info(k).version for k in tensors}
    with NvmeStore(store_dir, capacity_bytes=2 << 20) as s:  # the same capacity is accepted
        assert sorted(s.keys()) == sorted(tensors) and len(s) == 6 and "gone" not in s
        for k, t in tensors.items():
            assert same(s.read(k).wait(), t)
            assert s.info(k).version == versions[k]
        nxt = s.write("k1", tensors["k1"]).wait()
        assert nxt.version > max(versions.values())  # sequence numbers go on after a reopen


def test_committed_writes_survive_a_crash(store_dir):
    s = NvmeStore(store_dir, capacity_bytes=1 << 20, config=SMALL)
    t = random_tensor((50_000,), torch.uint8, seed=7)
    s.write("a", t).wait()
    s.write("b", t[:10]).wait()
    s.delete("b")
    s._simulate_crash()  # no close: no compaction, the journal alone must carry it
    with NvmeStore(store_dir) as s2:
        assert s2.keys() == ["a"] and same(s2.read("a").wait(), t)


def test_read_your_writes(store):
    for i in range(10):
        t = torch.full((100_000,), float(i))
        store.write("x", t)  # not waited
        assert torch.equal(store.read("x").wait(), t)


def test_writes_to_one_key_commit_in_issue_order(store_dir):
    with NvmeStore(store_dir, capacity_bytes=8 << 20, config=StoreConfig(block_bytes=16 << 10, workers=8)) as s:
        handles = []
        for i in range(12):  # big and small versions alternate, so later ones often finish first
            n = 200_000 if i % 2 == 0 else 1000
            handles.append(s.write("x", torch.full((n,), i, dtype=torch.int32)))
        infos = [h.wait() for h in handles]
        assert [i.version for i in infos] == sorted(i.version for i in infos)
        assert s.info("x").version == infos[-1].version
        assert torch.equal(s.read("x").wait(), torch.full((1000,), 11, dtype=torch.int32))
        # Superseded versions gave their extents back: only the last one holds space.
        assert s.free_bytes == s.capacity_bytes - 4096
    with NvmeStore(store_dir) as s:
        assert torch.equal(s.read("x").wait(), torch.full((1000,), 11, dtype=torch.int32))


def test_delete(store):
    cap = store.free_bytes
    store.write("a", torch.ones(10_000)).wait()
    store.write("b", torch.ones(10)).wait()
    assert store.free_bytes < cap
    store.delete("a")
    assert "a" not in store and store.keys() == ["b"]
    with pytest.raises(ChunkKeyError):
        store.read("a")
    with pytest.raises(ChunkKeyError, match="no chunk 'a' in the store"):
        store.delete("a")
    store.delete("b")
    assert store.free_bytes == cap and len(store) == 0


def test_delete_waits_for_a_write_in_flight(store):
    store.write("a", torch.ones(500_000))  # several MB of blocks, not waited
    store.delete("a")
    assert "a" not in store
    store.flush()
    assert "a" not in store and store.free_bytes == store.capacity_bytes


def test_asyncio_face(store):
    async def main():
        t = random_tensor((70_000,), torch.bfloat16, seed=8)
        infos = await asyncio.gather(store.awrite("a", t), store.awrite("b", t * 2))
        a, b = await asyncio.gather(store.aread("a"), store.aread("b", out=torch.empty_like(t)))
        return t, infos, a, b

    t, infos, a, b = asyncio.run(main())
    assert [i.key for i in infos] == ["a", "b"]
    assert same(a, t) and same(b, t * 2)


def test_stats_count_bytes(store):
    t = torch.ones(50_000)
    store.write("a", t).wait()
    store.read("a").wait()
    snap = store.stats.snapshot()
    assert snap["nvme.write"]["bytes"] == 200_000 and snap["nvme.read"]["bytes"] == 200_000
    assert snap["nvme.write"]["requests"] == -(-200_000 // (16 << 10))
    assert snap["nvme.read"]["in_flight"] == 0


def test_journal_compaction_keeps_everything(store_dir):
    with NvmeStore(store_dir, capacity_bytes=1 << 20, config=SMALL) as s:
        for i in range(1100):  # more than the 1024 + 4 * chunks records that trigger a compaction
            s.write(f"k{i % 3}", torch.full((4,), i)).wait()
        assert s._journal.generation >= 1
    assert sorted(os.listdir(store_dir)) == sorted([DATA, MANIFEST, "index.snapshot", "index.journal.2"])
    with NvmeStore(store_dir) as s:
        assert {k: int(s.read(k).wait()[0]) for k in s.keys()} == {"k0": 1098, "k1": 1099, "k2": 1097}


@pytest.mark.parametrize("op", ["write", "delete"])
def test_a_compaction_never_loses_the_commit_that_triggered_it(store_dir, op):
    """The snapshot written when the journal grows long must include the record that made it long."""
    s = NvmeStore(store_dir, capacity_bytes=1 << 20, config=SMALL)
    s.write("keep", torch.full((4,), -1)).wait()
    i = 0
    while s._journal.generation == 0:
        assert i < 10_000, "the journal never compacted"  # it does after ~1030 records (NvmeStore._maybe_compact)
        i += 1
        if op == "write":
            s.write("x", torch.full((4,), i)).wait()
        else:
            s.write("x", torch.full((4,), i)).wait() if "x" not in s else s.delete("x")
    expect_x = torch.full((4,), i) if "x" in s else None
    s._simulate_crash()
    with NvmeStore(store_dir) as s2:
        if expect_x is None:
            assert "x" not in s2
        else:
            assert torch.equal(s2.read("x").wait(), expect_x)
        assert torch.equal(s2.read("keep").wait(), torch.full((4,), -1))
        assert s2.verify() == {}


@pytest.mark.parametrize("fail", ["rename", "fsync_dir"])
def test_a_failed_compaction_loses_nothing(store_dir, monkeypatch, fail):
    import storage.journal

    def boom(*a, **kw):
        raise OSError(errno.EIO, "Input/output error")

    s = NvmeStore(store_dir, capacity_bytes=1 << 20, config=SMALL)
    monkeypatch.setattr(*((os, "replace") if fail == "rename" else (storage.journal, "_fsync_dir")), boom)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(1100):
            s.write(f"k{i % 2}", torch.full((4,), i)).wait()
    assert any("compacting the store index" in str(w.message) and "nothing is lost" in str(w.message)
               for w in caught)
    monkeypatch.undo()
    s.write("k0", torch.full((4,), -7)).wait()
    s._simulate_crash()
    with NvmeStore(store_dir) as s2:
        assert int(s2.read("k0").wait()[0]) == -7 and int(s2.read("k1").wait()[0]) == 1099
        assert s2.verify() == {}


# -- space ---------------------------------------------------------------------------------------------------------
def test_store_full_error(store_dir):
    with NvmeStore(store_dir, capacity_bytes=64 << 10, config=SMALL) as s:
        s.write("a", torch.zeros(40 << 10, dtype=torch.uint8)).wait()
        with pytest.raises(StoreFullError) as e:
            s.write("b", torch.zeros(40 << 10, dtype=torch.uint8))
        msg = str(e.value)
        assert "no room for 'b' (40.0 KiB): 24.0 KiB free of 64.0 KiB" in msg
        assert "raise capacity_bytes, delete chunks" in msg
        # Overwriting needs room for the new copy beside the old one, and says so.
        with pytest.raises(StoreFullError, match="beside the old one"):
            s.write("a", torch.ones(40 << 10, dtype=torch.uint8))
        assert torch.equal(s.read("a").wait(), torch.zeros(40 << 10, dtype=torch.uint8))
        assert s.free_bytes == 24 << 10  # the failed writes took nothing
        s.delete("a")
        s.write("b", torch.zeros(40 << 10, dtype=torch.uint8)).wait()  # room again


@pytest.mark.parametrize("wait_s", [0.0, 10.0])
def test_wait_for_space(store_dir, monkeypatch, wait_s):
    cfg = StoreConfig(block_bytes=64 << 10, wait_for_space_s=wait_s)
    with NvmeStore(store_dir, capacity_bytes=128 << 10, config=cfg) as s:
        first = s.write("a", torch.zeros(64 << 10, dtype=torch.uint8)).wait()
        gate = threading.Event()
        real = os.pwritev
        monkeypatch.setattr(os, "pwritev", lambda *a: (gate.wait(30), real(*a))[1])  # a disk that waits for us
        # While a's new version is in flight, the old one still holds its extents: the store is full until it
        # commits. Waiting for space lets the write to b go ahead once they are freed.
        h1 = s.write("a", torch.ones(64 << 10, dtype=torch.uint8))
        if wait_s == 0:
            with pytest.raises(StoreFullError, match="wait_for_space_s"):
                s.write("b", torch.full((64 << 10,), 2, dtype=torch.uint8))
            gate.set()
            h1.wait()
            return
        # Opened from another thread, since the write to b blocks this one: whether b then had to wait depends on
        # the timer, but what the test checks below holds either way.
        threading.Timer(0.3, gate.set).start()
        h2 = s.write("b", torch.full((64 << 10,), 2, dtype=torch.uint8))
        assert s.info("a").version > first.version  # b got its room only when a's new version committed
        h2.wait()
        assert int(s.read("b").wait()[0]) == 2 and int(s.read("a").wait()[0]) == 1


def test_extents_being_read_are_not_reused(store_dir, monkeypatch):
    s = NvmeStore(store_dir, capacity_bytes=1 << 20, config=StoreConfig(block_bytes=16 << 10, workers=16))
    v1 = random_tensor((100_000,), torch.uint8, seed=12)
    s.write("k", v1).wait()
    gate = threading.Event()
    real = os.preadv

    def held(*a):  # the read's requests wait for the gate: a disk that is slow until the test says otherwise
        gate.wait(30)
        return real(*a)

    monkeypatch.setattr(os, "preadv", held)
    h = s.read("k")  # 7 blocks, held at the gate; the writes below use the other workers meanwhile
    s.write("k", torch.zeros(100_000, dtype=torch.uint8)).wait()  # supersedes v1 while it is being read
    s.delete("k")
    s.write("j", torch.ones(100_000, dtype=torch.uint8)).wait()  # first fit: would land on v1's extents
    assert not h.done()
    gate.set()
    assert same(h.wait(), v1)
    s.flush()
    assert s.free_bytes == s.capacity_bytes - (6 * (16 << 10) + 4096)  # v1's extents came back
    s.close()


def test_threads_writing_and_reading_at_once(store):
    import threading

    errors = []

    def worker(i):
        try:
            for j in range(25):
                t = torch.full((1000 * (j % 7 + 1),), i * 100 + j, dtype=torch.int32)
                store.write(f"t{i}", t)
                assert torch.equal(store.read(f"t{i}").wait(), t)
                if j % 5 == 4:
                    store.delete(f"t{i}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a reading and writing thread is stuck"
    assert not errors, errors
    store.flush()
    assert store.verify() == {}


def test_durable_store_round_trip(store_dir):
    cfg = StoreConfig(block_bytes=16 << 10, durable=True)
    t = random_tensor((70_000,), torch.float16, seed=13)
    with NvmeStore(store_dir, capacity_bytes=1 << 20, config=cfg) as s:
        s.write("t", t).wait()
    with NvmeStore(store_dir) as s:  # another block size on reopen: blocks are recorded, not recomputed
        assert s.config.block_bytes == 8 << 20 and same(s.read("t").wait(), t)


def test_host_pool_buffers_move_without_a_copy(store):
    from storage import HostPool

    pool = HostPool(budget_bytes=1 << 20)
    buf = pool.acquire(256 << 10)
    t = buf.view(torch.float32)
    t.copy_(torch.arange(t.numel(), dtype=torch.float32))
    store.write("x", t).wait()
    out = pool.acquire(256 << 10).view(torch.float32)
    assert store.read("x", out=out).wait() is out
    assert torch.equal(out, torch.arange(t.numel(), dtype=torch.float32))


def test_forgotten_close_releases_the_lock(store_dir):
    import gc

    s = NvmeStore(store_dir, capacity_bytes=1 << 20, config=SMALL)
    s.write("a", torch.ones(10)).wait()
    del s
    gc.collect()
    with NvmeStore(store_dir) as s2:  # the journal already held the commit
        assert torch.equal(s2.read("a").wait(), torch.ones(10))


# -- corruption ----------------------------------------------------------------------------------------------------
def _write_and_locate(store_dir, key="w", nbytes=100_000, block=2, checksum=SMALL.checksum):
    """Write ``key`` and close; returns the tensor and (file path, offset) of its block number ``block``."""
    t = random_tensor((nbytes,), torch.uint8, seed=9)
    config = StoreConfig(block_bytes=SMALL.block_bytes, workers=SMALL.workers, checksum=checksum)
    with NvmeStore(store_dir, capacity_bytes=1 << 20, config=config) as s:
        s.write(key, t).wait()
        s.write("other", torch.ones(1000)).wait()
        b = s._index[key].blocks[block]
        where = (os.path.join(s.paths[b.file], DATA), b.offset)
    return t, where


@pytest.mark.parametrize("checksum", sorted(CHECKSUMS))
@pytest.mark.parametrize("block", [2, 6], ids=["whole-block", "tail-block"])
def test_checksum_catches_a_flipped_byte(store_dir, block, checksum):
    t, (path, offset) = _write_and_locate(store_dir, block=block, checksum=checksum)  # block 6: the 1696 B tail
    flip_byte(path, offset + 123)
    with NvmeStore(store_dir, config=SMALL) as s:  # the store keeps the checksum it was made with
        assert s.checksum == checksum
        with pytest.raises(ChecksumError) as e:
            s.read("w").wait()
        assert isinstance(e.value, StoreCorruptError)
        assert e.value.key == "w" and e.value.block == block and e.value.offset == offset
        msg = str(e.value)
        assert f"checksum mismatch in chunk 'w' (block {block}" in msg and path in msg
        assert "restore it from a checkpoint" in msg
        assert torch.equal(s.read("other").wait(), torch.ones(1000))  # the rest of the store is fine
        bad = s.verify()
        assert list(bad) == ["w"] and "checksum mismatch" in bad["w"]
    # Without verification the flipped byte comes back silently: it is the checksum that catches it.
    with NvmeStore(store_dir, config=StoreConfig(block_bytes=16 << 10, verify=False)) as s:
        back = s.read("w").wait()
        i = block * (16 << 10) + 123
        assert (back != t).sum() == 1 and back[i] == t[i] ^ 0xFF


def test_a_store_keeps_its_checksum_and_refuses_an_unknown_one(store_dir):
    other = "crc32c" if StoreConfig().checksum != "crc32c" else "xxh3_64"
    t, _ = _write_and_locate(store_dir, checksum=other)
    with NvmeStore(store_dir) as s:  # default config: the manifest's checksum wins, old stores stay readable
        assert s.checksum == other
        assert torch.equal(s.read("w").wait(), t)
        assert s.verify() == {}
    meta = json.loads((store_dir / MANIFEST).read_text())
    (store_dir / MANIFEST).write_text(json.dumps(meta | {"checksum": "md5"}))
    with pytest.raises(StoreOpenError, match="uses checksum 'md5', which this version does not know"):
        NvmeStore(store_dir)


def test_cli_verify_reports_the_bad_chunk(store_dir, capsys):
    from offload.cli import main

    t, (path, offset) = _write_and_locate(store_dir)
    assert main(["store", "verify", str(store_dir)]) == 0
    assert "verified: all checksums match" in capsys.readouterr().out
    flip_byte(path, offset)
    assert main(["store", "list", str(store_dir)]) == 0  # list reads no data
    capsys.readouterr()
    assert main(["store", "verify", str(store_dir), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert list(report["bad"]) == ["w"] and "checksum mismatch" in report["bad"]["w"]
    assert sorted(c["key"] for c in report["chunks"]) == ["other", "w"]
    r = subprocess.run([sys.executable, "-m", "offload.cli", "store", "verify", str(store_dir)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "1 bad chunks" in r.stdout and "w: checksum mismatch in chunk 'w'" in r.stdout
    assert main(["store", "list", str(store_dir / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def listing(d) -> dict:
    """Every file in ``d`` with its size and modification time: what "nothing changed" means here."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(d).iterdir())}


def test_cli_verify_and_list_change_nothing(store_dir, capsys):
    """Closing a store compacts its index (a new snapshot and journal): inspecting it must not."""
    from offload.cli import main

    with NvmeStore(store_dir, capacity_bytes=1 << 20, config=SMALL) as s:
        s.write("w", torch.ones(1000)).wait()
        s._simulate_crash()  # an index that is all journal: a read-write open would compact it on close
    before = listing(store_dir)
    assert main(["store", "verify", str(store_dir)]) == 0
    assert main(["store", "list", str(store_dir)]) == 0
    assert "1 chunks" in capsys.readouterr().out
    assert listing(store_dir) == before


@pytest.mark.parametrize("lost", ["all", "snapshot"], ids=["no-index-files", "snapshot-only"])
def test_cli_verify_of_a_store_without_its_index_says_so_and_writes_nothing(store_dir, capsys, lost):
    """With the index gone, the chunks are unreachable; verify used to report "0 chunks, all checksums match"
    and write an empty index, making the loss permanent."""
    from offload.cli import main

    _write_and_locate(store_dir)  # two chunks; close() wrote index.snapshot and index.journal.1
    for p in store_dir.iterdir():
        if p.name == "index.snapshot" or lost == "all" and p.name.startswith("index."):
            p.unlink()
    before = listing(store_dir)
    assert DATA in before
    assert main(["store", "verify", str(store_dir)]) == 2
    err = capsys.readouterr().err
    if lost == "all":
        assert f"the store index in {store_dir} is missing: expected index.snapshot or index.journal.*" in err
    else:
        assert f"{store_dir / 'index.snapshot'} is missing, but index.journal.1 shows the store had one" in err
    assert "restore the index files" in err and "all checksums match" not in err
    assert listing(store_dir) == before, "verify changed the store"
    with pytest.raises(StoreCorruptError, match="missing"):  # nor does a read-write open start an empty index
        NvmeStore(store_dir)
    assert listing(store_dir) == before


def test_readonly_store_refuses_writes_and_shares_its_lock(store_dir):
    t, _ = _write_and_locate(store_dir)
    before = listing(store_dir)
    with NvmeStore(store_dir, readonly=True) as a, NvmeStore(store_dir, readonly=True) as b:
        assert same(a.read("w").wait(), t) and b.verify() == {}
        with pytest.raises(StoreError, match="open read-only; open it without readonly=True to change it"):
            a.write("w", t)
        with pytest.raises(StoreError, match="open read-only"):
            a.delete("w")
        with pytest.raises(StoreLockedError):
            NvmeStore(store_dir)
    assert listing(store_dir) == before
    with pytest.raises(ValueError, match="pass one"):
        NvmeStore(store_dir, readonly=True, reset=True)
    empty = store_dir.parent / "empty"
    empty.mkdir()
    with pytest.raises(StoreOpenError, match="no store in"):
        NvmeStore(empty, capacity_bytes=1 << 20, readonly=True)
    assert list(empty.iterdir()) == []


def test_truncated_data_file_on_reopen(store_dir):
    _write_and_locate(store_dir)
    path = store_dir / DATA
    os.truncate(path, os.path.getsize(path) - 4096)
    with pytest.raises(StoreCorruptError) as e:
        NvmeStore(store_dir)
    assert "was truncated or replaced" in str(e.value) and "reset=True" in str(e.value)
    with NvmeStore(store_dir, capacity_bytes=1 << 20, reset=True) as s:  # the way out it names
        assert len(s) == 0


def test_data_file_truncated_while_open(store_dir):
    with NvmeStore(store_dir, capacity_bytes=1 << 20, config=SMALL) as s:
        s.write("w", torch.ones(100_000)).wait()
        os.truncate(store_dir / DATA, 8192)
        with pytest.raises(StoreCorruptError, match=r"ended before chunk 'w'.*was truncated.*reset=True"):
            s.read("w").wait()


def test_missing_data_file(store_dir):
    _write_and_locate(store_dir)
    os.unlink(store_dir / DATA)
    with pytest.raises(StoreCorruptError, match=r"is missing.*Recreate the store with reset=True"):
        NvmeStore(store_dir)


def test_damaged_manifest(store_dir):
    _write_and_locate(store_dir)
    (store_dir / MANIFEST).write_text("{ not json")
    with pytest.raises(StoreCorruptError, match="cannot read store manifest"):
        NvmeStore(store_dir)


def _journal_path(store_dir) -> Path:
    [j] = [p for p in store_dir.iterdir() if p.name.startswith("index.journal")]
    return j


def _crashed_store_with_versions(store_dir, n=3):
    """Versions 1..n of key 'v' committed, one journal line each, and no compaction (crash, not close)."""
    s = NvmeStore(store_dir, capacity_bytes=1 << 20, config=SMALL)
    for v in range(1, n + 1):
        s.write("v", torch.full((20_000,), v)).wait()
    s._simulate_crash()
    lines = _journal_path(store_dir).read_bytes().splitlines(keepends=True)
    assert len(lines) == n
    return lines


@pytest.mark.parametrize("cut", [1, 10, "half", "garbage"])
def test_torn_journal_tail_is_dropped(store_dir, cut):
    lines = _crashed_store_with_versions(store_dir)
    j = _journal_path(store_dir)
    if cut == "garbage":
        j.write_bytes(b"".join(lines) + b"0123456789abcdef {\"op\": \"pu")  # a line that never finished
        expect = 3
    else:
        n = len(lines[-1]) // 2 if cut == "half" else cut
        j.write_bytes(b"".join(lines)[:-n])
        expect = 2
    with NvmeStore(store_dir) as s:
        assert torch.equal(s.read("v").wait(), torch.full((20_000,), expect))
        s.write("v", torch.full((20_000,), 9)).wait()  # appending after the cut works
    with NvmeStore(store_dir) as s:
        assert torch.equal(s.read("v").wait(), torch.full((20_000,), 9))


def test_damaged_journal_line_in_the_middle_is_corruption(store_dir):
    lines = _crashed_store_with_versions(store_dir)
    j = _journal_path(store_dir)
    damaged = bytearray(lines[1])
    damaged[30] ^= 0x01
    j.write_bytes(lines[0] + bytes(damaged) + lines[2])
    with pytest.raises(StoreCorruptError) as e:
        NvmeStore(store_dir)
    msg = str(e.value)
    assert "line 2 is damaged but later lines are intact" in msg and "not a torn write" in msg
    assert "Restore the store from a checkpoint or recreate it with reset=True" in msg
    with pytest.raises(StoreCorruptError):  # it stays an error: the open did not "repair" it
        NvmeStore(store_dir)


def test_damaged_snapshot_is_corruption(store_dir):
    _write_and_locate(store_dir)  # close() wrote a snapshot
    snap = store_dir / "index.snapshot"
    data = bytearray(snap.read_bytes())
    data[40] ^= 0x01
    snap.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=r"index.snapshot is damaged.*restore the store"):
        NvmeStore(store_dir)


def test_index_pointing_outside_the_file_is_corruption(store_dir):
    _crashed_store_with_versions(store_dir, n=1)
    j = _journal_path(store_dir)
    from storage.journal import _line, _parse
    rec = _parse(j.read_bytes())
    rec["blocks"][0][1] = 1 << 40
    j.write_bytes(_line(rec))
    with pytest.raises(StoreCorruptError, match=r"chunk 'v' points at a bad extent.*reset=True"):
        NvmeStore(store_dir)


# -- opening, locking, file systems --------------------------------------------------------------------------------
def test_second_open_is_locked(store_dir):
    s = NvmeStore(store_dir, capacity_bytes=1 << 20, config=SMALL)
    s.write("a", torch.ones(10)).wait()
    with pytest.raises(StoreLockedError) as e:
        NvmeStore(store_dir)
    assert isinstance(e.value, StoreOpenError)
    assert "is open elsewhere" in str(e.value) and "close that first" in str(e.value)
    with pytest.raises(StoreLockedError):
        NvmeStore(store_dir, capacity_bytes=1 << 20, reset=True)  # reset must not pull the files from under it
    assert torch.equal(s.read("a").wait(), torch.ones(10))
    s.close()
    with NvmeStore(store_dir) as s2:
        assert torch.equal(s2.read("a").wait(), torch.ones(10))


def test_second_open_from_another_process_is_locked(store_dir):
    with NvmeStore(store_dir, capacity_bytes=1 << 20, config=SMALL):
        code = ("import sys\nfrom storage import NvmeStore, StoreLockedError\ntry:\n    NvmeStore(sys.argv[1])\n"
                "except StoreLockedError as e:\n    print('locked:', e)\n    sys.exit(3)\n")
        r = subprocess.run([sys.executable, "-c", code, str(store_dir)], capture_output=True, text=True, cwd=ROOT,
                           timeout=120)
        assert r.returncode == 3, r.stderr
        assert "is open elsewhere" in r.stdout


def test_closed_store_says_how_to_reopen(store):
    store.close()
    store.close()  # a second close is a no-op
    with pytest.raises(StoreError, match=r"is closed; open it again with NvmeStore"):
        store.write("a", torch.ones(1))
    with pytest.raises(StoreError, match="is closed"):
        store.read("a")


def test_directory_missing(tmp_path):
    with pytest.raises(StoreOpenError) as e:
        NvmeStore(tmp_path / "nope", capacity_bytes=1 << 20)
    assert "does not exist: create it (mkdir -p" in str(e.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreOpenError, match="is not a directory"):
        NvmeStore(tmp_path / "file", capacity_bytes=1 << 20)


def _make_readonly(d):
    """Make directory ``d`` unwritable for this process: chmod; where that does not bite (root), a read-only
    bind mount of it on itself. Returns the undo and which it was ("chmod" or "mount"), or skips when neither
    works."""
    os.chmod(d, 0o555)
    if not os.access(d, os.W_OK):
        return (lambda: os.chmod(d, 0o755)), "chmod"
    os.chmod(d, 0o755)
    r = subprocess.run(["mount", "--bind", "-o", "ro", str(d), str(d)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"running as root and cannot make a read-only bind mount ({r.stderr.strip()})")
    return (lambda: subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=60)), "mount"


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing-store"])
def test_directory_read_only(store_dir, existing):
    if existing:
        with NvmeStore(store_dir, capacity_bytes=1 << 20, config=SMALL) as s:
            s.write("a", torch.ones(10)).wait()
    before = sorted(os.listdir(store_dir))
    undo, how = _make_readonly(store_dir)
    try:
        with pytest.raises(StoreOpenError) as e:
            NvmeStore(store_dir, capacity_bytes=1 << 20)
        if how == "chmod":
            assert f"store directory {store_dir} is not writable" in str(e.value)
            assert "fix its permissions or choose another directory" in str(e.value)
        else:  # a read-only mount: no permissions to fix
            assert f"store directory {store_dir} is on a read-only file system" in str(e.value)
            assert "permission" not in str(e.value)
        assert sorted(os.listdir(store_dir)) == before
    finally:
        undo()
    if existing:
        with NvmeStore(store_dir) as s:
            assert torch.equal(s.read("a").wait(), torch.ones(10))


def test_data_file_on_read_only_file_system(tmp_path, monkeypatch):
    # Past the directory check (e.g. remounted read-only between check and open): the open itself says so.
    d = tmp_path / "s"
    d.mkdir()
    real_open = os.open

    def fake_open(path, flags, *a, **kw):
        if str(path).endswith(DATA) and flags & os.O_RDWR:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(StoreOpenError, match=r"is on a read-only file system: choose a writable directory"):
        NvmeStore(d, capacity_bytes=1 << 20)


def test_open_errors_name_the_fix(store_dir, tmp_path):
    with pytest.raises(ValueError, match=r"capacity_bytes is needed to create one"):
        NvmeStore(store_dir)
    with pytest.raises(StoreOpenError, match=r"no store in .*not found\): give the directories that hold one"):
        NvmeStore(store_dir, create=False)
    with pytest.raises(ValueError, match=r"expected > 0, got 0"):
        NvmeStore(store_dir, capacity_bytes=0)
    assert os.listdir(store_dir) == []
    NvmeStore(store_dir, capacity_bytes=1 << 20).close()
    with pytest.raises(ValueError, match=r"was created with capacity_bytes=1048576, got 2097152: omit capacity_bytes"):
        NvmeStore(store_dir, capacity_bytes=2 << 20)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / DATA).write_bytes(b"")  # a data file without a manifest: a create that never finished
    with pytest.raises(StoreOpenError, match=r"no process holds it: a store whose creation was interrupted, not a "
                                             r"complete store. Pass reset=True to start a new store there"):
        NvmeStore(tmp_path / "half", capacity_bytes=1 << 20)


def _assert_no_harmful_advice(msg: str, reset: bool) -> None:
    """A store being created elsewhere at this instant: deleting its data file deletes the other process's store,
    and reset=True is no advice to a caller who passed it."""
    assert "Remove" not in msg and "delete" not in msg.lower() and "rm " not in msg
    if reset:
        assert "reset=True" not in msg
    assert "use another directory" in msg.lower() and "stop that process" in msg


@pytest.mark.parametrize("reset", [False, True], ids=["open", "reset"])
def test_a_store_being_created_by_another_process_is_named_without_harmful_advice(tmp_path, reset):
    """Another process has made the data file and holds its lock, and has not written the manifest yet."""
    d = tmp_path / "racing"
    d.mkdir()
    fd = os.open(d / DATA, os.O_RDWR | os.O_CREAT, 0o600)  # flock: another open file description = another owner
    os.write(fd, b"theirs")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(StoreLockedError) as e:
            NvmeStore(d, capacity_bytes=1 << 20, reset=reset)
        _assert_no_harmful_advice(str(e.value), reset)
        assert str(d) in str(e.value)
        assert os.listdir(d) == [DATA] and (d / DATA).read_bytes() == b"theirs"
    finally:
        os.close(fd)


def test_a_data_file_appearing_during_a_reset_does_not_advise_reset(tmp_path, monkeypatch):
    """The other process re-creates its data file just after reset=True removed the old one (here: the removal
    is made to not happen, which is the same race seen from this process)."""
    d = tmp_path / "racing"
    d.mkdir()
    (d / DATA).write_bytes(b"")
    real = os.unlink
    monkeypatch.setattr(os, "unlink", lambda p, *a, **kw: None if os.path.basename(p) == DATA else real(p, *a, **kw))
    with pytest.raises(StoreOpenError) as e:
        NvmeStore(d, capacity_bytes=1 << 20, reset=True)
    assert f"{d / DATA} appeared while this store was being reset" in str(e.value)
    _assert_no_harmful_advice(str(e.value), reset=True)


def test_bad_arguments(store):
    with pytest.raises(ValueError, match="non-empty str"):
        store.write("", torch.ones(1))
    with pytest.raises(TypeError, match="expected a torch.Tensor, got list"):
        store.write("a", [1, 2])
    store.write("a", torch.ones(10)).wait()
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        store.read("a", out=[0] * 10)
    for kw, msg in [({"block_bytes": 1000}, "block_bytes: expected a positive multiple of 4096, got 1000"),
                    ({"workers": -1}, "workers: expected >= 0"), ({"wait_for_space_s": -1}, "expected >= 0"),
                    ({"checksum": "md5"}, "checksum: expected one of")]:
        with pytest.raises(ValueError, match=msg):
            StoreConfig(**kw)


def test_unknown_key(store):
    store.write("layer0.exp_avg", torch.ones(1)).wait()
    with pytest.raises(ChunkKeyError) as e:
        store.read("layer0.exp_avgsq")
    assert isinstance(e.value, KeyError)
    assert str(e.value) == "no chunk 'layer0.exp_avgsq' in the store (1 chunks); did you mean 'layer0.exp_avg'?"
    with pytest.raises(ChunkKeyError) as e:
        store.info("zzz")
    assert "no chunk 'zzz' in the store (1 chunks)" in str(e.value)
    assert "store.keys()" in str(e.value)  # with no near match, it still says what to do


def test_read_mismatch(store):
    store.write("a", torch.ones(2, 50)).wait()
    with pytest.raises(ChunkMismatchError) as e:
        store.read("a", out=torch.empty(100, dtype=torch.float64))
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert "stored as torch.float32 with 100 elements [2, 50], got out of torch.float64 with 100 elements" in msg
    assert "pass a tensor of the stored dtype and size, or out=None" in msg
    with pytest.raises(ChunkMismatchError, match="got out of torch.float32 with 99 elements"):
        store.read("a", out=torch.empty(99))
    with pytest.raises(ChunkMismatchError):
        store.read("a", out=torch.empty(50, dtype=torch.float64))  # same bytes, wrong dtype
    assert torch.equal(store.read("a", out=torch.empty(10, 10)).wait(), torch.ones(10, 10))  # shape may differ
    store.write("b", torch.ones(10)).wait()  # the failed reads left nothing behind
    assert store.flush() is None and not store._in_flight


def _fake_no_o_direct(monkeypatch, directory):
    """tmpfs accepts O_DIRECT since Linux 6.6: on such kernels, make opens with O_DIRECT under ``directory`` fail
    the way older tmpfs does (EINVAL), to test the fallback."""
    real_open = os.open

    def fake_open(path, flags, *a, **kw):
        if flags & os.O_DIRECT and str(path).startswith(str(directory)):
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", fake_open)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")
def test_tmpfs_falls_back_to_buffered_io_with_a_warning(monkeypatch, tmp_path):
    import tempfile

    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    d = Path(tempfile.mkdtemp(dir=shm or tmp_path))
    try:
        _fake_no_o_direct(monkeypatch, d)
        with pytest.warns(RuntimeWarning, match=r"does not support O_DIRECT .* buffered I/O"):
            s = NvmeStore(d, capacity_bytes=1 << 20, config=SMALL)
        with s:
            assert s.direct is False and "buffered" in repr(s)
            t = random_tensor((70_001,), torch.uint8, seed=10)
            s.write("t", t).wait()
            assert same(s.read("t").wait(), t)
        with pytest.raises(StoreOpenError, match=r"does not support O_DIRECT .* pass direct=None"):
            NvmeStore(d, config=StoreConfig(direct=True))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # direct=False: no probe, no warning
            with NvmeStore(d, config=StoreConfig(direct=False)) as s:
                assert s.direct is False and same(s.read("t").wait(), t)
    finally:
        import shutil
        shutil.rmtree(d, ignore_errors=True)


def test_store_on_real_tmpfs(tmp_path):
    with mounted(tmp_path / "mnt", "tmpfs", 4 << 20) as mnt:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s = NvmeStore(mnt, capacity_bytes=1 << 20, config=SMALL)
        with s:
            # Either tmpfs takes O_DIRECT (Linux >= 6.6) or the store says it falls back: never silently.
            if not s.direct:
                assert any("O_DIRECT" in str(w.message) for w in caught)
            t = random_tensor((50_000,), torch.int16, seed=11)
            s.write("t", t).wait()
            assert same(s.read("t").wait(), t)
