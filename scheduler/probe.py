"""``offload probe``: measure this machine into a :class:`~scheduler.profile.HardwareProfile`.

Each measurement times the operation the runtime will actually perform, at the size it will perform it:

- device FLOP/s per dtype: square matmuls (the bulk of a transformer's FLOPs) on the compute device;
- compute efficiency: the training step (forward, loss, backward) of a small GPT (:data:`PROBE_LM`, fp32) on the
  device, its model FLOPs over its time, as a fraction of the fp32 matmul rate: what the FLOPs do not count
  (norms, softmax, the loss, the embedding's backward) and smaller matmuls cost is priced here; the same step at
  :data:`CURVE_SHAPES` (1 x 64 to 2 x 512 tokens) gives the efficiency by step size (``compute_curve``);
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

Noise. The probe is meant for an otherwise idle machine, and is often run on a busy one. Every rate is measured
in ``rounds`` (default 5) that interleave the related measurements (fp32, bf16 and fp16 matmul; the update alone
and under disk traffic; reads, writes and both), so that a burst of other work weighs on all of them alike; each
round takes the median of its repeats, the profile keeps the median of the rounds, and ``HardwareProfile.spread``
records (slowest - fastest) / median. :func:`plausibility` then checks related rates against each other (a
training step cannot beat its own matmuls; bf16 far above fp32 where the CPU has no bf16 instructions; the update
faster under disk traffic than alone; mixed disk traffic faster than reads and writes together; a wide spread;
other processes busy during the probe), and what it finds goes into ``HardwareProfile.warnings``: printed now,
and again by every ``offload plan`` that uses the profile.

``quick=True`` shrinks every size so the whole probe takes a few seconds (for tests); its numbers are rough and
its sources say "quick". The parts (:func:`measure_rounds`, :func:`matmul_rates`, :func:`disk_rates`,
:func:`update_rates`, :func:`plausibility`) take their sizes as arguments, so tests run them small.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import torch

from scheduler.profile import HardwareProfile, cached_path, fingerprint
from scheduler.workload import TransformerShape, build_transformer, from_module
from storage import NvmeStore, StoreConfig
from storage.memory import available_host_bytes, fresh_empty

PROBE_LM = TransformerShape(n_layer=2, d_model=768, n_head=12, d_ff=3072, vocab=32000, n_pos=1024, bias=True,
                            norm="layernorm", tied=True)
"""The GPT whose training step (batch 2 x seq 256) prices compute efficiency and cpu steal: GPT-2-small blocks
and a Llama-sized vocabulary, so a step is mostly matmuls but the loss and embedding work are there too."""
CURVE_SHAPES = ((1, 64), (1, 256), (2, 256), (2, 512))
"""(batch, seq) of the training steps that price compute by size (``HardwareProfile.compute_curve``): from a
single short sequence, where fixed costs per op weigh most, to 1024 tokens (~2 s a step on the 2-core VM)."""
CURVE_SHAPES_QUICK = ((1, 16), (2, 32))
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


STDERR = "stderr"
"""``progress=STDERR``: the ``sys.stderr`` of the time of the call (a test's capture, a redirect), not of import."""


def _progress(msg: str, out) -> None:
    if out is not None:
        print(msg, file=sys.stderr if out == STDERR else out, flush=True)


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


ROUNDS = 5
"""Interleaved rounds per noisy rate (``--rounds``); ``quick``: 2."""
SPREAD_MAX = 0.25
"""A rate whose rounds range wider than this share of their median is flagged: the machine was not quiet."""
FOREIGN_MAX = 0.10
"""Flagged when other processes used more than this share of the machine's CPU time during the probe."""
BF16_OVER_FP32_MAX = {"cuda": 32.0, "cpu_bf16": 32.0, "cpu": 2.0}
"""The most bf16 matmul may plausibly exceed fp32: 28x on a B200 (2.25 PFLOP/s dense bf16 against 80 TFLOP/s
fp32, vendor), ~15x on an H100; a CPU with AMX or AVX512-BF16 runs bf16 natively, one without only emulates it
(0.001 TFLOP/s against 0.02 fp32 on the 2-core development VM), so more than twice fp32 there means the fp32
timing was disturbed."""


@dataclasses.dataclass(frozen=True)
class Rate:
    """One rate measured in interleaved rounds: work per second of each round (the median of its repeats)."""

    rounds: tuple[float, ...]

    @property
    def value(self) -> float:
        return statistics.median(self.rounds)

    @property
    def spread(self) -> float:
        """(fastest - slowest) / median: 0 for one round."""
        return (max(self.rounds) - min(self.rounds)) / self.value if self.value > 0 else 0.0

    def describe(self, unit: str = "", scale: float = 1.0, digits: int = 2) -> str:
        return f"{self.value / scale:.{digits}f}{unit} (median of {len(self.rounds)}, spread {self.spread:.0%})"


def measure_rounds(jobs: dict[str, tuple[Callable[[], None], float]], *, rounds: int, repeats: int = 1,
                   sync: Callable[[], None] = lambda: None,
                   prepare: dict[str, Callable[[], None]] | None = None) -> dict[str, Rate]:
    """``jobs``: name -> (function, work per call). Each job is warmed once, then each round times every job in
    turn (``repeats`` calls each, their median); a job's rate per round is work / that median. ``prepare``: name ->
    a function run untimed before that job's calls in each round (start or stop side work)."""
    if rounds < 1 or repeats < 1:
        raise ValueError(f"measure_rounds: expected rounds >= 1 and repeats >= 1, got {rounds} and {repeats}")
    prepare = prepare or {}
    for name, (fn, _) in jobs.items():
        prepare.get(name, lambda: None)()
        fn()
    sync()
    out: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, (fn, work) in jobs.items():
            prepare.get(name, lambda: None)()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            out[name].append(work / statistics.median(times))
    return {name: Rate(tuple(v)) for name, v in out.items()}


def matmul_rates(dev: torch.device, n: int, *, rounds: int, sync: Callable[[], None] = lambda: None,
                 budget_s: float = 0.1) -> tuple[dict[str, Rate], dict[str, int]]:
    """TFLOP/s of square ``torch.mm`` per dtype (:data:`~scheduler.profile.DTYPES`), rounds interleaving the dtypes,
    and the size each was measured at: a dtype whose ``n`` x ``n`` matmul takes over ``budget_s`` (bf16 emulated
    on a CPU: seconds) is measured at half the size, down to 128, so that all rounds fit a minute."""
    jobs, sizes = {}, {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        m = n
        while True:
            a = torch.randn(m, m, device=dev).to(dt)
            b = torch.randn(m, m, device=dev).to(dt)
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync()
            first = time.perf_counter() - t0
            if first <= budget_s or m <= 128:
                break
            m //= 2
        reps = max(1, min(9, int(budget_s / max(first, 1e-6))))

        def call(a=a, b=b, reps=reps):
            for _ in range(reps):
                torch.mm(a, b)
        jobs[name], sizes[name] = (call, reps * 2 * m ** 3 / 1e12), m
    return measure_rounds(jobs, rounds=rounds, sync=sync), sizes


def disk_rates(store: NvmeStore, bufs: list[torch.Tensor], outs: list[torch.Tensor], *,
               rounds: int) -> tuple[dict[str, Rate], Callable[[], None]]:
    """GB/s through ``store`` writing ``bufs``, reading them back into ``outs``, and both at once (reads of one
    set interleaved with writes of another, as a pipeline issues them; the rate counts reads plus writes), rounds
    interleaving the three. Also returns the mixed job, for other measurements to run beside."""
    n, vol = len(bufs), sum(b.numel() * b.element_size() for b in bufs)

    def write_all(prefix="a"):
        for h in [store.write(f"{prefix}{i}", b) for i, b in enumerate(bufs)]:
            h.wait()

    def read_all():
        for h in [store.read(f"a{i}", out=o) for i, o in enumerate(outs)]:
            h.wait()

    def mixed():
        hs = []
        for i in range(n):
            hs.append(store.read(f"b{i}", out=outs[i]))
            hs.append(store.write(f"a{i}", bufs[i]))
        for h in hs:
            h.wait()
    write_all("b")  # the chunks the mixed job reads
    rates = measure_rounds({"write": (write_all, vol / 1e9), "read": (read_all, vol / 1e9),
                            "mixed": (mixed, 2 * vol / 1e9)}, rounds=rounds)
    return rates, mixed


def update_rates(numel: int, side: Callable[[], None], *, rounds: int,
                 repeats: int = 3) -> tuple[Rate, Rate, Callable[[], None]]:
    """fp32 params per second of ``torch.optim.AdamW(fused=True)`` on ``numel`` params, alone and while a thread
    runs ``side`` over and over (disk traffic), rounds alternating the two; and the optimizer's step."""
    p = torch.zeros(numel, requires_grad=True)
    p.grad = torch.randn(numel) * 1e-3
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    stop, busy, running = threading.Event(), threading.Event(), threading.Lock()

    def side_loop():
        while not stop.is_set():
            if not busy.wait(0.01):
                continue
            with running:  # held while side runs: "alone" waits for the side job in flight to end
                if busy.is_set():
                    side()

    def quiet():
        busy.clear()
        with running:
            pass

    def loud():
        busy.set()
        time.sleep(0.02)  # the side job's first requests are in flight before the timed steps start
    th = threading.Thread(target=side_loop, daemon=True)
    th.start()
    try:
        rates = measure_rounds({"alone": (opt.step, numel), "under_io": (opt.step, numel)}, rounds=rounds,
                               repeats=repeats, prepare={"alone": quiet, "under_io": loud})
    finally:
        quiet()
        stop.set()
        th.join()
    return rates["alone"], rates["under_io"], opt.step


def plausibility(*, device: str, tflops: dict[str, float], step_tflops: float, cpu_update: float,
                 cpu_update_io: float, disk: dict[str, float], spread: dict[str, float],
                 foreign_cpu: float | None, cpu_bf16: bool = False) -> list[str]:
    """What is implausible among a probe's numbers, one line each (empty: nothing). ``tflops`` per dtype and
    ``step_tflops`` (the fp32 training step's model FLOP/s) in 1e12 FLOP/s; ``disk``: ``read``, ``write``,
    ``mixed`` GB/s; ``spread``: field -> (slowest - fastest) / median; ``foreign_cpu``: the share of the machine's
    CPU time other processes used (None: unknown); ``cpu_bf16``: the CPU has bf16 instructions."""
    out = []
    if step_tflops > tflops["fp32"]:
        out.append(f"the fp32 training step ran at {step_tflops:.3g} TFLOP/s, faster than the fp32 matmul alone "
                   f"({tflops['fp32']:.3g}): the matmul timing was disturbed (fp32 raised to the step's rate)")
    kind = device if device != "cpu" or not cpu_bf16 else "cpu_bf16"
    limit = BF16_OVER_FP32_MAX.get(kind, BF16_OVER_FP32_MAX["cuda"])
    if "bf16" in tflops and tflops["bf16"] > limit * tflops["fp32"]:
        out.append(f"bf16 matmul {tflops['bf16']:.3g} TFLOP/s is {tflops['bf16'] / tflops['fp32']:.0f}x fp32 "
                   f"({tflops['fp32']:.3g}), more than the {limit:.0f}x plausible on this device: one of the two "
                   f"timings was disturbed")
    if cpu_update_io > cpu_update * (1 + max(0.1, spread.get("cpu_update_params_per_s", 0.0))):
        out.append(f"the CPU update ran faster under disk traffic ({cpu_update_io / 1e9:.2f} G params/s) than alone "
                   f"({cpu_update / 1e9:.2f}): one of the two was disturbed")
    if disk["mixed"] > 1.1 * (disk["read"] + disk["write"]):
        out.append(f"mixed disk traffic {disk['mixed']:.2f} GB/s exceeds reads ({disk['read']:.2f}) and writes "
                   f"({disk['write']:.2f}) together: one of them was disturbed")
    noisy = {f: v for f, v in spread.items() if v > SPREAD_MAX}
    if noisy:
        out.append("noisy (rounds ranged over more than " f"{SPREAD_MAX:.0%} of their median): " +
                   ", ".join(f"{f} {v:.0%}" for f, v in sorted(noisy.items())))
    if foreign_cpu is not None and foreign_cpu > FOREIGN_MAX:
        out.append(f"other processes used {foreign_cpu:.0%} of the machine's CPU time during the probe: its rates "
                   f"are this machine's under that load, not idle")
    return out


def _cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16 in /proc/cpuinfo's flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


class _Foreign:
    """The share of the machine's CPU time that other processes used while this one ran (psutil)."""

    def __init__(self):
        self.me = psutil.Process()
        self.t0, self.sys0, self.me0 = time.monotonic(), self._busy(), self._mine()

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    def _mine(self) -> float:
        t = self.me.cpu_times()
        return t.user + t.system

    def share(self) -> float | None:
        wall = (time.monotonic() - self.t0) * (os.cpu_count() or 1)
        if wall <= 0:
            return None
        return max(0.0, ((self._busy() - self.sys0) - (self._mine() - self.me0)) / wall)


def flush_denormals() -> None:
    """Flush subnormal floats to zero on the CPU, for this process (``torch.set_flush_denormal``): what every
    measurement here (the probe, ``offload plan --measure``, the benchmarks) runs under, ours and plain PyTorch
    alike.

    Why: subnormals are a property of the model and its data, not of a placement, and on x86 CPUs each op on one
    takes a slow microcode path. Training GPT-2 small at 1 x 64 on random tokens, plain PyTorch's step grew from
    0.60 s to 2.1 s over its first ten steps as subnormals appeared in backward (user CPU time 1.4 -> 4.6 s per
    step), and stayed at 0.58 s with them flushed: an effect the cost model cannot see (it prices FLOPs), which
    measurements mistook for machine noise. Results then differ from a run without flushing (tiny values become
    0), so :func:`offload.wrap` never sets it: it is a measurement condition, not a training default."""
    torch.set_flush_denormal(True)


def probe(*, quick: bool = False, directory: str | None = None, rounds: int | None = None,
          progress=STDERR) -> HardwareProfile:
    """Measure this machine: about two minutes on a 2-core machine, a few seconds with ``quick``. ``rounds``:
    interleaved rounds per noisy rate (default :data:`ROUNDS`, 2 with ``quick``). Progress lines go to
    ``progress``. Nothing is saved here (:func:`probe_and_cache`, ``offload probe``)."""
    rounds = rounds if rounds is not None else (2 if quick else ROUNDS)
    if rounds < 1:
        raise ValueError(f"probe: expected rounds >= 1, got {rounds}")
    flush_denormals()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    host = os.uname().nodename
    now = datetime.datetime.now().isoformat(timespec="seconds")
    tag = f"measured on {host} {now[:10]} by offload probe" + (" --quick (rough)" if quick else "")
    med = f"median of {rounds} interleaved rounds"
    sources: dict[str, str] = {}
    spread: dict[str, float] = {}
    steps = 7
    foreign = _Foreign()
    _progress(f"offload probe: {rounds} rounds per rate; load average {os.getloadavg()[0]:.2f} on "
              f"{os.cpu_count()} CPUs (run it on an otherwise idle machine)", progress)

    # 1. FLOP/s per dtype. bf16/fp16 matmul on a CPU without AMX is slow and emulated: still what training gets.
    _progress(f"[1/{steps}] device matmul rate ({dev.type}), dtypes interleaved", progress)
    n = 256 if quick else (4096 if cuda else 1024)
    mm, sizes = matmul_rates(dev, n, rounds=rounds, sync=sync, budget_s=0.02 if quick else 0.1)
    tflops = {k: r.value for k, r in mm.items()}
    for k, r in mm.items():
        _progress(f"      {k}: {r.describe(' TFLOP/s', digits=3)} ({sizes[k]}x{sizes[k]})", progress)
    spread["device_tflops"] = max(r.spread for r in mm.values())
    sources["device_tflops"] = (f"{tag}: torch.mm on {dev.type}, " + ", ".join(f"{k} {sizes[k]}x{sizes[k]}"
                                                                                 for k in mm) + f"; {med}")

    # 2. A real training step: how much of the matmul rate it reaches.
    lm, (lm_b, lm_s) = (PROBE_LM_QUICK, (2, 32)) if quick else (PROBE_LM, (2, 256))
    step, step_flops = _train_step_fn(lm, lm_b, lm_s, dev)
    jobs = {"step": (step, step_flops / 1e12)}
    for b, s in (CURVE_SHAPES_QUICK if quick else CURVE_SHAPES):
        if (b, s) != (lm_b, lm_s):
            fn, fl = _train_step_fn(lm, b, s, dev)
            jobs[f"{b}x{s}"] = (fn, fl / 1e12)
    rates = measure_rounds(jobs, rounds=rounds, sync=sync)
    st = rates["step"]
    t_step = step_flops / 1e12 / st.value
    what = (f"{tag}: model FLOPs / time of an fp32 training step of a {lm.n_layer}-layer GPT (d_model {lm.d_model}, "
            f"vocab {lm.vocab}, batch {lm_b} x seq {lm_s}: {t_step * 1e3:.0f} ms, {med}) over the fp32 matmul rate")
    if st.value > tflops["fp32"]:  # a step cannot beat its own matmuls: the matmul timing was disturbed
        what += f" (the step ran at {st.value:.3g} TFLOP/s, above the measured fp32 matmul: fp32 raised to it)"
        sources["device_tflops"] += (f"; fp32 raised from {tflops['fp32']:.3g} to the training step's "
                                     f"{st.value:.3g} (a step cannot beat its matmuls)")
    step_rate = st.value
    fp32_measured = tflops["fp32"]
    tflops["fp32"] = max(tflops["fp32"], st.value)
    compute_eff = st.value / tflops["fp32"]
    spread["compute_efficiency"] = st.spread
    sources["compute_efficiency"] = what
    curve = {lm_b * lm_s: compute_eff}
    for name, r in rates.items():
        if name != "step":
            b, s = map(int, name.split("x"))
            curve[b * s] = min(1.0, r.value / tflops["fp32"])
    sources["compute_curve"] = (f"{tag}: the training step of compute_efficiency at " +
                                ", ".join(f"{b} x {s}" for b, s in sorted(
                                    {(lm_b, lm_s), *(CURVE_SHAPES_QUICK if quick else CURVE_SHAPES)},
                                    key=lambda x: x[0] * x[1])) +
                                f" (tokens -> model FLOPs / time over the fp32 matmul rate), interleaved; {med}")
    spread["compute_curve"] = max(r.spread for r in rates.values())
    _progress(f"[2/{steps}] training step of a small GPT: {t_step * 1e3:.0f} ms (spread {st.spread:.0%}), "
              f"{compute_eff:.2f} of the fp32 matmul rate; by tokens per step: " +
              ", ".join(f"{t} {e:.2f}" for t, e in sorted(curve.items())), progress)

    # 3. Host <-> device.
    _progress(f"[3/{steps}] host <-> device copy", progress)
    nbytes = (16 << 20) if quick else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    if cuda:
        src = src.pin_memory()
        dst_dev = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        back = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
        dst2 = torch.empty_like(dst_dev)

        def h2d_fn():
            dst_dev.copy_(src, non_blocking=True)

        def d2h_fn():
            back.copy_(dst_dev, non_blocking=True)

        def both():
            with torch.cuda.stream(s1):
                dst2.copy_(src, non_blocking=True)
            with torch.cuda.stream(s2):
                back.copy_(dst_dev, non_blocking=True)
        link = f"{tag}: pinned copy_ of {nbytes >> 20} MiB, {med}"
    else:
        dst = torch.empty_like(src)
        dst2, src2 = torch.empty_like(src), torch.empty_like(src)

        def h2d_fn():
            dst.copy_(src)
        d2h_fn = h2d_fn

        def both():  # two copies at once, like the two copy streams of a GPU
            th = threading.Thread(target=lambda: dst2.copy_(src2))
            th.start()
            dst.copy_(src)
            th.join()
        link = f"{tag}: memcpy of {nbytes >> 20} MiB (CPU-only machine, no device link), {med}"
    gb = nbytes / 1e9
    cp = measure_rounds({"h2d": (h2d_fn, gb), "d2h": (d2h_fn, gb), "both": (both, 2 * gb)}, rounds=rounds,
                        repeats=1 if quick else 3, sync=sync)
    h2d, d2h, bidir = cp["h2d"].value, cp["d2h"].value, cp["both"].value
    for f, k in (("h2d_gbps", "h2d"), ("d2h_gbps", "d2h"), ("bidir_gbps", "both")):
        sources[f], spread[f] = link, cp[k].spread
    _progress(f"      h2d {cp['h2d'].describe(' GB/s', digits=1)}, d2h {cp['d2h'].describe(' GB/s', digits=1)}, "
              f"both at once {cp['both'].describe(' GB/s', digits=1)}", progress)
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

    # 4. Disk through our store. 5. CPU update, with and without disk traffic.
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
                      f"({'O_DIRECT' if store.direct else 'buffered: no O_DIRECT here'}), write/read/mixed "
                      f"interleaved", progress)
            # The memory the runtime's pool buffers are made of (fresh, 2 MiB pages where THP allows, touched): the
            # store moves them with no staging copy, and the kind of memory alone moves disk speed by up to 30%.
            bufs = [fresh_empty(chunk_bytes).fill_(i % 251) for i in range(nchunks)]
            outs = [fresh_empty(chunk_bytes).zero_() for _ in range(nchunks)]
            dk, mixed = disk_rates(store, bufs, outs, rounds=rounds)
            rd, wr, mx = dk["read"].value, dk["write"].value, dk["mixed"].value
            how = (f"{tag}: NvmeStore {'O_DIRECT' if store.direct else 'buffered (no O_DIRECT)'}, "
                   f"{nchunks} x {chunk_bytes >> 20} MiB chunks, {cfg.block_bytes >> 20} MiB blocks, {med}")
            sources.update(disk_read_gbps=how, disk_write_gbps=how, disk_mixed_gbps=how + ", reads and writes "
                           "interleaved", disk_block_bytes="StoreConfig().block_bytes, the size the disk was "
                           "measured at")
            for f, k in (("disk_read_gbps", "read"), ("disk_write_gbps", "write"), ("disk_mixed_gbps", "mixed")):
                spread[f] = dk[k].spread
            _progress(f"      read {dk['read'].describe(' GB/s')}, write {dk['write'].describe(' GB/s')}, mixed "
                      f"{dk['mixed'].describe(' GB/s')}", progress)

            _progress(f"[5/{steps}] CPU AdamW(fused=True) update rate, alone and under disk traffic, alternating",
                      progress)
            numel = (1 << 20) if quick else (16 << 20)
            upd_alone, upd_io, opt_step = update_rates(numel, mixed, rounds=rounds, repeats=3 if quick else 5)
            cpu_rate, cpu_io_rate = upd_alone.value, upd_io.value
            t_alone = numel / cpu_rate
            upd = (f"{tag}: torch.optim.AdamW(fused=True) on {numel >> 20} Mi fp32 params, "
                   f"{torch.get_num_threads()} threads, {med}")
            sources["cpu_update_params_per_s"] = upd
            sources["cpu_update_params_per_s_under_io"] = upd + " (alternating with alone), while NvmeStore reads " \
                                                                "and writes"
            spread["cpu_update_params_per_s"], spread["cpu_update_params_per_s_under_io"] = upd_alone.spread, \
                upd_io.spread
            _progress(f"      {upd_alone.describe(' G params/s', 1e9)} alone, {upd_io.describe(' G params/s', 1e9)} "
                      f"under disk traffic", progress)

            # 6. What host work costs the device's compute. Each side job takes about a third of a step alone.
            _progress(f"[6/{steps}] cpu steal: the training step alone and beside copies, updates, disk traffic",
                      progress)
            upd_steps = max(1, round(t_step / 3 / t_alone))
            disk_chunks = max(1, min(nchunks, round(t_step / 3 * mx * 1e9 / 2 / chunk_bytes)))

            def update_side():
                for _ in range(upd_steps):
                    opt_step()

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

    _progress(f"[7/{steps}] device update rate, capacities and reserves", progress)
    if cuda:
        numel = (1 << 20) if quick else (16 << 20)
        pd = torch.zeros(numel, device=dev, requires_grad=True)
        pd.grad = torch.randn(numel, device=dev)
        optd = torch.optim.AdamW([pd], lr=1e-4, fused=True)
        du = measure_rounds({"update": (optd.step, numel)}, rounds=rounds, repeats=5, sync=sync)["update"]
        dev_rate, spread["device_update_params_per_s"] = du.value, du.spread
        sources["device_update_params_per_s"] = f"{tag}: AdamW(fused=True) on {numel >> 20} Mi params on {dev}, {med}"
        dev_mem = torch.cuda.get_device_properties(0).total_memory
        sources["device_memory_bytes"] = "torch.cuda.get_device_properties(0).total_memory"
        # What this process's CUDA context and everything else on the card hold outside torch's allocator.
        free_b, total_b = torch.cuda.mem_get_info()
        context = max(0, total_b - free_b - torch.cuda.memory_reserved())
        dev_reserve = {"bytes": context, "fraction": 0.05}
        sources["device_reserve"] = (f"{tag}: {context / 2**30:.2f} GiB held outside torch's allocator (this "
                                     f"process's CUDA context, other processes, a display: torch.cuda.mem_get_info) "
                                     f"plus an estimated 5% of the memory for the caching allocator's rounding and "
                                     f"fragmentation; override with --device-reserve")
        dev_name = torch.cuda.get_device_name(0)
    else:
        dev_rate = cpu_rate
        sources["device_update_params_per_s"] = "same as cpu_update_params_per_s: the device is the CPU"
        dev_mem = available_host_bytes() // 4
        sources["device_memory_bytes"] = ("a quarter of RAM (or of the cgroup's limit when lower): on a CPU-only "
                                          "machine device memory is a budget our accounting enforces; override with "
                                          "--device-memory")
        dev_reserve = {"bytes": 0, "fraction": 0.0}
        sources["device_reserve"] = ("none: the device is the CPU, its memory a budget our accounting enforces (no "
                                     "context, no allocator of its own)")
        dev_name = "cpu"
    host_mem = available_host_bytes()
    sources["host_memory_bytes"] = "RAM (psutil), or the cgroup's memory limit when lower (a container's)"
    host_reserve = {"bytes": 0, "fraction": 0.5}
    sources["host_reserve"] = ("chosen: half of it, for the OS, this process, the data loader and page cache" +
                               ("" if cuda else ", and the device budget (a quarter of RAM on a CPU-only machine)") +
                               "; override with --host-reserve")
    nvme = psutil.disk_usage(directory or tempfile.gettempdir()).free
    sources["nvme_bytes"] = f"free space of {directory or tempfile.gettempdir()} (psutil.disk_usage) at probe time"
    warnings = plausibility(device=dev.type, tflops={**tflops, "fp32": fp32_measured}, step_tflops=step_rate,
                            cpu_update=cpu_rate, cpu_update_io=cpu_io_rate, disk={"read": rd, "write": wr, "mixed": mx},
                            spread=spread, foreign_cpu=foreign.share(), cpu_bf16=_cpu_bf16())
    if quick:
        warnings.insert(0, "--quick: tiny sizes and few rounds, rough numbers (for tests)")
    fp = fingerprint(directory)
    return HardwareProfile(name=f"probe-{fp}", fingerprint=fp, device_name=dev_name, device_tflops=tflops,
                           compute_efficiency=compute_eff, compute_curve=curve, cpu_steal=steal, h2d_gbps=h2d, d2h_gbps=d2h,
                           bidir_gbps=bidir, disk_read_gbps=rd, disk_write_gbps=wr, disk_mixed_gbps=mx,
                           disk_block_bytes=cfg.block_bytes, cpu_update_params_per_s=cpu_rate,
                           cpu_update_params_per_s_under_io=cpu_io_rate, device_update_params_per_s=dev_rate,
                           device_memory_bytes=int(dev_mem), host_memory_bytes=int(host_mem), nvme_bytes=int(nvme),
                           device_reserve=dev_reserve, host_reserve=host_reserve, sources=sources,
                           measured_at=now, spread=spread, warnings=tuple(warnings))


def summary(prof: HardwareProfile) -> str:
    """A few lines for people: the main rates with their spread, the reserves, and the warnings count."""
    sp = prof.spread
    pct = lambda f: f" (spread {sp[f]:.0%})" if f in sp else ""  # noqa: E731
    tf = ", ".join(f"{k} {v:.3g}" for k, v in prof.device_tflops.items())
    lines = [f"profile {prof.name} ({prof.device_name}), measured {prof.measured_at or 'by hand'}",
             f"  matmul TFLOP/s: {tf}{pct('device_tflops')}; a training step reaches "
             f"{prof.compute_efficiency:.2f} of fp32{pct('compute_efficiency')}" + (
                 "; by tokens per step " + ", ".join(f"{t} {e:.2f}" for t, e in prof.compute_curve.items())
                 if prof.compute_curve else ""),
             f"  copies GB/s: h2d {prof.h2d_gbps:.1f}{pct('h2d_gbps')}, d2h {prof.d2h_gbps:.1f}{pct('d2h_gbps')}, "
             f"both {prof.bidir_gbps:.1f}{pct('bidir_gbps')}",
             f"  disk GB/s: read {prof.disk_read_gbps:.2f}{pct('disk_read_gbps')}, write "
             f"{prof.disk_write_gbps:.2f}{pct('disk_write_gbps')}, mixed {prof.disk_mixed_gbps:.2f}"
             f"{pct('disk_mixed_gbps')}",
             f"  CPU update G params/s: {prof.cpu_update_params_per_s / 1e9:.2f}{pct('cpu_update_params_per_s')} "
             f"alone, {prof.cpu_update_params_per_s_under_io / 1e9:.2f}{pct('cpu_update_params_per_s_under_io')} "
             f"under disk traffic",
             "  memory: " + ", ".join(f"{t} {prof.usable_bytes(t) / 2**30:.1f} GiB usable of "
                                      f"{(prof.usable_bytes(t) + prof.reserve_bytes(t)) / 2**30:.1f}"
                                      for t in ("device", "host"))]
    if prof.warnings:
        lines.append(f"  {len(prof.warnings)} warning(s), below")
    return "\n".join(lines)


def probe_and_cache(*, quick: bool = False, directory: str | None = None, rounds: int | None = None,
                    progress=STDERR) -> tuple[HardwareProfile, str]:
    """Probe, then save as :func:`~scheduler.profile.cached_path`: the default profile of later plans."""
    prof = probe(quick=quick, directory=directory, rounds=rounds, progress=progress)
    path = prof.save(cached_path(directory))
    return prof, str(path)
