"""Predicted vs measured: a few real iterations of a placement through :func:`offload.wrap`, beside what the
cost model predicts for the same placement (the cost model's validation; ``offload plan --measure``,
``benchmarks/plan_validate.py``).

The seam between the scheduler and the runtime is :mod:`offload.plans` (:func:`config_to_plan`,
:func:`plan_to_config`, re-exported here); ``plan=`` on :func:`measure` and :class:`Run` runs any plan as it is. :func:`runnable_plan` picks the fastest uniform
placement with CPU updates (what ``offload plan --measure`` runs).

What is compared, per iteration (medians over the measured ones):

- iteration time: wall time of forward, backward, ``step()`` and ``zero_grad()``;
- per resource, busy time as :meth:`offload.timeline.Timeline.busy_s` defines it (the union of a resource's
  spans), measured from the runtime's timeline and computed the same way from the predicted one. Compute is the
  forward and backward spans (so it includes time spent waiting for fetches, as the runtime records it); when
  the update waits for backward, the runtime does not record the step's updates, so the ``step()`` call is
  recorded as the cpu_update span here;
- bytes per link: h2d and d2h counted by the runtime and its optimizer, disk reads and writes counted by the
  store (``nvme.read``, ``nvme.write``); the cost model's byte accounting must equal them exactly.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from offload.config import OffloadConfig
from offload.optimizer import SLOT_ALIGN
from offload.api import wrap
from offload.plans import check_plan_units, config_to_plan, plan_to_config  # noqa: F401 - plan_to_config re-exported
from offload.runtime import PARAM_ALIGN, runtime_of
from scheduler.cost import LINKS, RESOURCES, CostModel, Prediction
from scheduler.planner import Plan, UnitPlacement
from scheduler.buffers import DEVICE_BUDGET_TERMS
from scheduler.probe import flush_denormals
from scheduler.profile import HardwareProfile, resolve as resolve_profile
from scheduler.workload import TransformerShape, Workload, build_transformer, from_module, precision
from storage import Tier, faults, format_bytes

D, H, N = Tier.DEVICE, Tier.HOST, Tier.NVME
RUNNABLE = tuple(UnitPlacement(p, s, "cpu") for p in (H, N) for s in (H, N))
"""The uniform placements :func:`offload.wrap` runs: params and state each on host or nvme, updated on the CPU."""


def runnable_plan(workload: Workload, profile: HardwareProfile, *, depths=(1, 2, 3), buffers: int = 4,
                  overlap: bool = True) -> tuple[Plan, Prediction]:
    """The fastest plan :func:`offload.wrap` can run (:data:`RUNNABLE`, each prefetch depth) that fits (else the
    fastest of them: none fits), and its prediction."""
    cm = CostModel(workload, profile)
    proto = OffloadConfig(nvme_dirs=".")  # the tiers below need a directory to validate; never opened here
    best = None
    for pl in RUNNABLE:
        for k in depths:
            cfg = dataclasses.replace(proto, param_tier=pl.params, state_tier=pl.state, prefetch=k, buffers=buffers,
                                      overlap_update=overlap)
            plan = config_to_plan(cfg, workload, strategy="runnable")
            key = (bool(cm.shortfall(plan)), cm.predict(plan).iteration_s)
            if best is None or key < best[0]:
                best = (key, plan)
    return best[1], cm.predict(best[1], events=True)


# -- the workload of a real model --------------------------------------------------------------------------------------
def workload_of(shape: TransformerShape, *, batch: int, seq: int, name: str = "model",
                model: torch.nn.Module | None = None) -> Workload:
    """The workload :func:`offload.wrap` runs for our :class:`TransformerLM` of ``shape`` (or ``model``, one of
    them with some params frozen, say) in fp32: no activation checkpointing (the model does not recompute),
    chunks laid out tensor by tensor as the runtime does."""
    assert PARAM_ALIGN == SLOT_ALIGN, "one chunk alignment for params and state (Workload.chunk_align_bytes)"
    return from_module(model if model is not None else build_transformer(shape), batch=batch, seq=seq, name=name,
                       checkpointing=False, chunk_align_bytes=PARAM_ALIGN, **precision("fp32"))


def cpu_seconds() -> tuple[float, float] | None:
    """(seconds the machine's CPUs were busy, seconds this process used) so far; ``None`` where /proc/stat is not
    readable. Their difference over an interval is what other processes took (steal by other VMs included)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), r.ru_utime + r.ru_stime


def foreign_share(before, after, wall_s: float) -> float | None:
    """The share of the machine other processes used between two :func:`cpu_seconds` readings."""
    if before is None or after is None or wall_s <= 0:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / (wall_s * (os.cpu_count() or 1)))


FOREIGN_MAX = 0.05
"""An iteration during which other processes used more than this share of the machine's CPU is disturbed."""
CANARY_SLACK = 1.25
"""... and one just before which a fixed matmul ran this much slower than its best: the machine was slowed from
outside (other VMs on the host show in neither /proc/stat nor the load average)."""


def canary() -> float:
    """Seconds for five 1024 x 1024 fp32 matmuls, after one untimed (caches warm): how fast the CPU is now."""
    a = torch.ones(1024, 1024)
    torch.mm(a, a)
    t0 = time.perf_counter()
    for _ in range(5):
        torch.mm(a, a)
    return time.perf_counter() - t0


class Quiet:
    """Tells disturbed iterations from clean ones on a shared machine: before each, :meth:`before` times the
    canary; after it, :meth:`judge` says why the iteration should be set aside (others used more than
    :data:`FOREIGN_MAX` of the CPU, or the canary ran :data:`CANARY_SLACK` x slower than its best), or ``None``."""

    def __init__(self):
        self.best_s = min(canary() for _ in range(5))
        self.last_s = self.best_s

    def before(self) -> None:
        self.last_s = canary()
        self.best_s = min(self.best_s, self.last_s)

    def judge(self, rec: dict) -> str | None:
        rec["canary_s"] = self.last_s
        if rec.get("foreign_cpu") is not None and rec["foreign_cpu"] > FOREIGN_MAX:
            return f"others used {rec['foreign_cpu']:.0%} of the CPU"
        if self.last_s > CANARY_SLACK * self.best_s:
            return f"the CPU ran {self.last_s / self.best_s:.2f}x slower than its best"
        return None


def _lm_loss(model, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


# -- one placement, run for real ---------------------------------------------------------------------------------------
class Run:
    """A model of ``shape`` wrapped with ``config`` (and ``plan``, placing each unit, when given), trained one
    iteration at a time on random tokens; each :meth:`iteration` returns what it measured. Several runs can be
    alive at once, so that a benchmark can interleave placements (the machine's load then weighs on all alike)."""

    def __init__(self, shape: TransformerShape, config: OffloadConfig, *, batch: int, seq: int, seed: int = 0,
                 plan: Plan | None = None):
        flush_denormals()  # a measurement condition: subnormals slow the CPU by the data, not the placement
        torch.manual_seed(seed)
        model = build_transformer(shape, device="cpu")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self.model, self.opt = wrap(model, opt, config, plan=plan)
        self.rt = runtime_of(self.model)
        self.config = config
        gen = torch.Generator().manual_seed(seed + 1)
        self.data = [torch.randint(0, shape.vocab, (batch, seq + 1), generator=gen) for _ in range(4)]
        self.done = 0

    def counters(self) -> dict[str, int]:
        """Bytes moved so far, per link: h2d and d2h as the runtime and its optimizer count them, the disk as the
        store does (every byte asked of it, counted when asked: a step's last writes land during the next
        forward), and the runtime's and optimizer's own disk counts."""
        rt, opt = self.rt.report(), self.opt.report()
        store = opt.get("store") or {}
        return {"h2d": rt["h2d_bytes"] + opt["h2d_bytes"], "d2h": rt["d2h_bytes"] + opt["d2h_bytes"],
                "disk_read": store.get("nvme.read", {}).get("issued_bytes", 0),
                "disk_write": store.get("nvme.write", {}).get("issued_bytes", 0),
                "disk_read_counted_by_runtime": rt["disk_read_bytes"] + opt["read_bytes"],
                "disk_write_counted_by_runtime": rt["disk_write_bytes"] + opt["write_bytes"]}

    def iteration(self) -> dict:
        before = self.counters()
        idx = self.data[self.done % len(self.data)]
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        _lm_loss(self.model, idx).backward()
        tl = self.rt.timeline  # this iteration's (a new one starts at the next forward)
        step_t0 = tl.now()
        self.opt.step()
        step_t1 = tl.now()
        self.opt.zero_grad()
        wall = time.perf_counter() - t0
        # The share of the machine other processes used meanwhile: a shared machine slows us where the model
        # cannot see it, so a benchmark can set such iterations aside.
        foreign = foreign_share(cpu0, cpu_seconds(), wall)
        if not self.rt.overlap:  # the step's updates are not on the timeline: the step() call is their span
            tl.add("cpu_update", "step", step_t0, step_t1)
        after = self.counters()
        self.done += 1
        return {"iteration_s": wall, "busy_s": tl.busy_s(), "bytes": {k: after[k] - before[k] for k in after},
                "foreign_cpu": foreign}

    def close(self) -> None:
        self.rt.close()


# -- predicted vs measured ---------------------------------------------------------------------------------------------
def predicted_busy(p: Prediction) -> dict[str, float]:
    """Busy time per resource from a predicted timeline, defined as the runtime's Timeline defines it: compute
    is the forward span (from the start, fetches waited for included, to the head's forward) plus the backward
    span (the head's backward to the last block's); the others, the union of their operations (one at a time:
    the sum of their durations)."""
    busy = {r: v for r, v in p.busy_s.items()}
    fwd = [e for e in p.events if e.resource == "compute" and e.name.startswith("forward")]
    bwd = [e for e in p.events if e.resource == "compute" and e.name.startswith("backward")]
    if fwd and bwd:  # the runtime's forward span starts before it waits for the first fetches: at 0
        busy["compute"] = max(e.end_s for e in fwd) + (max(e.end_s for e in bwd) - min(e.start_s for e in bwd))
    return busy


def predicted_dict(p: Prediction) -> dict:
    """The prediction in the form ``offload.report.RunReport(predicted=...)`` takes."""
    t = p.traffic
    return {"iteration_s": p.iteration_s, "busy_s": predicted_busy(p),
            "bytes": {"h2d": t.h2d_bytes, "d2h": t.d2h_bytes, "disk_read": t.disk_read_bytes,
                      "disk_write": t.disk_write_bytes}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Comparison:
    """One placement: the cost model's prediction and the medians of the measured iterations."""

    name: str
    placement: str
    predicted_s: float
    measured_s: float
    iterations_s: tuple[float, ...]
    busy_predicted_s: dict
    busy_measured_s: dict
    bytes_predicted: dict
    bytes_counted: dict
    steal_s: float
    set_aside: int = 0
    """Measured iterations left out because the machine disturbed them (:class:`Quiet`)."""
    disturbed: bool = False
    """Every measured iteration was disturbed (they all count, and the figures say more about the machine)."""

    @property
    def ratio(self) -> float:
        """Predicted over measured iteration time."""
        return self.predicted_s / self.measured_s

    @property
    def bytes_equal(self) -> bool:
        return all(self.bytes_predicted[k] == self.bytes_counted[k] for k in LINKS)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ratio": self.ratio, "bytes_equal": self.bytes_equal}

    def text(self) -> str:
        out = [f"{self.name}: {self.placement}",
               f"  {'':12s} {'predicted':>10s} {'measured':>10s} {'ratio':>6s}",
               f"  {'iteration':12s} {self.predicted_s:9.3f}s {self.measured_s:9.3f}s {self.ratio:6.2f}"
               + (f"   ({self.set_aside} disturbed iteration{'s' if self.set_aside != 1 else ''} set aside)"
                  if self.set_aside else "")
               + ("   (every iteration was disturbed by other work on the machine: not a fair measurement)"
                  if self.disturbed else "")]
        for r in RESOURCES:
            p, m = self.busy_predicted_s[r], self.busy_measured_s[r]
            out.append(f"  {r:12s} {p:9.3f}s {m:9.3f}s {p / m if m > 0 else float('nan'):6.2f}"
                       + (f"   (incl. {self.steal_s:.3f}s taken by host work)" if r == "compute" and self.steal_s
                          else ""))
        out.append(f"  {'bytes':12s} {'predicted':>12s} {'counted':>12s}")
        for k in LINKS:
            p, c = self.bytes_predicted[k], self.bytes_counted[k]
            out.append(f"  {k:12s} {format_bytes(p):>12s} {format_bytes(c):>12s}   {'equal' if p == c else 'DIFFER'}")
        return "\n".join(out)


def compare(name: str, plan: Plan, prediction: Prediction, records: list[dict]) -> Comparison:
    """Medians of measured ``records`` (from :meth:`Run.iteration`) against ``prediction``. Bytes must not vary
    from iteration to iteration: the counted bytes are those of the last one, and every one is checked equal."""
    med = statistics.median
    counted = records[-1]["bytes"]
    for r in records:
        if any(r["bytes"][k] != counted[k] for k in LINKS):
            raise AssertionError(f"{name}: bytes per link changed between iterations: {[r['bytes'] for r in records]}")
    return Comparison(name=name, placement=plan.compact() + f", prefetch {plan.prefetch_depth}, buffers "
                                                            f"{plan.state_buffers}, overlap "
                                                            f"{'on' if plan.overlap_update else 'off'}",
                      predicted_s=prediction.iteration_s, measured_s=med(r["iteration_s"] for r in records),
                      iterations_s=tuple(r["iteration_s"] for r in records),
                      busy_predicted_s=predicted_busy(prediction),
                      busy_measured_s={k: med(r["busy_s"][k] for r in records) for k in RESOURCES},
                      bytes_predicted=predicted_dict(prediction)["bytes"], bytes_counted=dict(counted),
                      steal_s=prediction.steal_s)


def measure(shape: TransformerShape, config: OffloadConfig, profile: HardwareProfile, *, batch: int, seq: int,
            iters: int = 3, warmup: int = 1, name: str = "model", plan: Plan | None = None,
            progress: Callable[[str], None] | None = None, quiet: bool = True,
            prepare: Callable[["Run"], None] | None = None) -> Comparison:
    """Run ``config`` (or ``plan``, unit by unit, with ``config`` for the rest: ``nvme_dirs``, budgets) for
    ``warmup + iters`` iterations of a model of ``shape`` and compare the measured ones with the cost model's
    prediction for the same placement on ``profile``.

    With ``quiet`` (the default), an iteration the machine disturbed (:class:`Quiet`) is set aside and another
    one run, up to ``4 x iters`` in all; if fewer than ``iters`` were clean, the clean ones count (all of them
    when none was), and :attr:`Comparison.set_aside` says how many were set aside. ``prepare``: called with the
    run before its first iteration (to pin the optimizer's speculation policy, say)."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"measure: expected iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    w = workload_of(shape, batch=batch, seq=seq, name=name)
    if plan is None:
        plan, run_plan = config_to_plan(config, w), None
    else:
        check_plan_units(plan, w)
        run_plan = plan
    pred = CostModel(w, profile).predict(plan, events=True)
    run = Run(shape, config, batch=batch, seq=seq, plan=run_plan)
    if prepare is not None:
        prepare(run)
    q = Quiet() if quiet else None
    try:
        every, clean = [], []
        for i in range(warmup):
            rec = run.iteration()
            if progress is not None:
                progress(f"  warm-up {i + 1}: {rec['iteration_s']:.2f} s")
        while len(clean) < iters and len(every) < (4 * iters if quiet else iters):
            if q is not None:
                q.before()
            rec = run.iteration()
            why = q.judge(rec) if q is not None else None
            every.append(rec)
            if why is None:
                clean.append(rec)
            if progress is not None:
                progress(f"  iteration {len(every)}: {rec['iteration_s']:.2f} s" + (f" (set aside: {why})" if why
                                                                                      else ""))
    finally:
        run.close()
    used = clean or every
    return dataclasses.replace(compare(name, plan, pred, used), set_aside=len(every) - len(used),
                               disturbed=bool(every) and not clean and quiet)


def temp_store_dir(base: str | None = None) -> str:
    """A fresh directory for a run's NVMe store (under ``base``, else the temp dir)."""
    if base is not None:
        Path(base).mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix="offload-measure-", dir=base)


# -- memory: predicted peaks per tier against the runtime's --------------------------------------------------------------
MEMORY_PLANS = (  # name, OffloadConfig fields, frozen blocks
    ("all host", dict(param_tier="host", state_tier="host"), ()),
    ("all host, clip", dict(param_tier="host", state_tier="host", max_grad_norm=1e9), ()),
    ("params host, state nvme", dict(param_tier="host", state_tier="nvme"), ()),
    ("params nvme, state nvme, grads host", dict(param_tier="nvme", state_tier="nvme"), ()),
    ("grads nvme", dict(param_tier="nvme", state_tier="nvme", grad_tier="nvme"), ()),
    ("grads nvme, clip", dict(param_tier="nvme", state_tier="nvme", grad_tier="nvme", max_grad_norm=1e9), ()),
    ("frozen blocks, state nvme", dict(param_tier="host", state_tier="nvme"), (0, 1)),
    ("frozen blocks, all host, clip", dict(param_tier="host", state_tier="host", max_grad_norm=1e9), (1,)),
)
"""The placements :func:`measure_memory` is checked on (tests/test_memory_truth.py, benchmarks/memory_validate.py):
grads on host and NVMe, clipping on and off, frozen blocks. ``max_grad_norm=1e9``: clipping on, but never
clipping (a clipped step is undone and redone: not a peak the prediction prices)."""

MEASURED_BY = {"device": "the device budget's peak (TierBudget.peak_bytes)",
               "host": "the host pool's peak in use, less the copies kept where it had room to save a transfer "
                       "(HostPool.stats()['peak_needed_bytes']; those apart: ``cached``)",
               "nvme": "the store's peak extents in use (NvmeStore.peak_used_bytes)"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryComparison:
    """One placement: the cost model's peak per tier and term, and the runtime's measured peaks over a run."""

    name: str
    placement: str
    predicted_terms: dict
    """Tier -> term -> bytes (CostModel.memory_terms); the device's grads and activations are outside its budget."""
    measured: dict
    """Tier -> the run's peak bytes (:data:`MEASURED_BY`)."""
    cached: int = 0
    """The host pool's peak of copies kept where it had room (an update's NVMe weights from its backward fetch or
    the device): not needed, not predicted, not in ``measured``."""

    def predicted(self, tier: str) -> int:
        """The prediction of what the runtime measures on ``tier`` (the device: the terms its budget counts)."""
        terms = self.predicted_terms[tier]
        keep = DEVICE_BUDGET_TERMS if tier == "device" else terms
        return sum(v for k, v in terms.items() if k in keep)

    def ratio(self, tier: str) -> float:
        m = self.measured[tier]
        return self.predicted(tier) / m if m else (1.0 if not self.predicted(tier) else float("inf"))

    def to_dict(self) -> dict:
        tiers = ("device", "host", "nvme")
        return {"name": self.name, "placement": self.placement, "predicted_terms": self.predicted_terms,
                "predicted": {t: self.predicted(t) for t in tiers}, "measured": dict(self.measured),
                "cached_host_bytes": self.cached,
                "ratio": {t: self.ratio(t) for t in tiers}}

    def text(self) -> str:
        out = [f"{self.name}: {self.placement}",
               f"  {'tier':6s} {'predicted':>12s} {'measured':>12s} {'ratio':>6s}  terms (predicted)"]
        for t in ("device", "host", "nvme"):
            terms = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.predicted_terms[t].items() if v)
            out.append(f"  {t:6s} {format_bytes(self.predicted(t)):>12s} {format_bytes(self.measured[t]):>12s} "
                       f"{self.ratio(t):6.3f}  {terms}")
        if self.cached:
            out.append(f"  host copies kept for updates where the pool had room (apart): up to {format_bytes(self.cached)}")
        return "\n".join(out)


def measure_memory(shape: TransformerShape, config: OffloadConfig, *, batch: int, seq: int, iters: int = 3,
                   frozen: tuple[int, ...] = (), name: str = "model", slow_writes_s: float = 0.05) -> MemoryComparison:
    """Train a model of ``shape`` (blocks ``frozen`` with ``requires_grad=False``) under ``config`` for ``iters``
    steps and compare each tier's peak over the run (the first step included: it makes the optimizer state and
    speculates) with the cost model's prediction for the same placement. ``max_grad_norm`` is best set high
    enough never to clip: a step that clips is undone and redone, which the prediction does not price.

    Every store write lands ``slow_writes_s`` late (:mod:`storage.faults`): the pipeline holds a buffer per write
    in flight beside the ones it goes on with, and a small model's writes would land at once, before the next
    buffer is taken; on a real disk a write takes as long as the work beside it, and the peak the prediction
    prices is reached. 50 ms stays longer than that work on a loaded machine too (10 ms did not: a loaded suite
    measured 15% under the prediction)."""
    torch.manual_seed(0)
    model = build_transformer(shape, device="cpu")
    for i in frozen:
        for p in model.blocks[i].parameters():
            p.requires_grad_(False)
    w = workload_of(shape, batch=batch, seq=seq, name=name, model=model)
    plan = config_to_plan(config, w)
    terms = CostModel(w, resolve_profile("cpu-dev-2core")).memory_terms(plan)  # no rate enters the memory count
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, opt = wrap(model, opt, config)
    rt = runtime_of(model)
    slow = (lambda site, key: slow_writes_s if site == "store.write_done" else None)  # noqa: E731
    try:
        gen = torch.Generator().manual_seed(1)
        with faults.inject_delays(seed=None, rule=slow):
            for _ in range(iters):
                _lm_loss(model, torch.randint(0, shape.vocab, (batch, seq + 1), generator=gen)).backward()
                opt.step()
                opt.zero_grad()
            rt.settle_step_io()
        store = rt.swap.store if rt.swap.store_open else None
        pool = rt.pool.stats()
        measured = {"device": rt.device_budget.peak_bytes, "host": pool["peak_needed_bytes"],
                    "nvme": store.peak_used_bytes if store is not None else 0}
        cached = pool["peak_cached_bytes"]
    finally:
        rt.close()
    return MemoryComparison(name=name, placement=plan.compact() + f", prefetch {plan.prefetch_depth}, buffers "
                            f"{plan.state_buffers}, grads {config.grad_tier.value}, clip "
                            f"{'on' if plan.clip else 'off'}" + (f", frozen blocks {list(frozen)}" if frozen else ""),
                            predicted_terms=terms, measured=measured, cached=cached)
