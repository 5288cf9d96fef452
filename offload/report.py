"""Run reports: a progress line while training, then what happened: the loss curve, time per step, each
resource's busy time (against the plan's prediction when there is one), bytes moved per link, bytes held per
tier, the overlap efficiency, and each plan switched to during the run (re-plans: when, why, what it moved); as
text for a person, JSON for tools, and the last iteration as a Chrome trace.

    report = RunReport(model, opt, total_steps=200)
    for x, y in data:
        loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
        report.step(loss.item(), tokens=x.numel())
    print(report.text()); report.save("runs/last")

``offload run`` sets ``OFFLOAD_REPORT_DIR``; then a process that wrapped a model writes its report there when it
exits, from the runtime's own per-iteration history (with losses, if the script made a RunReport). Under several
ranks each rank writes ``report.rank<N>.json`` and the launcher sums them into one report
(:func:`merge_rank_reports`).

While the run goes, each step is also one JSON line in ``metrics.jsonl`` in that directory (:class:`MetricsLog`;
``RunReport(metrics_dir=...)`` outside the launcher), and TensorBoard scalars when tensorboard is installed.
"""

from __future__ import annotations

import atexit
import itertools
import json
import math
import os
import statistics
import sys
import time
import weakref
from pathlib import Path

from storage import format_bytes

REPORT_DIR_ENV = "OFFLOAD_REPORT_DIR"
_LINKS = ("h2d", "d2h", "disk_read", "disk_write")
_TIERS = ("device", "host", "nvme")
_current: "weakref.ref[RunReport] | None" = None


def sparkline(values: list[float], width: int = 60) -> str:
    """``[3, 2, 1]`` -> ``'█▄▁'``: the shape of a curve in one line (values resampled to ``width``)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return ""
    if len(vals) > width:  # mean over equal slices: noise averages out, the trend stays
        step = len(vals) / width
        vals = [statistics.fmean(vals[int(i * step):max(int((i + 1) * step), int(i * step) + 1)]) for i in range(width)]
    lo, hi = min(vals), max(vals)
    bars = "▁▂▃▄▅▆▇█"
    if hi == lo:
        return bars[3] * len(vals)
    return "".join(bars[min(int((v - lo) / (hi - lo) * len(bars)), len(bars) - 1)] for v in vals)


def _duration(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def runtime_of(model=None, optimizer=None):
    """The :class:`~offload.runtime.OffloadRuntime` behind a wrapped model or its optimizer, or ``None``."""
    rt = getattr(model, "_offload_runtime", None) if model is not None else None
    return rt if rt is not None else getattr(optimizer, "runtime", None)


def held_bytes(rt, opt) -> dict[str, int]:
    """Bytes each tier holds now, for a runtime (``None`` for an optimizer alone) and its optimizer: the device
    budget in use, the host pool handed out, the store's chunks."""
    out = dict.fromkeys(_TIERS, 0)
    if rt is not None:
        out["device"] = rt.device_budget.used_bytes
    pool = getattr(rt, "pool", None) or getattr(opt, "host_pool", None)
    if pool is not None:
        out["host"] = pool.stats()["in_use_bytes"]
    store = getattr(opt, "store", None)
    if store is not None:
        try:
            out["nvme"] = sum(store.info(k).nbytes for k in store.keys())
        except Exception:  # a closed store: nothing held
            pass
    return out


def moved_bytes_by_what(rt, opt) -> dict[str, dict[str, int]]:
    """Bytes moved so far per link, ``{"params+grads": {...}, "optimizer state": {...}}`` (each only where it
    applies): the counters of the runtime and of the optimizer (offload/swap.py counts each byte once)."""
    by_what: dict[str, dict[str, int]] = {}
    if rt is not None:
        s = rt.stats
        by_what["params+grads"] = {"h2d": s["h2d_bytes"], "d2h": s["d2h_bytes"],
                                   "disk_read": s["disk_read_bytes"], "disk_write": s["disk_write_bytes"]}
    if opt is not None and "h2d_bytes" in getattr(opt, "stats", {}):
        s = opt.stats
        by_what["optimizer state"] = {"h2d": s["h2d_bytes"], "d2h": s["d2h_bytes"], "disk_read": s["read_bytes"],
                                      "disk_write": s["write_bytes"]}
    return by_what


def moved_bytes(rt, opt) -> dict[str, int]:
    """Bytes moved so far per link, everything together."""
    by_what = moved_bytes_by_what(rt, opt)
    return {k: sum(d[k] for d in by_what.values()) for k in _LINKS}


class RunReport:
    """Records a training run step by step (see the module docstring) and reports on it.

    ``total_steps`` counts the whole run; a run resumed from a checkpoint passes the step it resumed at as
    ``start_step``, so that its first step shows as ``start_step + 1`` of ``total_steps``. ``metrics_dir``: where
    ``metrics.jsonl`` goes (one JSON line per step, :class:`MetricsLog`); by default the launcher's report
    directory (``OFFLOAD_REPORT_DIR``), else none."""

    def __init__(self, model=None, optimizer=None, *, total_steps: int | None = None, name: str = "run",
                 progress: bool = True, stream=None, predicted: dict | None = None, min_interval_s: float = 0.5,
                 start_step: int = 0, metrics_dir: str | os.PathLike | None = None):
        if start_step < 0:
            raise ValueError(f"RunReport: expected start_step >= 0 (the step a resumed run starts after), got "
                             f"{start_step}")
        if total_steps is not None and start_step > total_steps:
            raise ValueError(f"RunReport: start_step {start_step} is past total_steps {total_steps}; total_steps "
                             f"counts the whole run, the steps before the resume included")
        self.model, self.optimizer, self.name = model, optimizer, name
        self.total_steps = total_steps
        self.start_step = start_step
        """Steps done before this process started (a resumed run's checkpoint step): step numbers count on from it."""
        self.predicted = predicted
        """The plan's prediction for one iteration: ``{"iteration_s": s, "busy_s": {resource: s}, "bytes": {link:
        bytes}}`` (see :mod:`offload.measure`), shown beside the measured figures."""
        self.stream = stream if stream is not None else sys.stderr
        self.progress = progress
        self.min_interval_s = min_interval_s
        self.losses: list[float | None] = []
        self.tokens: list[int] = []
        self.step_s: list[float] = []
        self._t_start = self._t_last = time.perf_counter()
        self._last_draw = 0.0
        self._drawn = False
        rt = runtime_of(model, optimizer)
        self._first_iteration = rt.iterations if rt is not None else 0
        directory = metrics_dir if metrics_dir is not None else os.environ.get(REPORT_DIR_ENV)
        self.metrics_dir = Path(directory) if directory else None
        """The directory of ``metrics.jsonl`` (opened at the first step), or ``None``."""
        self._metrics: MetricsLog | None = None
        self._moved_before = moved_bytes(rt, optimizer if rt is None else rt.optimizer)
        global _current
        _current = weakref.ref(self)
        if os.environ.get(REPORT_DIR_ENV) and _at_exit:
            _at_exit["report"] = self

    @property
    def runtime(self):
        return runtime_of(self.model, self.optimizer)

    @property
    def metrics_file(self) -> Path | None:
        """The ``metrics.jsonl`` this report writes, once the first step has written to it."""
        return self._metrics.path if self._metrics is not None else None

    @property
    def step_number(self) -> int:
        """The number of the last step recorded, counted over the whole run (``start_step`` + steps recorded)."""
        return self.start_step + len(self.losses)

    # -- recording ----------------------------------------------------------------------------------------------
    def step(self, loss: float | None = None, tokens: int = 0) -> None:
        """Call once per optimizer step, after it: the step's loss (a float) and the tokens it trained on."""
        now = time.perf_counter()
        self.step_s.append(now - self._t_last)
        self._t_last = now
        self.losses.append(None if loss is None else float(loss))
        self.tokens.append(int(tokens))
        held = None
        if self.metrics_dir is not None:
            if self._metrics is None:
                self._metrics = MetricsLog.open(self.metrics_dir, start_step=self.start_step)
            rt = self.runtime
            moved = moved_bytes(rt, rt.optimizer if rt is not None else self.optimizer)
            step_s, held = self.step_s[-1], self.held_bytes()
            self._metrics.write({"step": self.step_number, "loss": self.losses[-1], "tokens": self.tokens[-1],
                                "tokens_per_s": self.tokens[-1] / step_s if step_s > 0 else None, "step_s": step_s,
                                "bytes_moved": {k: moved[k] - self._moved_before[k] for k in _LINKS},
                                "held_bytes": held})
            self._moved_before = moved
        if self.progress:
            last = self.total_steps is not None and self.step_number >= self.total_steps
            if now - self._last_draw >= self.min_interval_s or last or len(self.losses) == 1:
                self._draw(now, held)

    def held_bytes(self) -> dict[str, int]:
        """Bytes each tier holds now: the device budget in use, the host pool handed out, the store's chunks."""
        rt = self.runtime
        return held_bytes(rt, rt.optimizer if rt is not None else self.optimizer)

    def _draw(self, now: float, held: dict[str, int] | None = None) -> None:
        self._last_draw = now
        n = self.step_number
        elapsed = now - self._t_start
        recent = self.step_s[-20:]
        tok_s = sum(self.tokens[-20:]) / max(sum(recent), 1e-9)
        parts = [f"step {n}/{self.total_steps}" if self.total_steps else f"step {n}"]
        if self.losses[-1] is not None:
            parts.append(f"loss {self.losses[-1]:.4f}")
        if tok_s:
            parts.append(f"{tok_s:,.0f} tok/s")
        held = held if held is not None else self.held_bytes()
        parts.append(", ".join(f"{t} {format_bytes(b)}" for t, b in held.items() if b or t == "device"))
        if self.total_steps:
            left = (self.total_steps - n) * statistics.median(recent)
            parts.append(f"{_duration(elapsed)} elapsed, {_duration(left)} left")
        line = " | ".join(parts)
        if self.stream.isatty():
            self.stream.write("\r\x1b[2K" + line + ("\n" if n == self.total_steps else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    # -- the report ---------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Everything the report says, JSON-ready."""
        rt = self.runtime
        opt = rt.optimizer if rt is not None else self.optimizer
        steps = len(self.step_s)
        # The first step creates state and touches memory for the first time: keep it out of the medians.
        steady = self.step_s[1:] or self.step_s
        out: dict = {"name": self.name, "steps": steps, "start_step": self.start_step,
                     "total_steps": self.total_steps, "wall_s": round(time.perf_counter() - self._t_start, 3),
                     "step_s_median": statistics.median(steady) if steady else None,
                     "tokens": sum(self.tokens),
                     "tokens_per_s": sum(self.tokens[1:]) / sum(steady) if steady and sum(steady) else None,
                     "losses": self.losses}
        known = [x for x in self.losses if x is not None]
        if known:
            k = max(1, len(known) // 10)  # first and last tenth: a fall that noise cannot fake
            out["loss_first"], out["loss_last"] = statistics.fmean(known[:k]), statistics.fmean(known[-k:])
        hist = [h for h in rt.history if h["iteration"] > self._first_iteration + 1] if rt is not None else []
        hist = hist or (list(rt.history) if rt is not None else [])
        switched = [h["iteration"] for h in hist if "replan" in h]
        if switched:
            # Medians of the plan the run ended with: the iterations after the last switch (the switch's own
            # iteration also carries the move), or that one alone when nothing ran after it.
            hist = [h for h in hist if h["iteration"] > switched[-1]] or [h for h in hist if h["iteration"] ==
                                                                           switched[-1]]
            out["medians_since_iteration"] = hist[0]["iteration"]
        if hist:
            out["median_iterations"] = len(hist)
            resources = hist[-1]["timeline"]["busy_s"].keys()
            out["busy_s_median"] = {r: statistics.median(h["timeline"]["busy_s"][r] for h in hist) for r in resources}
            out["iteration_s_median"] = statistics.median(h["wall_s"] for h in hist)
            top = max(out["busy_s_median"].values())
            out["bottleneck"] = max(out["busy_s_median"], key=out["busy_s_median"].get)
            out["overlap_efficiency"] = out["iteration_s_median"] / top if top > 0 else None
        by_what = moved_bytes_by_what(rt, opt)
        if not self.step_s and rt is not None:  # made at exit (offload run): the runtime's own record of the steps
            out["steps"] = rt.iterations
            out["step_s_median"] = out.get("iteration_s_median")
        elif not self.step_s and hasattr(opt, "stats"):  # an optimizer alone (a rank's shard): its step count
            out["steps"] = opt.stats["steps"]
        out["bytes_moved"] = {k: sum(d[k] for d in by_what.values()) for k in _LINKS}
        out["bytes_moved_by_what"] = by_what
        out["held_bytes"] = self.held_bytes()
        if rt is not None:
            out["device_peak_bytes"] = rt.device_budget.peak_bytes
            out["device_budget_bytes"] = rt.device_budget.capacity_bytes
            same = _uniform(rt)
            out["placement"] = {"params": same["params"] if same else "mixed",
                                "grads": same["grads"] if same else "mixed",
                                "state": (same["state"] or rt.config.state_tier.value) if same else "mixed",
                                "overlap_update": rt.overlap, "units": len(rt.units)}
            if not same:
                out["placement"]["per_unit"] = [{"units": names, **pl} for names, pl in placement_groups(rt)]
            out.update(replans_of(rt))
        pool = getattr(rt, "pool", None) or getattr(opt, "host_pool", None)
        if pool is not None:
            out["host_pool"] = pool.stats()
        if opt is not None and hasattr(opt, "report"):
            r = opt.report()
            out["optimizer"] = {"class": r["optimizer"], "impl": r["impl"], "subgroups": len(r["subgroups"]),
                                "state_bytes_by_tier": r["state_bytes_by_tier"]}
            if r.get("speculative_steps") or r.get("spec_declined") or r.get("spec_waited_timing"):
                out["speculation"] = {"speculative_steps": r["speculative_steps"], "commits": r["spec_commits"],
                                      "rollbacks": r["spec_rollbacks"], "overflows": r["spec_overflows"],
                                      "declined": r["spec_declined"], "waited_timing": r["spec_waited_timing"],
                                      "stopped_for_memory": r["spec_stopped"], "rollback_s": r["rollback_s"],
                                      **opt.speculation.medians()}
        if self.predicted:
            out["predicted"] = self.predicted
        return out

    def text(self) -> str:
        return summary_text(self.summary())

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write ``report.json``, ``report.txt`` and ``trace.json`` (the last iteration, Chrome trace format, when
        there is a wrapped model); returns the paths written."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = [d / "report.json", d / "report.txt"]
        summary = self.summary()
        with open(paths[0], "w") as f:
            json.dump(summary, f, indent=1, default=str)
        paths[1].write_text(summary_text(summary) + "\n")
        trace = self.save_trace(d)
        return paths + ([trace] if trace else [])

    def save_trace(self, directory: str | os.PathLike) -> Path | None:
        """Write ``trace.json``, the last iteration in Chrome trace format, if there is one; returns its path."""
        rt = self.runtime
        if rt is not None:
            rt.settle_step_io()  # the last step's writes are on its timeline once they have landed
        tl = None if rt is None else rt.timeline if rt.timeline.events else rt.last_timeline
        if tl is None or not tl.events:
            return None
        path = Path(directory) / "trace.json"
        tl.save_chrome_trace(str(path))
        return path

    def save_rank(self, directory: str | os.PathLike, rank: int) -> list[Path]:
        """One rank of several: its summary as ``report.rank<N>.json``, for :func:`merge_rank_reports` to sum once
        every rank has exited, and rank 0's ``trace.json``; returns the paths written."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = rank_report_path(d, rank)
        path.write_text(json.dumps({**self.summary(), "rank": rank}, indent=1, default=str))
        trace = self.save_trace(d) if rank == 0 else None
        return [path] + ([trace] if trace else [])


def summary_text(s: dict) -> str:
    """The report for a person, from :meth:`RunReport.summary` (or :func:`merge_rank_reports`' sum of ranks)."""
    took = f" in {_duration(s['wall_s'])}" if s["losses"] else ""  # made at exit: no clock of its own
    ranks = f", {s['ranks']} ranks" if s.get("ranks") else ""
    first = s.get("start_step") or 0
    resumed = f" ({first + 1}-{first + s['steps']} of {s.get('total_steps') or '?'}, resumed at step {first})" \
        if first else ""
    lines = [f"== {s['name']}: {s['steps']} steps{resumed}{ranks}{took} =="]
    if "loss_first" in s:
        known = [x for x in s["losses"] if x is not None]
        lines.append(f"loss {s['loss_first']:.4f} -> {s['loss_last']:.4f}  "
                     f"(min {min(known):.4f})  {sparkline(known)}")
    if s["step_s_median"] is not None:
        tok = f", {s['tokens_per_s']:,.0f} tokens/s" if s["tokens_per_s"] else ""
        lines.append(f"step time {s['step_s_median'] * 1e3:.0f} ms (median){tok}")
    if "placement" in s:
        p = s["placement"]
        when = f"update {'overlapped with backward' if p['overlap_update'] else 'after backward'}"
        at_end = " at the end" if s.get("replans") else ""
        if "per_unit" in p:
            lines.append(f"placement{at_end} per unit ({p['units']} units; {when}):")
            lines += [f"  {g['units']}: {_placement_words(g)}" for g in p["per_unit"]]
        else:
            lines.append(f"placement{at_end}: params on {p['params']}, grads on {p['grads']}, optimizer state on "
                         f"{p['state']}; {p['units']} units; {when}")
    lines += _replans_text(s)
    if "optimizer" in s:
        o = s["optimizer"]
        tiers = ", ".join(f"{format_bytes(b)} on {t}" for t, b in o["state_bytes_by_tier"].items())
        lines.append(f"optimizer: {o['class']} ({o['impl']}), {o['subgroups']} subgroups, state {tiers}")
    if "speculation" in s:
        sp = s["speculation"]
        lines.append(f"speculative update (clipping/loss scaling during backward): {sp['speculative_steps']} steps "
                     f"speculated, {sp['commits']} committed, {sp['rollbacks']} rolled back and redone "
                     f"({sp['rollback_s']:.2f} s), {sp['overflows']} overflowed; {sp['declined']} steps waited for "
                     f"backward (recent steps clipped)"
                     + (f", {sp['waited_timing']} by the timing rule (a waiting step timed, or waiting was the faster)"
                        if sp.get("waited_timing") else "")
                     + (f"; {sp['stopped_for_memory']} stopped for lack of host memory for pre-update copies"
                        if sp["stopped_for_memory"] else "")
                     + (f"; median step (last backward to step end) {sp['speculative_s']:.2f} s speculative, "
                        f"{sp['waiting_s']:.2f} s waiting" if sp.get("speculative_s") and sp.get("waiting_s") else ""))
    if "busy_s_median" in s:
        pred = (s.get("predicted") or {}).get("busy_s", {})
        prof = (s.get("predicted") or {}).get("profile")
        head, pred_iter, source = "per iteration (median)", (s.get("predicted") or {}).get("iteration_s"), \
            f"cost model, profile {prof}"
        if "medians_since_iteration" in s:
            # The prediction made at the start was for the first plan: compare with the last re-plan's own.
            pred, pred_iter, source = {}, s["replans"][-1]["predicted_new_s"], "re-planner, for this plan"
            head = (f"per iteration (median of {s['median_iterations']} from iteration "
                    f"{s['medians_since_iteration']}, the plan at the end)")
            lines.append(head)
            head = " " * len("per iteration (median)")
        lines.append(f"{head}      measured" + (f"    predicted ({source})" if pred or pred_iter else ""))
        rows = [("iteration", s["iteration_s_median"], pred_iter)]
        rows += [(r, v, pred.get(r)) for r, v in s["busy_s_median"].items() if v > 0 or pred.get(r)]
        for name, v, p in rows:
            extra = f"   {_ms(p):>8} ms  (measured {v / p:.2f}x of it)" if p else ""
            lines.append(f"  {name:<24} {_ms(v):>8} ms{extra}")
        eff = s.get("overlap_efficiency")
        if eff:
            lines.append(f"overlap efficiency {eff:.2f} (iteration / busiest resource, {s['bottleneck']}; "
                         f"1.00 = the bottleneck never waited)")
    together = f" ({s['ranks']} ranks together)" if s.get("ranks") else ""
    lines.append(f"bytes moved{together}: " + _links_text(s["bytes_moved"], every=True))
    for what, d in s["bytes_moved_by_what"].items():
        if any(d.values()):
            lines.append(f"  {what}: " + _links_text(d))
    held = s["held_bytes"]
    peak = f" (device peak {format_bytes(s['device_peak_bytes'])} of a {format_bytes(s['device_budget_bytes'])} " \
           f"budget)" if "device_peak_bytes" in s and s["device_budget_bytes"] < 1 << 60 else ""
    if s.get("ranks"):
        peak = ""  # rank 0's device figures: beside a sum over ranks they would read as the sum's
    lines.append(f"held now{together}: " + ", ".join(f"{t} {format_bytes(b)}" for t, b in held.items()) + peak)
    for r in s.get("per_rank", []):
        lines.append(f"  rank {r['rank']}: moved " + (_links_text(r["bytes_moved"]) or "nothing") + "; held " +
                     (", ".join(f"{t} {format_bytes(b)}" for t, b in r["held_bytes"].items() if b) or "nothing"))
    if s.get("ranks_missing"):
        lines.append(f"no report from rank {', '.join(map(str, s['ranks_missing']))} (it did not exit normally): "
                     f"the sums above leave it out")
    return "\n".join(lines)


def _links_text(moved: dict[str, int], every: bool = False) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in moved.items() if v or every)



def _uniform(rt) -> dict | None:
    """The placement every unit shares (units without trainable params match any state), or ``None``."""
    rows = rt.placements()
    keys = ("params", "grads", "state", "update")
    stated = [r for r in rows if r["state"] is not None] or rows
    first = stated[0]
    if all(r[k] == first[k] for r in rows for k in keys if r["state"] is not None or k in ("params", "grads")):
        return {k: first[k] for k in keys}
    return None


def placement_groups(rt) -> list[tuple[str, dict]]:
    """Runs of consecutive units placed alike, as ``(names, placement)``: ``("blocks.0 .. blocks.3", {...})``."""
    out: list[tuple[list[str], dict]] = []
    for r in rt.placements():
        pl = {k: r[k] for k in ("params", "grads", "state", "update")}
        if out and out[-1][1] == pl:
            out[-1][0].append(r["unit"])
        else:
            out.append(([r["unit"]], pl))
    return [(names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}", pl) for names, pl in out]


def _placement_words(pl: dict) -> str:
    state = f", state on {pl['state']}, updated on {pl['update']}" if pl["state"] else ", no trainable params"
    return f"params on {pl['params']}, grads on {pl['grads']}{state}"


def placement_text(runtime) -> str:
    """What a wrapped model's runtime placed where, in a few lines (printed by ``offload run`` before training);
    unit by unit when the units differ (a plan)."""
    rt, opt = runtime, runtime.optimizer
    cfg = rt.config
    r = opt.report()
    pbytes = sum(u.nbytes for u in rt.units)
    budget = rt.device_budget.capacity_bytes
    budget_txt = f"a device budget of {format_bytes(budget)}" if budget < 1 << 60 else "no device budget"
    state = ", ".join(f"{format_bytes(b)} on {t}" for t, b in r["state_bytes_by_tier"].items()) or "none"
    sites = sorted({s["update_on"] for s in r["subgroups"]})
    tail = (f"  optimizer state: {state}; {r['optimizer']} ({r['impl']}), {len(r['subgroups'])} subgroups updated on "
            f"{'/'.join(sites)}, {'overlapped with backward' if rt.overlap else 'after backward'}")
    same = _uniform(rt)
    if same is not None and same["params"] != "device":
        return "\n".join([
            f"plan: {len(rt.units)} units, {format_bytes(pbytes)} of params on {same['params']}, on the device only "
            f"while their unit computes ({budget_txt}, prefetch {cfg.prefetch})",
            f"  grads: on {same['grads']} between backward and the update", tail])
    by_tier: dict[str, int] = {}
    for u in rt.units:
        by_tier[u.param_tier.value] = by_tier.get(u.param_tier.value, 0) + u.nbytes
    held = ", ".join(f"{format_bytes(b)} {'kept on the device' if t == 'device' else 'on ' + t}"
                     for t, b in by_tier.items())
    return "\n".join([f"plan: {len(rt.units)} units placed one by one{f' ({rt.plan.compact()})' if rt.plan else ''}, "
                      f"{format_bytes(pbytes)} of params: {held} ({budget_txt}, prefetch {cfg.prefetch})"]
                     + [f"  {names}: {_placement_words(pl)}" for names, pl in placement_groups(rt)] + [tail])


# -- re-plans: placements switched during the run --------------------------------------------------------------------
_started_with: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # runtime -> its placement code at wrap


def placement_code(rt) -> str:
    """The runtime's placement now as the planner's run-length codes (``Plan.compact``: ``NNc x4 | HHc x2``,
    params/state tier and update site per unit)."""
    if rt.plan is not None:
        return rt.plan.compact()
    # The config's placement. A unit without trainable params has no subgroup: the config's state and a CPU
    # update, as offload.measure.config_to_plan says.
    codes = [r["params"][0].upper() + (r["state"] or rt.config.state_tier.value)[0].upper() + (r["update"] or "c")[0]
             for r in rt.placements()]
    return " | ".join(f"{c} x{len(list(g))}" for c, g in itertools.groupby(codes))


def replans_of(rt) -> dict:
    """``{"replans": [...], "replan_decisions": [...]}`` for the run report, each key only when non-empty.

    ``replans``: each plan applied (history records holding a ``"replan"``, offload/runtime.py), with the
    iteration it first ran, who chose it and after which iteration, what drifted and the predicted iteration
    times (the re-planner's decision, on its calibrated profile), old and new placement codes, and the bytes the
    switch moved per link. ``replan_decisions``: every decision of :mod:`offload.autoplan`, kept plans included."""
    # A Replanner exists only if offload.autoplan was imported: no need to import it (and the scheduler's
    # re-planner) for every report.
    autoplan = sys.modules.get("offload.autoplan")
    decisions = autoplan.decisions(rt) if autoplan is not None else []
    chosen = {d["iteration"]: d for d in decisions if d["decision"] == "replan"}
    records = [h for h in rt.history if "replan" in h]
    # The history keeps the last 1000 iterations: an older switch is gone, and with it the next one's "old".
    old = _started_with.get(rt) if len(records) == rt.stats["replans"] else None
    out = []
    for h in records:
        r = h["replan"]
        after = r.get("requested_after")
        d = chosen.get(after)
        out.append({"iteration": h["iteration"], "chosen_after": after,
                    "by": "autoplan" if d else "runtime.on_iteration" if after is not None else "runtime.apply_plan",
                    "drifted": d["drifted"] if d else None, "old_plan": d["old_plan"] if d else old,
                    "new_plan": r["plan"], "predicted_old_s": d["old_s"] if d else None,
                    "predicted_new_s": d["new_s"] if d else None, "units_moved": list(r["units_moved"]),
                    "bytes": dict(r["bytes"]), "switch_s": r["s"]})
        old = r["plan"]
    res = {"replans": out} if out else {}
    if decisions:
        res["replan_decisions"] = decisions
    return res


def _ms(seconds: float) -> str:
    """Milliseconds with the digits that matter: 133, 4.2, 0.36."""
    ms = seconds * 1e3
    return f"{ms:.0f}" if abs(ms) >= 10 else f"{ms:.1f}" if abs(ms) >= 1 else f"{ms:.2g}"


def _replans_text(s: dict) -> list[str]:
    applied, decided = s.get("replans", []), s.get("replan_decisions", [])
    if not applied and not decided:
        return []
    lines = [f"re-plans: {len(applied)} applied" + (f", {len(decided)} decided by autoplan" if decided else "")]
    for e in applied:
        who = f"{e['by']} after iteration {e['chosen_after']}" if e["chosen_after"] is not None else e["by"]
        why = ""
        if e["drifted"]:
            why = ": " + ", ".join(f"{f} at {x:.2g}x" for f, x in e["drifted"].items()) + " of the profile"
        lines.append(f"  from iteration {e['iteration']} ({who}{why})")
        pred = ""
        if e["predicted_old_s"] is not None and e["predicted_new_s"] is not None:
            pred = f"; predicted {_ms(e['predicted_old_s'])} -> {_ms(e['predicted_new_s'])} ms per iteration"
        moved = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in e["bytes"].items() if v)
        lines.append(f"    {e['old_plan'] or '?'} -> {e['new_plan']}{pred}; {len(e['units_moved'])} units moved "
                     f"({moved or 'no bytes'}) in {e['switch_s'] * 1e3:.0f} ms")
    kept = [d for d in decided if d["decision"] != "replan"]
    if kept:
        more = f" and {len(kept) - 5} more" if len(kept) > 5 else ""
        lines.append("  kept the plan after iteration " + ", ".join(f"{d['iteration']} ({d['why']})"
                                                                  for d in kept[:5]) + more)
    return lines


def current() -> RunReport | None:
    """The RunReport made last in this process, if it is still alive."""
    return _current() if _current is not None else None


# -- each step as it ends: metrics.jsonl and TensorBoard -------------------------------------------------------------
TENSORBOARD_DIR = "tensorboard"


def _rank() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun (``offload run --nproc N``), else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def metrics_path(directory: str | os.PathLike, rank: int = 0) -> Path:
    """``metrics.jsonl`` of one process or rank 0; ``metrics.rank<N>.jsonl`` of rank N."""
    return Path(directory) / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl")


def _tensorboard_writer(log_dir: Path, purge_step: int | None):
    """A TensorBoard ``SummaryWriter`` when tensorboard is installed, else ``None`` (the metrics file alone)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class MetricsLog:
    """Each training step as one JSON line, appended to ``metrics.jsonl`` and flushed when the step ends (``tail
    -f`` follows it; a killed run keeps every line written), and as TensorBoard scalars (``tensorboard/`` beside
    it) when ``torch.utils.tensorboard`` imports.

    A line (the README's "Watching a run" gives each field)::

        {"step": 21, "time": 1767225600.0, "loss": 2.53, "tokens": 512, "tokens_per_s": 1240.0, "step_s": 0.41,
         "bytes_moved": {"h2d": 0, "d2h": 0, "disk_read": 1048576, "disk_write": 1048576},
         "held_bytes": {"device": 0, "host": 2097152, "nvme": 4194304}}

    Opening truncates the file, except that a run resumed at ``start_step`` keeps the lines up to that step: the
    curve continues, and the steps the resumed run does again are not there twice. Under several ranks, rank N
    writes ``metrics.rank<N>.jsonl`` (rank 0 ``metrics.jsonl``) and its lines carry ``"rank"``."""

    def __init__(self, path: str | os.PathLike, *, start_step: int = 0, rank: int = 0, world: int = 1):
        self.path = Path(path)
        self.rank, self.world = rank, world
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_step and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                    pass
        self.path.write_text("".join(kept))
        self._tb = _tensorboard_writer(self.path.parent / TENSORBOARD_DIR / (f"rank{rank}" if rank else ""),
                                       purge_step=start_step + 1 if start_step else None)
        if self._tb is not None:
            _tb_writers.add(self._tb)

    @classmethod
    def open(cls, directory: str | os.PathLike, *, start_step: int = 0) -> "MetricsLog":
        """The log of this process (its rank's file under torchrun) in ``directory``."""
        rank, world = _rank()
        return cls(metrics_path(directory, rank), start_step=start_step, rank=rank, world=world)

    def write(self, record: dict) -> None:
        """Append one step: ``record`` holds the fields above but ``time`` (now) and ``rank`` (added)."""
        line = {"step": record["step"], "time": round(time.time(), 3), **record}
        if self.world > 1:
            line["rank"] = self.rank
        # Opened, appended, closed: the line is in the file (the OS's page cache) when this returns.
        with open(self.path, "a") as f:
            f.write(json.dumps(line, default=float) + "\n")
        if self._tb is not None:
            for tag, value in _scalars(line):
                self._tb.add_scalar(tag, value, global_step=line["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            _tb_writers.discard(self._tb)
            self._tb = None


def _scalars(line: dict):
    """A metrics line as TensorBoard ``(tag, value)`` pairs: ``loss``, ``tokens_per_s``, ``step_s``,
    ``bytes_moved/<link>``, ``held_bytes/<tier>``."""
    for key in ("loss", "tokens_per_s", "step_s"):
        if line.get(key) is not None:
            yield key, line[key]
    for group in ("bytes_moved", "held_bytes"):
        for k, v in line[group].items():
            yield f"{group}/{k}", v


_tb_writers: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_tb_writers() -> None:
    for w in list(_tb_writers):  # a SummaryWriter writes its last events from a thread: let it finish
        w.close()


class _IterationLog:
    """Under ``offload run``: each iteration of a wrapped model as a metrics line, from the runtime's history
    record (a ``runtime.on_iteration`` callback), for a script that makes no RunReport; a RunReport writes the
    line itself, with the loss. ``step`` is the runtime's iteration count in this process."""

    def __init__(self, rt, directory: str):
        self._rt = weakref.ref(rt)  # the runtime holds this callback: no cycle keeping it alive
        self._directory = directory
        self._log: MetricsLog | None = None
        self._moved_before = moved_bytes(rt, rt.optimizer)

    def __call__(self, record: dict) -> None:
        rt, rep = self._rt(), current()
        if rt is None or (rep is not None and rep.runtime is rt and rep.metrics_dir is not None):
            return None
        if self._log is None:
            self._log = MetricsLog.open(self._directory)
        moved = moved_bytes(rt, rt.optimizer)
        self._log.write({"step": record["iteration"], "loss": None, "tokens": None, "tokens_per_s": None,
                         "step_s": record["wall_s"], "bytes_moved": {k: moved[k] - self._moved_before[k] for k in
                                                                     _LINKS},
                         "held_bytes": held_bytes(rt, rt.optimizer)})
        self._moved_before = moved
        return None


# Under `offload run` only: what the exit handler reports on, held strongly (a script's main() may have returned
# and dropped its model by the time the interpreter exits).
_at_exit: dict = {}


def _write_at_exit() -> None:
    directory = os.environ.get(REPORT_DIR_ENV)
    if not directory:
        return
    rep = _at_exit.get("report") or current()
    if rep is None and "model" in _at_exit:
        rep = RunReport(_at_exit["model"], _at_exit["optimizer"], progress=False, name=Path(sys.argv[0]).name)
    if rep is None:
        return
    rank, world = _rank()
    try:
        if world > 1:
            rep.save_rank(directory, rank)
        else:
            rep.save(directory)
    except Exception as e:  # never turn a finished run into a failed one over its report
        print(f"offload: could not write the run report to {directory}: {e}", file=sys.stderr)


def report_at_exit(model, optimizer) -> None:
    """Called by ``offload.wrap`` (and each rank's ``ShardedOffloadOptimizer``): note the placement the run starts
    with (the first re-plan's "old"), and under ``offload run``, write each iteration's metrics line as it ends and
    this run's report to ``OFFLOAD_REPORT_DIR`` when the process exits."""
    rt = runtime_of(model, optimizer)
    if rt is not None:
        _started_with[rt] = placement_code(rt)
    directory = os.environ.get(REPORT_DIR_ENV)
    if directory:
        if not _at_exit:
            atexit.register(_write_at_exit)
        _at_exit.update(model=model, optimizer=optimizer)
        if rt is not None:
            rt.on_iteration.append(_IterationLog(rt, directory))


def rank_report_path(directory: str | os.PathLike, rank: int) -> Path:
    return Path(directory) / f"report.rank{rank}.json"


def merge_rank_reports(directory: str | os.PathLike, world: int) -> list[Path]:
    """One report of a run of ``world`` ranks (``offload run --nproc N``), from the ``report.rank<N>.json`` each
    rank wrote at exit: rank 0's figures (steps, losses, times, placement), with the bytes moved and held and the
    optimizer state summed over the ranks, and each rank's own under ``per_rank``. Writes ``report.json`` and
    ``report.txt``; returns their paths, or ``[]`` when no rank wrote a report."""
    d = Path(directory)
    found = {r: json.loads(rank_report_path(d, r).read_text()) for r in range(world)
             if rank_report_path(d, r).is_file()}
    if not found:
        return []
    out = {k: v for k, v in found[min(found)].items() if k not in ("host_pool", "rank")}
    out["ranks"] = world
    if len(found) < world:
        out["ranks_missing"] = [r for r in range(world) if r not in found]
    every = list(found.values())

    def add(dicts: list[dict]) -> dict:
        keys = dict.fromkeys(k for x in dicts for k in x)
        return {k: sum(x.get(k, 0) for x in dicts) for k in keys}

    out["bytes_moved"] = add([s["bytes_moved"] for s in every])
    out["held_bytes"] = add([s["held_bytes"] for s in every])
    what = dict.fromkeys(k for s in every for k in s["bytes_moved_by_what"])
    out["bytes_moved_by_what"] = {k: add([s["bytes_moved_by_what"][k] for s in every if k in s["bytes_moved_by_what"]])
                                  for k in what}
    out["tokens"] = sum(s["tokens"] for s in every)
    rates = [s["tokens_per_s"] for s in every if s.get("tokens_per_s")]
    out["tokens_per_s"] = sum(rates) if rates else None
    states = [s["optimizer"]["state_bytes_by_tier"] for s in every if "optimizer" in s]
    if "optimizer" in out and states:
        out["optimizer"] = {**out["optimizer"], "state_bytes_by_tier": add(states),
                            "subgroups": sum(s["optimizer"]["subgroups"] for s in every if "optimizer" in s)}
    out["per_rank"] = [{"rank": r, "bytes_moved": s["bytes_moved"], "held_bytes": s["held_bytes"],
                        **({"state_bytes_by_tier": s["optimizer"]["state_bytes_by_tier"]} if "optimizer" in s else {}),
                        **({"host_pool": s["host_pool"]} if "host_pool" in s else {})} for r, s in found.items()]
    paths = [d / "report.json", d / "report.txt"]
    paths[0].write_text(json.dumps(out, indent=1, default=str))
    paths[1].write_text(summary_text(out) + "\n")
    return paths
