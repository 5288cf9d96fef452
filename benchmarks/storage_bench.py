"""Storage benchmark: sequential direct write and read of 1 GiB through our NVMe store against raw I/O.

Run it (from the repository root, on an otherwise idle machine):

    .venv/bin/python benchmarks/storage_bench.py

Options: ``--dir DIR`` (where the files go; default a fresh ``benchmarks/results/tmp-*`` on the repository's
file system, removed afterwards), ``--size-gib 1``, ``--chunk-mib 64``, ``--reps 5``, ``--quick`` (a tiny
smoke run for CI), ``--json PATH`` (default ``benchmarks/results/storage_bench.json``).

What it measures, all on the same directory, in one run:

* raw baselines (the best of them is "best raw", separately for write and read):
  - a plain Python loop: N threads (1, 2, 4, 8, 16) issuing ``os.pwritev`` / ``os.preadv`` with ``O_DIRECT``, over
    chunks of ``--chunk-mib`` (and the same split into 1/8-size requests), from a page-aligned, pre-touched buffer,
    on the very extents the store uses: its reads read the store's committed chunks, its writes go to the free
    half of the store's file that the store's next write takes. Where a file lies on this virtual disk changes
    its speed: three pre-allocated 1 GiB files in one directory, written by the same loop in turn, gave medians
    of 3.25, 3.5 and 3.85 GB/s (7 reps), and a separate raw file put a run-long bias of that size, either way,
    into the comparison;
  - fio where installed (on a separate pre-allocated file, as dd) (engines psync / libaio / io_uring, whichever work; a few queue depths and job counts;
    ``direct=1``; JSON output parsed);
  - dd with ``oflag=direct`` / ``iflag=direct``;
* our store: ``NvmeStore`` writing ``size / chunk`` chunks from HostPool buffers, waiting for every handle, then
  reading them all back into other HostPool buffers (checksums verified on read, as in production);
* references: ``torch.save`` / ``torch.load`` of the same bytes, and ``aiofiles`` buffered write / read.

How: a sweep (3 repetitions) over every raw variant picks, per direction, the best Python loop, the best fio
and dd; then ``--reps`` repetitions interleave those, the store and the references (the Python loop and the store
back to back, alternating which goes first). Figures are medians over those repetitions; "best raw" is the
highest median among the raw finalists. Every file is written once before timing starts (the first write into
freshly pre-allocated extents is slower on ext4; it is reported separately as "cold"). The raw loop, the store
and the references move the same HostPool buffers: the memory behind a buffer matters (on this VM, 2 MiB pages
make O_DIRECT ~30% faster than scattered 4 KiB ones, which the HostPool asks for), so a comparison over different
buffers would measure the buffers. Each timed measurement runs with Python's garbage collector collected before
and paused during, as ``timeit`` does. The share of CPU that other processes used during the comparison is
reported: on a 2-core machine any of it shows in the figures.

The page cache is not what is measured: the raw loop, dd, fio and the store use ``O_DIRECT`` (no page cache at
all); the buffered references ``fsync`` after writing (inside the timed write) and then drop the file's pages
with ``posix_fadvise(POSIX_FADV_DONTNEED)`` before the timed read, and the benchmark checks with ``mincore``
that no page of the file is resident when the read starts. (What the host of a virtual disk caches below the
guest cannot be seen or dropped from here.)
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import gc
import json
import mmap
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from storage import HostPool, NvmeStore, StoreConfig  # noqa: E402
from storage.alloc import round_up  # noqa: E402
from storage.memory import memview  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
BAR = 0.9
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def human(nbytes: int) -> str:
    return f"{nbytes / GiB:g} GiB" if nbytes >= GiB else f"{nbytes / MiB:g} MiB"


def quiet(fn, *args):
    """Run one timed measurement as ``timeit`` does: garbage collected before, collector paused during. With torch
    loaded a full collection holds the GIL ~75 ms here, stalling every I/O thread; left on, it lands at random in
    one measurement or another (it is the same for every contender)."""
    gc.collect()
    gc.disable()
    try:
        return fn(*args)
    finally:
        gc.enable()


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)  # user nice system irq softirq steal
    return busy, sum(v[:8])


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


# -- machine ------------------------------------------------------------------------------------------------------
def mount_of(path: str) -> tuple[str, str, str]:
    """(mount point, fs type, device) of the file system holding ``path``."""
    real = os.path.realpath(path)
    best = ("/", "?", "?")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    return best


def machine_info(path: str) -> dict:
    mnt, fstype, dev = mount_of(path)
    info = {"cpu_count": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0)),
            "cpu_model": platform.processor() or "?", "kernel": platform.release(), "python": platform.python_version(),
            "torch": torch.__version__, "fs_type": fstype, "mount": mnt, "device": dev,
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
            "loadavg_at_start": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            if m:
                info["cpu_model"] = m.group(1).strip()
    except OSError:
        pass
    blk = os.path.basename(dev)
    for name in (blk, re.sub(r"p?\d+$", "", blk)):
        q = f"/sys/block/{name}/queue"
        if os.path.isdir(q):
            for k in ("scheduler", "rotational", "max_sectors_kb", "nr_requests"):
                try:
                    info[f"queue_{k}"] = Path(q, k).read_text().strip()
                except OSError:
                    pass
            break
    fio = shutil.which("fio")
    if fio:
        try:
            info["fio"] = subprocess.run([fio, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def resident_fraction(path: str) -> float:
    """Fraction of the file's pages in the page cache now (mincore over a read-only mapping)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return float("nan")
        try:
            npages = (size + page - 1) // page
            vec = ctypes.create_string_buffer(npages)
            if _libc.mincore(addr, size, vec) != 0:
                return float("nan")
            return sum(b & 1 for b in vec.raw) / npages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def huge_page_share(tensors: list[torch.Tensor]) -> float:
    """Fraction of these buffers' bytes backed by transparent huge pages (AnonHugePages of the overlapping
    mappings in /proc/self/smaps; madvise splits mappings at the advised range, so they match the buffers)."""
    ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]
    total = sum(b - a for a, b in ranges)
    huge, hit = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and not line.startswith(("AnonHugePages", "Size")) and ":" not in head:
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    hit = any(a < hi and lo < b for a, b in ranges)
                elif hit and line.startswith("AnonHugePages:"):
                    huge += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return float("nan")
    return min(1.0, huge / total) if total else 0.0


def drop_file_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def pattern_fill(buf: torch.Tensor, seed: int) -> None:
    """Fill a uint8 buffer with bytes that are neither zero nor trivially compressible (cheap: one multiply)."""
    n8 = buf.numel() // 8
    words = buf[:n8 * 8].view(torch.int64)
    torch.arange(seed << 40, (seed << 40) + n8, dtype=torch.int64, out=words)
    words.mul_(-7046029254386353131)  # 0x9E3779B97F4A7C15, the golden-ratio multiplier
    words.bitwise_xor_(words >> 29)
    buf[n8 * 8:].fill_(seed & 0xFF)


# -- raw baselines -----------------------------------------------------------------------------------------------
def py_loop(path: str, bufs: list[torch.Tensor], req: int, threads: int, write: bool, base: int = 0,
            runs: list[tuple[int, int]] | None = None) -> float:
    """N threads, each taking the next request off a shared counter: one ``pwritev`` / ``preadv`` of ``req`` bytes
    (at most) per request, between the file (chunk after chunk, from byte ``base``) and the chunk buffers ``bufs``.
    ``runs``: (offset, length) extents of the file to use instead, in order (a request never spans two)."""
    total = sum(b.numel() for b in bufs)
    runs = runs or [(base, total)]
    if sum(n for _, n in runs) < total:
        raise ValueError(f"py_loop: the runs hold {sum(n for _, n in runs)} bytes, the buffers {total}")
    reqs, off, r, r_off = [], 0, 0, 0
    for buf in bufs:
        o = 0
        while o < buf.numel():
            n = min(req, buf.numel() - o, runs[r][1] - r_off)
            reqs.append((runs[r][0] + r_off, buf, o, n))
            o, r_off = o + n, r_off + n
            if r_off == runs[r][1]:
                r, r_off = r + 1, 0
        off += buf.numel()
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        lock = threading.Lock()
        nxt = [0]
        errors: list[BaseException] = []
        fn = os.pwritev if write else os.preadv

        def work():
            try:
                while True:
                    with lock:
                        i = nxt[0]
                        nxt[0] += 1
                    if i >= len(reqs):
                        return
                    foff, buf, o, n = reqs[i]
                    done = fn(fd, [memview(buf, o, n)], foff)
                    if done != n:
                        raise OSError(f"short {'write' if write else 'read'}: {done} of {n} at {foff}")
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        ts = [threading.Thread(target=work) for _ in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        dt = time.perf_counter() - t0
        if errors:
            raise errors[0]
        return gbps(off, dt)
    finally:
        os.close(fd)


def run_fio(path: str, size: int, write: bool, engine: str, bs: int, iodepth: int, numjobs: int) -> float:
    per_job = size // numjobs
    rw = "write" if write else "read"
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", "--direct=1",
           f"--ioengine={engine}", f"--iodepth={iodepth}", f"--numjobs={numjobs}", f"--size={per_job}",
           f"--offset_increment={per_job}", "--fallocate=none", "--group_reporting", "--output-format=json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    out = p.stdout
    if p.returncode != 0 or "{" not in out:
        raise RuntimeError(f"fio {engine} failed (rc {p.returncode}): {(p.stderr or out).strip()[-300:]}")
    d = json.loads(out[out.index("{"):])
    job = d["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio {engine}: error {job['error']}")
    st = job[rw]
    if st["io_bytes"] < size * 0.99 or st["runtime"] <= 0:
        raise RuntimeError(f"fio {engine}: moved {st['io_bytes']} of {size} bytes")
    return st["bw_bytes"] / 1e9


def run_dd(path: str, size: int, write: bool, bs: int) -> float:
    count = size // bs
    if write:  # from /dev/zero: the only data dd can make without a CPU cost of its own
        cmd = ["dd", "if=/dev/zero", f"of={path}", f"bs={bs}", f"count={count}", "oflag=direct", "conv=notrunc"]
    else:
        cmd = ["dd", f"if={path}", "of=/dev/null", f"bs={bs}", f"count={count}", "iflag=direct"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"dd failed: {p.stderr.strip()[-300:]}")
    m = re.search(r"(\d+) bytes.*copied, ([\d.]+) s", p.stderr)
    if not m:
        raise RuntimeError(f"cannot parse dd output: {p.stderr.strip()[-300:]}")
    return gbps(int(m.group(1)), float(m.group(2)))


# -- our store -----------------------------------------------------------------------------------------------------
def store_runs(store: NvmeStore, nbytes: int, write: bool) -> tuple[str, list[tuple[int, int]]]:
    """The first ``nbytes`` of a one-directory store's data file that a raw loop may move to measure the disk where
    the store's data is: committed extents for a read (reading them changes nothing), free runs, lowest first
    (where first fit puts the store's next write), for a write (nothing committed is there). Call it with no
    store write in flight."""
    if len(store.paths) != 1:
        raise ValueError("store_runs: a one-directory store only")
    if write:
        free = list(zip(store._alloc[0]._offsets, store._alloc[0]._lengths))
    else:
        free = sorted((b.offset, round_up(b.length)) for c in store._index.values() for b in c.blocks)
    runs, left = [], nbytes
    for off, n in free:
        if left <= 0:
            break
        if runs and runs[-1][0] + runs[-1][1] == off:  # merge neighbours: fewer, larger requests
            runs[-1] = (runs[-1][0], runs[-1][1] + min(n, left))
        else:
            runs.append((off, min(n, left)))
        left -= min(n, left)
    if left > 0:
        raise ValueError(f"store_runs: the store has {nbytes - left} {'free' if write else 'committed'} bytes, "
                         f"{nbytes} asked")
    return os.path.join(store.paths[0], "chunks.dat"), runs


class StoreBench:
    def __init__(self, directory: str, size: int, chunk: int, config=None):
        self.size, self.chunk = size, chunk
        self.lengths = [min(chunk, size - s) for s in range(0, size, chunk)]
        os.makedirs(directory, exist_ok=True)
        # A write goes to free extents beside the committed copy, so the store needs room for two versions.
        self.store = NvmeStore(directory, capacity_bytes=2 * size + 2 * chunk, config=config)
        self.pool = HostPool(budget_bytes=2 * (size + len(self.lengths) * 4096) + 2 * chunk, slab_bytes=chunk)
        self.src = [self.pool.acquire(n) for n in self.lengths]  # the pool zero-fills (pre-touches) its slabs
        self.dst = [self.pool.acquire(n) for n in self.lengths]
        for i, b in enumerate(self.src):
            pattern_fill(b.tensor, 1000 + i)
        self.stats: dict[str, list] = {"write": [], "read": []}

    def write(self) -> float:
        self.store.stats.reset()
        t0 = time.perf_counter()
        hs = [self.store.write(f"chunk{i:04d}", b.tensor) for i, b in enumerate(self.src)]
        for h in hs:
            h.wait()
        dt = time.perf_counter() - t0
        self.stats["write"].append(self.store.stats.snapshot())
        return gbps(self.size, dt)

    def read(self) -> float:
        self.store.stats.reset()
        t0 = time.perf_counter()
        hs = [self.store.read(f"chunk{i:04d}", out=b.tensor) for i, b in enumerate(self.dst)]
        for h in hs:
            h.wait()
        dt = time.perf_counter() - t0
        self.stats["read"].append(self.store.stats.snapshot())
        return gbps(self.size, dt)

    def verify(self) -> bool:
        return all(torch.equal(a.tensor, b.tensor) for a, b in zip(self.src, self.dst))

    def close(self) -> None:
        self.store.close()


# -- references (buffered) -----------------------------------------------------------------------------------------
def torch_save(path: str, ts: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(ts, f)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    return gbps(sum(t.numel() for t in ts), dt)


def torch_load(path: str, nbytes: int) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    t = torch.load(path, weights_only=True)
    dt = time.perf_counter() - t0
    return gbps(nbytes, dt), t


async def _aio_write(path: str, bufs: list[torch.Tensor]) -> None:
    import aiofiles

    async with aiofiles.open(path, "wb") as f:
        for buf in bufs:
            await f.write(memview(buf))
        await f.flush()
        await asyncio.get_running_loop().run_in_executor(None, os.fsync, f.fileno())


async def _aio_read(path: str, bufs: list[torch.Tensor]) -> None:
    import aiofiles

    async with aiofiles.open(path, "rb") as f:
        for buf in bufs:
            view, off = memview(buf), 0
            while off < len(view):
                n = await f.readinto(view[off:])
                if not n:
                    raise OSError(f"aiofiles: {path} ended early")
                off += n


def aio_write(path: str, bufs: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    asyncio.run(_aio_write(path, bufs))
    return gbps(sum(b.numel() for b in bufs), time.perf_counter() - t0)


def aio_read(path: str, bufs: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    asyncio.run(_aio_read(path, bufs))
    return gbps(sum(b.numel() for b in bufs), time.perf_counter() - t0)


def checksum_speeds(bufs: list[torch.Tensor]) -> dict[str, float]:
    """Single-thread GB/s of the store's block checksums and zlib.crc32 over the same bytes."""
    import zlib

    from storage.nvme import CHECKSUMS

    views = [memview(b) for b in bufs]
    nbytes = sum(len(v) for v in views)
    out = {}
    for name, fn in (*CHECKSUMS.items(), ("crc32", zlib.crc32)):
        t0 = time.perf_counter()
        for v in views:
            fn(v)
        out[name] = round(gbps(nbytes, time.perf_counter() - t0), 2)
    return out


# -- driver ----------------------------------------------------------------------------------------------------------
def raw_variants(args, chunk: int, have_fio: bool) -> list[dict]:
    reqs = [chunk] + ([chunk // 8] if chunk // 8 >= 1 * MiB and chunk // 8 % 4096 == 0 else [])
    threads = [1, 4] if args.quick else [1, 2, 4, 8, 16]  # 16: as many requests in flight as the store has
    vs = [{"name": f"py-loop t={t} req={r // MiB}MiB", "kind": "py", "threads": t, "req": r}
          for r in reqs for t in threads]
    if have_fio:
        small = reqs[-1]
        fio = [("psync", chunk, 1, 1), ("psync", small, 1, 4), ("libaio", small, 4, 1), ("libaio", small, 16, 1),
               ("io_uring", small, 4, 1), ("io_uring", small, 16, 1)]
        if args.quick:
            fio = fio[:1]
        vs += [{"name": f"fio {e} bs={bs // MiB}MiB qd={qd} jobs={nj}", "kind": "fio", "engine": e, "bs": bs,
                "iodepth": qd, "numjobs": nj} for e, bs, qd, nj in fio]
    vs.append({"name": f"dd bs={chunk // MiB}MiB direct", "kind": "dd", "bs": chunk})
    return vs


def run_raw(v: dict, path: str, sb: "StoreBench", write: bool) -> float:
    size = sb.size
    if v["kind"] == "py":  # on the store's own extents (see store_runs)
        target, runs = store_runs(sb.store, size, write)
        return py_loop(target, [b.tensor for b in (sb.src if write else sb.dst)], v["req"], v["threads"], write,
                       runs=runs)
    if v["kind"] == "fio":
        return run_fio(path, size, write, v["engine"], v["bs"], v["iodepth"], v["numjobs"])
    return run_dd(path, size, write, v["bs"])


def summary(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3),
            "reps": [round(x, 3) for x in xs]} if xs else {"median": 0.0, "min": 0.0, "max": 0.0, "reps": []}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="directory for the test files (a fresh subdirectory is made and removed); "
                                  "default: benchmarks/results/ on the repository's file system")
    ap.add_argument("--size-gib", type=float, default=1.0, help="bytes moved per measurement, GiB (default 1)")
    ap.add_argument("--chunk-mib", type=int, default=64, help="store chunk and raw request size, MiB (default 64)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions of the final comparison (default 5)")
    ap.add_argument("--sweep-reps", type=int, default=None, help="repetitions of the raw variant sweep (default 3)")
    ap.add_argument("--quick", action="store_true", help="tiny run for a CI smoke test (figures not meaningful)")
    ap.add_argument("--no-refs", action="store_true", help="skip the torch.save and aiofiles references")
    ap.add_argument("--keep", action="store_true", help="keep the test files")
    ap.add_argument("--store-workers", type=int, default=0, help="StoreConfig.workers (default: the store's default)")
    ap.add_argument("--store-block-mib", type=int, default=0, help="StoreConfig.block_bytes in MiB (default: the "
                                                                   "store's default)")
    ap.add_argument("--store-checksum", default="", help="StoreConfig.checksum (default: the store's default)")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "storage_bench.json"),
                    help="where to write the results (default benchmarks/results/storage_bench.json)")
    args = ap.parse_args(argv)

    if args.quick:
        args.size_gib, args.chunk_mib = 1 / 64, 4
        args.reps = min(args.reps, 2) if args.reps != 5 else 1
        sweep_reps = 1
    else:
        sweep_reps = args.sweep_reps or 3
    if args.reps < 1 or args.chunk_mib < 1 or args.size_gib <= 0:
        ap.error("--reps, --chunk-mib and --size-gib must be positive")
    chunk = args.chunk_mib * MiB
    size = max(chunk, int(args.size_gib * GiB) // chunk * chunk)

    base = Path(args.dir) if args.dir else REPO / "benchmarks" / "results"
    base.mkdir(parents=True, exist_ok=True)
    _, fstype, _ = mount_of(str(base))
    if fstype in ("tmpfs", "ramfs"):
        ap.error(f"--dir {base} is on {fstype}: O_DIRECT is impossible there and the page cache would be measured; "
                 f"give a directory on a disk")
    need = 3 * size + 4 * chunk + (0 if args.no_refs else size)
    if shutil.disk_usage(base).free < need * 1.1:
        ap.error(f"{base} has {shutil.disk_usage(base).free / GiB:.1f} GiB free, the benchmark needs "
                 f"{need / GiB:.1f} GiB: free space, lower --size-gib, or pass --dir elsewhere")
    work = tempfile.mkdtemp(prefix="tmp-", dir=base)
    info = machine_info(work)
    have_fio = shutil.which("fio") is not None
    log(f"storage benchmark: {human(size)} in {chunk // MiB} MiB chunks, {args.reps} reps, in {work} "
        f"({info['fs_type']} on {info['device']}), {info['cpu_count']} CPUs, load {info['loadavg_at_start'][0]:.2f}, "
        f"fio {'yes' if have_fio else 'not installed'}")
    if info["loadavg_at_start"][0] > 0.5 * (info["cpu_count"] or 1):
        log("warning: the machine is busy (load average above half the CPUs); figures will be noisy")

    results: dict = {"config": {"size_bytes": size, "chunk_bytes": chunk, "reps": args.reps,
                                "sweep_reps": sweep_reps, "quick": args.quick, "dir": work, "bar": BAR},
                     "machine": info,
                     "page_cache": "raw loop, fio, dd and the store use O_DIRECT (no page cache); torch.save and "
                                   "aiofiles fsync inside the timed write, then posix_fadvise(DONTNEED) drops the "
                                   "file's pages before the timed read (mincore checks none are resident)"}
    store = None
    try:
        # One set of buffers for everything measured in this process (raw loop, store, references): HostPool
        # chunks, page-aligned and pre-touched. On a VM, which host memory backs a buffer changes O_DIRECT speed
        # by up to ~25% here, so comparing runs that used different buffers would measure the buffers.
        cfg = {"workers": args.store_workers} if args.store_workers else {}
        if args.store_checksum:
            cfg["checksum"] = args.store_checksum
        if args.store_block_mib:
            cfg["block_bytes"] = args.store_block_mib * MiB
        store = StoreBench(os.path.join(work, "store"), size, chunk, StoreConfig(**cfg))
        raw_path = os.path.join(work, "raw.dat")
        fd = os.open(raw_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        cold = {"raw_write": py_loop(raw_path, [b.tensor for b in store.src], chunk, 4, True)}
        log(f"cold write (fresh pre-allocated extents, untimed warm-up): raw py-loop t=4 {cold['raw_write']:.2f} GB/s")
        cold["store_write"] = store.write()
        store.write()  # the second version goes to the other half of the store's files: warm them too
        store.read()
        if not store.verify():
            raise RuntimeError("the store read back different bytes than it wrote")
        store.stats = {"write": [], "read": []}
        log(f"cold write: store {cold['store_write']:.2f} GB/s; store data verified (read back == written)")
        results["cold_write_gbps"] = {k: round(v, 3) for k, v in cold.items()}

        results["hostpool_huge_page_share"] = round(huge_page_share([b.tensor for b in store.src + store.dst]), 3)
        results["checksum_gbps_one_thread"] = quiet(checksum_speeds, [b.tensor for b in store.src[:4]])
        log(f"checksum speed, one thread: {results['checksum_gbps_one_thread']} GB/s")

        # 1. Sweep every raw variant (fewer reps) to find the best ones.
        variants = raw_variants(args, chunk, have_fio)
        sweep: dict[str, dict[str, list[float]]] = {v["name"]: {"write": [], "read": []} for v in variants}
        broken: dict[str, str] = {}
        for rep in range(sweep_reps):
            for v in variants:
                if v["name"] in broken:
                    continue
                for d in ("write", "read"):
                    try:
                        x = quiet(run_raw, v, raw_path, store, d == "write")
                    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                        broken[v["name"]] = str(e)
                        log(f"sweep: {v['name']}: unavailable ({str(e)[:120]})")
                        break
                    sweep[v["name"]][d].append(x)
                    log(f"sweep {rep + 1}/{sweep_reps}  {v['name']:<36} {d:<5} {x:6.2f} GB/s")
        ranked = {}
        for d in ("write", "read"):
            ok = [(statistics.median(s[d]), n) for n, s in sweep.items() if n not in broken and s[d]]
            ranked[d] = [n for _, n in sorted(ok, reverse=True)]
        results["sweep"] = {n: {d: summary(s[d]) for d in ("write", "read")} for n, s in sweep.items()
                            if n not in broken}
        results["unavailable"] = broken
        # Finalists: the best variant of each family (Python loop, fio, dd) for each direction. On a noisy machine
        # a sweep winner is partly luck, so each family's best gets its own medians of --reps below.
        byname = {v["name"]: v for v in variants}
        finalists = {}
        for d in ("write", "read"):
            finalists[d] = []
            for n in ranked[d]:
                if byname[n]["kind"] not in {byname[f]["kind"] for f in finalists[d]}:
                    finalists[d].append(n)
        log(f"finalists: write {finalists['write']}, read {finalists['read']}")

        # 2. The comparison: interleaved repetitions, alternating which goes first.
        final: dict[str, dict[str, list[float]]] = {}

        def rec(name: str, d: str, x: float) -> None:
            final.setdefault(name, {"write": [], "read": []})[d].append(x)
            log(f"rep {rep + 1}/{args.reps}  {name:<36} {d:<5} {x:6.2f} GB/s")

        ref_path = os.path.join(work, "ref.dat")
        residency: list[float] = []
        busy0, total0, own0 = *cpu_jiffies(), own_cpu_s()
        for rep in range(args.reps):
            for d in ("write", "read"):
                # fio and dd first, then the Python loop and the store side by side, alternating which goes first:
                # the pair that decides the bar always runs back to back, under the same conditions.
                ext = [("raw", n) for n in finalists[d] if byname[n]["kind"] != "py"]
                pair = [("raw", n) for n in finalists[d] if byname[n]["kind"] == "py"] + [("store", "store")]
                order = ext + (pair[::-1] if rep % 2 else pair)
                for kind, name in order:
                    if kind == "raw":
                        rec(name, d, quiet(run_raw, byname[name], raw_path, store, d == "write"))
                    else:
                        rec("store (NvmeStore)", d, quiet(store.write if d == "write" else store.read))
            if args.no_refs:
                continue
            src = [b.tensor for b in store.src]
            rec("torch.save / torch.load", "write", quiet(torch_save, ref_path, src))
            drop_file_cache(ref_path)
            residency.append(resident_fraction(ref_path))
            x, t = quiet(torch_load, ref_path, size)
            if rep == 0 and not all(torch.equal(a, b) for a, b in zip(t, src)):
                raise RuntimeError("torch.load returned different bytes")
            del t
            rec("torch.save / torch.load", "read", x)
            os.unlink(ref_path)
            rec("aiofiles (buffered)", "write", quiet(aio_write, ref_path, src))
            drop_file_cache(ref_path)
            residency.append(resident_fraction(ref_path))
            rec("aiofiles (buffered)", "read", quiet(aio_read, ref_path, [b.tensor for b in store.dst]))
            os.unlink(ref_path)
        busy1, total1 = cpu_jiffies()
        tick = os.sysconf("SC_CLK_TCK")
        others = max(0.0, (busy1 - busy0) / tick - (own_cpu_s() - own0)) / max(1e-9, (total1 - total0) / tick)
        results["other_processes_cpu_share"] = round(others, 3)
        if others > 0.1:
            log(f"warning: other processes used {100 * others:.0f}% of the CPUs during the comparison: figures are "
                f"noisy; rerun on an idle machine")
        for b in store.dst:  # the references read into these too: clear them and check the store once more
            b.tensor.zero_()
        store.read()
        store.stats["read"].pop()
        if not store.verify():
            raise RuntimeError("the store read back different bytes than it wrote")

        # 3. Figures.
        med = {n: {d: summary(s[d]) for d in ("write", "read")} for n, s in final.items()}
        best = {}
        for d in ("write", "read"):
            name = max(finalists[d], key=lambda n: med[n][d]["median"])
            best[d] = {"variant": name, "gbps": med[name][d]["median"]}
        st = med["store (NvmeStore)"]
        ratios = {d: round(st[d]["median"] / best[d]["gbps"], 3) if best[d]["gbps"] else 0.0
                  for d in ("write", "read")}
        ck = {"bytes": 0, "busy_s": 0.0, "request_s": 0.0}
        qd = {}
        for d in ("write", "read"):
            snaps = store.stats[d]
            for s in snaps:
                c = s["nvme.checksum"]
                ck["bytes"] += c["bytes"]
                ck["busy_s"] += c["busy_s"]
                ck["request_s"] += c["request_s"]
            qd[d] = {"mean_queue_depth": round(statistics.median(s[f"nvme.{d}"]["mean_queue_depth"] for s in snaps), 2),
                     "max_in_flight": max(s[f"nvme.{d}"]["max_in_flight"] for s in snaps),
                     "requests_per_rep": snaps[0][f"nvme.{d}"]["requests"],
                     "device_busy_gbps": round(statistics.median(s[f"nvme.{d}"]["gbps"] for s in snaps), 3)}
        ck["gbps_while_busy"] = round(ck["bytes"] / ck["busy_s"] / 1e9, 2) if ck["busy_s"] else 0.0
        ck["call_s_per_gib"] = round(ck["request_s"] / (ck["bytes"] / GiB), 4) if ck["bytes"] else 0.0
        ck["busy_s"], ck["request_s"] = round(ck["busy_s"], 4), round(ck["request_s"], 4)
        total_store_s = sum(size / (x * 1e9) for x in final["store (NvmeStore)"]["write"] +
                            final["store (NvmeStore)"]["read"])
        ck["threads_hashing_on_average"] = round(ck["request_s"] / total_store_s, 3) if total_store_s else 0.0
        passed = {d: ratios[d] >= BAR for d in ("write", "read")}
        results.update({"final": med, "best_raw": best, "store": st, "ratios_store_over_best_raw": ratios,
                        "bar_met": all(passed.values()), "passed": passed, "checksum": ck, "store_queue": qd,
                        "store_config": {k: getattr(store.store.config, k) for k in
                                         ("block_bytes", "workers", "verify", "durable")} |
                                        {"checksum": store.store.checksum, "workers_effective": store.store._pool.threads,
                                         "direct": store.store.direct},
                        "ref_resident_fraction_before_read": [round(r, 4) for r in residency],
                        "elapsed_s": round(time.perf_counter() - T0, 1)})

        # 4. Table.
        print()
        print(f"Raw variants, sweep (median of {sweep_reps}), GB/s:  {'write':>8}{'read':>8}")
        for n, x in results["sweep"].items():
            print(f"  {n:<44}{x['write']['median']:>8.2f}{x['read']['median']:>8.2f}")
        print()
        print(f"Sequential {human(size)}, {chunk // MiB} MiB chunks, median of {args.reps} interleaved reps "
              f"(min-max), GB/s, in {work} ({info['fs_type']}, {info['device']}):")
        rows = []
        for n, x in final.items():
            tags = [d for d in ("write", "read") if best[d]["variant"] == n]
            rows.append((n + (f"  [best raw {'+'.join(tags)}]" if tags else ""), x))
        w = max(len(n) for n, _ in rows) + 2
        print(f"  {'':<{w}}{'write':>20}{'read':>20}")

        def cell(xs):
            return f"{statistics.median(xs):6.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else f"{'-':>6}"

        for n, s in rows:
            print(f"  {n:<{w}}{cell(s['write']):>20}{cell(s['read']):>20}")
        print(f"  sweep (median of {sweep_reps}) best write: {ranked['write'][0]}, best read: {ranked['read'][0]}; "
              f"{len(results['sweep'])} raw variants ran" + (f", unavailable: {', '.join(broken)}" if broken else ""))
        print(f"  cold first write into fresh extents (not in the table): raw {cold['raw_write']:.2f}, "
              f"store {cold['store_write']:.2f}")
        print(f"  store checksums ({store.store.checksum}): {human(ck['bytes'])} hashed; the hash calls took {ck['call_s_per_gib']:.3f} "
              f"s per GiB summed over threads (wall time, so waiting for a core counts), on average "
              f"{ck['threads_hashing_on_average']:.2f} threads hashing while the store ran, {ck['gbps_while_busy']:.1f} "
              f"GB/s while any was; one thread alone: " +
              ", ".join(f"{k} {v:.1f}" for k, v in results['checksum_gbps_one_thread'].items()) + " GB/s")
        print(f"  store queue depth: write {qd['write']['mean_queue_depth']} (max {qd['write']['max_in_flight']}), "
              f"read {qd['read']['mean_queue_depth']} (max {qd['read']['max_in_flight']}); "
              f"{qd['write']['requests_per_rep']} requests of {human(size // qd['write']['requests_per_rep'])} per rep, "
              f"{store.store._pool.threads} workers")
        print(f"  buffers (HostPool, shared by the raw loop, the store and the references): "
              f"{100 * results['hostpool_huge_page_share']:.0f}% in 2 MiB pages")
        print(f"  other processes used {100 * results['other_processes_cpu_share']:.0f}% of the CPUs during the "
              f"comparison (load average at start {info['loadavg_at_start'][0]:.2f})")
        print(f"  page cache: {results['page_cache']}; resident before reads: "
              f"{max(residency) * 100 if residency else 0:.1f}% at most")
        for d in ("write", "read"):
            print(f"  store / best raw {d:<5}: {st[d]['median']:.2f} / {best[d]['gbps']:.2f} = {ratios[d]:.2f}x  "
                  f"{'PASS' if passed[d] else 'FAIL'} (bar {BAR}x)")
        if args.quick:
            print("  (--quick: tiny sizes, the figures and the verdict mean nothing)")
    finally:
        if store is not None:
            store.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        results["complete"] = "bar_met" in results
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
