"""The cost model against the runtime: predicted iteration time within 15% of the measured one on at least 5
placements of a >= 100M-param model on this machine (CPU device, NVMe tier), and its bytes per link equal to
the bytes the runtime and the store count.

    .venv/bin/python benchmarks/plan_validate.py --probe  # probe this machine, then GPT-2 small (124M) fp32,
                                                          # batch 2 x seq 256, 7 placements (~6-10 min on 2 cores)
    .venv/bin/python benchmarks/plan_validate.py          # the same from the last probe (`offload probe`)
    .venv/bin/python benchmarks/plan_validate.py --quick  # a tiny model, for CI (times not meaningful)

The seventh placement is the planner's own per-unit choice when the host may hold only half the model (params,
grads and state), run as it is through ``offload.wrap(plan=...)`` (``--no-planner`` skips it).

The profile is ``--profile``, else this machine's cached probe (``offload probe``), else the shipped
``cpu-dev-2core``; ``--probe`` measures a fresh one first. Placements are built up front and their iterations
interleaved (one of each in turn), so the machine's load weighs on all alike; each gets a warm-up iteration
(state is created by the first step), then medians over ``--iters``. An iteration during which other processes
took more than 5% of the CPU, or just before which a fixed matmul ran 25% slower than its best, is set aside and
run again (the machine's load is what the model cannot see). Writes ``benchmarks/results/plan_validate.json``.
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
import torch  # noqa: E402

from offload import OffloadConfig  # noqa: E402
from offload.measure import (Quiet, Run, compare, config_to_plan, cpu_seconds, foreign_share,  # noqa: E402
                             temp_store_dir, workload_of)
from scheduler import profile as profiles  # noqa: E402
from scheduler.cost import CostModel  # noqa: E402
from scheduler.planner import UnitPlacement, uniform  # noqa: E402
from scheduler.workload import PRESETS, TransformerShape, build_transformer  # noqa: E402
from storage import Tier  # noqa: E402
from scheduler.probe import flush_denormals  # noqa: E402

TINY = TransformerShape(n_layer=4, d_model=64, n_head=4, d_ff=256, vocab=512, n_pos=64, bias=True, norm="layernorm",
                        tied=True)
BAR = 0.15


def planner_choice(w, hw, share: float = 0.5):
    """What the planner chooses when the host may hold only ``share`` of the model's params, grads and state
    (the rest must go to NVMe), updates on the CPU: a per-unit plan mixing host and NVMe, run as it is."""
    from scheduler.planner import OPTIONS
    from scheduler.planner import plan as make_plan

    total = sum(w.param_bytes(i) + w.grad_bytes(i) + w.state_bytes(i) for i in range(len(w.units)))
    options = [o for o in OPTIONS if o.update == "cpu"]
    res = make_plan(w, hw.with_capacities(host_memory_bytes=int(share * total), host_reserve_bytes=0), options=options)
    return dataclasses.replace(res.plan, strategy="planner")

# (name, OffloadConfig fields): the runtime's placements, from everything in host memory to everything on NVMe.
PLACEMENTS = [
    ("host params, host state", dict(param_tier="host", state_tier="host")),
    ("host params, host state, step after backward, prefetch 0",
     dict(param_tier="host", state_tier="host", overlap_update=False, prefetch=0)),
    ("host params, nvme state", dict(param_tier="host", state_tier="nvme")),
    ("nvme params, host state, prefetch 1", dict(param_tier="nvme", state_tier="host", prefetch=1)),
    ("all on nvme", dict(param_tier="nvme", state_tier="nvme", grad_tier="nvme")),
    ("all on nvme, step after backward", dict(param_tier="nvme", state_tier="nvme", grad_tier="nvme",
                                              overlap_update=False)),
]


class Plain:
    """The same model trained in memory without offload, interleaved with the placements: it checks the compute
    part of the model alone, and shows how much the machine's load moved the measured times."""

    def __init__(self, shape: TransformerShape, *, batch: int, seq: int):
        torch.manual_seed(0)
        self.model = build_transformer(shape, device="cpu")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.idx = torch.randint(0, shape.vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(1))

    def iteration(self) -> float:
        t0 = time.perf_counter()
        logits = self.model(self.idx[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.idx[:, 1:].reshape(-1)).backward()
        self.opt.step()
        self.opt.zero_grad()
        return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", help="profile name or JSON path (default: this machine's probe, else cpu-dev-2core)")
    ap.add_argument("--probe", action="store_true", help="run `offload probe` first (cached as it does) and predict "
                                                        "from it: calibration and validation under the same load")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3, help="measured iterations per placement (after one warm-up)")
    ap.add_argument("--dir", help="where the NVMe stores go (default: under benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="a tiny model, one iteration each: checks the pipeline")
    ap.add_argument("--no-planner", action="store_true", help="skip the planner's own mixed per-unit placement")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "plan_validate.json"))
    args = ap.parse_args(argv)
    flush_denormals()  # ours and plain alike: scheduler.probe.flush_denormals says why
    shape, name = (TINY, "tiny") if args.quick else (PRESETS["gpt2"][0], "gpt2")
    if args.quick:
        args.batch, args.seq, args.iters = 2, 16, 1
    if args.probe:
        from scheduler.probe import probe_and_cache

        hw, path = probe_and_cache(quick=args.quick, directory=args.dir)
        print(f"probed this machine: {path}", flush=True)
    else:
        hw = profiles.resolve(args.profile)
    w = workload_of(shape, batch=args.batch, seq=args.seq, name=name)
    base = Path(args.dir) if args.dir else Path(args.json).parent
    print(f"plan validation: {name} ({w.params / 1e6:.1f}M params) fp32, batch {args.batch} x seq {args.seq}, "
          f"{len(PLACEMENTS) + (not args.no_planner)} placements, 1 warm-up + {args.iters} iterations each, interleaved; profile "
          f"{hw.name}; load average {os.getloadavg()[0]:.2f}", flush=True)
    runs, dirs = [], []
    try:
        for label, fields in PLACEMENTS:
            d = temp_store_dir(str(base))
            dirs.append(d)
            cfg = OffloadConfig(nvme_dirs=d, **fields)
            plan = config_to_plan(cfg, w, strategy=label)
            runs.append((label, plan, CostModel(w, hw).predict(plan, events=True), Run(shape, cfg, batch=args.batch,
                                                                                       seq=args.seq)))
        if not args.no_planner:  # the planner's own per-unit choice, run as it is (offload.wrap(plan=...))
            d = temp_store_dir(str(base))
            dirs.append(d)
            plan = planner_choice(w, hw)
            label = f"planner, host for half the model: {plan.compact()}"
            runs.append((label, plan, CostModel(w, hw).predict(plan, events=True),
                         Run(shape, OffloadConfig(nvme_dirs=d), batch=args.batch, seq=args.seq, plan=plan)))
        plain = Plain(shape, batch=args.batch, seq=args.seq)
        # No offload: everything on the device (the CPU), the update there too.
        plain_pred = CostModel(w, hw).predict(uniform(w, UnitPlacement(Tier.DEVICE, Tier.DEVICE, "device"), "plain",
                                                      prefetch_depth=0)).iteration_s
        # Rounds interleave the placements (and plain). A disturbed iteration (offload.measure.Quiet) is set
        # aside, and rounds go on until each has --iters clean ones (at most 4 x --iters rounds; then the clean
        # ones it has count, or all when none is, and the summary says so).
        clean = {label: [] for label in ["plain"] + [r[0] for r in runs]}
        every = {label: [] for label in clean}
        q = Quiet()
        for it in range(1 + 4 * args.iters):
            todo = [label for label in clean if len(clean[label]) < args.iters]
            if not todo:
                break
            for label in todo:
                q.before()
                if label == "plain":
                    c0 = cpu_seconds()
                    t = plain.iteration()
                    rec, predicted = {"iteration_s": t, "foreign_cpu": foreign_share(c0, cpu_seconds(), t)}, plain_pred
                else:
                    _, _plan, pred, run = next(r for r in runs if r[0] == label)
                    rec, predicted = run.iteration(), pred.iteration_s
                why = q.judge(rec)
                if it:
                    every[label].append(rec)
                    if why is None:
                        clean[label].append(rec)
                note = f"  (set aside: {why})" if it and why else ""
                print(f"  {'warm-up' if not it else f'round {it}':8s} {label:58s} {rec['iteration_s']:6.2f} s "
                      f"(predicted {predicted:6.2f} s){note}", flush=True)
        records = {label: clean[label] or every[label] for label in clean}  # disturbed ones only if none is clean
        disturbed_used = [label for label in clean if len(clean[label]) < args.iters]
        plain_s = [r["iteration_s"] for r in records["plain"]]
    finally:
        for *_, run in runs:
            run.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    results = [compare(label, plan, pred, records[label]) for label, plan, pred, _ in runs]
    print()
    for c in results:
        print(c.text())
    print()
    print(f"{'placement':58s} {'predicted':>9s} {'measured':>9s} {'ratio':>6s}  within {BAR:.0%}  bytes")
    for c in results:
        ok = abs(c.ratio - 1) <= BAR
        print(f"{c.name:58s} {c.predicted_s:8.2f}s {c.measured_s:8.2f}s {c.ratio:6.2f}  {'yes' if ok else 'NO':>9s}"
              f"  {'equal' if c.bytes_equal else 'DIFFER'}")
    plain_med = statistics.median(plain_s)
    print(f"{'(reference) plain, in memory, no offload':58s} {plain_pred:8.2f}s {plain_med:8.2f}s "
          f"{plain_pred / plain_med:6.2f}")
    within = sum(abs(c.ratio - 1) <= BAR for c in results)
    bytes_ok = all(c.bytes_equal for c in results)
    passed = within >= 5 and bytes_ok and w.params >= 100e6
    print(f"\n{within} of {len(results)} placements within {BAR:.0%}, bytes per link "
          f"{'equal' if bytes_ok else 'NOT equal'} on all: bar {'PASS' if passed else 'FAIL'} (load average now "
          f"{os.getloadavg()[0]:.2f}; a shared machine inflates and scatters measured times"
          + (f"; fewer than --iters clean iterations for: {'; '.join(disturbed_used)}" if disturbed_used else "") + ")"
          + ("; --quick: a tiny model, whose times are overheads the model does not price" if args.quick else ""))
    out = {"model": name, "params": w.params, "batch": args.batch, "seq": args.seq, "iters": args.iters,
           "bar": BAR, "within": within, "bytes_equal": bytes_ok, "pass": passed,
           "loadavg_end": os.getloadavg(), "profile": hw.to_dict(),
           "plain": {"predicted_s": plain_pred, "measured_s": plain_med, "iterations_s": plain_s},
           "set_aside": {label: len(every[label]) - len(clean[label]) for label in clean},
           "disturbed_used": disturbed_used, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
           "placements": [c.to_dict() for c in results]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
