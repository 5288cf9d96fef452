"""Predicted vs measured for several ranks: a few real iterations of :class:`ShardedOffloadOptimizer` on ``world``
gloo processes on this machine, beside what :mod:`scheduler.sharded` predicts for the same run
(``offload plan --nproc N --measure``, ``benchmarks/nproc_validate.py``).

Each rank trains our :class:`TransformerLM` of a shape (fp32, its own random tokens) as a user's loop does: forward,
backward (the grads' reduce-scatters start during it), ``step()`` (the shard's update, the all-gather),
``zero_grad()``. The ranks start each iteration together (a barrier, outside the timed span), as the collectives of
the iteration before leave them anyway. What each rank measures:

- iteration time: wall time of forward, backward, ``step()`` and ``zero_grad()`` (median over the measured ones),
  and of forward and backward alone;
- memory per tier: on the device, the buckets' params, grads and grad shares (their storages' bytes, from the
  optimizer's report); on the host, the inner optimizer's host pool at its peak (host state, NVMe staging); on
  NVMe, the rank's store (its files are pre-allocated at their capacity); and the process's peak resident set above what it held
  before the model was built (on a CPU device, device and host memory are both RAM: activations and allocator
  slack show there, in nothing else);
- collectives: every call the optimizer makes during the measured iterations, by kind, with its tensor's bytes,
  counted by wrapping ``torch.distributed``'s functions in the rank's process (the optimizer is not told).

Ranks are started with ``torch.multiprocessing`` and meet through a file (no port to race for), each with
``threads`` threads, 1 by default: what ``torchrun`` gives each of several processes unless ``OMP_NUM_THREADS`` is
set.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import offload.distributed as sharded_mod
from offload.config import OffloadConfig
from offload.measure import cpu_seconds
from scheduler.probe import flush_denormals
from scheduler.workload import TransformerShape, build_transformer

COLLECTIVES = ("reduce_scatter", "all_gather", "all_reduce", "broadcast")


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


@contextlib.contextmanager
def counting_collectives(counts: dict):
    """While inside, every collective the sharded optimizer issues is counted in ``counts``:
    ``{kind: {"calls": n, "bytes": b}}`` with ``b`` the bytes of the collective's full tensor (a reduce-scatter's
    input, an all-gather's output, an all-reduce's or broadcast's tensor), as :mod:`scheduler.sharded` names them."""
    saved = {"rs": sharded_mod._reduce_scatter, "ag": sharded_mod._all_gather, "ar": dist.all_reduce,
             "bc": dist.broadcast}

    def count(kind, nbytes):
        c = counts.setdefault(kind, {"calls": 0, "bytes": 0})
        c["calls"] += 1
        c["bytes"] += nbytes

    def rs(out, inp, *a, **k):
        count("reduce_scatter", _nbytes(inp))
        return saved["rs"](out, inp, *a, **k)

    def ag(out, inp, *a, **k):
        count("all_gather", _nbytes(out))
        return saved["ag"](out, inp, *a, **k)

    def ar(t, *a, **k):
        count("all_reduce", _nbytes(t))
        return saved["ar"](t, *a, **k)

    def bc(t, *a, **k):
        count("broadcast", _nbytes(t))
        return saved["bc"](t, *a, **k)

    # The optimizer calls its module's reduce-scatter and all-gather names and torch.distributed's all_reduce
    # (through the module object, so patching the attribute reaches it).
    sharded_mod._reduce_scatter, sharded_mod._all_gather, dist.all_reduce, dist.broadcast = rs, ag, ar, bc
    try:
        yield counts
    finally:
        sharded_mod._reduce_scatter, sharded_mod._all_gather = saved["rs"], saved["ag"]
        dist.all_reduce, dist.broadcast = saved["ar"], saved["bc"]


def _rss_bytes() -> int:
    """The process's resident set now (Linux /proc; ru_maxrss is a peak only)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _die_with_parent(parent: int) -> None:
    """Linux: this rank is killed when the process that started it dies (killed, not only failed: no rank is left
    waiting in a collective forever), or exits now if that happened while it started."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _rank_main(rank: int, world: int, tmp: str, spec: dict) -> None:
    _die_with_parent(spec["parent"])
    flush_denormals()  # a measurement condition, as offload.measure.Run's (scheduler.probe.flush_denormals says why)
    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    with sharded_mod.spawned_rank():
        torch.save(_rank_run(rank, world, Path(tmp), spec), Path(tmp) / f"result{rank}.pt")


def _rank_run(rank: int, world: int, tmp: Path, spec: dict) -> dict:
    shape: TransformerShape = spec["shape"]
    batch, seq = spec["batch"], spec["seq"]
    base_rss = _rss_bytes()
    torch.manual_seed(0)  # the same weights on every rank (rank 0's are broadcast anyway)
    model = build_transformer(shape, device="cpu")
    cfg = OffloadConfig(**spec["config"])
    opt = sharded_mod.ShardedOffloadOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True),
                                              config=cfg, bucket_bytes=spec["bucket_bytes"])
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own part of the global batch
    data = [torch.randint(0, shape.vocab, (batch, seq + 1), generator=gen) for _ in range(2)]
    times, backward, cpu, counts = [], [], [], {}
    for i in range(spec["warmup"] + spec["iters"]):
        idx = data[i % len(data)]
        dist.barrier()  # start together: the measured span is this rank's iteration, not the other's lag
        measured = i >= spec["warmup"]
        with counting_collectives(counts) if measured else contextlib.nullcontext():
            c0 = cpu_seconds()
            t0 = time.perf_counter()
            logits = model(idx[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
            loss.backward()
            del logits, loss
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            wall = time.perf_counter() - t0
            c1 = cpu_seconds()
        if measured:
            times.append(wall)
            backward.append(t1 - t0)
            cpu.append(None if c0 is None or c1 is None else (c1[0] - c0[0], c1[1] - c0[1]))
    rep = opt.report()
    inner = rep["inner"] or {}
    store = opt._inner.store if opt._inner is not None else None
    out = {"rank": rank, "times_s": times, "forward_backward_s": backward, "cpu_s": cpu, "collectives": counts, "report": rep,
           "device": rep["bucket_bytes"], "host_pool_peak": (inner.get("host_pool") or {}).get("peak_in_use_bytes", 0),
           "state_bytes_by_tier": inner.get("state_bytes_by_tier", {}),
           "nvme_bytes": store.capacity_bytes if store is not None else 0,  # the store pre-allocates its files
           "rss_growth": _peak_rss_bytes() - base_rss}
    opt.close()
    return out


def run(shape: TransformerShape, *, world: int, batch: int, seq: int, config: dict, iters: int = 3,
        warmup: int = 1, bucket_bytes: int = sharded_mod.DEFAULT_BUCKET_BYTES, threads: int = 1,
        timeout_s: float = 600.0, tmp: str | None = None) -> list[dict]:
    """Train on ``world`` gloo ranks (``config``: ``OffloadConfig`` keyword arguments; its ``nvme_dirs`` get a
    directory per rank); each rank's measurements (module note), rank 0 first."""
    if world < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"measure_sharded.run: expected world >= 1, iters >= 1, warmup >= 0, got world={world}, "
                         f"iters={iters}, warmup={warmup}")
    threads = threads or 1
    with contextlib.ExitStack() as stack:
        d = tmp or stack.enter_context(tempfile.TemporaryDirectory(prefix="offload-nproc-"))
        spec = {"shape": shape, "batch": batch, "seq": seq, "config": config, "iters": iters, "warmup": warmup,
                "bucket_bytes": bucket_bytes, "threads": threads, "parent": os.getpid()}
        ctx = torch.multiprocessing.spawn(_rank_main, args=(world, d, spec), nprocs=world, join=False)
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1):  # raises, with the rank's traceback, when a rank raised
                if time.monotonic() > deadline:
                    raise TimeoutError(f"measure_sharded: {world} ranks did not finish in {timeout_s:.0f} s")
        finally:  # a rank that failed, timed out or was interrupted leaves the others waiting in a collective
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(Path(d) / f"result{r}.pt", weights_only=False) for r in range(world)]


def foreign_shares(ranks: list[dict]) -> list[float | None]:
    """Per measured iteration, the share of the machine's CPU that processes other than the ranks used (another
    job on a shared machine slows the ranks where no model sees it)."""
    out = []
    for k, (wall, c) in enumerate(zip(ranks[0]["times_s"], ranks[0]["cpu_s"])):
        mine = [r["cpu_s"][k] for r in ranks]
        if c is None or any(m is None for m in mine) or wall <= 0:
            out.append(None)
            continue
        out.append(max(0.0, (c[0] - sum(m[1] for m in mine)) / (wall * (os.cpu_count() or 1))))
    return out


def median_time(ranks: list[dict]) -> float:
    """The iteration time of the run: per iteration the slowest rank (the others wait for it at the next
    collective), then the median over iterations."""
    per_iter = [max(ts) for ts in zip(*(r["times_s"] for r in ranks))]
    return statistics.median(per_iter)


def compare(pred, ranks: list[dict]) -> dict:
    """``pred`` (a :class:`scheduler.sharded.ShardedPrediction`) beside what the ranks measured: per rank, memory
    per tier (the device's buffers: params, grads, grad shares; activations are predicted, not measured on a CPU
    device), the iteration time, and per kind the collectives' calls and bytes per iteration, predicted and counted."""
    iters = len(ranks[0]["times_s"])
    mem = pred.memory
    dev_pred = sum(v for k, v in mem["device"].items() if k != "activations")
    rows = []
    for r in ranks:
        dev = sum(r["device"].values())
        rows.append({"rank": r["rank"],
                     "device_buffers": {"predicted": dev_pred, "measured": dev},
                     "host": {"predicted": sum(mem["host"].values()), "measured": r["host_pool_peak"]},
                     "nvme": {"predicted": sum(mem["nvme"].values()), "measured": r["nvme_bytes"]},
                     "total": {"predicted": dev_pred + sum(mem["host"].values()) + sum(mem["nvme"].values()),
                               "measured": dev + r["host_pool_peak"] + r["nvme_bytes"]},
                     "activations_predicted": mem["device"].get("activations", 0),
                     "peak_rss_growth": r["rss_growth"],
                     "iteration_s": statistics.median(r["times_s"]),
                     "forward_backward_s": statistics.median(r["forward_backward_s"])})
    predicted_coll: dict[str, dict] = {}
    for c in pred.collectives:
        p = predicted_coll.setdefault(c.kind, {"calls": 0, "bytes": 0})
        p["calls"] += c.calls
        p["bytes"] += c.tensor_bytes
    colls = {}
    for kind in sorted(set(predicted_coll) | {k for r in ranks for k in r["collectives"]}):
        counted = [{k: v // iters for k, v in r["collectives"].get(kind, {"calls": 0, "bytes": 0}).items()}
                   for r in ranks]
        colls[kind] = {"predicted": predicted_coll.get(kind, {"calls": 0, "bytes": 0}), "counted": counted,
                       "equal": all(c == predicted_coll.get(kind, {"calls": 0, "bytes": 0}) for c in counted)}
    measured = median_time(ranks)
    return {"nproc": pred.nproc, "state_tier": pred.state_tier, "iterations": iters,
            "iteration_s": {"predicted": pred.iteration_s, "measured": measured, "ratio": pred.iteration_s / measured,
                            "per_iteration": [max(ts) for ts in zip(*(r["times_s"] for r in ranks))],
                            "foreign_cpu": foreign_shares(ranks)},
            "busy_predicted_s": pred.busy_s, "ranks": rows, "collectives": colls}


def text(cmp: dict) -> str:
    from storage import format_bytes as fb

    t = cmp["iteration_s"]
    foreign = [f for f in t["foreign_cpu"] if f is not None]
    lines = [f"{cmp['nproc']} ranks, state on {cmp['state_tier']}: predicted vs measured per rank "
             f"({cmp['iterations']} iterations, median)",
             f"  iteration    predicted {t['predicted']:.3f} s, measured {t['measured']:.3f} s (slowest rank per "
             f"iteration; predicted / measured {t['ratio']:.2f})"
             + (f"; other processes used {statistics.median(foreign):.0%} of the CPU meanwhile" if foreign else "")]
    for r in cmp["ranks"]:
        lines.append(f"  rank {r['rank']}: iteration {r['iteration_s']:.3f} s, of which forward and backward (the "
                     f"reduce-scatters started in it) {r['forward_backward_s']:.3f} s (predicted "
                     f"{cmp['busy_predicted_s']['compute'] + cmp['busy_predicted_s']['reduce_scatter_exposed']:.3f} s)")
        for k in ("device_buffers", "host", "nvme", "total"):
            p, m = r[k]["predicted"], r[k]["measured"]
            ratio = f"{p / m:.3f}" if m else ("equal" if p == m else "-")
            lines.append(f"    {k:15s} predicted {fb(p):>10s}  measured {fb(m):>10s}  {ratio}")
        lines.append(f"    activations    predicted {fb(r['activations_predicted']):>10s}  (not measured on a CPU "
                     f"device; the process's peak resident set grew {fb(r['peak_rss_growth'])})")
    lines.append("  collectives per iteration, per rank (calls, bytes of their tensors):")
    for kind, c in cmp["collectives"].items():
        p = c["predicted"]
        counted = "; ".join(f"{x['calls']} x {fb(x['bytes'])}" for x in c["counted"])
        lines.append(f"    {kind:15s} predicted {p['calls']} x {fb(p['bytes'])}, counted {counted}  "
                     f"{'equal' if c['equal'] else 'DIFFER'}")
    return "\n".join(lines)
