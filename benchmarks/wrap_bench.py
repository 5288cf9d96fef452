"""A >= 100M-param GPT trained with everything on NVMe vs the same model trained plainly in memory.

    .venv/bin/python benchmarks/wrap_bench.py             # GPT-2 small shape (124M), medians of 5 iterations
    .venv/bin/python benchmarks/wrap_bench.py --quick     # a tiny model, for CI

Prints, per mode, the iteration time (median) and, from the runtime's measured timeline, each resource's busy
time and the overlap efficiency ``iteration time / max over resources of busy time`` (1.0: the busiest
resource never waited; the bar is <= 1.25). Plain and offloaded iterations are interleaved.
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
from scheduler.workload import TransformerShape, build_transformer  # noqa: E402
from storage import format_bytes  # noqa: E402
from scheduler.probe import flush_denormals  # noqa: E402

GPT2_SMALL = TransformerShape(n_layer=12, d_model=768, n_head=12, d_ff=3072, vocab=50257, n_pos=1024, bias=True,
                              norm="layernorm", tied=True)
TINY = TransformerShape(n_layer=4, d_model=64, n_head=4, d_ff=256, vocab=512, n_pos=64, bias=True, norm="layernorm",
                        tied=True)


def loss_of(model, idx):
    logits = model(idx[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="NVMe store directory (default: a temporary one under benchmarks/results)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "wrap_bench.json"))
    args = ap.parse_args(argv)
    flush_denormals()  # ours and plain alike: scheduler.probe.flush_denormals says why
    shape = TINY if args.quick else GPT2_SMALL
    if args.quick:
        args.batch, args.seq, args.iters = 2, 32, 2
    results = Path(args.json).parent
    results.mkdir(parents=True, exist_ok=True)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="wrapbench-", dir=results))
    torch.manual_seed(0)
    plain_model = build_transformer(shape, device="cpu")
    nparams = sum(p.numel() for p in plain_model.parameters())
    model_bytes = nparams * 4
    off_model = build_transformer(shape, device="cpu")
    off_model.load_state_dict(plain_model.state_dict())
    print(f"wrap benchmark: {nparams / 1e6:.1f}M params ({format_bytes(model_bytes)}), batch {args.batch} x seq "
          f"{args.seq}, {args.iters} iterations; NVMe store in {work}", flush=True)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-4, fused=True)
    cfg = OffloadConfig(param_tier="nvme", state_tier="nvme", nvme_dirs=str(work), overlap_update=True,
                        device_budget_bytes=model_bytes // 2, prefetch=2)
    model, opt = wrap(off_model, torch.optim.AdamW(off_model.parameters(), lr=1e-4, fused=True), cfg)
    rt = runtime_of(model)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, shape.vocab, (args.batch, args.seq + 1), generator=g) for _ in range(args.iters + 1)]

    def iteration(m, o, idx):
        t0 = time.perf_counter()
        loss_of(m, idx).backward()
        o.step()
        o.zero_grad()
        return time.perf_counter() - t0

    iteration(plain_model, plain_opt, data[0])  # warm-up: state creation, first-touch of memory
    iteration(model, opt, data[0])
    t_plain, t_off, eff, busy = [], [], [], []
    for i in range(args.iters):
        t_plain.append(iteration(plain_model, plain_opt, data[i + 1]))
        t_off.append(iteration(model, opt, data[i + 1]))
        tl = rt.timeline.summary()
        top = max(tl["busy_s"].values())
        eff.append(t_off[-1] / top)
        busy.append(tl["busy_s"])
        print(f"  iter {i + 1}: plain {t_plain[-1]:6.2f} s   offload {t_off[-1]:6.2f} s   busiest "
              f"{tl['bottleneck']} {top:5.2f} s -> overlap efficiency {eff[-1]:.3f}", flush=True)
    med = statistics.median
    same = all(torch.equal(a, b) for a, b in zip(plain_model.state_dict().values(), model.state_dict().values()))
    busy_med = {r: med(b[r] for b in busy) for r in busy[0]}
    out = {"params": nparams, "batch": args.batch, "seq": args.seq, "iters": args.iters,
           "plain_s": t_plain, "offload_s": t_off, "ratio": med(t_off) / med(t_plain),
           "overlap_efficiency": eff, "overlap_efficiency_median": med(eff), "bar": 1.25,
           "pass": med(eff) <= 1.25, "busy_s_median": busy_med, "bit_identical": same,
           "device_budget_bytes": cfg.device_budget_bytes, "device_peak_bytes": rt.device_budget.peak_bytes,
           "runtime": {k: v for k, v in rt.report().items() if k not in ("units", "timeline")}}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1, default=str)
    trace = Path(args.json).with_suffix(".trace.json")
    rt.timeline.save_chrome_trace(str(trace))
    print()
    print(f"iteration: offload (params, grads, state on NVMe; device budget {format_bytes(cfg.device_budget_bytes)})"
          f" {med(t_off):.2f} s vs plain in memory {med(t_plain):.2f} s -> {med(t_off) / med(t_plain):.2f}x")
    print("busy per resource (median): " + ", ".join(f"{r} {v:.2f} s" for r, v in busy_med.items()))
    print(f"overlap efficiency (iteration / busiest resource): {med(eff):.3f}  (bar <= 1.25: "
          f"{'PASS' if med(eff) <= 1.25 else 'FAIL'})")
    print(f"same weights as plain after {args.iters + 1} iterations: {same}")
    print(f"results: {args.json}, timeline of the last iteration: {trace}")
    rt.close()
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
