"""The NVMe tensor store: named chunks of tensor bytes in pre-allocated files on local disks.

Why one module: allocation, the I/O threads, checksums and the journal all change one index under the store's
one lock.

How a chunk is kept
-------------------
A chunk of ``n`` bytes is cut into *blocks* of ``block_bytes`` (the last one shorter). Each block is one I/O
request, one 4 KiB-aligned extent in one of the store's files, and one checksum. With several directories
(one per drive) consecutive blocks go to consecutive files, RAID-0 style, so a large chunk is read from every
drive at once and the drives' bandwidths add up.

Every request is an ``os.preadv`` / ``os.pwritev`` issued by a worker thread straight into or out of the
tensor's own memory (the syscalls release the GIL); the files are opened with ``O_DIRECT`` so the page cache
neither slows the transfer nor fakes its speed. O_DIRECT wants aligned addresses: tensors from a
:class:`~storage.hostpool.HostPool` are, and move with no copy; anything else goes through an aligned staging
copy. The sub-4 KiB tail of a chunk always goes through a small bounce buffer.

Crash safety
------------
A write never touches the committed copy: it allocates fresh extents, writes the blocks there, and only when
all of them are on disk appends one line to the journal (:mod:`storage.journal`) that makes them the committed
version; the old extents are freed after that. ``kill -9`` at any moment therefore leaves, for every key, the
last committed version (a torn journal line is dropped on reopen). ``durable=True`` adds ``fdatasync`` of the
data before each commit and ``fsync`` of the journal after, for power loss too.

Concurrency
-----------
Reads see the last committed version, and wait for any write to the same key still in flight (read your
writes). Two writes in flight to one key commit in the order they were issued. Extents being read are not
reused until the read finishes. One process (one store object) opens a store at a time: a ``flock`` on each
data file makes a second open fail with a clear error instead of corrupting the first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import crc32c
import torch
import xxhash

from storage import faults
from storage.alloc import ALIGN, ExtentAllocator, round_up
from storage.errors import (ChecksumError, ChunkKeyError, ChunkMismatchError, DiskFullError, StoreCorruptError,
                            StoreError, StoreFullError, StoreLockedError, StoreOpenError)
from storage.journal import Journal
from storage.memory import aligned_empty, byte_view, is_aligned, memview
from storage.stats import TransferStats
from storage.units import format_bytes
from storage.workers import BACKGROUND, READAHEAD, URGENT, PriorityWorkers

MANIFEST = "offload-store.json"
DATA = "chunks.dat"
FORMAT = 1
# Block checksums the store can use: name -> function of a buffer, releasing the GIL on large inputs (both do).
# A store keeps the one it was created with (its manifest names it).
CHECKSUMS = {"xxh3_64": xxhash.xxh3_64_intdigest, "crc32c": crc32c.crc32c}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """How the store does its I/O. Defaults come from measurements on our machines (benchmarks/storage_bench.py)."""

    block_bytes: int = 8 << 20
    """Bytes per I/O request and stripe unit. 4-16 MiB reach full bandwidth here; much smaller adds per-request
    overhead, much larger leaves too few requests in flight to keep a drive's queue full."""
    workers: int = 0
    """Threads issuing requests; 0 means 16 per directory. A quarter as many more compute the checksums (of writes,
    and verify reads) beside them, so an I/O thread always goes straight to its next request; both serve reads
    first (storage/workers.py). On one store file, alternating the two (9 reps, disk at ~3.4 GB/s write and
    ~2.4 read), 16 was 1-2% ahead of 8 in both directions, and 16-thread raw loops win most write sweeps of
    benchmarks/storage_bench.py: the store keeps as many requests in flight as the best raw loop."""
    direct: bool | None = None
    """O_DIRECT: ``None`` uses it where the file system supports it (tmpfs does not: buffered I/O, with a
    warning); ``True`` requires it; ``False`` never uses it."""
    verify: bool = True
    """Check each block's checksum on read."""
    checksum: str = "xxh3_64"
    """The block checksum of a new store (a reopened store keeps the one it was made with): ``"xxh3_64"``
    (XXH3, 64-bit, ~22 GB/s per core here) or ``"crc32c"`` (hardware CRC-32C, ~12-16 GB/s). Both release the
    GIL. The checksum is the store's only CPU work besides issuing requests; on this 2-core VM it competes with
    the hypervisor's copy of the data, so the cheaper one is the default (benchmarks/storage_bench.py)."""
    durable: bool = False
    """fdatasync data and fsync the journal at every commit: survive power loss, not only ``kill -9``."""
    wait_for_space_s: float = 0.0
    """When the files are full, how long ``write`` waits for in-flight writes and reads to free extents before
    raising :class:`StoreFullError`."""

    def __post_init__(self):
        if self.block_bytes < ALIGN or self.block_bytes % ALIGN:
            raise ValueError(f"StoreConfig.block_bytes: expected a positive multiple of {ALIGN}, got "
                             f"{self.block_bytes}; try 8 << 20")
        if self.workers < 0:
            raise ValueError(f"StoreConfig.workers: expected >= 0 (0 = 16 per directory), got {self.workers}")
        if self.checksum not in CHECKSUMS:
            raise ValueError(f"StoreConfig.checksum: expected one of {sorted(CHECKSUMS)}, got {self.checksum!r}")
        if self.wait_for_space_s < 0:
            raise ValueError(f"StoreConfig.wait_for_space_s: expected >= 0, got {self.wait_for_space_s}")


@dataclasses.dataclass(frozen=True)
class ChunkInfo:
    """What the store knows of a committed chunk."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    version: int
    """The store-wide sequence number of the write that produced this version."""


@dataclasses.dataclass
class _Block:
    file: int
    offset: int
    length: int  # data bytes; the extent on disk is round_up(length)
    checksum: int = 0


class _Chunk:
    """A committed version of a key: its blocks and how many reads are using them."""

    __slots__ = ("info", "blocks", "readers", "dead")

    def __init__(self, info: ChunkInfo, blocks: list[_Block]):
        self.info = info
        self.blocks = blocks
        self.readers = 0
        self.dead = False

    def record(self) -> dict:
        i = self.info
        return {"op": "put", "seq": i.version, "key": i.key, "dtype": str(i.dtype).removeprefix("torch."),
                "shape": list(i.shape), "nbytes": i.nbytes,
                "blocks": [[b.file, b.offset, b.length, b.checksum] for b in self.blocks]}


class StoreVersion:
    """A committed version of a key held on disk by :meth:`NvmeStore.hold`."""

    __slots__ = ("key", "chunk", "released")

    def __init__(self, key: str, chunk: "_Chunk"):
        self.key, self.chunk, self.released = key, chunk, False

    @property
    def info(self) -> ChunkInfo:
        return self.chunk.info

    def __repr__(self) -> str:
        return f"StoreVersion({self.key!r}, version {self.chunk.info.version})"


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise StoreCorruptError(f"unknown dtype {name!r} in the store index")
    return dt


class IOHandle:
    """One read or write in flight. ``wait()`` blocks until it is done and returns the tensor (reads) or the
    committed :class:`ChunkInfo` (writes), or raises what went wrong. ``future`` is a
    ``concurrent.futures.Future`` for composing with other code (``asyncio.wrap_future``)."""

    __slots__ = ("key", "kind", "nbytes", "future")

    def __init__(self, key: str, kind: str, nbytes: int):
        self.key, self.kind, self.nbytes = key, kind, nbytes
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    def wait(self, timeout: float | None = None):
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()

    def __repr__(self) -> str:
        state = "done" if self.future.done() else "in flight"
        return f"IOHandle({self.kind} {self.key!r}, {format_bytes(self.nbytes)}, {state})"


class _Op:
    """Book-keeping of one read or write: outstanding blocks, the memory they use, the first error."""

    __slots__ = ("handle", "seq", "key", "chunk", "blocks", "mem", "keep", "out", "remaining", "error", "lock",
                 "files", "priority")

    def __init__(self, handle: IOHandle, seq: int, key: str, blocks: list[_Block], mem: torch.Tensor):
        self.handle = handle
        self.seq = seq
        self.key = key
        self.chunk: _Chunk | None = None  # reads: the version being read
        self.blocks = blocks
        self.mem = mem  # contiguous uint8 source / destination, 4 KiB-aligned where possible
        self.keep = None  # tensors to keep alive until done
        self.out = None  # reads: the tensor to fill from mem (when mem is staging) and return
        self.remaining = len(blocks)
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.files: set[int] = set()
        self.priority = URGENT  # reads: the worker queue its blocks (and their checks) wait in


class NvmeStore:
    """Named tensor chunks on local disks. See the module docstring for how and why.

    Args:
        paths: one directory, or several (one per drive) to stripe over. They must exist and be writable.
        capacity_bytes: total bytes to pre-allocate (split evenly over the directories). Required for a new store;
            for an existing one, omit it (or pass the same value).
        config: :class:`StoreConfig`.
        reset: delete an existing store in these directories and create a new one.
        create: ``False`` to only open an existing store (a directory without one raises
            :class:`StoreOpenError`).
        readonly: open an existing store to read and verify it, changing nothing on disk: no index written or
            compacted, no torn journal tail cut, no file created (``offload store``). Writes and deletes raise.
            It takes a shared lock, so it fails while a writer has the store open, and a writer fails while it
            is open.

    Example::

        store = NvmeStore("/mnt/nvme/offload", capacity_bytes=64 << 30)
        h = store.write("layer3.exp_avg", t)     # returns at once
        h.wait()                                  # committed
        store.read("layer3.exp_avg", out=buf).wait()
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], capacity_bytes: int | None = None, *,
                 config: StoreConfig | None = None, reset: bool = False, create: bool = True,
                 readonly: bool = False):
        self.config = config or StoreConfig()
        if readonly and reset:
            raise ValueError("NvmeStore: reset=True deletes the store, readonly=True changes nothing: pass one")
        self.readonly = readonly
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [str(Path(p)) for p in paths]
        if not self.paths:
            raise ValueError("NvmeStore: expected at least one directory, got none")
        if len(set(os.path.realpath(p) for p in self.paths)) != len(self.paths):
            raise ValueError(f"NvmeStore: the same directory is listed twice in {self.paths}; give each drive once")
        self._lock = threading.Condition()
        self._fds: list[int] = []
        self._closed = True
        self._dead = False
        for p in self.paths:
            self._check_dir(p, readonly)
        try:
            self._open(capacity_bytes, reset, create and not readonly)
        except BaseException:
            self._close_fds()
            raise
        self._closed = False

    # -- opening ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_dir(path: str, readonly: bool = False) -> None:
        if not os.path.exists(path):
            raise StoreOpenError(f"store directory {path} does not exist: create it (mkdir -p {path}) or point the "
                                 f"store at an existing directory on a local disk")
        if not os.path.isdir(path):
            raise StoreOpenError(f"store path {path} is not a directory: give a directory on a local disk")
        if readonly:
            if not os.access(path, os.R_OK | os.X_OK):
                raise StoreOpenError(f"store directory {path} is not readable by this user: fix its permissions")
        elif not os.access(path, os.W_OK | os.X_OK):
            if _read_only_fs(path):  # access() fails there too, for every user: not a permissions problem
                raise StoreOpenError(f"store directory {path} is on a read-only file system: choose a directory on "
                                     f"a writable one (or remount it read-write)")
            raise StoreOpenError(f"store directory {path} is not writable by this user: fix its permissions or "
                                 f"choose another directory")

    def _open(self, capacity_bytes: int | None, reset: bool, create: bool) -> None:
        self._reset = reset  # what the errors of a store that appears meanwhile may advise
        manifests = [os.path.join(p, MANIFEST) for p in self.paths]
        existing = [m for m in manifests if os.path.exists(m)]
        if reset:
            for p in self.paths:  # never delete the files of a store that is open: take each lock once first
                if os.path.exists(os.path.join(p, DATA)):
                    os.close(self._open_data(os.path.join(p, DATA), create=False))
            for p in self.paths:
                for name in os.listdir(p):
                    if name in (MANIFEST, DATA) or name.startswith("index."):
                        os.unlink(os.path.join(p, name))
            existing = []
        if existing:
            self._reopen(manifests, capacity_bytes)
        else:
            if not create:
                raise StoreOpenError(f"no store in {', '.join(self.paths)} ({MANIFEST} not found): give the "
                                     f"directories that hold one")
            if capacity_bytes is None:
                raise ValueError(f"NvmeStore: no store in {self.paths} yet, so capacity_bytes is needed to create "
                                 f"one (e.g. capacity_bytes=64 << 30)")
            self._create(capacity_bytes)
        self._journal = Journal(self.paths[0], durable=self.config.durable, readonly=self.readonly)
        try:
            snapshot, records = self._journal.load()
            self._rebuild(snapshot, records)
        except BaseException:
            self._journal.close()
            raise
        self._hash = CHECKSUMS[self.checksum]
        nworkers = self.config.workers or 16 * len(self.paths)
        # Reads before writes, in both pools (storage/workers.py): a read is on a caller's critical path, a
        # write is write-back.
        self._pool = PriorityWorkers(nworkers, "nvme-store")
        # Checksums are computed here, beside the I/O threads, so that hashing a block never leaves an I/O
        # thread without a request in flight (the checksums release the GIL, so the two run in parallel).
        self._hash_pool = PriorityWorkers(max(1, nworkers // 4), "nvme-hash")
        self.stats = TransferStats(("nvme.write", "nvme.read", "nvme.checksum"))

    def _create(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"NvmeStore capacity_bytes: expected > 0, got {capacity_bytes}")
        n = len(self.paths)
        file_bytes = round_up(-(-capacity_bytes // n), max(ALIGN, 1))
        self.uuid = uuid.uuid4().hex
        self.checksum = self.config.checksum
        self.file_bytes = file_bytes
        created: list[str] = []
        try:
            self._create_files(file_bytes, created)
        except BaseException:
            self._close_fds()
            for path in created:  # leave no half-made store behind
                if os.path.exists(path):
                    os.unlink(path)
            raise
        self._setup_direct()

    def _create_files(self, file_bytes: int, created: list[str]) -> None:
        n = len(self.paths)
        for i, p in enumerate(self.paths):
            free = shutil.disk_usage(p).free
            if free < file_bytes:
                raise DiskFullError(errno.ENOSPC, (
                    f"not enough free space in {p} for the store: need {format_bytes(file_bytes)}, "
                    f"{format_bytes(free)} free. Free space, lower capacity_bytes, or add directories on other "
                    f"drives"))
            path = os.path.join(p, DATA)
            fd = self._open_data(path, create=True)
            created.append(path)
            self._fds.append(fd)
            try:
                os.posix_fallocate(fd, 0, file_bytes)
            except OSError as e:
                os.close(self._fds.pop())
                os.unlink(path)
                created.pop()
                if e.errno == errno.ENOSPC:
                    raise DiskFullError(errno.ENOSPC, (
                        f"not enough free space in {p} to pre-allocate {format_bytes(file_bytes)} for the store: "
                        f"free space, lower capacity_bytes, or add directories on other drives")) from None
                if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    warnings.warn(f"{p}: the file system cannot pre-allocate (posix_fallocate: {e.strerror}); "
                                  f"space is not reserved, so a full disk will show up on write", RuntimeWarning,
                                  stacklevel=4)
                    fd = self._open_data(path, create=True)
                    created.append(path)
                    self._fds.append(fd)
                    os.ftruncate(fd, file_bytes)
                else:
                    raise StoreOpenError(f"cannot pre-allocate {path}: {e.strerror}") from e
            if i == 0:  # the index's first journal before any manifest (Journal.create says why)
                try:
                    created.append(Journal.create(p))
                except FileExistsError:
                    raise StoreOpenError(f"{p} holds index files of a store but no {MANIFEST}: left by a store "
                                         f"whose manifest was deleted. Pass reset=True to start a new store there "
                                         f"(it deletes them), or use another directory") from None
            manifest = {"format": FORMAT, "uuid": self.uuid, "stripe_index": i, "stripe_count": n,
                        "file_bytes": file_bytes, "block_bytes": self.config.block_bytes,
                        "checksum": self.config.checksum}
            created.append(os.path.join(p, MANIFEST))
            self._write_manifest(created[-1], manifest)

    def _reopen(self, manifests: list[str], capacity_bytes: int | None) -> None:
        metas = []
        for i, m in enumerate(manifests):
            if not os.path.exists(m):
                raise StoreOpenError(f"{self.paths[i]} has no store manifest ({MANIFEST}) but other directories "
                                     f"of this store do: pass the same directories, in the same order, that "
                                     f"created the store")
            try:
                with open(m) as f:
                    metas.append(json.load(f))
            except (OSError, ValueError) as e:
                raise StoreCorruptError(f"cannot read store manifest {m}: {e}") from e
        first = metas[0]
        if first.get("format") != FORMAT:
            raise StoreOpenError(f"{manifests[0]} is store format {first.get('format')}; this version reads "
                                 f"format {FORMAT}")
        if first.get("checksum") not in CHECKSUMS:
            raise StoreOpenError(f"{manifests[0]} uses checksum {first.get('checksum')!r}, which this version does "
                                 f"not know (it knows {sorted(CHECKSUMS)}): open it with the version that made it")
        self.checksum = first["checksum"]
        for i, meta in enumerate(metas):
            if meta.get("uuid") != first["uuid"] or meta.get("stripe_index") != i or \
                    meta.get("stripe_count") != len(self.paths):
                raise StoreOpenError(
                    f"{self.paths[i]} holds stripe {meta.get('stripe_index')} of {meta.get('stripe_count')} of store "
                    f"{meta.get('uuid')}, but was given as stripe {i} of {len(self.paths)} of store {first['uuid']}: "
                    f"pass the same directories, in the same order, that created the store")
        self.uuid = first["uuid"]
        self.file_bytes = int(first["file_bytes"])
        if capacity_bytes is not None and round_up(-(-capacity_bytes // len(self.paths))) != self.file_bytes:
            raise ValueError(
                f"the store in {self.paths} was created with capacity_bytes={self.file_bytes * len(self.paths)}, "
                f"got {capacity_bytes}: omit capacity_bytes to reopen it, or pass reset=True to start a new store")
        for p in self.paths:
            path = os.path.join(p, DATA)
            if not os.path.exists(path):
                raise StoreCorruptError(f"{path} is missing: the store's data file was deleted. Recreate the "
                                        f"store with reset=True")
            size = os.path.getsize(path)
            if size != self.file_bytes:
                raise StoreCorruptError(f"{path} is {size} bytes, expected {self.file_bytes}: the file was "
                                        f"truncated or replaced. Restore it, or recreate the store with reset=True")
            self._fds.append(self._open_data(path, create=False))
        self._setup_direct()

    def _open_data(self, path: str, *, create: bool) -> int:
        flags = (os.O_RDONLY if self.readonly else os.O_RDWR) | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except PermissionError as e:
            raise StoreOpenError(f"cannot open {path} for writing ({e.strerror}): the directory or file is "
                                 f"read-only; fix permissions or choose another directory") from None
        except OSError as e:
            if e.errno == errno.EROFS:
                raise StoreOpenError(f"{os.path.dirname(path)} is on a read-only file system: choose a "
                                     f"writable directory") from None
            if e.errno == errno.EEXIST:
                raise self._not_complete(path) from None
            raise
        try:
            # Readers share: several verifications at once are fine, a writer beside any of them is not.
            fcntl.flock(fd, (fcntl.LOCK_SH if self.readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(f"the store in {os.path.dirname(path)} is open elsewhere (another process, or "
                                   f"another NvmeStore in this one): close that first (or stop that process), or "
                                   f"use another directory") from None
        return fd

    def _not_complete(self, path: str) -> StoreOpenError:
        """The error for a data file found where this store was about to create one. Never "delete it": if its
        lock is held, another process is creating a store there this very moment, and the file is its data."""
        d = os.path.dirname(path)
        if _locked(path):
            return StoreLockedError(f"another process is creating a store in {d} at this moment ({path} is locked "
                                    f"and {MANIFEST} not written yet): use another directory, or stop that process "
                                    f"first")
        if self._reset:
            return StoreOpenError(f"{path} appeared while this store was being reset in {d}: another process is "
                                  f"using the directory. Use another directory, or stop that process first")
        return StoreOpenError(f"{path} exists but {MANIFEST} does not and no process holds it: a store whose "
                              f"creation was interrupted, not a complete store. Pass reset=True to start a new "
                              f"store there, or use another directory")

    def _setup_direct(self) -> None:
        """Reopen each data file with O_DIRECT if the config asks and the file system allows it."""
        self.direct = False
        if self.config.direct is False or not hasattr(os, "O_DIRECT"):
            return
        direct_fds = []
        probe = aligned_empty(ALIGN)
        for p in self.paths:
            path = os.path.join(p, DATA)
            try:
                fd = os.open(path, (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_DIRECT)
                os.preadv(fd, [memview(probe)], 0)  # some file systems accept the flag but fail the I/O
                direct_fds.append(fd)
            except OSError as e:
                for fd in direct_fds:
                    os.close(fd)
                if self.config.direct:
                    raise StoreOpenError(f"{p} does not support O_DIRECT ({e.strerror}) and StoreConfig(direct=True)"
                                         f" requires it: use a directory on a disk file system (ext4, xfs), not "
                                         f"tmpfs, or pass direct=None") from None
                warnings.warn(f"{p} does not support O_DIRECT ({e.strerror}; tmpfs never does): the store uses "
                              f"buffered I/O there, which goes through the page cache", RuntimeWarning, stacklevel=5)
                return
        # Keep the locked descriptors open (the lock lives on them) and do I/O through the direct ones.
        self._lock_fds, self._fds = self._fds, direct_fds
        self.direct = True

    @staticmethod
    def _write_manifest(path: str, manifest: dict) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)

    def _rebuild(self, snapshot: dict, records: list[dict]) -> None:
        self._index: dict[str, _Chunk] = {}
        self._seq = int(snapshot.get("seq", 0))
        for rec in snapshot.get("chunks", []) + records:
            self._seq = max(self._seq, int(rec["seq"]))
            if rec["op"] == "put":
                info = ChunkInfo(rec["key"], _dtype(rec["dtype"]), tuple(rec["shape"]), int(rec["nbytes"]),
                                 int(rec["seq"]))
                self._index[rec["key"]] = _Chunk(info, [_Block(*b) for b in rec["blocks"]])
            elif rec["op"] == "del":
                self._index.pop(rec["key"], None)
            else:
                raise StoreCorruptError(f"unknown operation {rec['op']!r} in the store journal")
        self._alloc = [ExtentAllocator(self.file_bytes) for _ in self.paths]
        for chunk in self._index.values():
            if sum(b.length for b in chunk.blocks) != chunk.info.nbytes:
                raise StoreCorruptError(f"chunk {chunk.info.key!r}: its blocks hold "
                                        f"{sum(b.length for b in chunk.blocks)} bytes, its index entry says "
                                        f"{chunk.info.nbytes}")
            for b in chunk.blocks:
                try:
                    if not 0 <= b.file < len(self.paths):
                        raise ValueError(f"file {b.file} does not exist")
                    self._alloc[b.file].reserve(b.offset, b.length)
                except ValueError as e:
                    raise StoreCorruptError(f"chunk {chunk.info.key!r} points at a bad extent: {e}. The index is "
                                            f"damaged: restore the store or recreate it with reset=True") from None
        self._latest: dict[str, int] = {}  # key -> seq of its last committed put or delete
        self._pending: dict[str, _Op] = {}  # key -> its latest write in flight
        self._in_flight: set[_Op] = set()
        self._peak_used = 0

    # -- public -----------------------------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.file_bytes * len(self.paths)

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(a.free_bytes for a in self._alloc)

    def _used_locked(self) -> int:
        return self.capacity_bytes - sum(a.free_bytes for a in self._alloc)

    @property
    def used_bytes(self) -> int:
        """Bytes of the files' extents taken now: committed chunks, versions held or still read, writes in flight."""
        with self._lock:
            return self._used_locked()

    @property
    def peak_used_bytes(self) -> int:
        """The most :attr:`used_bytes` has been since the store opened (or :meth:`reset_peak`): what the NVMe tier
        needed, to check against a plan."""
        with self._lock:
            return max(self._peak_used, self._used_locked())

    def reset_peak(self) -> None:
        with self._lock:
            self._peak_used = self._used_locked()

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        return list(self._index)

    def info(self, key: str) -> ChunkInfo:
        chunk = self._index.get(key)
        if chunk is None:
            raise self._unknown(key)
        return chunk.info

    def write(self, key: str, tensor: torch.Tensor) -> IOHandle:
        """Start writing ``tensor`` as the new version of ``key``; returns at once.

        Do not change ``tensor`` until the handle is done (its bytes are read by the workers, in place, when it
        is 4 KiB-aligned and contiguous). The old version stays readable, and is what a crash leaves, until the
        new one is committed.
        """
        self._check_open(writing=True)
        if not isinstance(key, str) or not key:
            raise ValueError(f"store key: expected a non-empty str, got {key!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"write {key!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cpu":
            raise ValueError(f"write {key!r}: the store reads host memory and the tensor is on {tensor.device}; copy "
                             f"it to a HostPool buffer first")
        tensor = tensor.detach()
        nbytes = tensor.numel() * tensor.element_size()
        handle = IOHandle(key, "write", nbytes)
        if tensor.is_contiguous() and is_aligned(tensor):
            mem, keep = byte_view(tensor), tensor
        else:  # O_DIRECT needs aligned memory: one staging copy, after which the caller's tensor is free again
            mem = aligned_empty(nbytes)[:nbytes]
            if nbytes:
                mem.view(tensor.dtype).view(tensor.shape).copy_(tensor)  # detached: no autograd
            keep = None
        info = ChunkInfo(key, tensor.dtype, tuple(tensor.shape), nbytes, 0)
        blocks = self._allocate(key, nbytes)
        self.stats.issue("nvme.write", nbytes)
        with self._lock:
            self._seq += 1
            op = _Op(handle, self._seq, key, blocks, mem)
            op.keep = keep
            op.chunk = _Chunk(dataclasses.replace(info, version=op.seq), blocks)
            self._pending[key] = op
            self._in_flight.add(op)
        if not blocks:
            self._finish_write(op)
            return handle
        op.remaining = 2 * len(blocks)  # each block: its write and its checksum
        start = 0
        for b in blocks:
            self._pool.submit(self._write_block, op, b, start, priority=BACKGROUND)
            self._hash_pool.submit(self._hash_block, op, b, start, priority=BACKGROUND)
            start += b.length
        return handle

    def read(self, key: str, out: torch.Tensor | None = None, *, priority: int = URGENT) -> IOHandle:
        """Start reading the committed version of ``key`` into ``out`` (or a new tensor); returns at once.

        ``out`` must have the stored dtype and number of elements (its shape may differ). ``wait()`` on the
        handle returns ``out``. If a write to ``key`` is in flight, this first waits for it to commit.
        ``priority``: :data:`~storage.workers.URGENT` for a read someone waits for now,
        :data:`~storage.workers.READAHEAD` for one ahead of its use (served after the urgent ones queued).
        """
        if priority not in (URGENT, READAHEAD):
            raise ValueError(f"read {key!r}: expected priority URGENT or READAHEAD (storage.workers), got {priority!r}")
        self._check_open()
        pending = self._pending.get(key)
        if pending is not None:
            try:
                pending.handle.future.result()
            except BaseException:
                pass  # a failed write leaves the previous version, which is what we read
        with self._lock:
            chunk = self._index.get(key)
            if chunk is None:
                raise self._unknown(key)
            info = chunk.info
            if out is None:
                out = aligned_empty(info.nbytes)[:info.nbytes].view(info.dtype).view(info.shape)
            else:
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"read {key!r}: out must be a torch.Tensor, got {type(out).__name__}")
                if out.dtype != info.dtype or out.numel() * out.element_size() != info.nbytes:
                    raise ChunkMismatchError(
                        f"read {key!r}: stored as {info.dtype} with {info.nbytes // max(1, _itemsize(info.dtype))} "
                        f"elements {list(info.shape)}, got out of {out.dtype} with {out.numel()} elements "
                        f"{list(out.shape)}: pass a tensor of the stored dtype and size, or out=None")
                if out.device.type != "cpu":
                    raise ValueError(f"read {key!r}: out is on {out.device}; the store fills host memory: read into "
                                     f"a HostPool buffer and copy it to the device")
            chunk.readers += 1
            handle = IOHandle(key, "read", info.nbytes)
            if out.is_contiguous() and is_aligned(out):
                mem = byte_view(out)
                staged = False
            else:
                mem = aligned_empty(info.nbytes)[:info.nbytes]
                staged = True
            op = _Op(handle, 0, key, chunk.blocks, mem)
            op.chunk = chunk
            op.out = out
            op.priority = priority
            op.keep = staged
            self._in_flight.add(op)
        self.stats.issue("nvme.read", info.nbytes)
        if not chunk.blocks:
            self._finish_read(op)
            return handle
        start = 0
        for b in chunk.blocks:
            self._pool.submit(self._read_block, op, b, start, priority=priority)
            start += b.length
        return handle

    def delete(self, key: str) -> None:
        """Remove ``key`` (committed at once). Its extents are reused when reads in flight on it finish."""
        self._check_open(writing=True)
        self._settle_write(key)
        with self._lock:
            chunk = self._index.get(key)
            if chunk is None:
                raise self._unknown(key)
            self._seq += 1
            self._journal_append({"op": "del", "seq": self._seq, "key": key})
            del self._index[key]
            self._latest[key] = self._seq
            self._retire(chunk)
            self._maybe_compact()

    def _settle_write(self, key: str) -> None:
        """Until the write in flight to ``key``, if any, has committed or failed."""
        pending = self._pending.get(key)
        if pending is not None:
            concurrent.futures.wait([pending.handle.future])

    def hold(self, key: str) -> "StoreVersion":
        """Keep the committed version of ``key`` (waiting first for a write in flight) on disk after later writes
        or a delete supersede it, until :meth:`release`: a transaction's pre-image, which :meth:`restore` makes
        the committed version again. Its extents stay taken while held (the store needs room for both)."""
        self._check_open()
        self._settle_write(key)
        with self._lock:
            chunk = self._index.get(key)
            if chunk is None:
                raise self._unknown(key)
            chunk.readers += 1  # what keeps a read's extents alive keeps the held version's
            return StoreVersion(key, chunk)

    def restore(self, version: "StoreVersion") -> None:
        """Make a held version of its key the committed one again (journaled like a write; a crash after this
        leaves it), superseding what was written since. The hold stays until :meth:`release`."""
        self._check_open(writing=True)
        if version.released:
            raise ValueError(f"restore of {version.key!r}: that version was already released")
        self._settle_write(version.key)
        with self._lock:
            chunk = version.chunk
            current = self._index.get(version.key)
            if current is chunk:
                return
            self._seq += 1
            chunk.info = dataclasses.replace(chunk.info, version=self._seq)
            chunk.dead = False
            self._journal_append(chunk.record())
            self._index[version.key] = chunk
            self._latest[version.key] = self._seq
            if current is not None:
                self._retire(current)
            self._maybe_compact()

    def release(self, version: "StoreVersion") -> None:
        """Let go of a held version: its extents are freed unless it is the committed one (idempotent)."""
        if version.released:
            return
        version.released = True
        with self._lock:
            chunk = version.chunk
            chunk.readers -= 1
            if chunk.dead and chunk.readers == 0 and not self._dead:
                self._free_blocks(chunk.blocks)

    def flush(self) -> None:
        """Wait for every read and write in flight (their errors stay with their handles). Raises
        :class:`StoreError` if a store directory was deleted or replaced meanwhile (:meth:`_gone`)."""
        with self._lock:
            futures = [op.handle.future for op in self._in_flight]
        concurrent.futures.wait(futures)
        gone = self._gone()
        if gone is not None:
            raise gone

    def verify(self, keys: Iterable[str] | None = None) -> dict[str, str]:
        """Read every chunk (or ``keys``) and check its checksums; returns ``{key: error}`` for the bad ones."""
        bad = {}
        for key in list(self._index) if keys is None else keys:
            try:
                self.read(key).wait()
            except StoreError as e:
                bad[key] = str(e)
        return bad

    def close(self) -> None:
        """Finish what is in flight, compact the index, release the files. A second call is a no-op."""
        if self._closed:
            return
        with self._lock:
            futures = [op.handle.future for op in self._in_flight]
        concurrent.futures.wait(futures)
        self._pool.shutdown(wait=True)
        self._hash_pool.shutdown(wait=True)
        gone = self._gone()
        with self._lock:
            try:
                if not self.readonly and gone is None:
                    self._compact()
            except OSError as e:  # the journal holds every commit and stays valid: nothing is lost
                warnings.warn(f"compacting the store index in {self.paths[0]} at close failed "
                              f"({_os_reason(e)}); nothing is lost, the next open reads the journal",
                              RuntimeWarning, stacklevel=2)
            finally:
                self._closed = True
                self._journal.close()
                self._close_fds()
        if gone is not None:
            raise gone

    def _simulate_crash(self) -> None:
        """Drop the store as ``kill -9`` would: requests not yet started never run, nothing more is committed.
        For tests of crash recovery in one process."""
        with self._lock:
            self._dead = True
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._hash_pool.shutdown(wait=True, cancel_futures=True)
        self._journal.close()
        self._close_fds()

    def __del__(self):
        # Forgotten close(): release the files and their locks. The journal is already complete on disk, so
        # nothing is lost; only the compaction close() would do is skipped.
        if not getattr(self, "_closed", True):
            self._closed = True
            self._journal.close()
            self._close_fds()

    def __enter__(self) -> "NvmeStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def awrite(self, key: str, tensor: torch.Tensor) -> ChunkInfo:
        """``write`` for asyncio code: awaits the commit without blocking the event loop."""
        return await asyncio.wrap_future(self.write(key, tensor).future)

    async def aread(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """``read`` for asyncio code."""
        return await asyncio.wrap_future(self.read(key, out).future)

    def __repr__(self) -> str:
        return (f"NvmeStore({self.paths}, {len(self._index)} chunks, {format_bytes(self.capacity_bytes)}, "
                f"{'O_DIRECT' if self.direct else 'buffered'})")

    # -- internals --------------------------------------------------------------------------------------------------
    def _check_open(self, writing: bool = False) -> None:
        if self._closed:
            raise StoreError(f"the store in {self.paths} is closed; open it again with NvmeStore({self.paths!r})")
        if writing and self.readonly:
            raise StoreError(f"the store in {self.paths} is open read-only; open it without readonly=True to "
                             f"change it")

    def _unknown(self, key: str) -> ChunkKeyError:
        import difflib

        near = difflib.get_close_matches(key, list(self._index), n=3)
        hint = (f"; did you mean {', '.join(map(repr, near))}?" if near else
                "; write it first, or check the name against store.keys()")
        return ChunkKeyError(f"no chunk {key!r} in the store ({len(self._index)} chunks){hint}")

    def _allocate(self, key: str, nbytes: int) -> list[_Block]:
        """Extents for a new version of ``key``, one per block, striped over the files."""
        bsz = self.config.block_bytes
        lengths = [min(bsz, nbytes - s) for s in range(0, nbytes, bsz)]
        deadline = time.monotonic() + self.config.wait_for_space_s
        with self._lock:
            while True:
                blocks = self._try_allocate(lengths)
                if blocks is not None:
                    self._peak_used = max(self._peak_used, self._used_locked())
                    return blocks
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._in_flight:
                    free = sum(a.free_bytes for a in self._alloc)
                    raise StoreFullError(
                        f"the store in {self.paths} has no room for {key!r} ({format_bytes(nbytes)}): "
                        f"{format_bytes(free)} free of {format_bytes(self.capacity_bytes)}, largest free extent "
                        f"{format_bytes(max(a.largest_free() for a in self._alloc))}. A write needs room for its "
                        f"new copy beside the old one until it commits: raise capacity_bytes, delete chunks, or "
                        f"set StoreConfig(wait_for_space_s=...) to wait for writes in flight")
                self._lock.wait(remaining)  # woken by _retire / _finish_* freeing extents

    def _try_allocate(self, lengths: list[int]) -> list[_Block] | None:
        nfiles = len(self._alloc)
        first = max(range(nfiles), key=lambda f: self._alloc[f].free_bytes)
        blocks: list[_Block] = []
        for j, length in enumerate(lengths):
            for k in range(nfiles):
                f = (first + j + k) % nfiles
                off = self._alloc[f].alloc(length)
                if off is not None:
                    blocks.append(_Block(f, off, length))
                    break
            else:
                for b in blocks:
                    self._alloc[b.file].free(b.offset, b.length)
                return None
        return blocks

    def _free_blocks(self, blocks: list[_Block]) -> None:
        for b in blocks:
            self._alloc[b.file].free(b.offset, b.length)
        self._lock.notify_all()

    def _retire(self, chunk: _Chunk) -> None:
        """A committed version is superseded or deleted: free its extents once no read uses them."""
        chunk.dead = True
        if chunk.readers == 0:
            self._free_blocks(chunk.blocks)

    def _journal_append(self, record: dict) -> None:
        self._journal.append(record)

    def _maybe_compact(self) -> None:
        """Compact a long journal. Call it only once the index holds the record just appended: the snapshot
        replaces the journal that holds that record, so a snapshot taken before would lose the commit."""
        if self._journal.records_since_snapshot > 4 * len(self._index) + 1024:
            try:
                self._compact()
            except OSError as e:  # the commit is already in the journal, which stays valid: retry at the next
                if self._gone() is not None:
                    return  # not "nothing is lost": flush() and close() say what happened
                warnings.warn(f"compacting the store index in {self.paths[0]} failed ({e}); nothing is lost, the "
                              f"journal grows until a later compaction succeeds", RuntimeWarning, stacklevel=2)

    def _compact(self) -> None:
        self._journal.compact({"seq": self._seq, "chunks": [c.record() for c in self._index.values()]})

    def _gone(self) -> StoreError | None:
        """The error to raise if a store directory was deleted (or its data file replaced) while open: the open
        descriptors keep working on the removed files, so nothing fails, and everything written is lost when
        they close. Checked at :meth:`flush` and :meth:`close`, in the caller's thread."""
        for p, fd in zip(self.paths, self._fds):
            try:
                st = os.stat(os.path.join(p, DATA))
                same = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            except FileNotFoundError:
                same = False
            if not same:
                return StoreError(
                    f"the store directory {p} was deleted or replaced while this store was open ({DATA} is not the "
                    f"file it opened): what it holds, and the chunks written since, are lost when the store closes. "
                    f"Keep the directory from being removed (a temporary-file cleaner, another run with "
                    f"reset=True on it) and restart from a checkpoint")
        return None

    def _close_fds(self) -> None:
        for fd in self._fds + getattr(self, "_lock_fds", []):
            os.close(fd)
        self._fds, self._lock_fds = [], []

    # Worker side ---------------------------------------------------------------------------------------------------
    def _iov(self, mem: torch.Tensor, start: int, length: int) -> tuple[list[memoryview], torch.Tensor | None]:
        """iovecs for one block: the aligned body straight from ``mem``, the sub-4 KiB tail via a bounce buffer."""
        body = length // ALIGN * ALIGN
        views = [memview(mem, start, body)] if body else []
        tail = None
        if length > body:
            tail = aligned_empty(ALIGN)
            views.append(memview(tail))
        return views, tail

    def _write_block(self, op: _Op, b: _Block, start: int) -> None:
        try:
            faults.delay("store.write", op.key)
            if op.error is None and not self._dead:
                views, tail = self._iov(op.mem, start, b.length)
                if tail is not None:
                    body = b.length // ALIGN * ALIGN
                    tail.zero_()
                    tail[:b.length - body].copy_(op.mem[start + body:start + b.length])
                t0 = self.stats.begin("nvme.write")
                try:
                    _full_io(os.pwritev, self._fds[b.file], views, b.offset, round_up(b.length))
                finally:
                    self.stats.end("nvme.write", t0, b.length)
                with op.lock:
                    op.files.add(b.file)
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the handle
            self._fail(op, e, b)
        self._block_done(op, self._finish_write)

    def _hash_block(self, op: _Op, b: _Block, start: int) -> None:
        """The checksum of a block being written (the caller does not change the memory until the handle is
        done, so it may be read while the block is on its way to the disk)."""
        try:
            if op.error is None and not self._dead:
                t0 = self.stats.begin("nvme.checksum")
                b.checksum = self._hash(memview(op.mem, start, b.length))
                self.stats.end("nvme.checksum", t0, b.length)
        except BaseException as e:  # noqa: BLE001
            self._fail(op, e, b)
        self._block_done(op, self._finish_write)

    def _read_block(self, op: _Op, b: _Block, start: int) -> None:
        try:
            faults.delay("store.read", op.key)
            if op.error is None and not self._dead:
                views, tail = self._iov(op.mem, start, b.length)
                t0 = self.stats.begin("nvme.read")
                try:
                    _full_io(os.preadv, self._fds[b.file], views, b.offset, round_up(b.length))
                finally:
                    self.stats.end("nvme.read", t0, b.length)
                if tail is not None:
                    body = b.length // ALIGN * ALIGN
                    op.mem[start + body:start + b.length].copy_(tail[:b.length - body])
                if self.config.verify and op.error is None:
                    # Verify on the hash threads, so this thread goes straight on to its next request.
                    self._hash_pool.submit(self._verify_block, op, b, start, priority=op.priority)
                    return
        except BaseException as e:  # noqa: BLE001
            self._fail(op, e, b)
        self._block_done(op, self._finish_read)

    def _verify_block(self, op: _Op, b: _Block, start: int) -> None:
        try:
            t0 = self.stats.begin("nvme.checksum")
            got = self._hash(memview(op.mem, start, b.length))
            self.stats.end("nvme.checksum", t0, b.length)
            if got != b.checksum:
                raise ChecksumError(op.key, op.chunk.blocks.index(b), os.path.join(self.paths[b.file], DATA),
                                    b.offset, b.checksum, got)
        except BaseException as e:  # noqa: BLE001
            self._fail(op, e, b)
        self._block_done(op, self._finish_read)

    def _fail(self, op: _Op, e: BaseException, b: _Block) -> None:
        if isinstance(e, OSError) and not isinstance(e, StoreError):
            path = os.path.join(self.paths[b.file], DATA)
            if e.errno == errno.ENOSPC:
                e = DiskFullError(errno.ENOSPC, f"disk full writing chunk {op.key!r} to {path}: the previous version"
                                                f" is kept; free space on that drive")
            elif e.errno == errno.EROFS:
                e = StoreError(f"{self.paths[b.file]} is on a read-only file system now ({op.handle.kind} of chunk "
                               f"{op.key!r}): the kernel remounts a file system read-only after disk errors; check "
                               f"the drive (dmesg), then restart from a checkpoint on a writable directory")
            elif e.errno == _SHORT:
                e = StoreCorruptError(f"{path} ended before chunk {op.key!r}'s block at byte {b.offset}: the file "
                                      f"was truncated. Restore it, or recreate the store with reset=True")
            else:
                e = StoreError(f"I/O error on {path} at byte {b.offset} for chunk {op.key!r}: {e}")
        with op.lock:
            if op.error is None:
                op.error = e

    @staticmethod
    def _block_done(op: _Op, finish) -> None:
        with op.lock:
            op.remaining -= 1
            last = op.remaining == 0
        if last:
            finish(op)

    def _finish_write(self, op: _Op) -> None:
        result = None
        with self._lock:
            self._in_flight.discard(op)
            if self._pending.get(op.key) is op:
                del self._pending[op.key]
            error = op.error
            if error is None and self._dead:
                error = StoreError("the store was dropped before this write committed")
            if error is None:
                try:
                    if self.config.durable:
                        for f in op.files:
                            os.fdatasync(self._fds[f])
                    if op.seq > self._latest.get(op.key, -1):
                        self._journal_append(op.chunk.record())
                        old = self._index.get(op.key)
                        self._index[op.key] = op.chunk
                        self._latest[op.key] = op.seq
                        if old is not None:
                            self._retire(old)
                        self._maybe_compact()
                    else:  # a later write or delete of this key committed first: ours is already history
                        self._free_blocks(op.blocks)
                    result = op.chunk.info
                except OSError as e:
                    what = (f"cannot commit chunk {op.key!r} to the store journal in {self.paths[0]}: "
                            f"{_os_reason(e)}; the previous version is kept")
                    error = DiskFullError(e.errno, what) if e.errno == errno.ENOSPC else StoreError(what)
            if error is not None:
                if not self._dead:
                    self._free_blocks(op.blocks)
        op.mem = op.keep = None
        faults.delay("store.write_done", op.key)
        if error is not None:
            op.handle.future.set_exception(error)
        else:
            op.handle.future.set_result(result)

    def _finish_read(self, op: _Op) -> None:
        error = op.error
        if error is None and op.keep:  # staged: copy into the caller's tensor (any layout)
            try:
                if op.out.numel():
                    with torch.no_grad():
                        op.out.copy_(op.mem.view(op.out.dtype).view(op.out.shape))
            except BaseException as e:  # noqa: BLE001
                error = e
        with self._lock:
            self._in_flight.discard(op)
            chunk = op.chunk
            chunk.readers -= 1
            if chunk.dead and chunk.readers == 0 and not self._dead:
                self._free_blocks(chunk.blocks)
        out = op.out
        op.mem = op.out = op.keep = None
        faults.delay("store.read_done", op.key)
        if error is not None:
            op.handle.future.set_exception(error)
        else:
            op.handle.future.set_result(out)


_SHORT = -1  # errno we give a short read / write (the file ended early)


def _read_only_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _os_reason(e: OSError) -> str:
    """An OSError's cause in words that point at the fix."""
    if e.errno == errno.EROFS:
        return "the file system is read-only (remounted read-only after disk errors?)"
    if e.errno == errno.ENOENT:
        return "the store directory was deleted"
    return e.strerror or str(e)


def _locked(path: str) -> bool:
    """Whether some open store holds ``path``'s lock (asked without taking it for longer than the question)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we got


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _full_io(fn, fd: int, views: list[memoryview], offset: int, total: int) -> None:
    """``os.preadv`` / ``os.pwritev`` until ``total`` bytes are done (they may do fewer, e.g. near ENOSPC)."""
    done = fn(fd, views, offset)
    while done < total:
        if done <= 0:
            raise OSError(_SHORT, "short I/O: end of file")
        # Drop the bytes already done from the front of the iovecs and go on. With O_DIRECT a partial transfer
        # is always a whole number of blocks, so the rest stays aligned.
        rest, skip = [], done
        for v in views:
            if skip >= len(v):
                skip -= len(v)
                continue
            rest.append(v[skip:])
            skip = 0
        views = rest
        n = fn(fd, views, offset + done)
        if n <= 0:
            raise OSError(_SHORT, "short I/O: end of file")
        done += n
