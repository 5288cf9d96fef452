"""How fast ``offload plan`` says "does not fit", and whether every fix it prints fits when fed back.

    .venv/bin/python benchmarks/plan_fixes.py           # every preset on a grid of machines (~1-3 min on 2 cores)
    .venv/bin/python benchmarks/plan_fixes.py --quick   # two presets

For each preset and each machine of the grid (the rtx4090 profile with smaller and larger tiers), plans once and
prints the planner's wall time; where it does not fit, plans again with each printed fix applied (its capacity,
or its --batch / --seq) and checks that it fits, and that one printed step less of a capacity fix does not (the
fix is the least, to the digits printed). Exit status 1 if any fix fails either check.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scheduler import planner, profile, workload  # noqa: E402

GiB, TB = 1 << 30, 10**12
GRID = [(24 * GiB, 64 * GiB, 1), (24 * GiB, 128 * GiB, 2 * TB), (10 * GiB, 128 * GiB, 2 * TB),
        (2 * GiB, 16 * GiB, 100 * GiB), (80 * GiB, 256 * GiB, 4 * TB), (24 * GiB, 8 * GiB, 10**9)]
KEYS = {"--device-memory": "device_memory_bytes", "--host-memory": "host_memory_bytes", "--nvme": "nvme_bytes"}


def fed_back(name: str, batch: int, seq: int, hw, fix: planner.Fix, step: int = 0):
    """Plan ``name`` with ``fix`` applied (a capacity ``step`` bytes smaller)."""
    caps, tokens = {}, {"--batch": batch, "--seq": seq}
    for flag, v in fix.values:
        if flag in KEYS:
            caps[KEYS[flag]] = v - step
        else:
            tokens[flag] = v
    w = workload.preset(name, batch=tokens["--batch"], seq=tokens["--seq"])
    return planner.plan(w, hw.with_capacities(**caps), max_sims=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    names = ["gpt2", "llama-70b"] if args.quick else list(workload.PRESETS)
    base = profile.resolve("rtx4090-pcie4-gen4nvme")
    bad, worst_no = 0, 0.0
    for name in names:
        for batch in (4, 32):
            for dev, host, nvme in GRID:
                hw = base.with_capacities(device_memory_bytes=dev, host_memory_bytes=host, nvme_bytes=nvme)
                w = workload.preset(name, batch=batch, seq=2048)
                t0 = time.perf_counter()
                res = planner.plan(w, hw)
                dt = time.perf_counter() - t0
                if res.fits:
                    print(f"{name:10s} b{batch:<3d} {dev / GiB:5.0f}/{host / GiB:5.0f} GiB/{nvme / 1e12:5.2f} TB  "
                          f"fits       {dt:6.2f} s")
                    continue
                worst_no = max(worst_no, dt)
                print(f"{name:10s} b{batch:<3d} {dev / GiB:5.0f}/{host / GiB:5.0f} GiB/{nvme / 1e12:5.2f} TB  "
                      f"NO in {dt:6.2f} s: {res.shortfall}")
                for fix in res.shortfall.fixes:
                    ok = fed_back(name, batch, 2048, hw, fix).fits
                    # one printed step less: the last digit of a size, or one sequence less
                    less = None
                    for flag, text in fix.changes:
                        if flag in KEYS and len(fix.changes) == 1:
                            num = text.rstrip("KMGTiB")
                            digits = len(num.split(".")[1]) if "." in num else 0
                            v = dict(fix.values)[flag]
                            unit = v / float(num)
                            less = fed_back(name, batch, 2048, hw, fix, step=max(1, int(unit * 10 ** -digits))).fits
                    verdict = "fits" if ok else "DOES NOT FIT"
                    if less is not None:
                        verdict += ", one step less does not" if not less else ", ONE STEP LESS FITS TOO"
                    print(f"    {str(fix):40s} {verdict}")
                    bad += (not ok)
    print(f"slowest 'does not fit': {worst_no:.2f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
