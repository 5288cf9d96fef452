"""``offload probe``: measure this machine into a :class:`~scheduler.profile.HardwareProfile`.

Each measurement times the operation the runtime will actually perform, at the size it will perform it:

- device FLOP/s per dtype: square matmuls (the bulk of a transformer's FLOPs) on the compute device;
- compute efficiency: the training step (forward, loss, backward) of a small GPT (:data:`PROBE_LM`, fp32) on the
  device, its model FLOPs over its time, as a fraction of the fp32 matmul rate: what the FLOPs do not count
  (norms, softmax, the loss, the embedding's backward) and smaller matmuls cost is priced here;
- host <-> device: pinned ``copy_`` to and from CUDA; on a CPU-only machine there is no link, so this is a
  memcpy between two host tensors and every source says so;
- disk: our own :class:`~storage.NvmeStore` (O_DIRECT where the file system allows, the store's block size and
  thread pool) writing, reading, and both at once, on a temp dir or ``--dir``;
- CPU update: ``torch.optim.AdamW(fused=True)`` on an fp32 subgroup of 16 Mi params (``OffloadConfig``'s
  default subgroup), alone and while a thread keeps the store reading and writing;
- cpu steal: the same training step timed alone, then while another thread copies host -> device, runs the CPU
  update, or reads and writes chunks through the store one at a time (as the runtime's threads do); the step's
  extra time over that work's own time alone is the device compute each second of it takes (0 on a GPU; about 1
  or more where the device is the CPU: cost.py).

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
from scheduler.workload import TransformerShape, build_transformer, from_module
from storage import NvmeStore, StoreConfig
from storage.memory import available_host_bytes, fresh_empty

PROBE_LM = TransformerShape(n_layer=2, d_model=768, n_head=12, d_ff=3072, vocab=32000, n_pos=1024, bias=True,
                            norm="layernorm", tied=True)
"""The GPT whose training step (batch 2 x seq 256) prices compute efficiency and cpu steal: GPT-2-small blocks
and a Llama-sized vocabulary, so a step is mostly matmuls but the loss and embedding work are there too."""
PROBE_LM_QUICK = TransformerShape(n_layer=1, d_model=128, n_head=4, d_ff=512, vocab=1000, n_pos=64, bias=True,
                                  norm="layernorm", tied=True)


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


def _train_step_fn(shape: TransformerShape, batch: int, seq: int,
                   dev: torch.device) -> tuple[Callable[[], None], float]:
    """A training step (forward, loss, backward) of ``shape`` on ``dev``, in fp32, and its model FLOPs."""
    torch.manual_seed(0)
    model = build_transformer(shape, device=dev)
    idx = torch.randint(0, shape.vocab, (batch, seq + 1), device=dev)

    def step():
        logits = model(idx[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, shape.vocab), idx[:, 1:].reshape(-1)).backward()
        model.zero_grad(set_to_none=True)
    flops = from_module(build_transformer(shape), batch=batch, seq=seq, checkpointing=False).model_flops
    return step, flops


def _steal(step: Callable[[], None], side: Callable[[], None], repeats: int,
           sync) -> tuple[float, float, float, float]:
    """(compute seconds lost per second of ``side``, ``side`` alone s, step alone s, step beside side s). The
    step runs on this
    thread while ``side`` runs once on another; ``side`` should take well under the step's time, so that all of
    it runs beside the step. Repeats interleave alone and shared runs; medians."""
    alone, shared, side_s = [], [], []
    step()
    side()
    sync()
    for _ in range(repeats):
        alone.append(_median_time(step, 1, sync))
        side_s.append(_median_time(side, 1, sync))
        th = threading.Thread(target=side)
        t0 = time.perf_counter()
        th.start()
        step()
        sync()
        t_step = time.perf_counter() - t0
        th.join()
        shared.append(t_step)
    a, w, s = statistics.median(alone), statistics.median(side_s), statistics.median(shared)
    return max(0.0, (s - a) / w), w, a, s


def probe(*, quick: bool = False, directory: str | None = None, progress=sys.stderr) -> HardwareProfile:
    """Measure this machine: about two minutes on a 2-core machine, a few seconds with ``quick``. Progress lines
    go to ``progress``."""
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    host = os.uname().nodename
    when = datetime.date.today().isoformat()
    tag = f"measured on {host} {when} by offload probe" + (" --quick (rough)" if quick else "")
    sources: dict[str, str] = {}
    steps = 7

    # 1. FLOP/s per dtype. bf16/fp16 matmul on a CPU without AMX is slow and emulated: still what training gets.
    _progress(f"[1/{steps}] device matmul rate ({dev.type})", progress)
    n = 256 if quick else (4096 if cuda else 1024)
    tflops = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a = torch.randn(n, n, device=dev).to(dt)
        b = torch.randn(n, n, device=dev).to(dt)
        first = _median_time(lambda: torch.mm(a, b), 1, sync)
        # At least half a second of repeats (fp32 on a CPU: ~40), so that a short burst of other work is an outlier.
        t = _median_time(lambda: torch.mm(a, b), 3 if quick else max(5, min(41, int(0.5 / first))), sync)
        tflops[name] = 2 * n ** 3 / t / 1e12
        _progress(f"      {name}: {tflops[name]:.3f} TFLOP/s ({n}x{n} matmul)", progress)
    sources["device_tflops"] = f"{tag}: {n}x{n} torch.mm median on {dev.type}"

    # 2. A real training step: how much of the matmul rate it reaches.
    lm, (lm_b, lm_s) = (PROBE_LM_QUICK, (2, 32)) if quick else (PROBE_LM, (2, 256))
    step, step_flops = _train_step_fn(lm, lm_b, lm_s, dev)
    t_step = _median_time(step, 3, sync)
    eff = step_flops / t_step / (tflops["fp32"] * 1e12)
    what = (f"{tag}: model FLOPs / time of an fp32 training step of a {lm.n_layer}-layer GPT (d_model {lm.d_model}, "
            f"vocab {lm.vocab}, batch {lm_b} x seq {lm_s}: {t_step * 1e3:.0f} ms) over the fp32 matmul rate")
    if eff > 1:  # a noisy matmul timing; a step cannot beat its matmuls
        what += f" (measured {eff:.2f}, capped at 1.0)"
    compute_eff = min(1.0, eff)
    sources["compute_efficiency"] = what
    _progress(f"[2/{steps}] training step of a small GPT: {t_step * 1e3:.0f} ms, {compute_eff:.2f} of the fp32 "
              f"matmul rate", progress)

    # 3. Host <-> device.
    _progress(f"[3/{steps}] host <-> device copy", progress)
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
    src = dst2 = None  # 512 MiB given back before the disk test (the closures above are done with them)
    # Side work for the steal measurement (step 6): copies to the device for about a third of a step's time.
    copy_src = torch.empty((4 << 20) if quick else (64 << 20), dtype=torch.uint8).fill_(1)
    copies = max(1, round(h2d * 1e9 * t_step / 3 / copy_src.numel()))
    if cuda:
        copy_src = copy_src.pin_memory()
    copy_dst = torch.empty_like(copy_src, device=dev)
    copy_stream = torch.cuda.Stream() if cuda else None

    def copy_side():
        for _ in range(copies):
            if copy_stream is None:
                copy_dst.copy_(copy_src)
                continue
            with torch.cuda.stream(copy_stream):
                copy_dst.copy_(copy_src, non_blocking=True)
        if copy_stream is not None:
            copy_stream.synchronize()

    # 3. Disk through our store. 4. CPU update, with and without disk traffic.
    cfg = StoreConfig()
    # Chunks of 16 blocks: the size of a transformer block's state or params (tens to hundreds of MB), which the
    # runtime moves one at a time; each chunk is a journal commit, so much smaller chunks would price those.
    chunk_bytes = (2 if quick else 16) * cfg.block_bytes
    total = (64 << 20) if quick else (1 << 30)
    nchunks = max(2, total // chunk_bytes)
    with tempfile.TemporaryDirectory(prefix="offload-probe-", dir=directory) as tmp:
        store = NvmeStore(tmp, capacity_bytes=4 * nchunks * chunk_bytes + (64 << 20), config=cfg)
        with store:
            _progress(f"[4/{steps}] disk: {nchunks} x {chunk_bytes >> 20} MiB chunks through NvmeStore in {tmp} "
                      f"({'O_DIRECT' if store.direct else 'buffered: no O_DIRECT here'})", progress)
            # The memory the runtime's pool buffers are made of (fresh, 2 MiB pages where THP allows, touched): the
            # store moves them with no staging copy, and the kind of memory alone moves disk speed by up to 30%.
            bufs = [fresh_empty(chunk_bytes).fill_(i % 251) for i in range(nchunks)]
            outs = [fresh_empty(chunk_bytes).zero_() for _ in range(nchunks)]

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

            _progress(f"[5/{steps}] CPU AdamW(fused=True) update rate, alone and under disk traffic", progress)
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

            # 6. What host work costs the device's compute. Each side job takes about a third of a step alone.
            _progress(f"[6/{steps}] cpu steal: the training step alone and beside copies, updates, disk traffic",
                      progress)
            upd_steps = max(1, round(t_step / 3 / t_alone))
            disk_chunks = max(1, min(nchunks, round(t_step / 3 * mx * 1e9 / 2 / chunk_bytes)))

            def update_side():
                for _ in range(upd_steps):
                    opt.step()

            def disk_side():  # as the runtime's update thread does: read a chunk, write one, one at a time
                for i in range(disk_chunks):
                    store.read(f"b{i}", out=outs[i]).wait()
                    store.write(f"a{i}", bufs[i]).wait()
            steal, steal_how = {}, []
            for kind, side in (("copy", copy_side), ("update", update_side), ("disk", disk_side)):
                steal[kind], side_s, alone_s, step_s = _steal(step, side, 2 if quick else 3, sync)
                steal_how.append(f"{kind} {side_s * 1e3:.0f} ms alone; step {alone_s * 1e3:.0f} ms alone, "
                                 f"{step_s * 1e3:.0f} ms beside it")
                _progress(f"      {kind}: {steal[kind]:.2f} s of compute lost per s ({steal_how[-1]})", progress)
            sources["cpu_steal"] = (f"{tag}: the training step of compute_efficiency alone and beside each kind of "
                                    f"host work on another thread ({'; '.join(steal_how)}); medians, interleaved")

    _progress(f"[7/{steps}] device update rate and capacities", progress)
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
        dev_mem = available_host_bytes() // 4
        sources["device_memory_bytes"] = ("a quarter of RAM (or of the cgroup's limit when lower): on a CPU-only "
                                          "machine device memory is a budget our accounting enforces; override with "
                                          "--device-memory")
        dev_name = "cpu"
    host_mem = available_host_bytes() // 2
    sources["host_memory_bytes"] = ("half of RAM (psutil), or of the cgroup's memory limit when lower (a "
                                    "container's): leave the rest to the OS and the data loader")
    nvme = psutil.disk_usage(directory or tempfile.gettempdir()).free
    sources["nvme_bytes"] = f"free space of {directory or tempfile.gettempdir()} (psutil.disk_usage) at probe time"
    fp = fingerprint(directory)
    prof = HardwareProfile(name=f"probe-{fp}", fingerprint=fp, device_name=dev_name, device_tflops=tflops,
                           compute_efficiency=compute_eff, cpu_steal=steal, h2d_gbps=h2d, d2h_gbps=d2h,
                           bidir_gbps=bidir, disk_read_gbps=rd,
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
