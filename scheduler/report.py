"""The dry-run report of ``offload plan``: text for people, JSON for tools, a Chrome trace and an SVG timeline."""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path

from scheduler.cost import RESOURCES, CostModel, Prediction
from scheduler.plan import code_legend
from scheduler.planner import Result, strategies
from scheduler.profile import HardwareProfile
from scheduler.workload import Workload
from storage import format_bytes


def _s(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def compare(workload: Workload, profile: HardwareProfile, ours: Result) -> list[dict]:
    cm = CostModel(workload, profile)
    rows = []
    for name, p in list(strategies(workload, profile).items()) + [("ours", ours.plan)]:
        pr = ours.prediction if name == "ours" else cm.predict(p)
        short = cm.shortfall(p)
        rows.append({"strategy": name, "fits": not short, "iteration_s": pr.iteration_s,
                     "tokens_per_s": pr.tokens_per_s(workload), "tflops": pr.model_tflops(workload),
                     "bottleneck": pr.bottleneck,
                     "short": {t: b for t, b in short.items()}})
    return rows


def to_dict(workload: Workload, profile: HardwareProfile, res: Result, rows: list[dict]) -> dict:
    p = res.prediction
    return {"model": workload.name, "batch": workload.batch, "seq": workload.seq, "params": workload.params,
            "trainable": workload.trainable, "profile": profile.to_dict(), "fits": res.fits,
            "shortfall": None if res.shortfall is None else {
                "tier": res.shortfall.tier, "short_bytes": res.shortfall.short_bytes, "fix": res.shortfall.fix,
                "short": dict(res.shortfall.short), "joint": res.shortfall.joint,
                "fixes": [dict(f.changes) for f in res.shortfall.fixes]},
            "plan": res.plan.to_dict(workload),
            "memory_bytes": p.memory_bytes,
            "memory_terms_bytes": CostModel(workload, profile).memory_terms(res.plan),
            # what the plan needs to run (what fits is judged on): the peak less speculation's copies, which the
            # runtime takes only where room is free (CostModel.required)
            "memory_needed_bytes": CostModel(workload, profile).required(res.plan),
            "capacity_bytes": {"device": profile.device_memory_bytes, "host": profile.host_memory_bytes,
                               "nvme": profile.nvme_bytes},
            "reserve_bytes": {t: profile.reserve_bytes(t) for t in ("device", "host", "nvme")},
            "usable_bytes": {t: profile.usable_bytes(t) for t in ("device", "host", "nvme")},
            "traffic": p.traffic._asdict(), "busy_s": p.busy_s, "iteration_s": p.iteration_s,
            "tokens_per_s": p.tokens_per_s(workload), "model_tflops": p.model_tflops(workload),
            "bottleneck": p.bottleneck, "lower_bound_s": p.lower_bound_s, "fill_s": p.fill_s,
            "bound_by": p.bound_by, "strategies": rows, "workload": workload.to_dict()}


def _count(n: int) -> str:
    """``70e9`` -> ``'70.00 B'``, ``124e6`` -> ``'124.4 M'``, ``164e3`` -> ``'164.2 K'``."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def text(workload: Workload, profile: HardwareProfile, res: Result, rows: list[dict]) -> str:
    p, cm = res.prediction, CostModel(workload, profile)
    cap = cm.capacity()
    trained = f" ({workload.trainable:,} trainable, {workload.trainable / workload.params:.2%}: grads and state " \
              f"for those only)" if workload.trainable < workload.params else ""
    out = [f"model {workload.name}: {_count(workload.params)} params{trained} in {len(workload.units)} units, "
           f"batch {workload.batch} x seq {workload.seq}, {workload.compute_dtype} (state "
           f"{workload.state_bytes_per_param} B/param)", f"profile {profile.name} ({profile.device_name})"]
    out.append("FITS" if res.fits else f"DOES NOT FIT: {res.shortfall}")
    out.append("memory per tier (needed / usable: the capacity less what is reserved for the CUDA context, "
               "allocator fragmentation, the OS):")
    needed = cm.memory_terms(dataclasses.replace(res.plan, speculate=False))
    for tier, terms in needed.items():
        detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in terms.items() if v)
        held = profile.reserve_bytes(tier)
        reserve = f" ({format_bytes(held + cap[tier])} less {format_bytes(held)} reserved)" if held else ""
        total = sum(terms.values())
        # speculation's pre-update copies (host) and previous versions (store) take only free room
        spec = f"; up to {format_bytes(p.memory_bytes[tier])} while a step speculates, where free" \
            if p.memory_bytes[tier] > total else ""
        out.append(f"  {tier:6s} {format_bytes(total):>10s} / {format_bytes(cap[tier]):>10s}"
                   f"{reserve}   ({detail}){spec}")
    out.append(f"placement, unit by unit in order (prefetch depth {res.plan.prefetch_depth}):")
    out.append(f"  {res.plan.compact()}")
    out += ["  " + line for line in placement_legend()]
    t = p.traffic
    out.append(f"bytes per iteration: h2d {format_bytes(t.h2d_bytes)}, d2h {format_bytes(t.d2h_bytes)}, disk read "
               f"{format_bytes(t.disk_read_bytes)}, disk write {format_bytes(t.disk_write_bytes)}; updates: cpu "
               f"{t.cpu_update_params / 1e9:.2f} G params, device {t.device_update_params / 1e9:.2f} G params")
    out.append("busy per resource: " + ", ".join(f"{k} {_s(v)}" for k, v in p.busy_s.items()))
    out.append(f"predicted iteration {_s(p.iteration_s)}: {p.tokens_per_s(workload):,.0f} tokens/s, "
               f"{p.model_tflops(workload):.2f} TFLOP/s; bottleneck {p.bottleneck}; lower bound "
               f"{_s(p.lower_bound_s)} (set by {p.bound_by}, fill {_s(p.fill_s)}; we reach "
               f"{p.lower_bound_s / p.iteration_s:.0%} of it)")
    out.append("strategies (same cost model):")
    out.append(f"  {'strategy':16s} {'fits':>5s} {'iteration':>11s} {'tokens/s':>10s} {'TFLOP/s':>8s}  bottleneck")
    for r in rows:
        note = "" if r["fits"] else "  short: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in r["short"].items())
        out.append(f"  {r['strategy']:16s} {'yes' if r['fits'] else 'no':>5s} {_s(r['iteration_s']):>11s} "
                   f"{r['tokens_per_s']:10,.0f} {r['tflops']:8.2f}  {r['bottleneck']}{note}")
    return "\n".join(out)


def placement_legend() -> list[str]:
    """The legend under the placement picture (:meth:`scheduler.plan.Plan.compact`): every symbol it can hold."""
    letters = code_legend()
    tiers = ", ".join(f"{k} {v}" for k, v in letters.items() if k.isupper())
    sites = ", ".join(f"{k} {v}" for k, v in letters.items() if k.islower())
    return ["legend: XYz xN = N units in a row with params on X, optimizer state on Y, update on z; | separates "
            "runs",
            f"        X, Y: {tiers}; z: {sites} (grads wait where the update runs)"]


def chrome_trace(p: Prediction) -> dict:
    """Chrome trace format (Perfetto, chrome://tracing): one thread per resource, times in microseconds."""
    tid = {r: k for k, r in enumerate(RESOURCES)}
    evs = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid[r], "args": {"name": r}} for r in RESOURCES]
    evs += [{"name": e.name, "ph": "X", "pid": 0, "tid": tid[e.resource], "ts": e.start_s * 1e6,
             "dur": (e.end_s - e.start_s) * 1e6, "cat": e.resource} for e in p.events]
    return {"traceEvents": evs, "displayTimeUnit": "ms"}


COLORS = {"forward": "#4e79a7", "backward": "#f28e2b", "update": "#59a14f", "grad": "#e15759", "state": "#b07aa1",
          "new": "#76b7b2", "F": "#9c9c9c", "B": "#bab0ac"}


def svg(p: Prediction, title: str, width: int = 1200) -> str:
    """The predicted timeline: one row per resource, one rectangle per operation."""
    left, row, top = 90, 26, 30
    total = max(p.iteration_s, 1e-12)
    scale = (width - left - 10) / total
    h = top + row * len(RESOURCES) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" font-family="sans-serif" '
             f'font-size="11">', f'<text x="4" y="16">{html.escape(title)}</text>']
    for k, r in enumerate(RESOURCES):
        y = top + k * row
        parts.append(f'<text x="4" y="{y + 15}">{r}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{width - left - 10}" height="{row - 4}" fill="#f4f4f4"/>')
    ys = {r: top + k * row for k, r in enumerate(RESOURCES)}
    for e in p.events:
        w = max((e.end_s - e.start_s) * scale, 0.5)
        color = COLORS.get(e.name.split()[0], "#888")
        parts.append(f'<rect x="{left + e.start_s * scale:.2f}" y="{ys[e.resource]}" width="{w:.2f}" '
                     f'height="{row - 4}" fill="{color}" stroke="#fff" stroke-width="0.3">'
                     f'<title>{html.escape(e.name)}: {_s(e.start_s)} - {_s(e.end_s)}</title></rect>')
    y = top + row * len(RESOURCES) + 16
    parts.append(f'<text x="{left}" y="{y}">0</text><text x="{width - 80}" y="{y}">{_s(total)}</text></svg>')
    return "\n".join(parts)


def write(out_dir: str, workload: Workload, profile: HardwareProfile, res: Result, rows: list[dict]) -> list[str]:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    files = {"plan.json": json.dumps(to_dict(workload, profile, res, rows), indent=1),
             "trace.json": json.dumps(chrome_trace(res.prediction)),
             "timeline.svg": svg(res.prediction, f"{workload.name} b{workload.batch} s{workload.seq} on "
                                                 f"{profile.name}: {_s(res.prediction.iteration_s)}")}
    for name, body in files.items():
        (d / name).write_text(body)
    return [str(d / n) for n in files]
