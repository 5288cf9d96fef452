"""Re-planning during training: the rates a running job measures correct the profile, and a better plan is
adopted at an iteration boundary when the corrected profile says it pays.

After each iteration the runtime hands over its history record (``OffloadRuntime.after_step``: ``{"iteration",
"wall_s", "timeline": Timeline.summary(), "stats"}``) and :class:`Replanner` does three things:

1. **Calibrate** (:func:`estimate`, :func:`calibrate`): per measured iteration, the rate each busy resource ran
   at, in the cost model's terms (cost.py); then the median over the last ``window`` iterations, skipping the
   first ``warmup`` after a plan takes effect (state chunks are created, the plan's moves are on that timeline).
   A rate measured in fewer than half of them is not trusted.

   - ``disk_read_gbps``, ``disk_write_gbps``, ``h2d_gbps``, ``d2h_gbps``: bytes / busy seconds of the resource
     (the union of its spans: overlapping requests count once, as one queue would); h2d and d2h after the cost
     model's sharing stretch (``bidir_gbps``), which the calibrated profile keeps, so that it predicts the measured
     rates for the plan that ran;
   - ``cpu_update_params_per_s``: params updated on the CPU / the seconds the updates themselves took (the
     runtime's ``stats["cpu_update_s"]``; for records without it, the update thread's busy seconds less a model
     of its other work: waits for state reads, the previous unit's new params written, device updates). The rate the plan was priced with (``..._under_io``
     when it streams the disk) takes the measured value and the other is scaled alike. Not measured when the
     other work is most of the span: the difference would be noise;
   - ``compute_efficiency``: the forward and backward spans less the fetch waits (``stats["fetch_wait_s"]``) and
     less what host work took from compute (``cpu_steal`` x each host resource's busy time), against the
     workload's FLOPs. A workload built for a guessed batch or sequence length is calibrated too: the factor
     absorbs its error, and above an efficiency of 1 the rest goes into ``device_tflops``.

   A resource with fewer than ``min_bytes`` or ``min_busy_s`` in an iteration is not measured there.

2. **Detect drift**: a rate that matters to the current plan (its resource, at the measured rate, busy at least
   ``min_share`` of the predicted iteration) differs from the profile by more than ``drift`` for ``patience``
   iterations in a row. ``drift`` must exceed the iteration-to-iteration noise of the rates.

3. **Re-plan** with the profile calibrated in the rates that drifted (one within ``drift`` is noise as far as we
   can tell), with the same capacities and options and the current plan's buffers and overlap. The new plan is
   returned only if it is predicted at least ``min_gain`` faster than the current one on that profile; otherwise
   the calibration is adopted (drift is then measured against it) and the plan stays. After a switch nothing is
   judged for ``cooldown`` iterations (the new plan's warm-up and a window of its own), so a noisy stretch
   cannot flip plans back and forth.

Everything here is a pure function of the records given: the same records give the same decisions.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from scheduler.cost import STEAL_OF, CostModel
from scheduler.planner import OPTIONS, Plan, UnitPlacement
from scheduler.planner import plan as make_plan
from scheduler.profile import HardwareProfile
from scheduler.workload import Workload
from storage import Tier

D, N = Tier.DEVICE, Tier.NVME
LINK_FIELDS = {"h2d_gbps": "h2d", "d2h_gbps": "d2h", "disk_read_gbps": "disk_read", "disk_write_gbps": "disk_write"}
FIELDS = ("compute_efficiency", *LINK_FIELDS, "cpu_update_params_per_s")
"""The rates calibration estimates (profile field names)."""
RESOURCE_OF = {"compute_efficiency": "compute", **LINK_FIELDS, "cpu_update_params_per_s": "cpu_update"}


class Estimate(NamedTuple):
    """One rate: the median measured value, what the profile predicts for the same plan, over how many
    iterations. Units: GB/s for links, params/s for CPU updates, a fraction for compute efficiency."""

    measured: float
    predicted: float
    iterations: int
    ratio: float
    """Median of the measured over the predicted speed: below 1, slower than the profile says. For compute, of the
    predicted over the measured compute seconds (host steal included, so its noise is not amplified by taking
    the steal out)."""


def _check_record(rec) -> None:
    tl = rec.get("timeline") if isinstance(rec, Mapping) else None
    ok = isinstance(tl, Mapping) and isinstance(rec.get("iteration"), int) and isinstance(tl.get("busy_s"), Mapping) \
        and isinstance(tl.get("bytes"), Mapping)
    if not ok:
        raise ValueError(f"replan: expected a history record of OffloadRuntime.after_step ({{'iteration': int, "
                         f"'timeline': Timeline.summary(), 'stats': {{...}}}}), got {rec!r:.200}")


def _update_thread_other_s(cm: CostModel, plan: Plan, r: dict[str, float]) -> float:
    """Seconds of the update thread's ``update`` spans that are not CPU updates, at seconds-per-byte rates ``r``
    (cost.py ``rates``), when the update overlaps backward: each unit's state read and written (nvme state), the
    new params of the unit before it written (nvme params; the last unit's are written after the step, outside
    any span), and a device update's own work (offload/optimizer.py runs it on the same thread: the state to the
    device and back, the update, the new params back when they live off the device)."""
    out = 0.0
    order = cm.update_order(plan)
    for k, i in enumerate(order):
        pl = plan.units[i]
        sb, pb = cm.state_bytes(i, pl), cm.pb[i]
        if pl.state is N:
            out += sb * (r["disk_read"] + r["disk_write"])
        if pl.params is N and k < len(order) - 1:
            out += pb * r["disk_write"]
        if cm.update_weights_from(i, pl, fetches=cm.fetches(i, plan), overlap=True) == "store":  # read in first
            out += pb * r["disk_read"]
        if pl.update == "device":
            out += cm.params[i] * r["device_update"] + (sb * (r["h2d"] + r["d2h"]) if pl.state is not D else 0.0) \
                + (cm.tpb[i] * r["d2h"] if pl.params is not D else 0.0)
    return out


def _per_iteration(prev, rec, cm: CostModel, plan: Plan, pred: dict[str, float], *, min_bytes: int,
                   min_busy_s: float) -> dict[str, tuple[float, float]]:
    """What one iteration measured, field -> (value, ratio) (:class:`Estimate`): effective GB/s per link, CPU
    params/s, and the compute efficiency the profile's peak would need (module note). Only the resources it
    measured enough of."""
    busy, nbytes = rec["timeline"]["busy_s"], rec["timeline"]["bytes"]
    out: dict[str, tuple[float, float]] = {}
    for field, res in LINK_FIELDS.items():
        b, s = nbytes.get(res, 0), busy.get(res, 0.0)
        if b >= min_bytes and s >= min_busy_s:
            out[field] = (b / s / 1e9, b / s / 1e9 / pred[field])
    t = cm.traffic(plan)
    # The update thread's own time: its spans less its other work, at this iteration's link rates where measured.
    cpu_s = busy.get("cpu_update", 0.0)
    own_measured = _counter_delta(prev, rec, "cpu_update_s")
    if t.cpu_update_params and own_measured is not None and own_measured >= min_busy_s:
        # The runtime timed the updates themselves (offload/optimizer.py ``cpu_update_s``): no model of what
        # else the update spans hold is needed.
        out["cpu_update_params_per_s"] = (t.cpu_update_params / own_measured,
                                          t.cpu_update_params / own_measured / pred["cpu_update_params_per_s"])
        cpu_s = own_measured
    elif t.cpu_update_params and cpu_s >= min_busy_s:
        r = dict(cm.rates(t))
        r.update({LINK_FIELDS[f]: 1 / (v * 1e9) for f, (v, _) in out.items()})  # this iteration's, where measured
        other = _update_thread_other_s(cm, plan, r)
        if plan.overlap_update:
            own = max(0.0, cpu_s - other)
        else:  # the step reads ahead and writes behind its updates: the span is theirs when the rest hides
            own = cpu_s if other <= 0.5 * cpu_s else 0.0
        # When other work takes most of the span, the difference is mostly noise: not measured.
        if own >= 0.5 * cpu_s and own >= min_busy_s:
            out["cpu_update_params_per_s"] = (t.cpu_update_params / own,
                                              t.cpu_update_params / own / pred["cpu_update_params_per_s"])
        # What the update thread's own work takes from compute (below): all but its waits for the disk.
        if plan.overlap_update:
            cpu_s = max(0.0, cpu_s - _update_thread_other_s(cm, plan, {**r, "h2d": 0.0, "d2h": 0.0,
                                                                       "device_update": 0.0}))
    # Compute: its spans less fetch waits and less what host work took from it (cost.py, "Shared cores").
    waits = _fetch_wait_s(prev, rec)
    comp = busy.get("compute", 0.0)
    if waits is not None and comp - waits >= min_busy_s:
        pure = comp - waits
        host_busy = {r: (cpu_s if r == "cpu_update" else busy.get(r, 0.0)) for r in STEAL_OF}
        steal = sum(cm.steal[r] * host_busy[r] for r in STEAL_OF)
        fwd_bwd = pure - steal
        if fwd_bwd >= 0.5 * pure:  # else the split between compute and steal is a guess
            model_s = sum(cm.fwd_s) + sum(cm.bwd_s)  # at the profile's efficiency
            out["compute_efficiency"] = (cm.hw.efficiency_at(cm.w.tokens) * model_s / fwd_bwd,
                                         (model_s + steal) / pure)
    return out


def _counter_delta(prev, rec, key: str, missing: float | None = None) -> float | None:
    """The growth of the cumulative runtime counter ``key`` over ``rec``'s iteration; ``None`` when there is no
    record of the iteration before to subtract (and this is not the first). A record without the counter counts
    as ``missing`` (``None``: not measured)."""
    now = (rec.get("stats") or {}).get(key, missing)
    if now is None:
        return None
    if rec["iteration"] == 1:
        return now
    if prev is None or prev["iteration"] != rec["iteration"] - 1:
        return None
    return now - (prev.get("stats") or {}).get(key, missing or 0.0)


def _fetch_wait_s(prev, rec) -> float | None:
    """Seconds compute waited for fetches in ``rec``'s iteration (the counters are cumulative)."""
    return _counter_delta(prev, rec, "fetch_wait_s", missing=0.0)


def _predicted(cm: CostModel, plan: Plan) -> dict[str, float]:
    """The values of :data:`FIELDS` the profile predicts for ``plan``, in the units :func:`_per_iteration` measures."""
    t = cm.traffic(plan)
    r = cm.rates(t)
    out = {f: 1 / (r[res] * 1e9) for f, res in LINK_FIELDS.items()}
    out["cpu_update_params_per_s"] = 1 / r["cpu_update"]
    out["compute_efficiency"] = cm.hw.efficiency_at(cm.w.tokens)
    return out


def estimate(records: Sequence[Mapping], workload: Workload, plan: Plan, profile: HardwareProfile, *,
             warmup: int = 1, min_bytes: int = 1 << 20, min_busy_s: float = 1e-3) -> dict[str, Estimate]:
    """Field -> :class:`Estimate` for each rate of :data:`FIELDS` measured in ``records`` (consecutive history
    records of iterations that ran ``plan``; the first ``warmup`` only serve as the next one's counter baseline)."""
    if warmup < 0:
        raise ValueError(f"estimate: expected warmup >= 0, got {warmup}")
    cm = CostModel(workload, profile)
    cm.check(plan)
    pred = _predicted(cm, plan)
    per: dict[str, list[tuple[float, float]]] = {}
    for k in range(warmup, len(records)):
        rec = records[k]
        _check_record(rec)
        prev = records[k - 1] if k else None
        for f, v in _per_iteration(prev, rec, cm, plan, pred, min_bytes=min_bytes, min_busy_s=min_busy_s).items():
            per.setdefault(f, []).append(v)
    measured = len(records) - warmup
    # A rate measured in fewer than half the iterations passed its threshold by noise: not trusted.
    return {f: Estimate(statistics.median(v for v, _ in per[f]), pred[f], len(per[f]),
                        statistics.median(r for _, r in per[f]))
            for f in FIELDS if 2 * len(per.get(f, ())) >= measured > 0}


def apply(profile: HardwareProfile, estimates: Mapping[str, Estimate], workload: Workload, plan: Plan, *,
          run: str = "run") -> HardwareProfile:
    """``profile`` with the estimated rates, chosen so that the cost model predicts for ``plan`` exactly what was
    measured (module note); each changed number's source says where it came from. Capacities are unchanged."""
    if not estimates:
        return profile
    cm = CostModel(workload, profile)
    t = cm.traffic(plan)
    r = cm.rates(t)
    hw, changes, sources = profile, {}, dict(profile.sources)

    def put(field: str, value, how: str, n: int) -> None:
        changes[field] = value
        was = _fmt(getattr(hw, field))
        sources[field] = f"calibrated from {n} iterations of {run}: {how} (the profile said {was})"

    for field in ("disk_read_gbps", "disk_write_gbps"):
        if field in estimates:
            e = estimates[field]
            put(field, e.measured, "bytes / busy seconds, median", e.iterations)
    if t.disk_read_bytes and t.disk_write_bytes and ({"disk_read_gbps", "disk_write_gbps"} & set(estimates)):
        # Both directions ran, so what was measured are the rates under this plan's mix (cost.py, "one device
        # shared by reads and writes"). Keep the profile's share for this traffic (how much slower the mix is than
        # one at a time, a property of the disk): each direction's rate is the effective one measured (or the
        # profile's, for a direction not measured) times that share, and the mixed rate is what gives the share.
        k = cm.disk_share(t)
        n = max(estimates[f].iterations for f in ("disk_read_gbps", "disk_write_gbps") if f in estimates)
        eff = {f: estimates[f].measured if f in estimates else 1 / (r[LINK_FIELDS[f]] * 1e9)
               for f in ("disk_read_gbps", "disk_write_gbps")}
        rd, wr = eff["disk_read_gbps"] * k * 1e9, eff["disk_write_gbps"] * k * 1e9
        both = min(t.disk_read_bytes, t.disk_write_bytes)
        pair_s = k * (t.disk_read_bytes / rd + t.disk_write_bytes / wr) - (t.disk_read_bytes - both) / rd - \
            (t.disk_write_bytes - both) / wr
        if pair_s > 0:
            for f, v in (("disk_read_gbps", rd), ("disk_write_gbps", wr)):
                put(f, v / 1e9, ("bytes / busy seconds, median" if f in estimates else "the profile's rate as "
                                 "this plan ran it, the other direction being measured") +
                    f", before the profile's mixed-traffic share ({k:.3f})", n)
            put("disk_mixed_gbps", 2 * both / pair_s / 1e9, "what keeps the profile's mixed-traffic share with the "
                "calibrated read and write rates", n)
    if "h2d_gbps" in estimates or "d2h_gbps" in estimates:
        # Keep the sharing stretch the profile applies to this traffic, so the effective rates come out as measured.
        stretch = r["h2d"] * hw.h2d_gbps * 1e9 if t.h2d_bytes and t.d2h_bytes else 1.0
        eff = {f: (estimates[f].measured if f in estimates else 1 / (r[LINK_FIELDS[f]] * 1e9))
               for f in ("h2d_gbps", "d2h_gbps")}
        for f in ("h2d_gbps", "d2h_gbps"):
            if f in estimates:
                put(f, eff[f] * stretch, "bytes / busy seconds, median, before the profile's sharing stretch",
                    estimates[f].iterations)
        if t.h2d_bytes and t.d2h_bytes:
            h2d, d2h = changes.get("h2d_gbps", hw.h2d_gbps), changes.get("d2h_gbps", hw.d2h_gbps)
            alone_s = max(t.h2d_bytes / (h2d * 1e9), t.d2h_bytes / (d2h * 1e9))
            both = (t.h2d_bytes + t.d2h_bytes) / 1e9
            bidir = both / (stretch * alone_s) if stretch > 1 else max(hw.bidir_gbps, both / alone_s)
            if bidir != hw.bidir_gbps:
                n = max(estimates[f].iterations for f in ("h2d_gbps", "d2h_gbps") if f in estimates)
                put("bidir_gbps", bidir, "what keeps the measured h2d and d2h rates when both directions run", n)
    if "cpu_update_params_per_s" in estimates:
        e = estimates["cpu_update_params_per_s"]
        used = "cpu_update_params_per_s_under_io" if t.disk_read_bytes or t.disk_write_bytes else \
            "cpu_update_params_per_s"
        k = e.measured / getattr(hw, used)
        for f in ("cpu_update_params_per_s", "cpu_update_params_per_s_under_io"):
            put(f, getattr(hw, f) * k, "params / update-thread seconds less its other work, median" +
                ("" if f == used else f"; scaled as {used} (the one measured), keeping the profile's ratio"),
                e.iterations)
    if "compute_efficiency" in estimates:
        e = estimates["compute_efficiency"]
        how = "forward + backward spans less fetch waits and host steal, against the workload's FLOPs, median"
        # Measured at this workload's tokens per step; a curve keeps its shape, scaled to pass through it.
        k = e.measured / hw.efficiency_at(workload.tokens)
        put("compute_efficiency", min(1.0, hw.compute_efficiency * k), how + (
            f" ({workload.tokens} tokens per step, the compute_curve scaled alike)" if hw.compute_curve else ""),
            e.iterations)
        if hw.compute_curve:
            put("compute_curve", {t: min(1.0, v * k) for t, v in hw.compute_curve.items()},
                how + f", at {workload.tokens} tokens per step; every point scaled alike", e.iterations)
        if e.measured > 1:  # the workload overstates its FLOPs (e.g. a guessed batch): the peak takes the rest
            put("device_tflops", {k: v * e.measured for k, v in hw.device_tflops.items()},
                how + "; the part above an efficiency of 1", e.iterations)
    name = hw.name if hw.name.endswith("+calibrated") else hw.name + "+calibrated"
    return dataclasses.replace(hw, name=name, sources=sources, **changes)


def _fmt(v) -> str:
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {x:.4g}" for k, x in v.items()) + "}"
    return f"{v:.4g}"


def calibrate(records: Sequence[Mapping], workload: Workload, plan: Plan, profile: HardwareProfile, *,
              run: str = "run", warmup: int = 1, min_bytes: int = 1 << 20,
              min_busy_s: float = 1e-3) -> HardwareProfile:
    """``profile`` with the rates ``records`` measured (:func:`estimate`, then :func:`apply`)."""
    est = estimate(records, workload, plan, profile, warmup=warmup, min_bytes=min_bytes, min_busy_s=min_busy_s)
    return apply(profile, est, workload, plan, run=run)


class Replanner:
    """Watches a run's iterations and returns a better plan when measured rates make one (module note).

    ``observe(record)`` after each iteration, in order; a returned plan must run from the next iteration on (the
    runtime applies it at the iteration boundary). ``log`` lists every decision (JSON-able)."""

    def __init__(self, workload: Workload, profile: HardwareProfile, plan: Plan, *,
                 options: Sequence[UnitPlacement] = OPTIONS, drift: float = 0.2, patience: int = 3,
                 min_gain: float = 0.05, warmup: int = 1, window: int = 5, cooldown: int | None = None,
                 min_share: float = 0.05, depths: Sequence[int] = (1, 2, 3), min_bytes: int = 1 << 20,
                 min_busy_s: float = 1e-3, run: str = "run"):
        checks = [("drift", drift, drift > 0, "> 0"), ("patience", patience, patience >= 1, ">= 1"),
                  ("min_gain", min_gain, 0 <= min_gain < 1, "in [0, 1)"), ("warmup", warmup, warmup >= 0, ">= 0"),
                  ("window", window, window >= 1, ">= 1"), ("min_share", min_share, 0 <= min_share < 1, "in [0, 1)")]
        if cooldown is not None:
            checks.append(("cooldown", cooldown, cooldown >= 0, ">= 0"))
        for name, v, ok, want in checks:
            if not ok:
                raise ValueError(f"Replanner.{name}: expected {want}, got {v!r}")
        if not options:
            raise ValueError("Replanner.options: expected at least one UnitPlacement (planner.OPTIONS: all 15)")
        CostModel(workload, profile).check(plan)
        self.workload, self.profile, self.plan = workload, profile, plan
        self.options = tuple(options)
        self.drift, self.patience, self.min_gain = drift, patience, min_gain
        self.warmup, self.window, self.min_share = warmup, window, min_share
        self.cooldown = warmup + window if cooldown is None else cooldown
        """Iterations of a new plan before it is judged: its warm-up plus a full window of its own."""
        self.depths, self.min_bytes, self.min_busy_s, self.run = tuple(depths), min_bytes, min_busy_s, run
        self.log: list[dict] = []
        self._records: list[Mapping] = []  # the last window + 1 records (the oldest may be the previous plan's)
        self._since_change = 0  # iterations the current plan has run
        self._hold = warmup  # iterations of the current plan before it is judged
        self._streak = {f: 0 for f in FIELDS}
        self._busy: dict[str, float] | None = None  # resource -> busy share of the predicted iteration (current plan)

    def observe(self, record: Mapping) -> Plan | None:
        """Take one iteration's history record; return the plan to run from the next iteration, or ``None``."""
        _check_record(record)
        self._records = (self._records + [record])[-(self.window + 1):]
        self._since_change += 1
        if self._since_change <= self._hold:
            return None
        # The last `window` iterations past the warm-up are measured; the record before them (a warm-up one, or
        # the previous plan's last) only gives the first one's counter baseline.
        measured = min(self.window, self._since_change - self.warmup)
        recs = self._records[-(measured + 1):]
        est = estimate(recs, self.workload, self.plan, self.profile, warmup=len(recs) - measured,
                       min_bytes=self.min_bytes, min_busy_s=self.min_busy_s)
        drifted = self._drifted(est)
        if not any(self._streak[f] >= self.patience for f in drifted):
            return None
        return self._decide(record["iteration"], est, drifted)

    def _drifted(self, est: dict[str, Estimate]) -> list[str]:
        """Update the per-rate streaks; the rates that drifted in this iteration. A rate matters when its resource,
        at the measured rate, would be busy ``min_share`` of the predicted iteration (a disk the profile thinks
        idle matters once it is measured slow)."""
        if self._busy is None:
            p = CostModel(self.workload, self.profile).predict(self.plan)
            self._busy = {r: b / p.iteration_s for r, b in p.busy_s.items()} if p.iteration_s > 0 else {}
        out = []
        for f in FIELDS:
            e = est.get(f)
            matters = e is not None and (f == "compute_efficiency" or
                                         self._busy.get(RESOURCE_OF[f], 0.0) / e.ratio >= self.min_share)
            if matters and abs(e.ratio - 1) > self.drift:
                self._streak[f] += 1
                out.append(f)
            else:
                self._streak[f] = 0
        return out

    def _decide(self, iteration: int, est: dict[str, Estimate], drifted: list[str]) -> Plan | None:
        # Only the rates that drifted: one within ``drift`` of the profile is noise as far as we can tell, and
        # adopting it would let the profile wander with the noise.
        calibrated = apply(self.profile, {f: est[f] for f in drifted}, self.workload, self.plan,
                           run=f"{self.run} (iterations to {iteration})")
        cm = CostModel(self.workload, calibrated)
        old_s = cm.predict(self.plan).iteration_s
        res = make_plan(self.workload, calibrated, options=self.options, depths=self.depths,
                        grad_buffers=self.plan.grad_buffers, state_buffers=self.plan.state_buffers)
        # The runtime decides whether updates overlap backward (clipping and loss scaling forbid it): keep it.
        new = dataclasses.replace(res.plan, strategy="replanned", overlap_update=self.plan.overlap_update)
        fits = res.fits and not cm.shortfall(new)
        new_s = cm.predict(new).iteration_s if fits else None
        gain = 1 - new_s / old_s if fits and old_s > 0 else None
        same = new.units == self.plan.units and new.prefetch_depth == self.plan.prefetch_depth
        switch = fits and not same and gain >= self.min_gain
        why = None if switch else ("no other plan fits" if not fits else "the planner keeps this plan" if same
                                   else f"predicted gain below min_gain ({self.min_gain})")
        entry = {"iteration": iteration, "decision": "replan" if switch else "kept", "why": why,
                 "drifted": {f: round(est[f].ratio, 4) for f in drifted},
                 "rates": {f: {"profile": float(f"{e.predicted:.4g}"), "measured": float(f"{e.measured:.4g}"),
                               "iterations": e.iterations} for f, e in est.items()},
                 "old_s": old_s, "new_s": new_s, "gain": None if gain is None else round(gain, 4),
                 "old_plan": self.plan.compact(), "old_prefetch": self.plan.prefetch_depth,
                 "new_plan": new.compact() if fits else None, "new_prefetch": new.prefetch_depth if fits else None}
        self.log.append(entry)
        self.profile = calibrated  # adopted either way: drift is now measured against it
        self._streak = {f: 0 for f in FIELDS}
        self._busy = None
        if not switch:
            return None
        self.set_plan(new)
        self._hold = max(self.warmup, self.cooldown)
        return new

    def set_plan(self, plan: Plan) -> None:
        """The runtime runs ``plan`` from the next iteration on (ours, or one applied from outside): measure it
        afresh, from its warm-up."""
        CostModel(self.workload, self.profile).check(plan)
        self.plan = plan
        self._records = self._records[-1:]  # the last record before it: the first one's counter baseline
        self._since_change = 0
        self._hold = self.warmup
        self._streak = {f: 0 for f in FIELDS}
        self._busy = None
