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
exits, from the runtime's own per-iteration history (with losses, if the script made a RunReport).
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


class RunReport:
    """Records a training run step by step (see the module docstring) and reports on it."""

    def __init__(self, model=None, optimizer=None, *, total_steps: int | None = None, name: str = "run",
                 progress: bool = True, stream=None, predicted: dict | None = None, min_interval_s: float = 0.5):
        self.model, self.optimizer, self.name = model, optimizer, name
        self.total_steps = total_steps
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
        global _current
        _current = weakref.ref(self)
        if os.environ.get(REPORT_DIR_ENV) and _at_exit:
            _at_exit["report"] = self

    @property
    def runtime(self):
        return runtime_of(self.model, self.optimizer)

    # -- recording ----------------------------------------------------------------------------------------------
    def step(self, loss: float | None = None, tokens: int = 0) -> None:
        """Call once per optimizer step, after it: the step's loss (a float) and the tokens it trained on."""
        now = time.perf_counter()
        self.step_s.append(now - self._t_last)
        self._t_last = now
        self.losses.append(None if loss is None else float(loss))
        self.tokens.append(int(tokens))
        if self.progress:
            last = self.total_steps is not None and len(self.losses) >= self.total_steps
            if now - self._last_draw >= self.min_interval_s or last or len(self.losses) == 1:
                self._draw(now)

    def held_bytes(self) -> dict[str, int]:
        """Bytes each tier holds now: the device budget in use, the host pool handed out, the store's chunks."""
        out = {"device": 0, "host": 0, "nvme": 0}
        rt = self.runtime
        opt = rt.optimizer if rt is not None else self.optimizer
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

    def _draw(self, now: float) -> None:
        self._last_draw = now
        n = len(self.losses)
        elapsed = now - self._t_start
        recent = self.step_s[-20:]
        tok_s = sum(self.tokens[-20:]) / max(sum(recent), 1e-9)
        parts = [f"step {n}/{self.total_steps}" if self.total_steps else f"step {n}"]
        if self.losses[-1] is not None:
            parts.append(f"loss {self.losses[-1]:.4f}")
        if tok_s:
            parts.append(f"{tok_s:,.0f} tok/s")
        held = self.held_bytes()
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
        out: dict = {"name": self.name, "steps": steps, "wall_s": round(time.perf_counter() - self._t_start, 3),
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
        moved = dict.fromkeys(_LINKS, 0)
        by_what: dict[str, dict[str, int]] = {}
        if rt is not None:
            s = rt.stats
            by_what["params+grads"] = {"h2d": s["h2d_bytes"], "d2h": s["d2h_bytes"],
                                       "disk_read": s["disk_read_bytes"], "disk_write": s["disk_write_bytes"]}
        if opt is not None and "h2d_bytes" in getattr(opt, "stats", {}):
            s = opt.stats
            by_what["optimizer state"] = {"h2d": s["h2d_bytes"], "d2h": s["d2h_bytes"], "disk_read": s["read_bytes"],
                                          "disk_write": s["write_bytes"]}
        for d in by_what.values():
            for k in _LINKS:
                moved[k] += d[k]
        if not self.step_s and rt is not None:  # made at exit (offload run): the runtime's own record of the steps
            out["steps"] = rt.iterations
            out["step_s_median"] = out.get("iteration_s_median")
        elif not self.step_s and hasattr(opt, "stats"):  # an optimizer alone (a rank's shard): its step count
            out["steps"] = opt.stats["steps"]
        out["bytes_moved"] = moved
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
        if self.predicted:
            out["predicted"] = self.predicted
        return out

    def text(self) -> str:
        s = self.summary()
        took = f" in {_duration(s['wall_s'])}" if self.step_s else ""  # made at exit: no clock of its own
        lines = [f"== {s['name']}: {s['steps']} steps{took} =="]
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
        if "busy_s_median" in s:
            pred = (self.predicted or {}).get("busy_s", {})
            prof = (self.predicted or {}).get("profile")
            head, pred_iter, source = "per iteration (median)", (self.predicted or {}).get("iteration_s"), \
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
        moved = s["bytes_moved"]
        lines.append("bytes moved: " + ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in moved.items()))
        for what, d in s["bytes_moved_by_what"].items():
            if any(d.values()):
                lines.append(f"  {what}: " + ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}"
                                                        for k, v in d.items() if v))
        held = s["held_bytes"]
        peak = f" (device peak {format_bytes(s['device_peak_bytes'])} of a {format_bytes(s['device_budget_bytes'])} " \
               f"budget)" if "device_peak_bytes" in s and s["device_budget_bytes"] < 1 << 60 else ""
        lines.append("held now: " + ", ".join(f"{t} {format_bytes(b)}" for t, b in held.items()) + peak)
        return "\n".join(lines)

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write ``report.json``, ``report.txt`` and ``trace.json`` (the last iteration, Chrome trace format)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = [d / "report.json", d / "report.txt"]
        with open(paths[0], "w") as f:
            json.dump(self.summary(), f, indent=1, default=str)
        paths[1].write_text(self.text() + "\n")
        rt = self.runtime
        if rt is not None:
            tl = rt.timeline if rt.timeline.events else rt.last_timeline
            if tl is not None and tl.events:
                paths.append(d / "trace.json")
                tl.save_chrome_trace(str(paths[-1]))
        return paths


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


# Under `offload run` only: what the exit handler reports on, held strongly (a script's main() may have returned
# and dropped its model by the time the interpreter exits).
_at_exit: dict = {}


def _write_at_exit() -> None:
    directory = os.environ.get(REPORT_DIR_ENV)
    if not directory or int(os.environ.get("RANK", "0")) != 0:
        return
    rep = _at_exit.get("report") or current()
    if rep is None and "model" in _at_exit:
        rep = RunReport(_at_exit["model"], _at_exit["optimizer"], progress=False, name=Path(sys.argv[0]).name)
    if rep is None:
        return
    try:
        rep.save(directory)
    except Exception as e:  # never turn a finished run into a failed one over its report
        print(f"offload: could not write the run report to {directory}: {e}", file=sys.stderr)


def report_at_exit(model, optimizer) -> None:
    """Called by ``offload.wrap``: note the placement the run starts with (the first re-plan's "old"), and under
    ``offload run``, write this run's report to ``OFFLOAD_REPORT_DIR`` when the process exits."""
    rt = runtime_of(model, optimizer)
    if rt is not None:
        _started_with[rt] = placement_code(rt)
    if os.environ.get(REPORT_DIR_ENV):
        if not _at_exit:
            atexit.register(_write_at_exit)
        _at_exit.update(model=model, optimizer=optimizer)
