"""Several ranks: a ``ShardedOffloadOptimizer`` run (ZeRO-1/2, offload/distributed.py) on ``N`` ranks of one machine,
priced per rank: its memory per tier against one rank's share of the machine, the bytes of each collective per
iteration at the profile's collective bandwidth, and one iteration's time (``offload plan --nproc N``).

Why one module: the bucket layout decides the memory, the collectives and the shard each rank updates; all three
are computed from it here, as the runtime computes them from its buckets.

What a rank holds (offload/distributed.py's note, "Buckets"): the trainable params laid out flat, last param
first, in buckets of about ``bucket_bytes``, each param starting on a multiple of 1024 elements and each bucket
padded to a multiple of ``1024 N``; every rank keeps **all** params (replicated) and a grad buffer as large, plus
its ``1/N`` share of each bucket's grads (the reduce-scatter's output). Rank ``r`` owns the ``r``-th ``1/N`` of
every bucket: the ranges where that share meets a param are the pieces of its inner ``OffloadOptimizer``, whose
state (and fp32 masters where the params are not fp32 host memory the update can change in place) lives on the
state tier, each tensor padded to 64 bytes in its chunk. Params offloaded by ``offload.wrap`` are not sharded, so
here they stay on the device; frozen params are outside the buckets, whole on every rank.

Collectives per iteration, per rank, named as ``torch.distributed`` names them (the bytes of the full tensor:
a reduce-scatter's input, an all-gather's output):

- ``reduce_scatter``: each bucket's grads, once backward has finished them (in bucket order);
- ``all_reduce``: which params got a grad on any rank (one int32 per param); with clipping also the squared norm
  (one fp32);
- ``all_gather``: each bucket's params after the update.

(Where the backend has no reduce-scatter the runtime all-reduces each bucket instead; ``reduce_scatter=False``.)
Time: ``calls x collective_latency_s + wire bytes / collective_gbps[kind]``, where wire bytes are what each rank
sends in a ring: ``(N-1)/N`` of the tensor for reduce-scatter and all-gather, ``2(N-1)/N`` for all-reduce, and
``collective_gbps`` is nccl-tests' bus bandwidth (``benchmarks/collective_bw.py`` measures it).

Contention (:func:`per_rank`): the ranks of one machine share its host memory, NVMe (capacity and bandwidth) and
CPU cores (the CPU update), so each rank gets ``1/N`` of them; on a CPU device the ranks also share the device
(its compute, copies and memory budget: ``1/N`` each); on a GPU each rank has its own device, and its copies get
``1/N`` of ``pcie_root_gbps`` where the profile gives the bandwidth the GPUs' links share, else their own link.

Iteration time: forward and backward at the rank's share of the compute; the grads' reduce-scatters overlap
backward on a GPU (only what backward cannot hide shows), and on a CPU device they do not (gloo's threads run on
the cores backward uses: they take their time from it); then the flags' all-reduce, the shard's update (CPU:
at the rank's share of the cores; NVMe state streams beside it), and the all-gather.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from scheduler.cost import CostModel
from scheduler.profile import HardwareProfile
from scheduler.workload import Workload

SPLIT_ALIGN = 1024
"""Elements each param (and each rank's share) starts on: ``offload.optimizer.SPLIT_ALIGN`` (a test checks)."""
SLOT_ALIGN = 64
"""Byte alignment of each tensor in an optimizer chunk: ``offload.optimizer.SLOT_ALIGN`` (a test checks)."""
POOL_ALIGN = 4096
"""The host pool hands out buffers in multiples of this (storage/hostpool.py)."""
DEFAULT_BUCKET_BYTES = 25 << 20
"""``offload.distributed.DEFAULT_BUCKET_BYTES`` (a test checks)."""
DEFAULT_SUBGROUP_NUMEL = 16 << 20
DEFAULT_BUFFERS = 4
"""``OffloadConfig``'s ``subgroup_numel`` and ``buffers`` defaults (a test checks)."""
KINDS = ("reduce_scatter", "all_gather", "all_reduce")
STATE_TIERS = ("host", "device", "nvme")
"""The state tiers a plan may choose, in the order ties go (host: ``OffloadConfig``'s default)."""


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


# -- layout ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Bucket:
    numel: int
    """Elements, padded to a multiple of ``1024 N``."""
    params: tuple[tuple[int, int], ...]
    """(offset, numel) of each param in the bucket."""


def buckets(numels: Sequence[int], world: int, elem_bytes: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES
            ) -> list[Bucket]:
    """The runtime's buckets (``ShardedOffloadOptimizer._build_buckets``) over trainable params of ``numels`` elements
    (in parameter order, one dtype and param group)."""
    out, cur, n = [], [], 0
    for numel in reversed(numels):
        if cur and (n + numel) * elem_bytes > bucket_bytes:
            out.append(Bucket(_align(n, SPLIT_ALIGN * world), tuple(cur)))
            cur, n = [], 0
        cur.append((n, numel))
        n = _align(n + numel, SPLIT_ALIGN)
    if cur:
        out.append(Bucket(_align(n, SPLIT_ALIGN * world), tuple(cur)))
    return out


def owned(layout: list[Bucket], world: int, rank: int) -> list[int]:
    """Elements of each range rank ``rank`` owns, in bucket order: its inner optimizer's pieces."""
    pieces = []
    for b in layout:
        share = b.numel // world
        lo = rank * share
        for off, n in b.params:
            a, z = max(off, lo), min(off + n, lo + share)
            if a < z:
                pieces.append(z - a)
    return pieces


def subgroups(pieces: list[int], target: int | None) -> list[list[int]]:
    """The inner optimizer's subgroups (``offload.optimizer._cut``, elementwise optimizers): pieces packed up to
    ``target`` elements, a larger one cut on 1024-element boundaries; ``None``: one subgroup."""
    if target is None:
        return [list(pieces)] if pieces else []
    packs, cur, cur_n = [], [], 0
    for n in pieces:
        if n > target:
            step = max(SPLIT_ALIGN, target // SPLIT_ALIGN * SPLIT_ALIGN)
            if cur:
                packs.append(cur)
                cur, cur_n = [], 0
            packs += [[min(step, n - s)] for s in range(0, n, step)]
            continue
        if cur and cur_n + n > target:
            packs.append(cur)
            cur, cur_n = [], 0
        cur.append(n)
        cur_n += n
    if cur:
        packs.append(cur)
    return packs


def param_numels(workload: Workload) -> tuple[list[int], bool]:
    """(trainable params' elements in parameter order, exact): from the units' tensor sizes where the workload has
    them (``from_module`` with ``chunk_align_bytes``; blocks in order, the rest unit's first, which is where an LM's
    embedding is), else one tensor per unit: then the per-param padding (at most 1023 elements each) is not
    counted, well under 1% for any model large enough to shard."""
    out, exact = [], True
    for u in workload.units:
        if u.trainable_numels:
            out += list(u.trainable_numels)
        elif u.trainable:
            out.append(u.trainable)
            exact = False
    return out, exact


# -- one rank's share of the machine ---------------------------------------------------------------------------------
def per_rank(hw: HardwareProfile, n: int, threads: int = 1) -> HardwareProfile:
    """The profile of one of ``n`` ranks, each on ``threads`` threads, on the machine ``hw`` describes (module note,
    "Contention")."""
    if n < 1:
        raise ValueError(f"--nproc: expected a number of ranks >= 1, got {n}")
    if n == 1:
        return hw
    src = dict(hw.sources)
    why = f"; / {n}: {n} ranks share it"
    ch: dict = {}

    def split(field, value, reason=why):
        ch[field] = value
        src[field] = src[field] + reason

    split("host_memory_bytes", hw.host_memory_bytes // n)
    split("host_reserve", {"bytes": hw.host_reserve["bytes"] // n, "fraction": hw.host_reserve["fraction"]})
    split("nvme_bytes", hw.nvme_bytes // n)
    for f in ("disk_read_gbps", "disk_write_gbps", "disk_mixed_gbps", "cpu_update_params_per_s",
              "cpu_update_params_per_s_under_io"):
        split(f, getattr(hw, f) / n)
    if hw.device_name == "cpu":  # the device is the host's cores and memory: the ranks share it too
        share, reason = compute_share(hw, n, threads)
        split("device_tflops", {k: v * share for k, v in hw.device_tflops.items()}, reason)
        split("device_update_params_per_s", hw.device_update_params_per_s / n)
        split("device_memory_bytes", hw.device_memory_bytes // n)
        split("device_reserve", {"bytes": hw.device_reserve["bytes"] // n, "fraction": hw.device_reserve["fraction"]})
        for f in ("h2d_gbps", "d2h_gbps", "bidir_gbps"):
            split(f, getattr(hw, f) / n)
    elif hw.pcie_root_gbps:
        for f in ("h2d_gbps", "d2h_gbps", "bidir_gbps"):
            v = min(getattr(hw, f), hw.pcie_root_gbps / n)
            if v < getattr(hw, f):
                split(f, v, f"; {n} ranks share pcie_root_gbps {hw.pcie_root_gbps:g}")
    return dataclasses.replace(hw, name=f"{hw.name} (1 of {n} ranks)", sources=src, **ch)


def compute_share(hw: HardwareProfile, n: int, threads: int = 1) -> tuple[float, str]:
    """(the fraction of a CPU device's all-core compute rate one of ``n`` ranks gets, why): each rank runs on
    ``threads`` threads (``OMP_NUM_THREADS``; torchrun gives each of several processes 1 unless it is set), at their
    speedup over one (``cpu_thread_speedup``) over the all-core speedup, less when the ranks' threads outnumber the
    cores (they take turns); ``1/n`` without the profile's figures."""
    sp = hw.cpu_thread_speedup
    if not sp:
        return 1 / n, f"; / {n}: {n} ranks share the cores"
    cores = max(sp)
    below = max(t for t in sp if t <= max(1, min(threads, cores)))
    share = sp[below] / sp[cores] * min(1.0, cores / (n * threads))
    return share, (f"; x {share:.3f}: {n} ranks on {cores} cores, {threads} thread{'s' if threads > 1 else ''} each "
                   f"(speedup {sp[below]:.2f} of {sp[cores]:.2f}, cpu_thread_speedup)")


def collective_rates(hw: HardwareProfile) -> tuple[dict[str, float], float, str]:
    """(bus GB/s per kind, latency s per call, where they came from): the profile's, else an estimate said so."""
    if hw.collective_gbps:
        return dict(hw.collective_gbps), hw.collective_latency_s, hw.sources["collective_gbps"]
    # Estimate: without NVLink, NCCL's rings between GPUs of one host go through PCIe (and often host memory),
    # so no faster than the slower copy direction; on a CPU device gloo is bound by memcpy and its threads.
    if hw.device_name == "cpu":
        bw = min(hw.h2d_gbps, hw.d2h_gbps) / 40
        why = "estimate: 1/40 of the memcpy rate (gloo on one host; cpu-dev-2core measured 1/45 to 1/18)"
    else:
        bw = min(hw.h2d_gbps, hw.d2h_gbps) / 2
        why = "estimate: half the slower PCIe copy direction (NCCL rings over PCIe, no NVLink)"
    return {k: bw for k in KINDS}, 1e-4, why + "; measure it: benchmarks/collective_bw.py"


# -- the prediction ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    what: str
    calls: int
    tensor_bytes: int
    """Bytes of the full tensors of its calls per iteration (a reduce-scatter's inputs, an all-gather's outputs)."""
    wire_bytes: int
    """Bytes this rank sends for them, in a ring."""
    seconds: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardedPrediction:
    nproc: int
    state_tier: str
    update_on: str
    memory: dict
    """Tier -> term -> bytes, per rank."""
    capacity: dict
    """Tier -> bytes one rank may fill (its share of the machine, less its share of the reserve)."""
    collectives: tuple[Collective, ...]
    busy_s: dict
    """compute, reduce_scatter_exposed, step_collectives, update, disk, all_gather: seconds per iteration."""
    iteration_s: float
    owned_params: int
    buckets: int
    exact_layout: bool
    collective_source: str
    threads: int = 1
    """Threads each rank computes on (a CPU device's share of the cores)."""

    @property
    def memory_totals(self) -> dict:
        return {t: sum(v.values()) for t, v in self.memory.items()}

    @property
    def shortfall(self) -> dict:
        tot = self.memory_totals
        return {t: tot[t] - self.capacity[t] for t in tot if tot[t] > self.capacity[t]}

    @property
    def fits(self) -> bool:
        return not self.shortfall

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "memory_totals": self.memory_totals, "shortfall": self.shortfall,
                "fits": self.fits}


class ShardedCost:
    """Formulas for ``workload`` (one rank's batch) on ``nproc`` ranks of the machine ``profile`` describes."""

    def __init__(self, workload: Workload, profile: HardwareProfile, nproc: int, *, numels: Sequence[int] | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, subgroup_numel: int = DEFAULT_SUBGROUP_NUMEL,
                 buffers: int = DEFAULT_BUFFERS, clip: bool = False, reduce_scatter: bool = True,
                 nvme_capacity_bytes: int | None = None, threads_per_rank: int = 1):
        if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
            raise ValueError(f"--nproc: expected a number of ranks >= 1, got {nproc!r}")
        if isinstance(threads_per_rank, bool) or not isinstance(threads_per_rank, int) or threads_per_rank < 1:
            raise ValueError(f"threads per rank: expected a positive integer, got {threads_per_rank!r}")
        self.w, self.machine, self.n = workload, profile, nproc
        self.threads = threads_per_rank
        self.hw = per_rank(profile, nproc, threads_per_rank)
        self.cm = CostModel(workload, self.hw)
        exact = numels is not None
        if numels is None:
            numels, exact = param_numels(workload)
        self.numels, self.exact = list(numels), exact
        self.elem = workload.param_bytes_per_param
        self.layout = buckets(self.numels, nproc, self.elem, bucket_bytes)
        self.subgroup_numel, self.buffers, self.clip = subgroup_numel, buffers, clip
        self.reduce_scatter, self.nvme_capacity_bytes = reduce_scatter, nvme_capacity_bytes
        # The largest share is rank 0's or the last's (padding falls at a bucket's end): price the larger.
        self.pieces = max((owned(self.layout, nproc, r) for r in (0, nproc - 1)), key=sum)
        self.padded = sum(b.numel for b in self.layout)
        self.frozen_bytes = sum(workload.param_bytes(i) - workload.trainable_param_bytes(i)
                                for i in range(len(workload.units)))

    # -- memory -----------------------------------------------------------------------------------------------------
    def needs_master(self, update_on: str) -> bool:
        """``OffloadOptimizer._needs_master``: low-precision params, or params on a GPU updated on the CPU."""
        return self.elem != 4 or (self.machine.device_name != "cpu" and update_on == "cpu")

    def subgroups(self, tier: str, update_on: str) -> list[list[int]]:
        """The inner optimizer's subgroups (pieces' elements): host state updated on the CPU is one subgroup;
        elsewhere subgroups of ``subgroup_numel``."""
        one = tier == "host" and update_on == "cpu"
        return subgroups(self.pieces, None if one else self.subgroup_numel)

    def chunks(self, tier: str, update_on: str) -> list[int]:
        """Bytes of each inner subgroup's chunk: per piece its state tensors (and master), each 64-byte aligned."""
        per_tensor = self.w.state_bytes_per_param // 4 - (1 if self.elem != 4 else 0)  # moments (the master apart)
        tensors = per_tensor + (1 if self.needs_master(update_on) else 0)
        return [sum(tensors * _align(4 * n, SLOT_ALIGN) for n in sub) for sub in self.subgroups(tier, update_on)]

    def memory(self, tier: str, update_on: str) -> dict[str, dict[str, int]]:
        """Per rank, tier -> term -> bytes (module note)."""
        e, n = self.elem, self.n
        chunks = self.chunks(tier, update_on)
        state = sum(chunks)
        device = {"params": self.padded * e + self.frozen_bytes, "grads": self.padded * e,
                  "grad_shares": self.padded // n * e, "activations": self.cm.act_bytes}
        if not self.reduce_scatter:  # the all-reduce fallback reduces a copy of every bucket's grads
            device["grads_reduced"] = self.padded * e
        host: dict[str, int] = {}
        nvme: dict[str, int] = {}
        # The update's fp32 grads: in scratch for each subgroup whose grads are not fp32 where it runs
        # (OffloadOptimizer._scratch_bytes): low-precision params, or a GPU's grads updated on the CPU.
        largest = max((sum(sub) for sub in self.subgroups(tier, update_on)), default=0)
        if update_on == "cpu" and (e != 4 or self.machine.device_name != "cpu"):
            host["grad_scratch"] = _align(4 * largest, POOL_ALIGN)
        elif update_on == "device" and e != 4:
            device["grad_scratch"] = 4 * largest
        if tier == "device":
            device["state"] = state
        elif tier == "host":
            host["state"] = sum(_align(c, POOL_ALIGN) for c in chunks)
        else:  # streamed through `buffers` host buffers; the store is sized for the state when not told
            held = sorted(chunks, reverse=True)[:self.buffers]
            host["state_staging"] = sum(_align(c, POOL_ALIGN) for c in held)
            per_elem = 4 * (self.w.state_bytes_per_param // 4 - (1 if e != 4 else 0)
                            + (1 if self.needs_master(update_on) else 0))
            need = sum(sum(sub) * per_elem + len(sub) * SLOT_ALIGN * 8  # OffloadOptimizer._open_store's estimate
                       for sub in subgroups(self.pieces, self.subgroup_numel))
            nvme["store"] = self.nvme_capacity_bytes or int(need * 2.2) + (64 << 20)
        return {"device": device, "host": host, "nvme": nvme}

    def capacity(self) -> dict[str, int]:
        return {t: self.hw.usable_bytes(t) for t in ("device", "host", "nvme")}

    # -- collectives ------------------------------------------------------------------------------------------------
    def collectives(self) -> list[Collective]:
        bw, lat, _ = collective_rates(self.machine)
        n = self.n
        ring = (n - 1) / n

        def coll(kind, what, calls, nbytes):
            wire = int(nbytes * ring * (2 if kind == "all_reduce" else 1))
            secs = (calls * lat + wire / (bw[kind] * 1e9)) if n > 1 else 0.0
            return Collective(kind, what, calls, nbytes, wire, secs)

        grads = self.padded * self.elem
        out = [coll("reduce_scatter", "grads, one per bucket", len(self.layout), grads) if self.reduce_scatter else
               coll("all_reduce", "grads, one per bucket (no reduce-scatter in the backend)", len(self.layout), grads),
               coll("all_reduce", "which params got a grad (int32 each)", 1, 4 * len(self.numels))]
        if self.clip:
            out.append(coll("all_reduce", "squared grad norm (fp32)", 1, 4))
        out.append(coll("all_gather", "params, one per bucket", len(self.layout), self.padded * self.elem))
        return out

    # -- time -------------------------------------------------------------------------------------------------------
    def predict(self, tier: str = "host", update_on: str | None = None) -> ShardedPrediction:
        if tier not in STATE_TIERS:
            raise ValueError(f"state tier: expected one of {STATE_TIERS}, got {tier!r}")
        update_on = update_on or ("device" if tier == "device" else "cpu")
        hw, cm, e = self.hw, self.cm, self.elem
        mem = self.memory(tier, update_on)
        colls = self.collectives()
        fwd, bwd = sum(cm.fwd_s), sum(cm.bwd_s)
        rs = colls[0].seconds
        if hw.device_name == "cpu":  # gloo's threads share the cores with backward: nothing hidden
            rs_exposed = rs
        else:  # started as backward finishes each bucket: only the last bucket's, or what backward cannot hide
            k = len(self.layout)
            rs_exposed = max(rs / k, rs - bwd * (k - 1) / k)
        step_coll = sum(c.seconds for c in colls[1:-1])
        gather = colls[-1].seconds
        owned_params = sum(self.pieces)
        chunks = self.chunks(tier, update_on)
        streamed = tier == "nvme" and len(chunks) > self.buffers  # fewer chunks stay in the buffers between steps
        disk_s = 0.0
        if streamed:
            sb = sum(chunks)
            disk_s = 2 * sb / (hw.disk_mixed_gbps * 1e9)
        if update_on == "device":
            update_s = owned_params / hw.device_update_params_per_s
            if tier != "device":  # state to the device and back
                update_s += sum(chunks) * (1 / (hw.h2d_gbps * 1e9) + 1 / (hw.d2h_gbps * 1e9))
        else:
            rate = hw.cpu_update_params_per_s_under_io if streamed else hw.cpu_update_params_per_s
            update_s = owned_params / rate
            if hw.device_name != "cpu":  # the shard's grads to the host, its new params back
                update_s += owned_params * e * (1 / (hw.d2h_gbps * 1e9) + 1 / (hw.h2d_gbps * 1e9))
        step_s = max(update_s, disk_s) + (max(chunks) / (hw.disk_read_gbps * 1e9) if streamed else 0.0)
        busy = {"compute": fwd + bwd, "reduce_scatter_exposed": rs_exposed, "step_collectives": step_coll,
                "update": update_s, "disk": disk_s, "all_gather": gather}
        iteration = fwd + bwd + rs_exposed + step_coll + step_s + gather
        return ShardedPrediction(nproc=self.n, state_tier=tier, update_on=update_on, memory=mem,
                                 capacity=self.capacity(), collectives=tuple(colls), busy_s=busy,
                                 iteration_s=iteration, owned_params=owned_params, buckets=len(self.layout),
                                 exact_layout=self.exact, collective_source=collective_rates(self.machine)[2],
                                 threads=self.threads)


def plan(workload: Workload, profile: HardwareProfile, nproc: int, **kw) -> tuple[ShardedPrediction,
                                                                                  list[ShardedPrediction]]:
    """The fastest state tier that fits one rank (else the one nearest to fitting: the fewest bytes short), and
    every tier's prediction."""
    cost = ShardedCost(workload, profile, nproc, **kw)
    preds = [cost.predict(t) for t in STATE_TIERS]
    best = min(preds, key=lambda p: (not p.fits, sum(p.shortfall.values()), p.iteration_s,
                                     STATE_TIERS.index(p.state_tier)))
    return best, preds


def text(workload: Workload, profile: HardwareProfile, best: ShardedPrediction,
         preds: list[ShardedPrediction]) -> str:
    """``offload plan --nproc N``'s report."""
    from storage import format_bytes as fb

    n = best.nproc
    lines = [f"{workload.name} on {n} ranks of {profile.name} (ShardedOffloadOptimizer, ZeRO-1/2): "
             f"{workload.trainable / 1e6:.1f}M trainable params, batch {workload.batch} x seq {workload.seq} per "
             f"rank ({n * workload.batch} x {workload.seq} per iteration)",
             f"  {'fits' if best.fits else 'DOES NOT FIT'}: optimizer state on {best.state_tier}, updated on "
             f"{best.update_on}; each rank updates {best.owned_params / 1e6:.2f}M params "
             f"({best.buckets} bucket{'s' if best.buckets != 1 else ''}"
             f"{'' if best.exact_layout else ', per-param padding not counted'})"]
    if not best.fits:
        lines.append("  short per rank: " + ", ".join(f"{t} by {fb(b)}" for t, b in best.shortfall.items()) +
                     "; params and grads stay whole on every rank (offload.wrap's params are not sharded yet): "
                     "--nproc 1 plans offload.wrap")
    lines.append("  memory per rank (used / usable, its share of the machine):")
    for tier, terms in best.memory.items():
        items = ", ".join(f"{k} {fb(v)}" for k, v in terms.items() if v)
        lines.append(f"    {tier:6s} {fb(sum(terms.values())):>10s} / {fb(best.capacity[tier]):>10s}"
                     + (f"   ({items})" if items else ""))
    bw, lat, _ = collective_rates(profile)
    where = best.collective_source.split(":")[0]
    lines.append(f"  collectives per iteration, per rank (bus GB/s {', '.join(f'{k} {v:g}' for k, v in bw.items())}, "
                 f"{lat * 1e3:g} ms a call: {where}):")
    for c in best.collectives:
        lines.append(f"    {c.kind:14s} {c.calls:4d} x  {fb(c.tensor_bytes):>10s} tensors, {fb(c.wire_bytes):>10s} "
                     f"sent  {c.seconds * 1e3:9.1f} ms   {c.what}")
    b = best.busy_s
    lines.append(f"  iteration {best.iteration_s:.3f} s: compute {b['compute']:.3f} s "
                 f"({compute_share(profile, n, best.threads)[0]:.2f} of the device's cores, "
                 f"{best.threads} thread{'s' if best.threads > 1 else ''} a rank"
                 if profile.device_name == "cpu" else f"  iteration {best.iteration_s:.3f} s: compute "
                                                      f"{b['compute']:.3f} s (own device")
    lines[-1] += (f"), grads' reduce-scatter {b['reduce_scatter_exposed']:.3f} s not hidden by backward, "
                  f"update {b['update']:.3f} s" + (f" beside disk {b['disk']:.3f} s" if b["disk"] else "") +
                  f", all-gather {b['all_gather']:.3f} s")
    lines.append(f"  contention: host memory, NVMe and the CPU update split {n} ways"
                 + ("; the CPU device's cores, copies and memory budget too" if profile.device_name == "cpu" else
                    f"; PCIe root {profile.pcie_root_gbps:g} GB/s shared" if profile.pcie_root_gbps else
                    "; each GPU its own PCIe link (no pcie_root_gbps in the profile)"))
    lines.append("  state tiers: " + "; ".join(
        f"{p.state_tier} {p.iteration_s:.3f} s{'' if p.fits else ' (does not fit)'}" for p in preds))
    return "\n".join(lines)
