"""Each placement's measured iteration against its plan's lower bound, at an I/O-bound and a compute-bound batch,
with plain PyTorch beside them: how far the runtime is from what its plan allows, and what the busiest resource
waited for when it was idle.

    .venv/bin/python benchmarks/placement_bench.py           # GPT-2 small (124M) fp32, batches 1x64 and 2x256,
                                                             # 4 placements + plain, 2 warm-ups + 5 iterations each
    .venv/bin/python benchmarks/placement_bench.py --quick   # a tiny model and tiny batches, for CI (times not
                                                             # meaningful)
    .venv/bin/python benchmarks/placement_bench.py --batches 1x64 --iters 3 --profile cpu-dev-2core

Placements (CPU device, device budget half the model's bytes, the NVMe store in a temporary directory under
benchmarks/results, deleted at the end; ``--dir`` puts the stores elsewhere, each removed when its batch is done):
all on NVMe (params and state; grads on the host, as the runtime keeps them), host params with NVMe state, NVMe
params with host state, and the planner's own per-unit plan when the host may hold only half the model (params,
grads and state), run through ``offload.wrap(plan=...)``.
Plain PyTorch (fused AdamW, the same model and data) runs in the same rounds.

Per placement and batch, medians over ``--iters`` iterations: measured time; the plan's lower bound
(``CostModel.predict(plan).lower_bound_s``, and which term sets it) and predicted time; measured / lower bound and
predicted / measured; each resource's busy time from the runtime's timeline; and, for the last iteration, the
largest idle gaps of its busiest resource with what the other resources were doing meanwhile. Bars: measured /
lower bound <= 1.2 at the I/O-bound batch (``--io-bound``, 1x64) and <= 1.15 at the others (compute-bound), for
every placement; all-NVMe / plain <= 2.8 at 1x64. The all-NVMe weights must equal plain PyTorch's bit
for bit after the same iterations.

The profile is ``--profile``, else this machine's cached probe (``offload probe``), else ``cpu-dev-2core``; its
disk rates are measured again before each batch, in the stores' directory, the probe's way (``--no-disk-now``
keeps the profile's): this VM's disk drifts by up to 30% from hour to hour, and a bound priced with another
hour's disk judges the runtime by that hour's (both bounds are printed and kept in the JSON). Runs
are interleaved (one iteration of each in turn) so the machine's load weighs on all alike; an iteration during
which other processes took more than 5% of the CPU, or just before which a fixed matmul ran 25% slower than its
best, is set aside and run again (``plan_validate.py``'s rules; not with ``--quick``), for at most 4 x ``--iters``
rounds; a run left with fewer than ``--iters`` undisturbed iterations takes the median of every one measured. Writes
``benchmarks/results/placement_bench.json`` and each run's last timeline as a Chrome trace beside it
(``placement_bench.<batch>.<placement>.trace.json``; open in Perfetto).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from plan_validate import TINY, planner_choice  # noqa: E402

from offload import OffloadConfig  # noqa: E402
from offload.measure import (Quiet, Run, compare, config_to_plan, cpu_seconds, foreign_share, temp_store_dir,  # noqa: E402
                             workload_of)
from scheduler import profile as profiles  # noqa: E402
from scheduler.cost import RESOURCES, CostModel  # noqa: E402
from scheduler.workload import PRESETS, build_transformer  # noqa: E402
from storage import format_bytes  # noqa: E402
from scheduler.probe import disk_rates, flush_denormals  # noqa: E402
from storage import NvmeStore  # noqa: E402
from storage.memory import fresh_empty  # noqa: E402

IO_BAR, COMPUTE_BAR, PLAIN_BAR = 1.2, 1.15, 2.8
"""measured / lower bound at the I/O-bound batch and at a compute-bound one; all-NVMe / plain at 1x64."""
PLAIN_BAR_BATCH = (1, 64)
# (key, label, OffloadConfig fields); the planner's plan is added per batch.
PLACEMENTS = [
    ("nvme", "all on nvme", dict(param_tier="nvme", state_tier="nvme")),
    ("host-params", "host params, nvme state", dict(param_tier="host", state_tier="nvme")),
    ("host-state", "nvme params, host state", dict(param_tier="nvme", state_tier="host")),
]
TOP_GAPS = 3
MIN_GAP_S = 1e-3
"""Idle gaps shorter than this are timer noise between back-to-back events: not counted."""


def parse_batches(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            b, s = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--batches: expected BATCHxSEQ[,BATCHxSEQ...] (e.g. 1x64,2x256), got {text!r}") from None
        if b < 1 or s < 1:
            raise SystemExit(f"--batches: expected positive sizes, got {part!r}")
        out.append((b, s))
    return out


class Plain:
    """Plain PyTorch on the same model (seed 0, as :class:`Run` builds it) and the same batches, in the same order."""

    def __init__(self, shape, data: list[torch.Tensor]):
        torch.manual_seed(0)
        self.model = build_transformer(shape, device="cpu")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.data, self.done = data, 0

    def iteration(self) -> dict:
        idx = self.data[self.done % len(self.data)]
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        logits = self.model(idx[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1)).backward()
        self.opt.step()
        self.opt.zero_grad()
        wall = time.perf_counter() - t0
        self.done += 1
        return {"iteration_s": wall, "foreign_cpu": foreign_share(c0, cpu_seconds(), wall)}


def idle_gaps(events, end_s: float, top: int = TOP_GAPS) -> dict:
    """The busiest resource of a timeline (``events``, up to ``end_s``), its idle gaps (the largest ``top``, and
    the total), and for each gap the events on other resources that ran during it, longest overlap first."""
    busy = {}
    for r in RESOURCES:
        spans = sorted((e.start_s, e.end_s) for e in events if e.resource == r)
        merged = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        busy[r] = merged
    res = max(RESOURCES, key=lambda r: sum(e - s for s, e in busy[r]))
    start = min([0.0] + [e.start_s for e in events])
    end = max([end_s] + [e.end_s for e in events])
    gaps, t = [], start
    for s, e in busy[res]:
        if s > t:
            gaps.append((t, s))
        t = max(t, e)
    if end > t:
        gaps.append((t, end))
    out = []
    gaps = [(a, b) for a, b in gaps if b - a >= MIN_GAP_S]
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        during = {}
        for e in events:
            if e.resource != res and e.end_s > a and e.start_s < b:
                key = f"{e.resource} {e.name}"
                during[key] = during.get(key, 0.0) + min(b, e.end_s) - max(a, e.start_s)
        out.append({"start_s": a, "end_s": b, "idle_s": b - a,
                    "during": [{"what": k, "overlap_s": v} for k, v in sorted(during.items(), key=lambda kv: -kv[1])]})
    return {"resource": res, "window_s": end - start, "idle_total_s": sum(b - a for a, b in gaps), "gaps": out}


def gaps_text(g: dict, shown: int = 4) -> list[str]:
    lines = [f"{g['resource']} idle {g['idle_total_s'] * 1e3:.0f} ms of {g['window_s'] * 1e3:.0f} ms"]
    for gap in g["gaps"]:
        what = ", ".join(f"{d['what']} ({d['overlap_s'] * 1e3:.0f} ms)" for d in gap["during"][:shown])
        more = len(gap["during"]) - shown
        lines.append(f"  idle {gap['idle_s'] * 1e3:.0f} ms at {gap['start_s']:.2f}-{gap['end_s']:.2f} s: "
                     + (what + (f", +{more} more" if more > 0 else "") if what else
                        "nothing on the timeline (host work outside it: loss, step() call, Python)"))
    return lines


DISK_CHUNKS, DISK_CHUNK_BYTES, DISK_ROUNDS = 8, 128 << 20, 5
"""The probe's disk measurement (scheduler/probe.py): 8 x 128 MiB chunks, medians of 5 interleaved rounds."""


def disk_now(base: Path, hw):
    """``hw`` with its disk rates (read, write, interleaved) measured now in ``base``, as ``offload probe`` measures
    them; and the rates, GB/s."""
    d = temp_store_dir(str(base))
    try:
        store = NvmeStore([d], 3 * DISK_CHUNKS * DISK_CHUNK_BYTES, reset=True)
        bufs = [fresh_empty(DISK_CHUNK_BYTES).fill_(i % 251) for i in range(DISK_CHUNKS)]
        outs = [fresh_empty(DISK_CHUNK_BYTES).zero_() for _ in range(DISK_CHUNKS)]
        try:
            dk, _ = disk_rates(store, bufs, outs, rounds=DISK_ROUNDS)
        finally:
            store.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    rates = {"disk_read_gbps": dk["read"].value, "disk_write_gbps": dk["write"].value,
             "disk_mixed_gbps": dk["mixed"].value}
    return dataclasses.replace(hw, **rates), rates


def run_batch(shape, hw, batch: int, seq: int, args, base: Path, results: Path) -> dict:
    name = "tiny" if args.quick else "gpt2"
    w = workload_of(shape, batch=batch, seq=seq, name=name)
    model_bytes = w.params * 4
    common = dict(device_budget_bytes=model_bytes // 2)
    probed, disk = hw, None
    if args.disk_now:
        hw, disk = disk_now(base, hw)
        print(f"\ndisk now: read {disk['disk_read_gbps']:.2f}, write {disk['disk_write_gbps']:.2f}, interleaved "
              f"{disk['disk_mixed_gbps']:.2f} GB/s (profile {probed.name}: {probed.disk_read_gbps:.2f}, "
              f"{probed.disk_write_gbps:.2f}, {probed.disk_mixed_gbps:.2f}); bounds and predictions use these",
              flush=True)
    cm, cm_probed = CostModel(w, hw), CostModel(w, probed)
    runs, dirs = {}, []  # key -> dict(label, plan, pred, run)
    tag = f"{batch}x{seq}"
    try:
        for key, label, fields in PLACEMENTS:
            d = temp_store_dir(str(base))
            dirs.append(d)
            cfg = OffloadConfig(nvme_dirs=d, **fields, **common)
            plan = config_to_plan(cfg, w, strategy=label)
            runs[key] = dict(label=label, plan=plan, pred=cm.predict(plan, events=True),
                             run=Run(shape, cfg, batch=batch, seq=seq))
        d = temp_store_dir(str(base))
        dirs.append(d)
        plan = planner_choice(w, hw)
        runs["planner"] = dict(label=f"planner, host for half: {plan.compact()}", plan=plan,
                               pred=cm.predict(plan, events=True),
                               run=Run(shape, OffloadConfig(nvme_dirs=d, **common), batch=batch, seq=seq, plan=plan))
        plain = Plain(shape, runs["nvme"]["run"].data)
        kind = "I/O-bound" if tag == args.io_bound else "compute-bound"
        bar = IO_BAR if kind == "I/O-bound" else COMPUTE_BAR
        print(f"\n== batch {batch} x seq {seq} ({kind}, bar {bar}; the all-NVMe plan's lower bound is set by "
              f"{runs['nvme']['pred'].bound_by}); device budget {format_bytes(common['device_budget_bytes'])}",
              flush=True)
        for key, r in runs.items():
            p = r["pred"]
            print(f"  {key:12s} {r['label']}: lower bound {p.lower_bound_s:.3f} s ({p.bound_by}), predicted "
                  f"{p.iteration_s:.3f} s", flush=True)

        keys = ["plain"] + list(runs)
        clean = {k: [] for k in keys}
        every = {k: [] for k in keys}
        set_aside = not args.quick
        q = Quiet() if set_aside else None
        rounds = args.warmup + (4 * args.iters if set_aside else args.iters)
        for it in range(rounds):
            todo = [k for k in keys if len(clean[k]) < args.iters]
            if not todo:
                break
            for k in todo:
                if q is not None:
                    q.before()
                rec = plain.iteration() if k == "plain" else runs[k]["run"].iteration()
                why = q.judge(rec) if q is not None else None
                rec.setdefault("canary_s", None)
                warm = it < args.warmup
                rec["set_aside"] = not warm and why is not None
                if not warm:
                    every[k].append(rec)
                    if not rec["set_aside"]:
                        clean[k].append(rec)
                    if k != "plain":  # the last measured iteration's timeline (events, end) and its Chrome trace
                        tl = runs[k]["run"].rt.timeline
                        runs[k]["last"] = (list(tl.events), rec["iteration_s"])
                        runs[k]["trace"] = str(results / f"{Path(args.json).stem}.{tag}.{k}.trace.json")
                        tl.save_chrome_trace(runs[k]["trace"])
                note = f"  (set aside: {why})" if rec["set_aside"] else ""
                lb = runs[k]["pred"].lower_bound_s if k != "plain" else None
                print(f"  {'warm-up' if warm else f'round {it - args.warmup + 1}':8s} {k:12s} "
                      f"{rec['iteration_s']:7.3f} s" + (f"  ({rec['iteration_s'] / lb:5.2f}x lower bound)" if lb
                                                         else "") + note, flush=True)
        # Too few undisturbed iterations: every measured one counts, so that no run's median rests on one or two.
        short = [k for k in keys if len(clean[k]) < args.iters]
        records = {k: every[k] if k in short else clean[k] for k in keys}
        # Bit identity: plain and all-NVMe after the same number of iterations (set-aside reruns differ).
        nvme_run = runs["nvme"]["run"]
        while plain.done < nvme_run.done:
            plain.iteration()
        while nvme_run.done < plain.done:
            nvme_run.iteration()
        t0 = time.perf_counter()
        same = all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                     nvme_run.model.state_dict().values()))
        print(f"  all-NVMe weights equal plain PyTorch's after {plain.done} iterations: {same} "
              f"(compared in {time.perf_counter() - t0:.1f} s)", flush=True)
    finally:
        for r in runs.values():
            r["run"].close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)

    med = statistics.median
    plain_s = med(r["iteration_s"] for r in records["plain"])
    out = {"batch": batch, "seq": seq, "kind": kind, "bar": bar, "params": w.params, "model_bytes": model_bytes,
           "disk_now_gbps": disk,
           "device_budget_bytes": common["device_budget_bytes"], "bit_identical": same,
           "iterations_compared": plain.done, "fewer_clean_than_iters": short,
           "plain": {"measured_s": plain_s, "iterations": every["plain"]}, "placements": {}}
    for k, r in runs.items():
        p, recs = r["pred"], records[k]
        c = compare(r["label"], r["plan"], p, recs)
        events, end_s = r["last"]
        gaps = idle_gaps(events, end_s)
        out["placements"][k] = {
            "label": r["label"], "plan": r["plan"].compact(), "measured_s": c.measured_s,
            "lower_bound_s": p.lower_bound_s, "bound_by": p.bound_by, "predicted_s": p.iteration_s,
            "lower_bound_profile_disk_s": cm_probed.predict(r["plan"]).lower_bound_s,
            "fill_s": p.fill_s, "measured_over_lower_bound": c.measured_s / p.lower_bound_s,
            "predicted_over_measured": c.ratio, "over_plain": c.measured_s / plain_s,
            "pass": c.measured_s / p.lower_bound_s <= bar,
            "busy_measured_s": c.busy_measured_s, "busy_predicted_s": c.busy_predicted_s,
            "bytes_predicted": c.bytes_predicted, "bytes_counted": c.bytes_counted, "bytes_equal": c.bytes_equal,
            "iterations": [{"iteration_s": x["iteration_s"], "busy_s": x["busy_s"], "foreign_cpu": x["foreign_cpu"],
                            "canary_s": x["canary_s"], "set_aside": x["set_aside"]} for x in every[k]],
            "last_iteration_gaps": gaps, "trace": r["trace"]}
    out["nvme_over_plain"] = out["placements"]["nvme"]["over_plain"]
    return out


def table(b: dict) -> list[str]:
    res_short = {"compute": "comp", "h2d": "h2d", "d2h": "d2h", "disk_read": "dread", "disk_write": "dwrite",
                 "cpu_update": "upd"}
    head = (f"{'placement':12s} {'measured':>9s} {'lower bd':>9s} {'bound by':>12s} {'predicted':>9s} "
            f"{'meas/lb':>7s} {'pred/meas':>9s}  " + " ".join(f"{res_short[r]:>6s}" for r in RESOURCES)
            + f"  {'bar':>9s}  bytes")
    lines = [f"batch {b['batch']} x seq {b['seq']} ({b['kind']}), busy per resource in s:", head]
    for k, p in b["placements"].items():
        lines.append(f"{k:12s} {p['measured_s']:8.3f}s {p['lower_bound_s']:8.3f}s {p['bound_by']:>12s} "
                     f"{p['predicted_s']:8.3f}s {p['measured_over_lower_bound']:7.2f} "
                     f"{p['predicted_over_measured']:9.2f}  "
                     + " ".join(f"{p['busy_measured_s'][r]:6.3f}" for r in RESOURCES)
                     + f"  {'PASS' if p['pass'] else 'FAIL'} <={b['bar']:.2f}  "
                     + ("= model" if p["bytes_equal"] else "DIFFER"))
    lines.append("(bytes: those the runtime and store counted per link against the cost model's; without a device "
                 "budget they are equal, and the model does not price the refetches a tight budget forces)")
    if b["disk_now_gbps"]:
        lines.append("(lower bounds with the disk measured now; against the profile's disk rates measured / lower "
                     "bound is " + ", ".join(f"{k} {p['measured_s'] / p['lower_bound_profile_disk_s']:.2f}"
                                             for k, p in b["placements"].items()) + ")")
    lines.append(f"{'plain':12s} {b['plain']['measured_s']:8.3f}s   (all-NVMe / plain {b['nvme_over_plain']:.2f}x; "
                 f"weights bit-identical: {b['bit_identical']})")
    if b["fewer_clean_than_iters"]:
        lines.append(f"(fewer than --iters undisturbed iterations, so the medians are over every measured one, for: "
                     f"{', '.join(b['fewer_clean_than_iters'])}; the machine was loaded from outside)")
    for k, p in b["placements"].items():
        g = gaps_text(p["last_iteration_gaps"])
        lines.append(f"{k}: last iteration, {g[0]}")
        lines.extend("  " + x for x in g[1:])
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", help="profile name or JSON path (default: this machine's probe, else cpu-dev-2core)")
    ap.add_argument("--batches", default="1x64,2x256", help="BATCHxSEQ,... (default 1x64,2x256)")
    ap.add_argument("--io-bound", default="1x64", help="the batch held to the I/O-bound bar (%(default)s; the "
                                                       "others are held to the compute-bound one)")
    ap.add_argument("--iters", type=int, default=5, help="measured iterations per placement (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up iterations per placement (default 2)")
    ap.add_argument("--dir", help="where the NVMe stores go (default: a temporary directory under benchmarks/results,"
                                  " deleted at the end); each store is removed when its batch is done")
    ap.add_argument("--quick", action="store_true", help="a tiny model and tiny batches: checks the pipeline")
    ap.add_argument("--no-disk-now", dest="disk_now", action="store_false",
                    help="price the bounds with the profile's disk rates, not ones measured before each batch")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "placement_bench.json"))
    args = ap.parse_args(argv)
    flush_denormals()  # ours and plain alike: scheduler.probe.flush_denormals says why
    if args.iters < 1 or args.warmup < 0:
        raise SystemExit(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    if args.quick:
        shape, args.iters, args.disk_now = TINY, min(args.iters, 2), False
        if args.batches == ap.get_default("batches"):
            args.batches = "1x16,2x32"
        if args.io_bound == ap.get_default("io_bound"):
            args.io_bound = args.batches.split(",")[0]
    else:
        shape = PRESETS["gpt2"][0]
    batches = parse_batches(args.batches)
    hw = profiles.resolve(args.profile)
    results = Path(args.json).parent
    results.mkdir(parents=True, exist_ok=True)
    base = Path(args.dir) if args.dir else Path(temp_store_dir(str(results)))
    nparams = sum(p.numel() for p in build_transformer(shape, device="meta").parameters())
    print(f"placement benchmark: {'tiny' if args.quick else 'gpt2'} ({nparams / 1e6:.1f}M params, fp32), batches "
          f"{args.batches}, {args.warmup} warm-ups + {args.iters} iterations each, interleaved with plain PyTorch; "
          f"profile {hw.name}; load average {os.getloadavg()[0]:.2f}; stores under {base}", flush=True)
    t0 = time.perf_counter()
    try:
        out_batches = [run_batch(shape, hw, b, s, args, base, results) for b, s in batches]
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    print()
    lines = []
    for b in out_batches:
        lines += table(b) + [""]
    bars = []
    for b in out_batches:
        worst = max(b["placements"].values(), key=lambda p: p["measured_over_lower_bound"])
        bars.append((f"{b['batch']}x{b['seq']} ({b['kind']}): measured / lower bound <= {b['bar']:.2f} for every "
                     f"placement (worst {worst['measured_over_lower_bound']:.2f})",
                     all(p["pass"] for p in b["placements"].values())))
        if (b["batch"], b["seq"]) == PLAIN_BAR_BATCH:
            bars.append((f"{b['batch']}x{b['seq']}: all-NVMe / plain <= {PLAIN_BAR} ({b['nvme_over_plain']:.2f}x)",
                         b["nvme_over_plain"] <= PLAIN_BAR))
        bars.append((f"{b['batch']}x{b['seq']}: all-NVMe weights bit-identical to plain PyTorch", b["bit_identical"]))
    lines += [f"{'PASS' if ok else 'FAIL'}  {text}" for text, ok in bars]
    lines.append(f"(load average now {os.getloadavg()[0]:.2f}; {time.perf_counter() - t0:.0f} s in all"
                 + ("; --quick: a tiny model, whose times are overheads the model does not price" if args.quick
                    else "") + ")")
    print("\n".join(lines))
    out = {"model": "tiny" if args.quick else "gpt2", "params": nparams, "iters": args.iters, "warmup": args.warmup,
           "profile": hw.to_dict(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_end": os.getloadavg(),
           "bars": [{"bar": text, "pass": ok} for text, ok in bars], "pass": all(ok for _, ok in bars),
           "batches": out_batches, "table": lines}
    Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"results: {args.json}; traces: {results}/{Path(args.json).stem}.<batch>.<placement>.trace.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
