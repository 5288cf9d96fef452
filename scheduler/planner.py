"""Plan and planner: where each unit's params, grads and optimizer state live, where its update runs.

``plan(workload, profile)`` is a pure, deterministic function. The search:

1. **Greedy on counts.** Units of equal size are interchangeable for bytes and busy times, so the search first
   works on *how many* units of each size take each placement option. It starts from no offload and, while a
   tier is over capacity, moves units to the option with the least predicted-time increase per byte freed on the
   short tier (the bound of :meth:`CostModel.bound` is the time proxy: it is exact accounting and costs O(1)).
   Then, while some move lowers the proxy and still fits, it takes the best one (this is what balances CPU
   updates against device updates over the link: the answer is rarely all or nothing).
2. **Placement in order.** Counts become per-unit placements in two arrangements (faster options first, since the
   first blocks' updates finish last; or spread evenly, so update work interleaves with backward), each simulated.
3. **Local search on the simulation**: change one unit's option, or swap two neighbours, keep improvements, within
   a fixed number of simulations (deterministic, not a time limit); from the best arrangement and, as a second
   start, from the best uniform plan.

The counts are tried at each prefetch depth; the fastest fitting plan wins. A plan that cannot fit comes back with
:class:`Shortfall`: the tier, how many bytes it lacks under the placement that needs least of it, and the
smallest change that makes it fit.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

from scheduler.cost import CostModel, Prediction
# Plan and UnitPlacement live in scheduler/plan.py (the cost model needs them too); imported from here they still work.
from scheduler.plan import OPTIONS, Plan, UnitPlacement
from scheduler.profile import HardwareProfile
from scheduler.workload import Workload
from storage import Tier, format_bytes

D, H, N = Tier.DEVICE, Tier.HOST, Tier.NVME


@dataclasses.dataclass(frozen=True)
class Shortfall:
    """Why nothing fits: the tier, the bytes it lacks under the placement needing least of it, and the fix."""

    tier: str
    short_bytes: int
    fix: str

    def __str__(self) -> str:
        return f"{self.tier} memory is short by {format_bytes(self.short_bytes)}: {self.fix}"


@dataclasses.dataclass(frozen=True)
class Result:
    plan: Plan
    prediction: Prediction
    fits: bool
    shortfall: Shortfall | None = None


def uniform(workload: Workload, pl: UnitPlacement, strategy: str, **kw) -> Plan:
    """Every block at ``pl``; the rest unit keeps its params on the device: it is held there through the
    iteration wherever it lives (cost.py), so elsewhere it would only add a fetch."""
    units = [pl] * len(workload.units)
    if workload.units[0].kind == "rest":
        units[0] = dataclasses.replace(pl, params=D)
    return Plan(strategy=strategy, units=tuple(units), **kw)


# -- the search ----------------------------------------------------------------------------------------------------------
class _Search:
    def __init__(self, cm: CostModel, options: Sequence[UnitPlacement]):
        self.cm = cm
        w = cm.w
        # Groups of interchangeable units: same kind and size, as much of it trained. The rest unit may only keep
        # params on the device.
        keyed: dict[tuple, list[int]] = {}
        for i, u in enumerate(w.units):
            keyed.setdefault((u.kind, u.params, u.trainable, u.fwd_flops, u.bwd_flops, u.act_bytes), []).append(i)
        self.groups = list(keyed.values())
        self.opts = [[o for o in options if not (w.units[g[0]].kind == "rest" and o.params is not D)]
                     for g in self.groups]
        if any(not o for o in self.opts):
            raise ValueError("plan: the options given leave the rest unit none (it needs params on 'device')")
        self.traffic = [[cm.unit_traffic(g[0], o) for o in opts] for g, opts in zip(self.groups, self.opts)]
        self.cap = cm.capacity()

    def evaluate(self, counts, proto: Plan) -> tuple[float, dict]:
        t = None
        for gi, cs in enumerate(counts):
            for oi, c in enumerate(cs):
                if c:
                    tt = self.traffic[gi][oi].scaled(c)
                    t = tt if t is None else t + tt
        b = self.cm.busy(t)
        hw = self.cm.hw
        proxy = max(b.values()) + 0.02 * sum(b.values())  # the small sum breaks ties towards less traffic
        proxy = max(proxy, (t.h2d_bytes + t.d2h_bytes) / (hw.bidir_gbps * 1e9), b["disk_read"] + b["disk_write"])
        items = [(self.groups[gi][0], self.opts[gi][oi], c) for gi, cs in enumerate(counts) for oi, c in
                 enumerate(cs)]
        mem = {k: sum(v.values()) for k, v in self.cm.memory_terms_of(proto, items).items()}
        return proxy, mem

    def over(self, mem) -> dict:
        return {k: mem[k] - self.cap[k] for k in ("device", "host", "nvme") if mem[k] > self.cap[k]}

    @staticmethod
    def _key(counts) -> tuple:
        return tuple(tuple(cs) for cs in counts)

    def greedy(self, proto: Plan) -> list[list[int]] | None:
        # Start from everything on the device (or, where the options leave that out, the first option: OPTIONS
        # lists the most device-resident first) and move units off where a tier is short or it pays.
        start = UnitPlacement(D, D, "device")
        counts = [[len(g) if o == (start if start in opts else opts[0]) else 0 for o in opts]
                  for g, opts in zip(self.groups, self.opts)]
        proxy, mem = self.evaluate(counts, proto)
        seen = {self._key(counts)}  # freeing one tier may fill another: never revisit a state, so no ping-pong
        for _ in range(10_000):  # bounded: each move frees bytes on the short tier or lowers the proxy
            short = self.over(mem)
            best = None
            for gi, cs in enumerate(counts):
                for a, ca in enumerate(cs):
                    if not ca:
                        continue
                    for b in range(len(cs)):
                        if b == a or (short and not _frees(self.opts[gi][a], self.opts[gi][b], next(iter(short)))):
                            continue
                        for m in sorted({1, max(1, ca // 8), max(1, ca // 2), ca}):  # bulk moves: fewer steps
                            cs[a] -= m
                            cs[b] += m
                            key = self._key(counts)
                            p2, mem2 = self.evaluate(counts, proto) if key not in seen else (0.0, None)
                            cs[a] += m
                            cs[b] -= m
                            if mem2 is None:
                                continue
                            if short:
                                tier = next(iter(short))
                                freed = mem[tier] - mem2[tier]
                                if freed <= 0:
                                    continue
                                new_short = any(mem2[k] > self.cap[k] for k in self.cap if k not in short)
                                score = (new_short, (p2 - proxy) / freed, -freed)
                            else:
                                if self.over(mem2) or p2 >= proxy * (1 - 1e-9):
                                    continue
                                score = (False, p2 - proxy, 0)
                            if best is None or score < best[0]:
                                best = (score, gi, a, b, m, p2, mem2)
            if best is None:
                return None if short else counts
            _, gi, a, b, m, proxy, mem = best
            counts[gi][a] -= m
            counts[gi][b] += m
            seen.add(self._key(counts))
        return counts if not self.over(mem) else None

    def arrangements(self, counts, proto: Plan) -> list[Plan]:
        """Per-unit placements from counts: faster options to earlier units, or spread evenly."""
        n = len(self.cm.w.units)
        cost = {}
        for gi, opts in enumerate(self.opts):
            for oi, o in enumerate(opts):
                b = self.cm.busy(self.traffic[gi][oi])
                cost[(gi, oi)] = sum(v for k, v in b.items() if k != "compute") + b["compute"] * 1e-3
        out = []
        for spread in (False, True):
            units: list[UnitPlacement | None] = [None] * n
            for gi, g in enumerate(self.groups):
                order = sorted((oi for oi, c in enumerate(counts[gi]) if c), key=lambda oi: (cost[(gi, oi)], oi))
                seq = [oi for oi in order for _ in range(counts[gi][oi])]
                if spread and len(order) > 1:  # Bresenham-like interleave: each option at even intervals
                    pos = sorted(((j + 0.5) / counts[gi][oi], r, oi) for r, oi in enumerate(order)
                                 for j in range(counts[gi][oi]))
                    seq = [oi for _, _, oi in pos]
                for i, oi in zip(g, seq):
                    units[i] = self.opts[gi][oi]
            out.append(dataclasses.replace(proto, units=tuple(units)))
        return out


def _frees(a: UnitPlacement, b: UnitPlacement, tier: str) -> bool:
    """Whether moving a unit from ``a`` to ``b`` can free bytes on ``tier`` (a cheap filter before evaluating)."""
    t = Tier(tier)
    return (a.params is t and b.params is not t) or (a.state is t and b.state is not t) or (
        t is D and a.update == "device" and b.update == "cpu") or (t is H and a.update == "cpu" and b.update == "device")


def _fits(cm: CostModel, p: Plan) -> bool:
    return not cm.shortfall(p)


def local_search(cm: CostModel, p: Plan, options: Sequence[UnitPlacement], *, max_sims: int) -> tuple[Plan, float]:
    """Improve ``p`` by one-unit option changes and neighbour swaps, judged by simulation (first improvement)."""
    best_t = cm.predict(p).iteration_s
    sims = 1
    rest = cm.w.units[0].kind == "rest"
    improved = True
    while improved and sims < max_sims:
        improved = False
        for i in range(len(p.units)):
            cands = [o for o in options if o != p.units[i] and not (rest and i == 0 and o.params is not D)]
            moves = [p.units[:i] + (o,) + p.units[i + 1:] for o in cands]
            if i + 1 < len(p.units) and p.units[i] != p.units[i + 1] and not (rest and i == 0):
                u = list(p.units)
                u[i], u[i + 1] = u[i + 1], u[i]
                moves.insert(0, tuple(u))
            for units in moves:
                if sims >= max_sims:
                    break
                q = dataclasses.replace(p, units=units)
                if not _fits(cm, q):
                    continue
                t = cm.predict(q).iteration_s
                sims += 1
                if t < best_t * (1 - 1e-9):
                    p, best_t, improved = q, t, True
                    break
    return p, best_t


def plan(workload: Workload, profile: HardwareProfile, *, options: Sequence[UnitPlacement] = OPTIONS,
         depths: Sequence[int] = (1, 2, 3), grad_buffers: int = 2, state_buffers: int = 4,
         max_sims: int | None = None) -> Result:
    """The fastest plan the search finds that fits every tier (module note), or the least-short one, diagnosed."""
    cm = CostModel(workload, profile)
    search = _Search(cm, options)
    if max_sims is None:  # enough for small models to converge; bounded for big ones (~ms per simulation)
        max_sims = 3000 if len(workload.units) <= 8 else 60
    # The greedy runs at one depth (the middle one; smaller ones if nothing fits): depth changes only the param
    # buffers, so its counts are then tried at every depth, which costs a simulation each, not a search.
    order = sorted(depths, key=lambda k: (abs(k - sorted(depths)[len(depths) // 2]), k))
    counts = None
    for k in [order[0]] + sorted(d for d in depths if d < order[0])[::-1]:
        proto = Plan(strategy="ours", units=(), prefetch_depth=k, grad_buffers=grad_buffers,
                     state_buffers=state_buffers)
        counts = search.greedy(proto)
        if counts is not None:
            break
    # Two starts for local search: the best arrangement of the greedy's counts, and the best uniform plan. The
    # proxy does not see which blocks stay on the device from forward into backward (cost.py), so the greedy
    # can end where local search needs several moves to improve, which a uniform start may not.
    starts: dict[str, tuple[float, Plan]] = {}
    for k in depths:
        proto = Plan(strategy="ours", units=(), prefetch_depth=k, grad_buffers=grad_buffers,
                     state_buffers=state_buffers)
        seeds = [("greedy", c) for c in (search.arrangements(counts, proto) if counts is not None else [])]
        seeds += [("uniform", dataclasses.replace(uniform(workload, o, "ours"), prefetch_depth=k,
                                                  grad_buffers=grad_buffers, state_buffers=state_buffers))
                  for o in options]
        for how, cand in seeds:
            if not _fits(cm, cand):
                continue
            t = cm.predict(cand).iteration_s
            if how not in starts or t < starts[how][0] * (1 - 1e-9):
                starts[how] = (t, cand)
    if not starts:
        fallback = uniform(workload, UnitPlacement(N, N, "cpu"), "ours", prefetch_depth=min(depths),
                           grad_buffers=grad_buffers, state_buffers=state_buffers)
        return Result(fallback, cm.predict(fallback, events=True), False, diagnose(cm, fallback))
    best: tuple[float, Plan] | None = None
    for how in ("greedy", "uniform"):  # fixed order: deterministic
        if how in starts:
            p, t = local_search(cm, starts[how][1], options, max_sims=max_sims)
            if best is None or t < best[0] * (1 - 1e-9):
                best = (t, p)
    return Result(best[1], cm.predict(best[1], events=True), True)


def diagnose(cm: CostModel, proto: Plan) -> Shortfall:
    """The tier that is short under the placement needing least of it, by how much, and the smallest fix."""
    w, cap = cm.w, cm.capacity()
    least_device = uniform(w, UnitPlacement(N, N, "cpu"), "least-device", prefetch_depth=0, grad_buffers=1,
                           state_buffers=1)
    mem = cm.memory(least_device)
    if mem["device"] > cap["device"]:
        short = mem["device"] - cap["device"]
        per_sample = (sum(u.act_bytes for u in w.units) + max(u.work_bytes for u in w.units)) / w.batch
        fixed = mem["device"] - per_sample * w.batch
        fix = f"a device with at least {format_bytes(mem['device'])} (--device-memory)"
        if fixed < cap["device"] and per_sample > 0:
            b = int((cap["device"] - fixed) // per_sample)
            if b >= 1:
                fix += f", or --batch {b} (activations take {format_bytes(per_sample)} per sample)"
            elif w.seq > 1:
                fix += ", or a shorter --seq"
        return Shortfall("device", short, fix)
    # Offloaded bytes go to host or nvme; the host needs at least its staging buffers (all on nvme).
    least_host = uniform(w, UnitPlacement(N, N, "cpu"), "least-host", prefetch_depth=max(proto.prefetch_depth, 1),
                         grad_buffers=proto.grad_buffers, state_buffers=proto.state_buffers)
    mh = cm.memory(least_host)
    if mh["host"] > cap["host"]:
        return Shortfall("host", mh["host"] - cap["host"],
                         f"at least {format_bytes(mh['host'])} of host memory (--host-memory), or fewer buffers")
    # Everything that is on neither the device nor the host must fit on nvme.
    sb = [cm.state_bytes(i, pl) for i, pl in enumerate(least_host.units)]
    total = sum(cm.pb) + sum(sb)
    room = max(0, cap["device"] - mem["device"]) + max(0, cap["host"] - mh["host"])
    need_nvme = max(0, total - room) + least_host.state_buffers * max(sb)
    return Shortfall("nvme", max(0, need_nvme - cap["nvme"]),
                     f"at least {format_bytes(need_nvme)} of NVMe (--nvme), or more host memory")


def exhaustive(workload: Workload, profile: HardwareProfile, *, options: Sequence[UnitPlacement],
               depths: Sequence[int] = (2,), grad_buffers: int = 2, state_buffers: int = 4) -> tuple[Plan, float] | None:
    """The best fitting plan over every assignment of ``options`` to units: the planner's yardstick (small
    workloads only: ``len(options) ** units`` simulations)."""
    cm = CostModel(workload, profile)
    rest = workload.units[0].kind == "rest"
    per_unit = [[o for o in options if not (rest and i == 0 and o.params is not D)]
                for i in range(len(workload.units))]
    best = None
    for k in depths:
        for units in itertools.product(*per_unit):
            p = Plan(strategy="exhaustive", units=units, prefetch_depth=k, grad_buffers=grad_buffers,
                     state_buffers=state_buffers)
            if not _fits(cm, p):
                continue
            t = cm.predict(p).iteration_s
            if best is None or t < best[1]:
                best = (p, t)
    return best


# -- comparison strategies, as plans in the same model ------------------------------------------------------------------
def strategies(workload: Workload, profile: HardwareProfile, *, dos_stride: int = 2) -> dict[str, Plan]:
    """What other systems would do, each expressed in our model (so the comparison is of placements, not of
    implementations). Params go to the host where a strategy allows it and they fit, else NVMe."""
    cm = CostModel(workload, profile)
    block_pb = sum(cm.pb[i] for i in cm.blocks)
    host = profile.usable_bytes("host")
    p_off = H if block_pb + (host // 4) <= host and block_pb <= host // 2 else N
    out = {
        "no offload": uniform(workload, UnitPlacement(D, D, "device"), "no offload", prefetch_depth=0),
        # ZeRO-Offload (Ren et al. 2021): fp16 params on the GPU, fp32 state and Adam on the CPU, step after bwd.
        "ZeRO-Offload": uniform(workload, UnitPlacement(D, H, "cpu"), "ZeRO-Offload", overlap_update=False),
        # ZeRO-Infinity (Rajbhandari et al. 2021): params and state on NVMe, CPU step after backward.
        "ZeRO-Infinity": uniform(workload, UnitPlacement(N, N, "cpu"), "ZeRO-Infinity", overlap_update=False),
        # Fuyou (Liao et al. 2024): state on SSD, CPU update overlapped with backward.
        "Fuyou": uniform(workload, UnitPlacement(p_off, N, "cpu"), "Fuyou"),
    }
    # Deep Optimizer States (Maurya et al. 2024): ZeRO-3 offload with every stride-th subgroup updated on the GPU.
    dos = list(uniform(workload, UnitPlacement(p_off, H, "cpu"), "DOS").units)
    for j, i in enumerate(cm.blocks):
        if j % dos_stride == 0:
            dos[i] = UnitPlacement(p_off, H, "device")
    out[f"DOS (stride {dos_stride})"] = Plan(strategy=f"DOS (stride {dos_stride})", units=tuple(dos),
                                             overlap_update=False)
    return out
