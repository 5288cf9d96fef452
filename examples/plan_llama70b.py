"""Dry run: can Llama-2-70B be fine-tuned on one 24 GiB GPU with 256 GiB of host memory and a 2 TB NVMe drive?
(With 128 GiB, no: a CPU update keeps an fp32 grad buffer per unit on the host, 128.5 GiB for this model alone;
`--host-memory 128` says so and names the least host memory that fits.)

    .venv/bin/python examples/plan_llama70b.py                    # the answer, in about a second, allocating nothing
    .venv/bin/python examples/plan_llama70b.py --out plan-70b/   # also plan.json, trace.json and timeline.svg

The same as `offload plan llama-70b --batch 4 --seq 2048 --profile rtx4090-pcie4-gen4nvme --device-memory 24GiB
--host-memory 256GiB --nvme 2TB`, from Python: the model is described by its shapes (a preset; a meta-device
module or a HF config.json work the same way), the machine by a shipped profile.
"""

import argparse

from scheduler import planner, profile, report, workload


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--profile", default="rtx4090-pcie4-gen4nvme")
    ap.add_argument("--host-memory", type=int, default=256, help="GiB of host memory (default 256)")
    ap.add_argument("--out", help="directory for plan.json, trace.json and timeline.svg")
    args = ap.parse_args()

    w = workload.preset("llama-70b", batch=args.batch, seq=args.seq)
    hw = profile.resolve(args.profile).with_capacities(device_memory_bytes=24 << 30, host_memory_bytes=args.host_memory << 30,
                                                       nvme_bytes=2 * 10**12)
    res = planner.plan(w, hw)
    print(report.text(w, hw, res, report.compare(w, hw, res)))
    if args.out:
        for path in report.write(args.out, w, hw, res, report.compare(w, hw, res)):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
