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

The counts are tried at each prefetch depth; the fastest fitting plan wins.

**Bounds before search.** :class:`Feasibility` decides from the memory formulas alone, in milliseconds, whether any
placement of the space fits, and finds one that does; the search above runs only when one does (or where the bounds
cannot tell), so a "does not fit" costs no search.

**When nothing fits** the result carries a :class:`Shortfall`. A tier is *short alone* when no placement fits it
even with the other two tiers unbounded; each such tier must grow, and the fix names the least growth of each
(found one after the other, the later ones unbounded meanwhile). When no tier is short alone the bytes are short
together: every tier that could take the rest alone is listed with the least capacity at which it would. The
least capacity is found by bisection with :class:`Feasibility`, then rounded up to the 3 digits printed and
checked again at that value, so a printed fix fits as printed. Where the device is the only tier that must grow,
a smaller ``--batch`` (or, when even one sequence does not fit, a shorter ``--seq``) is offered too, the largest
that fits (activations scale with the tokens).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np

from scheduler.buffers import param_buffers, r, state_read_ahead
from scheduler.cost import CostModel, Prediction
# Plan and UnitPlacement live in scheduler/plan.py (the cost model needs them too); imported from here they still work.
from scheduler.plan import OPTIONS, Plan, UnitPlacement
from scheduler.profile import HardwareProfile
from scheduler.workload import Workload
from storage import Tier, format_bytes

D, H, N = Tier.DEVICE, Tier.HOST, Tier.NVME


@dataclasses.dataclass(frozen=True)
class Result:
    plan: Plan
    prediction: Prediction
    fits: bool
    shortfall: "Shortfall | None" = None


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
        self.max_evals = 40_000
        """Count states the greedy may evaluate (~0.2 ms each for 81 units) before it gives up: a 70B plan that
        fits takes ~10,000; one where a tier is tight can wander through ~600,000 before it finds its way."""

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
        # what a plan needs (CostModel.required): speculation's copies take only free room
        need = dataclasses.replace(proto, speculate=False)
        mem = {k: sum(v.values()) for k, v in self.cm.memory_terms_of(need, items).items()}
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
        evals = 0
        for _ in range(10_000):  # bounded: each move frees bytes on the short tier or lowers the proxy
            if evals > self.max_evals:  # wandering where little fits: the bounds' witness is the start then
                return None
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
                            evals += 1
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
    fits = _Fits(workload, profile, options, depths, grad_buffers, state_buffers)
    cm = fits.cm
    search = _Search(cm, options)
    # Bounds first: when no placement fits, that is proved here, before any search (class Feasibility).
    witness = fits.feas.decide(list(cm.capacity().values()))
    if witness is False:
        fallback = uniform(workload, UnitPlacement(N, N, "cpu"), "ours", prefetch_depth=min(depths),
                           grad_buffers=grad_buffers, state_buffers=state_buffers)
        return Result(fallback, cm.predict(fallback, events=True), False,
                      diagnose(workload, profile, options=options, depths=depths, grad_buffers=grad_buffers,
                               state_buffers=state_buffers, fits=fits))
    if max_sims is None:  # enough for small models to converge; bounded for big ones (~ms per simulation)
        max_sims = 3000 if len(workload.units) <= 8 else 60
    # The greedy runs at one depth (the middle one; smaller ones if nothing fits): depth changes only the param
    # buffers, so its counts are then tried at every depth, which costs a simulation each, not a search.
    # The bounds say at which depths anything fits (memory grows with depth): the greedy is not run at one where
    # nothing does (a greedy that cannot succeed wanders long before it gives up).
    cap = list(cm.capacity().values())
    live = [k for k in sorted(depths) if k == min(depths) or Feasibility(
        cm, options, depth=k, grad_buffers=grad_buffers, state_buffers=state_buffers).decide(cap) is not False]
    order = sorted(live, key=lambda k: (abs(k - sorted(depths)[len(depths) // 2]), k))
    counts = None
    for k in [order[0]] + sorted(d for d in live if d < order[0])[::-1]:
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
    if not starts and isinstance(witness, Plan):  # the greedy missed what the bounds found: start from that
        starts["witness"] = (cm.predict(witness).iteration_s, witness)
    if not starts:
        fallback = uniform(workload, UnitPlacement(N, N, "cpu"), "ours", prefetch_depth=min(depths),
                           grad_buffers=grad_buffers, state_buffers=state_buffers)
        return Result(fallback, cm.predict(fallback, events=True), False,
                      diagnose(workload, profile, options=options, depths=depths, grad_buffers=grad_buffers,
                               state_buffers=state_buffers, fits=fits))
    best: tuple[float, Plan] | None = None
    for how in ("greedy", "uniform", "witness"):  # fixed order: deterministic
        if how in starts:
            p, t = local_search(cm, starts[how][1], options, max_sims=max_sims)
            if best is None or t < best[0] * (1 - 1e-9):
                best = (t, p)
    return Result(best[1], cm.predict(best[1], events=True), True)


# -- feasibility from bounds ------------------------------------------------------------------------------------------
TIERS = ("device", "host", "nvme")
_TIER_OF = {D: 0, H: 1, N: 2}
UNBOUNDED = 1 << 62
"""A capacity that holds anything (bounds with one tier left free)."""


def _largest2(a: int, ca, b: int, cb, n: int):
    """:func:`scheduler.buffers.largest` of two sizes, ``ca`` chunks of ``a`` and ``cb`` of ``b`` bytes (counts may be
    arrays): the sum of the ``n`` largest."""
    if a < b:
        a, ca, b, cb = b, cb, a, ca
    ta = np.minimum(ca, n)
    return ta * a + np.minimum(cb, n - ta) * b


class Feasibility:
    """Whether any plan of the planner's space fits given capacities, decided from the memory rules without a
    search; and one that does (a witness).

    The planner's space: every unit one of ``options`` (the rest unit one keeping params on the device), at one of
    its depths. Memory only grows with the depth, so the least one decides. With one group of identical blocks
    (every preset), what a plan holds per tier depends only on the rest unit's option, on whether any block's
    offloaded state is updated on the device (the device's state buffers), and on *how many* blocks keep their
    params (``x``) and their state (``y``) on each tier: the rules of :mod:`scheduler.buffers` in closed form
    (:meth:`tiers`), which per-unit terms (resident chunks, host grads, pre-update copies) enter by count and
    largest-chunk terms (buffers, staging, write room) by the counts' indicators or ``min(count, buffers)``. A
    block's update site follows from its tiers: on the device where that is allowed (it holds no host grads), else
    on the CPU (one host grad buffer each).

    For each rest option and each of the two cases of the device state buffers, every split ``x`` of the params is
    tried (``O(n^2)``, vectorized). For a given ``x`` and number ``y_N`` of states on NVMe, as many states as fit
    go to the device (host and NVMe only shrink with that, and a state moved from the host to the device frees
    host bytes in every phase); which states can go where is a transport problem from params tiers to state tiers
    along the options' edges, feasible iff every set ``T`` of state tiers takes at most the blocks whose params
    tier reaches ``T`` (Hall's condition). What is left, the host as a function of ``y_N``, is piecewise linear
    with a few known breakpoints (the read-ahead's, where the device's share stops growing, and under clipping
    where the state's pre-update copies stop being the host's peak phase), so only those and the ends of the
    feasible range of ``y_N`` are evaluated.

    Exact when every block uses the same state chunk and the same host grads wherever its state lives, which
    holds for the planner's options with 16-bit training (the default and every preset). Where fp32 masters make
    the state chunk vary, or options leave an update site to some edges into a state tier and not others, the
    witness search assumes the larger chunk and grads, and the proof of infeasibility the smaller; the gap
    between the two, workloads with blocks of several sizes, grads on NVMe and updates after backward are left to
    the search (:meth:`decide` says ``None``).

    Memory is priced as a plan needs it to run (:meth:`CostModel.required`: speculation's copies take only free
    room); ``speculate`` and ``clip`` price the peak of a speculating step instead (its witness plans keep the
    planner's own settings).
    """

    def __init__(self, cm: CostModel, options: Sequence[UnitPlacement], *, depth: int, grad_buffers: int,
                 state_buffers: int, speculate: bool = False, clip: bool = False):
        self.cm = cm
        self.proto = Plan(strategy="ours", units=(), prefetch_depth=depth, grad_buffers=grad_buffers,
                          state_buffers=state_buffers)
        self.priced = dict(speculate=speculate, clip=clip)
        self.k = cm.knobs(dataclasses.replace(self.proto, **self.priced))
        self.options = list(options)
        self.has_rest = cm.has_rest
        blocks = cm.blocks
        self.blocks = list(blocks)
        self.n = len(blocks)
        self.rest_opts = [o for o in options if o.params is D] if self.has_rest else [None]
        sizes = {(cm.pb[i], cm.gb[i], cm.sb[i], cm.sb_master[i], cm.params[i], cm.tpb[i]) for i in blocks}
        self.exact = len(sizes) <= 1 and self.k.overlap and all(o.grad_tier is H for o in options)
        self.evaluated = 0
        """Combinations of (rest option, device state buffers) examined so far: the work, for tests to bound."""
        if not self.n or not self.exact:
            return
        b = blocks[0]
        self.pb, self.gb = cm.pb[b], cm.gb[b]
        self.t = int(cm.gb[b] > 0)  # frozen blocks: no grads, no state, no update
        xd, xh = np.meshgrid(np.arange(self.n + 1), np.arange(self.n + 1), indexing="ij")
        keep = xd + xh <= self.n
        self.x = [xd[keep].astype(np.int64), xh[keep].astype(np.int64)]
        self.x.append(self.n - self.x[0] - self.x[1])
        # The two cases of the device's state buffers: no block's offloaded state updated on the device (such
        # options left out), or some (their buffers paid, every option allowed).
        self.cases = [c for c in (False, True) if not c or (self.t and any(
            o.update == "device" and o.state is not D for o in options))]
        self.edges = {c: self._edges(c) for c in self.cases}
        # per case, the blocks whose params tier reaches each set of state tiers (bit s: tier s), per split x
        self.reach = {}
        for c in self.cases:
            to = {s: {p for (p, s2) in self.edges[c]["pick"] if s2 == s} for s in range(3)}
            self.reach[c] = {m: sum((self.x[p] for p in set().union(*(to[s] for s in range(3) if m >> s & 1))),
                                    np.zeros_like(self.x[0])) for m in range(1, 8)}

    # -- the rules in closed form -----------------------------------------------------------------------------------
    def _edges(self, dev_offloaded: bool) -> dict:
        """Per (params tier, state tier) of the options allowed in a case: the option a block takes there (no host
        grads where it can, then the smaller state chunk), and the bounds the search and the proof use."""
        cm, b, t = self.cm, self.blocks[0], self.t
        allowed = [o for o in self.options if o.update == "cpu" or o.state is D or dev_offloaded]
        extra = lambda o: r(self.gb) * t if o.update == "cpu" else 0  # noqa: E731 - a CPU update's host grads
        pick: dict[tuple[int, int], UnitPlacement] = {}
        for o in allowed:
            key = (_TIER_OF[o.params], _TIER_OF[o.state])
            cost = lambda o: (extra(o), cm.state_bytes(b, o))  # noqa: E731
            if key not in pick or cost(o) < cost(pick[key]):
                pick[key] = o
        chunks = [cm.state_bytes(b, o) for o in allowed]
        hi_e = [max((extra(o) for (p, s), o in pick.items() if s == st), default=0) for st in range(3)]
        lo_e = [min((extra(o) for o in allowed if _TIER_OF[o.state] == st), default=0) for st in range(3)]
        return {"pick": pick, "upper": (hi_e, max(cm.state_bytes(b, o) for o in pick.values())),
                "lower": (lo_e, min(chunks))}

    def tiers(self, rest: UnitPlacement | None, x, y, host_grads, dev_offloaded: bool, chunk: int, *,
              phases: bool = False):
        """Device, host and NVMe bytes (:func:`scheduler.buffers.memory_terms`, summed) of the rest unit at
        ``rest`` and the blocks: ``x`` and ``y`` = how many keep params and state on each tier (device, host,
        nvme; ints or arrays), ``host_grads`` their host grad bytes, ``chunk`` their state chunk;
        ``dev_offloaded`` whether some block's offloaded state is updated on the device. With ``phases``: the
        host's three phases instead (forward, first step, later step)."""
        cm, k, t = self.cm, self.k, self.t
        xD, xH, xN = x
        yD, yH, yN = y
        pb, gb, sb = self.pb, self.gb, chunk * t
        rpb, rsb = r(pb), r(sb)
        spec = k.overlap and k.speculate
        K, RA = param_buffers(k.prefetch), state_read_ahead(k.state_buffers)
        # the rest unit (params on the device), when there is one
        if rest is not None:
            pr, gr = cm.pb[0], cm.gb[0]
            tr = gr > 0
            sr = cm.state_bytes(0, rest) if tr else 0
            r_dev = pr + gr + (sr if rest.state is D else 0)
            r_pool = sr if rest.update == "device" and rest.state is not D else 0
            r_host = (r(sr) if rest.state is H else 0) + (r(gr) if tr and rest.update == "cpu" else 0)
            r_pre = r(pr) if tr else 0
            r_pre_state = r(sr) if rest.state is not N else 0
            r_nv = r(sr) if rest.state is N else 0
        else:
            r_dev = r_pool = r_host = r_pre = r_pre_state = r_nv = 0
        n_rest = int(r_nv > 0)
        streamed = (xH + xN) > 0
        on_nvme = xN > 0
        device = (cm.act_bytes + r_dev + k.grad_buffers * gb + pb * xD + K * pb * streamed + sb * yD
                  + k.state_buffers * max(r_pool, sb if dev_offloaded else 0))
        pre_params = (rpb * t * (xD + xH) + r_pre) if spec else 0
        step = rpb * t * on_nvme  # one param chunk written beside its committed version
        staging = rpb * t * np.minimum(2, xN)  # the unit updating and the one before on its way to the store
        first = staging + _largest2(r_nv, n_rest, rsb, yN, 2) + pre_params
        later = staging + _largest2(r_nv, n_rest, rsb, yN, RA) + (
            pre_params + rsb * (yD + yH) + r_pre_state if spec and k.clip else 0)
        # the fetches in flight, and the last step's last unit's state on its way to the store
        last_writes = 0
        if k.overlap:
            last_writes = r_nv if rest is not None and cm.gb[0] > 0 else rsb * (yN > 0)
        forward = np.minimum(K, xN) * rpb + last_writes
        if phases:
            return forward, first, later
        host = rpb * xH + rsb * yH + host_grads + r_host + np.maximum(np.maximum(forward, first), later)
        held = rpb * t * xN if spec else 0
        # the first step rewrites only state chunks made at wrap (with masters); while it speculates, each param
        # chunk's new version goes beside the previous one, held anyway (buffers.py, write_room)
        fp32 = cm.w.master_bytes_per_param > 0
        rest_wrap = rest is not None and (not fp32 or cm.needs_master(rest))
        blk_wrap = not fp32 or chunk > cm.sb[self.blocks[0]]
        a = np.maximum(_largest2(r_nv * rest_wrap, n_rest * rest_wrap, rsb * blk_wrap, yN, 1)
                       + (0 if spec else step) + held, _largest2(r_nv, n_rest, rsb, yN, 1) + step)
        if spec and k.clip:
            a = np.maximum(a, rpb * t * on_nvme + held + rsb * yN + r_nv)
        nvme = rpb * xN + rsb * yN + r_nv + a
        return device, host, nvme

    # -- the decision -----------------------------------------------------------------------------------------------
    def decide(self, cap: Sequence[int], *, every_y: bool = False) -> Plan | bool | None:
        """A plan that fits ``cap`` (device, host, nvme bytes); ``False`` when none of the space does; ``None``
        when the bounds cannot tell (see the class note). ``every_y``: evaluate every ``y_N``, not only the
        breakpoints (the yardstick the breakpoints are tested against)."""
        if not self.exact:
            return None
        if not self.n:  # the rest unit alone: each of its options, priced
            for ro in self.rest_opts:
                self.evaluated += 1
                p = dataclasses.replace(self.proto, units=(ro,))
                if _within(self._memory(p), cap):
                    return p
            return False
        unknown = False
        for ro in self.rest_opts:
            for case in self.cases:
                self.evaluated += 1
                e = self.edges[case]
                got = self._solve(cap, ro, case, *e["upper"], every_y=every_y)
                if got is not None:
                    p = self._witness(ro, e["pick"], *got)
                    if _within(self._memory(p), cap):
                        return p
                    unknown = True  # cannot happen where the closed form is exact (tests hold it to that)
                elif e["upper"] != e["lower"] and self._solve(cap, ro, case, *e["lower"], every_y=every_y) is not None:
                    unknown = True
        return None if unknown else False

    def _solve(self, cap, ro, case, extra, chunk, *, every_y=False):
        """The first (x, y) with every tier within ``cap``, or ``None`` (class note)."""
        n, x, X = self.n, self.x, self.reach[case]
        per = chunk * self.t
        zero = np.zeros_like(x[0])
        dev0 = self.tiers(ro, x, (zero, zero, zero), 0, case, chunk)[0]
        kD = np.where(dev0 > cap[0], -1, np.minimum(n, (cap[0] - dev0) // per) if per else n)
        nv = lambda x, zero, yn: self.tiers(ro, x, (zero, zero, yn), 0, case, chunk)[2]  # noqa: E731
        # only the splits whose params fit the device and the store, each tier reached by an option
        keep = np.flatnonzero((kD >= 0) & (X[7] >= n) & (nv(x, zero, zero) <= cap[2]))
        if not keep.size:
            return None
        x, X, kD, zero = [v[keep] for v in x], {m: v[keep] for m, v in X.items()}, kD[keep], zero[keep]
        xD = x[0]
        # the most states NVMe takes: its bytes only grow with y_N (bisection, per x)
        lo_k, hi_k = zero.copy(), np.full_like(xD, n)
        while True:
            open_ = hi_k > lo_k
            if not open_.any():
                break
            mid = np.where(open_, (lo_k + hi_k + 1) // 2, lo_k)
            fit = nv(x, zero, mid) <= cap[2]
            lo_k = np.where(open_ & fit, mid, lo_k)
            hi_k = np.where(open_ & ~fit, mid - 1, hi_k)
        kN = lo_k
        lo_n = np.maximum.reduce([zero, n - X[3], n - X[2] - kD, n - X[2] - X[1]])
        hi_n = np.minimum.reduce([np.full_like(xD, n), X[4], kN, X[5], X[5] + X[6] - n, X[6]])
        keep = np.flatnonzero(lo_n <= hi_n)
        if not keep.size:
            return None
        x, X, kD, zero, lo_n, hi_n = ([v[keep] for v in x], {m: v[keep] for m, v in X.items()}, kD[keep],
                                      zero[keep], lo_n[keep], hi_n[keep])
        xD = x[0]
        m0 = np.minimum(kD, X[1])
        cands = [lo_n, hi_n, X[5] - m0, n - m0, X[5] - m0 + 1, n - m0 - 1, X[5] - m0 - 1, n - m0 + 1]
        ra = state_read_ahead(self.k.state_buffers)
        if self.k.clip and self.k.speculate and per:  # where the state's copies stop being the host's peak phase
            # from y_N = ra on, the later step's phase falls by a chunk per state on NVMe (its copy is not made)
            # while the others stay: they cross near yc
            fwd, first, later = self.tiers(ro, x, (n - ra + zero, zero, ra + zero), 0, case, chunk, phases=True)
            rsb = r(per)
            yc = (later + rsb * ra - np.maximum(fwd, first)) // rsb
            cands += [yc - 1, yc, yc + 1, yc + 2]
        cands += [np.full_like(xD, j) for j in range((n if every_y else ra + 1) + 1)]
        yn = np.clip(np.stack(cands), lo_n, hi_n)
        yd = np.minimum.reduce([np.broadcast_to(kD, yn.shape), np.broadcast_to(X[1], yn.shape), X[5] - yn, n - yn])
        yh = n - yn - yd
        y = (yd, yh, yn)
        hall = (yd >= 0) & (yh >= 0)
        for mask in range(1, 8):
            hall &= sum(y[s] for s in range(3) if mask >> s & 1) <= X[mask]
        dev, host, nvme = self.tiers(ro, x, y, extra[0] * yd + extra[1] * yh + extra[2] * yn, case, chunk)
        good = hall & (dev <= cap[0]) & (host <= cap[1]) & (nvme <= cap[2])
        hit = np.argwhere(good)
        if not hit.size:
            return None
        c, j = hit[0]
        return [int(v[j]) for v in x], [int(v[c, j]) for v in y]

    def _memory(self, p: Plan) -> dict[str, int]:
        return self.cm.memory(dataclasses.replace(p, **self.priced))

    def _witness(self, rest_opt, pick, x, y) -> Plan:
        units: list[UnitPlacement] = [None] * len(self.cm.w.units)  # type: ignore[list-item]
        if self.has_rest:
            units[0] = rest_opt
        flow = _transport(x, y, list(pick))
        seq = [pick[ps] for ps, f in sorted(flow.items()) for _ in range(f)]
        for i, o in zip(self.blocks, seq):
            units[i] = o
        return dataclasses.replace(self.proto, strategy="ours", units=tuple(units))


def _within(mem: dict, cap: Sequence[int]) -> bool:
    return all(mem[t] <= c for t, c in zip(TIERS, cap))


def _transport(supply, cap, edges) -> dict[tuple[int, int], int]:
    """Integer flow from params tiers (``supply``) to state tiers (``cap``) along ``edges``, moving all of the
    supply (the caller checked Hall's condition): augmenting paths on a 3 x 3 graph."""
    flow = {e: 0 for e in edges}
    left, room = list(supply), list(cap)
    while any(left):
        # breadth-first from every params tier with supply left, through edges forward and flows backward
        prev: dict = {("p", c): None for c in range(3) if left[c]}
        queue, end = list(prev), None
        while queue and end is None:
            node = queue.pop(0)
            side, c = node
            nxt = [("s", s) for (p, s) in edges if side == "p" and p == c] if side == "p" else \
                [("p", p) for (p, s) in edges if s == c and flow[(p, s)] > 0]
            for m in nxt:
                if m not in prev:
                    prev[m] = node
                    if m[0] == "s" and room[m[1]] > 0:
                        end = m
                        break
                    queue.append(m)
        assert end is not None, "Hall's condition held, so an augmenting path exists"
        path = [end]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        path.reverse()
        amount = min(left[path[0][1]], room[end[1]],
                     *(flow[(b[1], a[1])] for a, b in zip(path, path[1:]) if a[0] == "s"))
        for a, b in zip(path, path[1:]):
            if a[0] == "p":
                flow[(a[1], b[1])] += amount
            else:
                flow[(b[1], a[1])] -= amount
        left[path[0][1]] -= amount
        room[end[1]] -= amount
    return {e: f for e, f in flow.items() if f}


FLAGS = {"device": "--device-memory", "host": "--host-memory", "nvme": "--nvme"}
"""The ``offload plan`` option that sets each tier's capacity (what a fix names)."""
_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def size_at_least(n: int) -> tuple[str, int]:
    """The shortest size text, 3 significant digits in the largest binary unit (``'11.6GiB'``), of at least ``n``
    bytes, and the bytes it reads as (``int(float(number) * unit)``, as ``offload plan``'s options read it)."""
    if n < 1024:
        return f"{n}B", n
    unit, mult = next((u, m) for u, m in _UNITS if n >= m)
    digits = max(0, 2 - len(str(int(n / mult))) + 1)
    scale = 10 ** digits
    k = -(-n * scale // mult)  # ceiling, in integers: exact for any n
    while True:
        text = f"{k / scale:.{digits}f}"
        value = int(float(text) * mult)
        if value >= n:
            return f"{text}{unit}", value
        k += 1


@dataclasses.dataclass(frozen=True)
class Fix:
    """One change of the command line that makes the workload fit, checked by planning with it: ``changes`` maps
    an option (``--nvme``, ``--batch``) to its text, ``values`` the same keys to the number each reads as (bytes,
    or sequences and tokens)."""

    changes: tuple[tuple[str, str], ...]
    values: tuple[tuple[str, int], ...]

    def __str__(self) -> str:
        return " ".join(f"{k} {v}" for k, v in self.changes)


@dataclasses.dataclass(frozen=True)
class Shortfall:
    """Why nothing fits: each tier that is short and by how much, and the least changes that make it fit.

    ``short`` lists ``(tier, bytes)``: with ``joint`` False every one of those tiers must grow by at least that
    much (no placement fits it otherwise); with ``joint`` True each tier has room for its floor and the bytes
    together do not fit: growing any one listed tier by its amount is enough. ``fixes`` are alternatives, each
    verified by planning with it; ``tier`` and ``short_bytes`` are the first entry of ``short``."""

    short: tuple[tuple[str, int], ...]
    joint: bool
    fixes: tuple[Fix, ...]

    @property
    def tier(self) -> str:
        return self.short[0][0]

    @property
    def short_bytes(self) -> int:
        return self.short[0][1]

    @property
    def fix(self) -> str:
        return "fits with " + ", or ".join(str(f) for f in self.fixes) if self.fixes else \
            "no change of memory, --batch or --seq found that fits"

    def __str__(self) -> str:
        first, *more = [f"{t} memory is short by {format_bytes(b)}" for t, b in self.short]
        if self.joint:
            what = ", or ".join([first] + [m.replace(" is short", "") for m in more])
            what += " (no tier is short alone: together they are)"
        else:
            what = " and ".join([first] + [m.replace(" memory is short", "") for m in more])
        return f"{what}; {self.fix}"


def _rescaled(w: Workload, batch: int, seq: int) -> Workload:
    """``w`` at another batch and sequence length, for the fix search: activation bytes scale with the tokens (the
    formulas of workload.py are linear in them; rounded up), FLOPs too (they do not bear on what fits)."""
    num, den = batch * seq, w.batch * w.seq
    units = tuple(dataclasses.replace(u, act_bytes=-(-u.act_bytes * num // den),
                                      work_bytes=-(-u.work_bytes * num // den),
                                      fwd_flops=u.fwd_flops * num / den, bwd_flops=u.bwd_flops * num / den)
                  for u in w.units)
    return dataclasses.replace(w, batch=batch, seq=seq, units=units)


class _Fits:
    """Whether the planner finds a fitting plan for given capacities (and tokens): :class:`Feasibility`, with the
    search where it cannot tell. Counts the checks (the work a diagnosis does)."""

    def __init__(self, workload: Workload, profile: HardwareProfile, options, depths, grad_buffers, state_buffers):
        self.args = (profile, list(options), tuple(depths), grad_buffers, state_buffers)
        self.w = workload
        self.cm = CostModel(workload, profile)
        self.feas = self._feas(self.cm)
        self.checks = 0

    def _feas(self, cm: CostModel) -> Feasibility:
        _, options, depths, gb, sb = self.args
        return Feasibility(cm, options, depth=min(depths), grad_buffers=gb, state_buffers=sb)

    def __call__(self, cap, feas: Feasibility | None = None) -> Plan | None:
        self.checks += 1
        f = feas or self.feas
        v = f.decide(cap)
        if v is None:  # the bounds cannot tell: the search decides
            v = _search_fits(f.cm, *self.args[1:], cap=cap)
        return v or None

    def at_tokens(self, batch: int, seq: int) -> Plan | None:
        cm = CostModel(_rescaled(self.w, batch, seq), self.args[0])
        return self(list(self.cm.capacity().values()), self._feas(cm))


def _search_fits(cm: CostModel, options, depths, grad_buffers, state_buffers, *, cap) -> Plan | None:
    """The planner's search (greedy, then uniform plans) at capacities ``cap``: a plan that fits, or ``None``."""
    search = _Search(cm, options)
    search.cap = dict(zip(TIERS, cap))
    for k in sorted(depths):
        proto = Plan(strategy="ours", units=(), prefetch_depth=k, grad_buffers=grad_buffers,
                     state_buffers=state_buffers)
        counts = search.greedy(proto)
        cands = search.arrangements(counts, proto) if counts is not None else []
        cands += [dataclasses.replace(uniform(cm.w, o, "ours"), prefetch_depth=k, grad_buffers=grad_buffers,
                                      state_buffers=state_buffers) for o in options]
        for p in cands:
            m = cm.required(p)
            if all(m[t] <= c for t, c in zip(TIERS, cap)):
                return p
    return None


def usable_of(profile: HardwareProfile, tier: str, capacity: int) -> int:
    """What a plan may fill of a tier of ``capacity`` bytes: less the profile's reserve (``usable_bytes``)."""
    if tier == "nvme":
        return capacity
    r = getattr(profile, f"{tier}_reserve")
    return capacity - min(capacity, int(r["bytes"] + r["fraction"] * capacity))


def capacity_for_usable(profile: HardwareProfile, tier: str, usable: int) -> int:
    """The least whole-tier capacity (what ``--device-memory`` / ``--host-memory`` / ``--nvme`` give) whose usable
    part, once the profile's reserve (bytes plus a fraction of the capacity) is kept, is at least ``usable``."""
    if tier == "nvme":
        return usable
    r = getattr(profile, f"{tier}_reserve")
    cap = max(0, math.floor((usable + r["bytes"]) / (1.0 - r["fraction"])) - 8)  # from below: the reserve rounds down
    while usable_of(profile, tier, cap) < usable:
        cap += 1
    return cap


def _least(fits: _Fits, cap: list[int], k: int) -> int | None:
    """The least size a fix can print (:func:`size_at_least`) for tier ``k``'s capacity, the others as in ``cap``,
    at which a plan fits; ``None`` when no capacity of it is enough. ``cap[k]`` itself must not fit."""
    top = fits(cap[:k] + [UNBOUNDED] + cap[k + 1:])
    if top is None:
        return None
    lo, hi = cap[k], fits.cm.required(top)[TIERS[k]]  # lo does not fit; hi does (top's usage)
    while hi - lo > max(1, hi // 4096):  # to well under the printed digits
        mid = (lo + hi) // 2
        if fits(cap[:k] + [mid] + cap[k + 1:]) is None:
            lo = mid
        else:
            hi = mid
    # The least fits somewhere in (lo, hi]: the printed sizes of the whole tier (its usable part plus the
    # profile's reserve) from there up, the first whose usable part fits. Returned as that usable part.
    prof, tier = fits.args[0], TIERS[k]
    x = size_at_least(capacity_for_usable(prof, tier, lo + 1))[1]
    while fits(cap[:k] + [usable_of(prof, tier, x)] + cap[k + 1:]) is None:  # a step or two: ~x / 1000 each
        x = size_at_least(x + 1)[1]
    return usable_of(prof, tier, x)


def diagnose(workload: Workload, profile: HardwareProfile, *, options: Sequence[UnitPlacement] = OPTIONS,
             depths: Sequence[int] = (1, 2, 3), grad_buffers: int = 2, state_buffers: int = 4,
             fits: _Fits | None = None) -> Shortfall:
    """Why no plan fits: the tiers that are short, and the least change of each that fits, verified (module
    note, "When nothing fits")."""
    fits = fits or _Fits(workload, profile, options, depths, grad_buffers, state_buffers)
    cap = list(fits.cm.capacity().values())
    # A tier is short alone when no plan fits even with the other two unbounded: it must grow.
    must = [k for k in range(3) if fits([c if j == k else UNBOUNDED for j, c in enumerate(cap)]) is None]
    fixes: list[Fix] = []
    short: list[tuple[str, int]] = []

    def fix_of(values: dict[str, int]) -> Fix:
        # The search works in usable bytes; a flag gives the whole tier, of which the profile keeps its reserve.
        whole = {t: capacity_for_usable(profile, t, v) for t, v in values.items()}
        ch = [(FLAGS[t], size_at_least(v)[0]) for t, v in whole.items()]
        return Fix(tuple(ch), tuple((FLAGS[t], size_at_least(v)[1]) for t, v in whole.items()))

    if must:
        # Each must grow at least to its floor (its least with the other tiers unbounded): that is what it is
        # short by. Grown to their floors, they may still not fit with the others: then one more tier grows
        # with them (each that can is a fix), or the must tiers alone grow further (the least of each in turn,
        # the ones not yet set unbounded).
        floor = list(cap)
        for k in must:
            floor[k] = _least(fits, [c if j == k else UNBOUNDED for j, c in enumerate(cap)], k)
        short = [(TIERS[k], floor[k] - cap[k]) for k in must]
        if fits(floor) is not None:
            fixes.append(fix_of({TIERS[k]: floor[k] for k in must}))
        else:
            for k in range(3):
                v = None if k in must else _least(fits, list(floor), k)
                if v is not None:
                    fixes.append(fix_of({TIERS[j]: v if j == k else floor[j] for j in sorted(must + [k])}))
            grown, todo = list(cap), list(must)
            while fits([UNBOUNDED if k in todo else c for k, c in enumerate(grown)]) is None:
                todo.append(next(k for k in range(3) if k not in todo))
            for k in sorted(todo):
                grown[k] = _least(fits, [UNBOUNDED if j in todo and j > k else c for j, c in enumerate(grown)], k)
            assert fits(grown) is not None, "each tier's least was found with the later ones unbounded: they fit"
            fixes.append(fix_of({TIERS[k]: grown[k] for k in sorted(todo)}))
    else:
        for k in range(3):
            v = _least(fits, list(cap), k)
            if v is not None:
                fixes.append(fix_of({TIERS[k]: v}))
                short.append((TIERS[k], v - cap[k]))
        assert short, "a tier short by nothing: every tier has room for its floor and yet nothing fits either way"
    if set(must) <= {0}:  # activations are device bytes: fewer tokens may fit where the other tiers do
        w = workload
        tokens = None
        if w.batch > 1 and fits.at_tokens(1, w.seq) is not None:
            lo, hi = 1, w.batch  # lo fits, hi does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits.at_tokens(mid, w.seq) is not None else (lo, mid)
            tokens = ("--batch", lo)
        elif w.seq > 1 and fits.at_tokens(w.batch, 1) is not None:
            lo, hi = 1, w.seq
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits.at_tokens(w.batch, mid) is not None else (lo, mid)
            tokens = ("--seq", lo)
        if tokens is not None:
            fixes.append(Fix(((tokens[0], str(tokens[1])),), (tokens,)))
    return Shortfall(tuple(short), not must, tuple(fixes))


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
