"""Several ranks on this machine: what a profile's ``collective_gbps``, ``collective_latency_s`` and
``cpu_thread_speedup`` hold (scheduler/profile.py), measured the way ShardedOffloadOptimizer's ranks run.

    .venv/bin/python benchmarks/collective_bw.py                    # 2 gloo ranks, 1 thread each
    .venv/bin/python benchmarks/collective_bw.py --world 4 --sizes 1 8 25 --json
    .venv/bin/python benchmarks/collective_bw.py --speedup          # also: the training step on 1..all threads

Each collective (reduce-scatter, all-gather, all-reduce of fp32 tensors) is timed at each size on every rank,
rounds interleaved (the machine's load weighs on all alike), the ranks starting together after a barrier; the
slowest rank's time counts (a collective ends for all when it ends for the last). Bus bandwidth is nccl-tests'
convention: the bytes each rank sends in a ring, ``(N-1)/N`` of the tensor for reduce-scatter and all-gather,
``2(N-1)/N`` for all-reduce, over the time. Per kind, a least-squares line ``time = latency + wire bytes /
bandwidth`` over the sizes gives the two numbers a profile keeps; the median time at each size is printed beside
the line's, so a poor fit shows.

``--speedup`` times ``offload probe``'s training step (its GPT, batch 2 x seq 256, fp32) with 1, 2, ... threads up to
the machine's cores, rounds interleaved, median: a rank given ``cores / N`` threads runs at that many threads'
speedup over one, which the profile's all-core rate divided by ``N`` misses when threads scale less than linearly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from offload.distributed import spawned_rank

KINDS = ("reduce_scatter", "all_gather", "all_reduce")


def wire_factor(kind: str, world: int) -> float:
    """Bytes each rank sends per byte of the collective's full tensor, in a ring (nccl-tests' bus bandwidth)."""
    return (2 if kind == "all_reduce" else 1) * (world - 1) / world


def _rank(rank: int, world: int, tmp: str, sizes: list[int], rounds: int, threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    with spawned_rank():
        _time_collectives(rank, world, sizes, rounds, out)


def _time_collectives(rank: int, world: int, sizes: list[int], rounds: int, out: str) -> None:
    rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    times: dict[str, list[float]] = {}
    bufs = {}
    for nbytes in sizes:
        n = nbytes // 4 // world * world
        full, share = torch.randn(n), torch.randn(n // world)
        bufs[nbytes] = {"reduce_scatter": lambda f=full, s=share: rs(s, f),
                        "all_gather": lambda f=full, s=share: ag(f, s),
                        "all_reduce": lambda f=full: dist.all_reduce(f)}
    for r in range(rounds + 1):  # round 0 warms each size up
        for nbytes in sizes:
            for kind in KINDS:
                dist.barrier()
                t0 = time.perf_counter()
                bufs[nbytes][kind]()
                dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                if r:
                    times.setdefault(f"{kind} {nbytes}", []).append(dt.item())
    if rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(latency s, bandwidth GB/s) of the least-squares line time = a + x / bw through (wire bytes, seconds)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return max(0.0, my - slope * mx), 1 / slope / 1e9


def thread_speedup(rounds: int) -> dict[int, float]:
    """Threads -> the probe's training step's speedup over one thread (median of ``rounds`` interleaved rounds)."""
    import os

    from scheduler.probe import PROBE_LM, flush_denormals
    from scheduler.workload import build_transformer

    flush_denormals()  # as every measurement here: scheduler.probe.flush_denormals says why
    torch.manual_seed(0)
    model = build_transformer(PROBE_LM, device="cpu")
    idx = torch.randint(0, PROBE_LM.vocab, (2, 257))
    counts = list(range(1, (os.cpu_count() or 1) + 1))
    times: dict[int, list[float]] = {t: [] for t in counts}
    saved = torch.get_num_threads()
    try:
        for r in range(rounds + 1):  # round 0 warms up
            for t in counts:
                torch.set_num_threads(t)
                t0 = time.perf_counter()
                logits = model(idx[:, :-1])
                torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                  idx[:, 1:].reshape(-1)).backward()
                model.zero_grad()
                if r:
                    times[t].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    one = statistics.median(times[1])
    return {t: one / statistics.median(ts) for t, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1, 4, 16, 25, 64], help="MiB")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (torchrun's default: 1)")
    ap.add_argument("--speedup", action="store_true", help="also time the probe's training step on 1..all threads")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sizes = [int(s * 2**20) for s in args.sizes]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/times.json"
        torch.multiprocessing.spawn(_rank, args=(args.world, tmp, sizes, args.rounds, args.threads, out),
                                    nprocs=args.world)
        with open(out) as f:
            times = json.load(f)
    result = {"world": args.world, "threads": args.threads, "kinds": {}}
    for kind in KINDS:
        pts = [(nb * wire_factor(kind, args.world), statistics.median(times[f"{kind} {nb}"])) for nb in sizes]
        lat, bw = fit(pts)
        result["kinds"][kind] = {"latency_s": lat, "bus_gbps": bw,
                                 "sizes": [{"bytes": nb, "median_s": t, "spread": (max(times[f"{kind} {nb}"]) -
                                                                                    min(times[f"{kind} {nb}"])) / t,
                                            "line_s": lat + x / (bw * 1e9)}
                                           for nb, (x, t) in zip(sizes, pts)]}
    if args.speedup:
        result["thread_speedup"] = thread_speedup(args.rounds)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.world} gloo ranks, {args.threads} thread(s) each; median of {args.rounds} rounds (slowest rank)")
    for kind, r in result["kinds"].items():
        print(f"{kind}: latency {r['latency_s'] * 1e3:.2f} ms, bus bandwidth {r['bus_gbps']:.3f} GB/s")
        for s in r["sizes"]:
            print(f"  {s['bytes'] / 2**20:8.2f} MiB  {s['median_s'] * 1e3:8.2f} ms (line {s['line_s'] * 1e3:8.2f} ms, "
                  f"spread {s['spread']:.0%})")
    if args.speedup:
        print("training step speedup over one thread: " + ", ".join(
            f"{t} threads {v:.2f}" for t, v in result["thread_speedup"].items()))


if __name__ == "__main__":
    main()
