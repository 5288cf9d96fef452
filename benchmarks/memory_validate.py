"""Predicted vs measured memory per tier: each placement trained a few steps through offload.wrap, its peaks (the
device budget's, the host pool's, the store's extents) beside the cost model's prediction, term by term.

    PYTHONPATH=. python benchmarks/memory_validate.py [--json memory_validate.json] [--layers 4] [--iters 3]

The prediction follows the runtime's own rules (scheduler/buffers.py); the bar is every tier within 10%. Device
grads and activations are autograd's, outside the device budget, so the device compares the budget's terms.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile

from offload.config import OffloadConfig
from offload.measure import MEMORY_PLANS, measure_memory
from scheduler.workload import TransformerShape

TOLERANCE = 0.10

def shape(layers: int) -> TransformerShape:
    return TransformerShape(n_layer=layers, d_model=64, n_head=4, d_ff=256, vocab=512, n_pos=32, bias=True,
                            norm="layernorm")


def run(layers: int = 4, iters: int = 3, batch: int = 2, seq: int = 16):
    out = []
    for name, fields, frozen in MEMORY_PLANS:
        d = tempfile.mkdtemp(prefix="memory-validate-")
        try:
            out.append(measure_memory(shape(layers), OffloadConfig(nvme_dirs=d, **fields), batch=batch, seq=seq,
                                      iters=iters, frozen=frozen, name=name))
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the comparisons here")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args(argv)
    results = run(args.layers, args.iters)
    worst = 0.0
    print(f"{'plan':38s} {'device':>7s} {'host':>7s} {'nvme':>7s}   (predicted / measured peak)")
    for c in results:
        print(f"{c.name:38s} " + " ".join(f"{c.ratio(t):7.3f}" for t in ("device", "host", "nvme")))
        worst = max([worst] + [abs(c.ratio(t) - 1) for t in ("device", "host", "nvme")])
    print()
    for c in results:
        print(c.text())
    within = worst <= TOLERANCE
    print(f"\nworst: {worst:.1%} off; {'every tier within' if within else 'NOT all within'} {TOLERANCE:.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tolerance": TOLERANCE, "plans": [c.to_dict() for c in results]}, f, indent=1)
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
