"""Clipping with the overlapped update: speculate (update during backward, validate the norm after, undo and
redo exactly when it clips) against waiting for backward, on a 124M GPT with params and optimizer state on NVMe
(by default; --params/--state/--grads place them elsewhere).

    .venv/bin/python benchmarks/clip_bench.py              # GPT-2 small (124M), batch 1 x 64, medians of 5
    .venv/bin/python benchmarks/clip_bench.py --batch 2 --seq 256 --state host   # another point and placement
    .venv/bin/python benchmarks/clip_bench.py --quick      # a tiny model, to try it

Four wrapped models train side by side, their iterations interleaved (so machine noise hits all alike):

- ``overlap``: the overlapped update, no clipping (the speed to keep);
- ``speculate``: ``max_grad_norm`` set above every norm: every step speculates and commits;
- ``wait``: the same clipping with ``speculate=False``: every step waits for backward before updating;
- ``clip-every-step``: ``max_grad_norm`` below every norm, speculation on: the first step rolls back, then the
  policy stops speculating and the steps wait for backward.

The bars: speculate / overlap <= 1.05, wait / speculate >= 1.2, clip-every-step / wait <= 1.05 (medians after
the warm-up steps). Each mode's policy does not time steps (``SpeculationPolicy(timed=False)``): by default the
runtime times both kinds and keeps the faster, which would mix them. ``speculate`` must equal ``overlap`` bit for bit (nothing clipped), and ``clip-every-step``
must equal ``wait`` (both clip every step).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from offload import OffloadConfig, runtime_of, wrap  # noqa: E402
from offload.optimizer import SpeculationPolicy  # noqa: E402
from scheduler.workload import TransformerShape, build_transformer  # noqa: E402
from storage import format_bytes  # noqa: E402
from scheduler.probe import flush_denormals  # noqa: E402

GPT2_SMALL = TransformerShape(n_layer=12, d_model=768, n_head=12, d_ff=3072, vocab=50257, n_pos=1024, bias=True,
                              norm="layernorm", tied=True)
TINY = TransformerShape(n_layer=4, d_model=64, n_head=4, d_ff=256, vocab=512, n_pos=64, bias=True, norm="layernorm",
                        tied=True)
MODES = {"overlap": {}, "speculate": {"max_grad_norm": 1e6}, "wait": {"max_grad_norm": 1e-6, "speculate": False},
         "clip-every-step": {"max_grad_norm": 1e-6}}


def loss_of(model, idx):
    logits = model(idx[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="directory for the NVMe stores (default: a temporary one under benchmarks/results)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--params", default="nvme", help="params tier (default nvme)")
    ap.add_argument("--state", default="nvme", help="optimizer state tier (default nvme)")
    ap.add_argument("--grads", default="host", help="grads tier (default host)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="iterations left out of the medians (default 2)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "clip_bench.json"))
    args = ap.parse_args(argv)
    flush_denormals()  # ours and plain alike: scheduler.probe.flush_denormals says why
    shape = TINY if args.quick else GPT2_SMALL
    if args.quick:
        args.batch, args.seq, args.iters = 2, 32, 3
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="clipbench-", dir=Path(args.json).parent))
    torch.manual_seed(0)
    init = build_transformer(shape, device="cpu").state_dict()
    nparams = sum(v.numel() for k, v in init.items() if not k.endswith("lm_head.weight"))
    model_bytes = nparams * 4
    print(f"clip benchmark: {nparams / 1e6:.1f}M params ({format_bytes(model_bytes)}), batch {args.batch} x seq "
          f"{args.seq}, {args.warmup} + {args.iters} iterations per mode; params on {args.params}, state on "
          f"{args.state}, grads on {args.grads}; stores in {work}",
          flush=True)
    runs = {}
    for name, extra in MODES.items():
        m = build_transformer(shape, device="cpu")
        m.load_state_dict(init)
        (work / name).mkdir(parents=True, exist_ok=True)
        cfg = OffloadConfig(param_tier=args.params, state_tier=args.state, grad_tier=args.grads,
                            nvme_dirs=str(work / name),
                            device_budget_bytes=model_bytes // 2, prefetch=2, **extra)
        runs[name] = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True), cfg)
        # Each mode measures its own kind of step: the policy's timing rule (which would wait on some steps to
        # time them, then keep the faster kind) is off; its clipping rule stays.
        runs[name][1].speculation = SpeculationPolicy(timed=False)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, shape.vocab, (args.batch, args.seq + 1), generator=g)
            for _ in range(args.warmup + args.iters)]
    times = {name: [] for name in MODES}
    for i, idx in enumerate(data):
        line = []
        for name, (model, opt) in runs.items():
            t0 = time.perf_counter()
            loss_of(model, idx).backward()
            opt.step()
            opt.zero_grad()
            times[name].append(time.perf_counter() - t0)
            line.append(f"{name} {times[name][-1]:5.2f} s")
        print(f"  iter {i + 1}{' (warm-up)' if i < args.warmup else ''}: " + "   ".join(line), flush=True)
    med = {name: statistics.median(t[args.warmup:]) for name, t in times.items()}
    sds = {name: model.state_dict() for name, (model, _) in runs.items()}
    same = lambda a, b: all(torch.equal(sds[a][k], sds[b][k]) for k in sds[a])  # noqa: E731
    stats = {name: {k: v for k, v in opt.stats.items() if k.startswith("spec") or k in ("steps", "rollback_s")}
             for name, (_, opt) in runs.items()}
    ratios = {"speculate/overlap": med["speculate"] / med["overlap"], "wait/speculate": med["wait"] / med["speculate"],
              "clip-every-step/wait": med["clip-every-step"] / med["wait"]}
    bars = {"speculate/overlap": ("<=", 1.05), "wait/speculate": (">=", 1.2), "clip-every-step/wait": ("<=", 1.05)}
    passed = {k: (ratios[k] <= b) if op == "<=" else (ratios[k] >= b) for k, (op, b) in bars.items()}
    out = {"params": nparams, "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "iters": args.iters,
           "placement": {"params": args.params, "state": args.state, "grads": args.grads},
           "times_s": times, "median_s": med, "ratios": ratios, "pass": passed, "stats": stats,
           "bit_identical": {"speculate==overlap": same("speculate", "overlap"),
                             "clip-every-step==wait": same("clip-every-step", "wait")}}
    print()
    for name in MODES:
        print(f"{name:>16}: {med[name]:6.2f} s per iteration (median)   {stats[name]}")
    for k, (op, b) in bars.items():
        print(f"{k:>22}: {ratios[k]:.3f}  (bar {op} {b}: {'PASS' if passed[k] else 'FAIL'})")
    print(f"bit-identical: {out['bit_identical']}")
    for name, (model, _) in runs.items():
        runtime_of(model).close()
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"results: {args.json}")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
