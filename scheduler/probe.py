"""``offload probe``: measure this machine into a :class:`~scheduler.profile.HardwareProfile`.

Each measurement times the operation the runtime will actually perform, at the size it will perform it:

- device FLOP/s per dtype: square matmuls (the bulk of a transformer's FLOPs) on the compute device;
- host <-> device: pinned ``copy_`` to and from CUDA; on a CPU-only machine there is no link, so this is a
  memcpy between two host tensors and every source says so;
- disk: our own :class:`~storage.NvmeStore` (O_DIRECT where the file system allows, the store's block size and
  thread pool) writing, reading, and both at once, on a temp dir or ``--dir``;
- CPU update: ``torch.optim.AdamW(fused=True)`` on an fp32 subgroup of 16 Mi params (``OffloadConfig``'s
  default subgroup), alone and while a thread keeps the store reading and writing.

Timings take the median of repeats. ``quick=True`` shrinks every size so the whole probe takes a few seconds
(for tests); its numbers are rough and its sources say "quick".
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Callable

import psutil
import torch

from scheduler.profile import HardwareProfile, cache_dir, fingerprint
from storage import NvmeStore, StoreConfig


def _median_time(fn: Callable[[], None], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()  # warm-up: first calls allocate and page in
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _progress(msg: str, out) -> None:
    if out is not None:
        print(msg, file=out, flush=True)


def probe(*, quick: bool = False, directory: str | None = None, progress=sys.stderr) -> HardwareProfile:
    """Measure this machine. About a minute (a few seconds with ``quick``); progress lines go to ``progress``."""
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    host = os.uname().nodename
    when = datetime.date.today().isoformat()
    tag = f"measured on {host} {when} by offload probe" + (" --quick (rough)" if quick else "")
    sources: dict[str, str] = {}
    steps = 5

    # 1. FLOP/s per dtype. bf16/fp16 matmul on a CPU without AMX is slow and emulated: still what training gets.
    _progress(f"[1/{steps}] device matmul rate ({dev.type})", progress)
    n = 256 if quick else (4096 if cuda else 1024)
    tflops = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a = torch.randn(n, n, device=dev).to(dt)
        b = torch.randn(n, n, device=dev).to(dt)
        t = _median_time(lambda: torch.mm(a, b), 3 if quick else 5, sync)
        tflops[name] = 2 * n ** 3 / t / 1e12
        _progress(f"      {name}: {tflops[name]:.3f} TFLOP/s ({n}x{n} matmul)", progress)
    sources["device_tflops"] = f"{tag}: {n}x{n} torch.mm median on {dev.type}"
    sources["compute_efficiency"] = ("assumed 1.0: device_tflops is already a measured matmul rate; lower it for "
                                     "a model with much non-matmul work")

    # 2. Host <-> device.
    _progress(f"[2/{steps}] host <-> device copy", progress)
    nbytes = (16 << 20) if quick else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    if cuda:
        src = src.pin_memory()
        dst_dev = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        back = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        t_h2d = _median_time(lambda: dst_dev.copy_(src, non_blocking=True), 5, sync)
        t_d2h = _median_time(lambda: back.copy_(dst_dev, non_blocking=True), 5, sync)
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
        dst2 = torch.empty_like(dst_dev)

        def both():
            with torch.cuda.stream(s1):
                dst2.copy_(src, non_blocking=True)
            with torch.cuda.stream(s2):
                back.copy_(dst_dev, non_blocking=True)
        t_both = _median_time(both, 5, sync)
        link = f"{tag}: pinned copy_ of {nbytes >> 20} MiB"
    else:
        dst = torch.empty_like(src)
        t_h2d = t_d2h = _median_time(lambda: dst.copy_(src), 3 if quick else 5)
        dst2, src2 = torch.empty_like(src), torch.empty_like(src)

        def both():  # two copies at once, like the two copy streams of a GPU
            th = threading.Thread(target=lambda: dst2.copy_(src2))
            th.start()
            dst.copy_(src)
            th.join()
        t_both = _median_time(both, 3 if quick else 5)
        link = f"{tag}: memcpy of {nbytes >> 20} MiB (CPU-only machine, no device link)"
    h2d, d2h, bidir = nbytes / t_h2d / 1e9, nbytes / t_d2h / 1e9, 2 * nbytes / t_both / 1e9
    for f in ("h2d_gbps", "d2h_gbps", "bidir_gbps"):
        sources[f] = link
    _progress(f"      h2d {h2d:.1f} GB/s, d2h {d2h:.1f} GB/s, both at once {bidir:.1f} GB/s", progress)
    del src

    # 3. Disk through our store. 4. CPU update, with and without disk traffic.
    cfg = StoreConfig()
    chunk_bytes = 4 * cfg.block_bytes
    total = (64 << 20) if quick else (1 << 30)
    nchunks = max(2, total // chunk_bytes)
    with tempfile.TemporaryDirectory(prefix="offload-probe-", dir=directory) as tmp:
        store = NvmeStore(tmp, capacity_bytes=4 * nchunks * chunk_bytes + (64 << 20), config=cfg)
        with store:
            _progress(f"[3/{steps}] disk: {nchunks} x {chunk_bytes >> 20} MiB chunks through NvmeStore in {tmp} "
                      f"({'O_DIRECT' if store.direct else 'buffered: no O_DIRECT here'})", progress)
            bufs = [torch.full((chunk_bytes,), i % 251, dtype=torch.uint8) for i in range(nchunks)]
            outs = [torch.empty(chunk_bytes, dtype=torch.uint8) for _ in range(nchunks)]

            def write_all(prefix="a"):
                for h in [store.write(f"{prefix}{i}", b) for i, b in enumerate(bufs)]:
                    h.wait()

            def read_all(prefix="a"):
                for h in [store.read(f"{prefix}{i}", out=o) for i, o in enumerate(outs)]:
                    h.wait()
            write_all("b")  # the chunks the mixed test reads
            t_w = _median_time(write_all, 1 if quick else 3)
            t_r = _median_time(read_all, 1 if quick else 3)

            def mixed():
                hs = []
                for i in range(nchunks):  # interleaved, as a pipeline issues them
                    hs.append(store.read(f"b{i}", out=outs[i]))
                    hs.append(store.write(f"a{i}", bufs[i]))
                for h in hs:
                    h.wait()
            t_m = _median_time(mixed, 1 if quick else 3)
            vol = nchunks * chunk_bytes
            rd, wr, mx = vol / t_r / 1e9, vol / t_w / 1e9, 2 * vol / t_m / 1e9
            how = (f"{tag}: NvmeStore {'O_DIRECT' if store.direct else 'buffered (no O_DIRECT)'}, "
                   f"{nchunks} x {chunk_bytes >> 20} MiB chunks, {cfg.block_bytes >> 20} MiB blocks")
            sources.update(disk_read_gbps=how, disk_write_gbps=how, disk_mixed_gbps=how + ", reads and writes "
                           "interleaved", disk_block_bytes="StoreConfig().block_bytes, the size the disk was "
                           "measured at")
            _progress(f"      read {rd:.2f} GB/s, write {wr:.2f} GB/s, mixed {mx:.2f} GB/s", progress)

            _progress(f"[4/{steps}] CPU AdamW(fused=True) update rate, alone and under disk traffic", progress)
            numel = (1 << 20) if quick else (16 << 20)
            p = torch.zeros(numel, requires_grad=True)
            p.grad = torch.randn(numel) * 1e-3
            opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
            reps = 3 if quick else 7
            t_alone = _median_time(opt.step, reps)
            stop = threading.Event()

            def disk_load():
                while not stop.is_set():
                    mixed()
            th = threading.Thread(target=disk_load, daemon=True)
            th.start()
            try:
                t_io = _median_time(opt.step, reps)
            finally:
                stop.set()
                th.join()
            cpu_rate, cpu_io_rate = numel / t_alone, numel / t_io
            upd = f"{tag}: torch.optim.AdamW(fused=True) on {numel >> 20} Mi fp32 params, {torch.get_num_threads()} threads"
            sources["cpu_update_params_per_s"] = upd
            sources["cpu_update_params_per_s_under_io"] = upd + ", while NvmeStore reads and writes"
            _progress(f"      {cpu_rate / 1e9:.2f} G params/s alone, {cpu_io_rate / 1e9:.2f} G params/s under disk "
                      f"traffic", progress)

    _progress(f"[5/{steps}] device update rate and capacities", progress)
    if cuda:
        numel = (1 << 20) if quick else (16 << 20)
        pd = torch.zeros(numel, device=dev, requires_grad=True)
        pd.grad = torch.randn(numel, device=dev)
        optd = torch.optim.AdamW([pd], lr=1e-4, fused=True)
        dev_rate = numel / _median_time(optd.step, 5, sync)
        sources["device_update_params_per_s"] = f"{tag}: AdamW(fused=True) on {numel >> 20} Mi params on {dev}"
        dev_mem = torch.cuda.get_device_properties(0).total_memory
        sources["device_memory_bytes"] = "torch.cuda.get_device_properties(0).total_memory"
        dev_name = torch.cuda.get_device_name(0)
    else:
        dev_rate = cpu_rate
        sources["device_update_params_per_s"] = "same as cpu_update_params_per_s: the device is the CPU"
        dev_mem = psutil.virtual_memory().total // 4
        sources["device_memory_bytes"] = ("a quarter of RAM: on a CPU-only machine device memory is a budget our "
                                          "accounting enforces; override with --device-memory")
        dev_name = "cpu"
    host_mem = psutil.virtual_memory().total // 2
    sources["host_memory_bytes"] = "half of RAM (psutil): leave the rest to the OS and the data loader"
    nvme = psutil.disk_usage(directory or tempfile.gettempdir()).free
    sources["nvme_bytes"] = f"free space of {directory or tempfile.gettempdir()} (psutil.disk_usage) at probe time"
    fp = fingerprint(directory)
    prof = HardwareProfile(name=f"probe-{fp}", fingerprint=fp, device_name=dev_name, device_tflops=tflops,
                           compute_efficiency=1.0, h2d_gbps=h2d, d2h_gbps=d2h, bidir_gbps=bidir, disk_read_gbps=rd,
                           disk_write_gbps=wr, disk_mixed_gbps=mx, disk_block_bytes=cfg.block_bytes,
                           cpu_update_params_per_s=cpu_rate, cpu_update_params_per_s_under_io=cpu_io_rate,
                           device_update_params_per_s=dev_rate, device_memory_bytes=int(dev_mem),
                           host_memory_bytes=int(host_mem), nvme_bytes=int(nvme), sources=sources)
    return prof


def probe_and_cache(*, quick: bool = False, directory: str | None = None, progress=sys.stderr) -> tuple[HardwareProfile, str]:
    """Probe, then save under :func:`~scheduler.profile.cache_dir` as ``<fingerprint>.json``."""
    prof = probe(quick=quick, directory=directory, progress=progress)
    path = prof.save(cache_dir() / f"{prof.fingerprint}.json")
    return prof, str(path)
