"""CostModel: bytes, busy times and a simulated timeline of one iteration, for a workload, a profile and a plan.

Everything here is a plain formula with units in its name, or a simulation built from those formulas.

Bytes per link (exact accounting; ``pb``, ``gb``, ``sb`` = a unit's param, grad and state bytes, ``P`` its params):

====================  =========================================================================================
params on host        h2d ``2 pb`` (fetched for forward and again for backward)
params on nvme        disk read ``2 pb`` and h2d ``2 pb`` (staged through host buffers)
update on cpu         d2h ``gb`` (grads leave as they complete); state on nvme: disk read + write ``sb``;
                      new params: to the device h2d ``pb`` (params on device), none (host), disk write ``pb`` (nvme)
update on device      state on host: h2d + d2h ``sb``; on nvme: also disk read + write ``sb``;
                      new params: none (device), d2h ``pb`` (host), d2h + disk write ``pb`` (nvme)
====================  =========================================================================================

The ``rest`` unit (embeddings and head) keeps its params on the device: it is used at both ends of forward and
backward, so holding it costs no more memory than streaming it twice would, and saves the transfers.

Busy time of a resource = its work / its rate: compute FLOPs / (``device_tflops`` x ``compute_efficiency``),
link bytes / ``h2d_gbps`` or ``d2h_gbps``, disk bytes / ``disk_read_gbps`` or ``disk_write_gbps``, params /
``cpu_update_params_per_s`` (``..._under_io`` when the plan also streams the disk) or
``device_update_params_per_s``. When both directions of a link (or of the disk) carry bytes, both durations are
stretched by the same factor so that their sum respects ``bidir_gbps`` (``disk_mixed_gbps``): an approximation
of how two directions share a link, exact when both are busy all the time.

Memory per tier is what the runtime allocates: resident chunks plus fixed pools (pools are allocated once and
reused, DESIGN.md "Tiers"), so the peak equals the total; see :meth:`CostModel.memory`.

The simulation (:meth:`CostModel.simulate`) is a discrete-event list schedule: each operation has a resource, a
duration and the operations it waits for; an operation becomes ready when all of those have ended, and each
resource runs its ready operations one at a time in the order they became ready (creation order on ties), which is
how a runtime that issues each copy or update as soon as its inputs are there behaves on FIFO streams. The
iteration ends when the last update has put the new params where the next forward reads them.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import TYPE_CHECKING, NamedTuple

from scheduler.profile import HardwareProfile
from scheduler.workload import REST, Workload
from storage import Tier

if TYPE_CHECKING:
    from scheduler.planner import Plan, UnitPlacement

RESOURCES = ("compute", "h2d", "d2h", "disk_read", "disk_write", "cpu_update")
LINKS = ("h2d", "d2h", "disk_read", "disk_write")
D, H, N = Tier.DEVICE, Tier.HOST, Tier.NVME


class Traffic(NamedTuple):
    """Bytes each link carries and params each update site updates, per iteration. (A NamedTuple, not a
    dataclass: the planner adds thousands of these, and ``dataclasses.astuple`` deep-copies.)"""

    h2d_bytes: int = 0
    d2h_bytes: int = 0
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    cpu_update_params: int = 0
    device_update_params: int = 0

    def __add__(self, o: "Traffic") -> "Traffic":  # element-wise, not tuple concatenation
        return Traffic(*(a + b for a, b in zip(self, o)))

    def __sub__(self, o: "Traffic") -> "Traffic":
        return Traffic(*(a - b for a, b in zip(self, o)))

    def scaled(self, k: int) -> "Traffic":
        return Traffic(*(k * a for a in self))


def unit_traffic(pb: int, gb: int, sb: int, params: int, pl: "UnitPlacement") -> Traffic:
    """The table in the module note, for one unit."""
    h2d = d2h = rd = wr = 0
    if pl.params is H:
        h2d += 2 * pb
    elif pl.params is N:
        rd += 2 * pb
        h2d += 2 * pb
    if pl.update == "cpu":
        d2h += gb
        if pl.state is N:
            rd += sb
            wr += sb
        if pl.params is D:
            h2d += pb
        elif pl.params is N:
            wr += pb
        return Traffic(h2d, d2h, rd, wr, params, 0)
    if pl.state in (H, N):
        h2d += sb
        d2h += sb
    if pl.state is N:
        rd += sb
        wr += sb
    if pl.params in (H, N):
        d2h += pb
    if pl.params is N:
        wr += pb
    return Traffic(h2d, d2h, rd, wr, 0, params)


@dataclasses.dataclass(frozen=True)
class Event:
    """One operation on a resource, in seconds from the start of the iteration: of the predicted timeline here,
    and of the measured one (:mod:`offload.timeline`), so that the two line up."""

    resource: str
    name: str
    start_s: float
    end_s: float
    nbytes: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prediction:
    """What the cost model predicts for one plan."""

    iteration_s: float
    traffic: Traffic
    busy_s: dict
    """Resource -> seconds it is busy (sum of its operations' durations, after the sharing stretch)."""
    memory_bytes: dict
    """Tier value -> bytes the plan places there (resident chunks plus pools)."""
    lower_bound_s: float
    fill_s: float
    """Unavoidable time with the compute stream idle: fetching the first unit's params before the first forward,
    and after the last backward, the update chain of the unit whose grads complete last (``rest``)."""
    bound_by: str
    """The term of the lower bound that is largest: ``compute+fill``, a link, ``disk`` or ``cpu_update``."""
    bottleneck: str
    """The resource busiest in the simulated iteration."""
    events: tuple[Event, ...] = ()

    def tokens_per_s(self, workload: Workload) -> float:
        return workload.tokens / self.iteration_s

    def model_tflops(self, workload: Workload) -> float:
        """Model FLOP/s (no recomputation counted), 1e12: the MFU numerator."""
        return workload.model_flops / self.iteration_s / 1e12


class CostModel:
    """Formulas for one workload on one profile; ``predict(plan)`` evaluates a plan."""

    def __init__(self, workload: Workload, profile: HardwareProfile):
        self.w = workload
        self.hw = profile
        self.flops_per_s = profile.flops_per_s(workload.compute_dtype)
        n = len(workload.units)
        self.pb = [workload.param_bytes(i) for i in range(n)]
        self.gb = [workload.grad_bytes(i) for i in range(n)]
        self.sb = [workload.state_bytes(i) for i in range(n)]
        self.params = [u.params for u in workload.units]
        self.has_rest = workload.units[0].kind == REST
        self.blocks = list(range(1, n)) if self.has_rest else list(range(n))
        recompute = 1.0 if workload.checkpointing else 0.0
        self.fwd_s = [u.fwd_flops / self.flops_per_s for u in workload.units]
        self.act_bytes = sum(u.act_bytes for u in workload.units) + max(u.work_bytes for u in workload.units)
        """Device bytes for activations: every unit's checkpointed input plus the largest working set."""
        self.bwd_s = [(u.bwd_flops + recompute * u.fwd_flops) / self.flops_per_s for u in workload.units]

    # -- validation -------------------------------------------------------------------------------------------------
    def check(self, plan: "Plan") -> None:
        if len(plan.units) != len(self.w.units):
            raise ValueError(f"plan {plan.strategy!r}: expected one placement per unit ({len(self.w.units)}), got "
                             f"{len(plan.units)}; was it made for another workload?")
        if self.has_rest and plan.units[0].params is not D:
            raise ValueError(f"plan {plan.strategy!r}: the rest unit (embeddings, head): expected params on 'device',"
                             f" got {plan.units[0].params.value!r}; it is used at both ends of the iteration, so "
                             f"streaming it costs more than holding it")

    # -- bytes --------------------------------------------------------------------------------------------------------
    def traffic(self, plan: "Plan") -> Traffic:
        total = Traffic()
        for i, pl in enumerate(plan.units):
            total = total + unit_traffic(self.pb[i], self.gb[i], self.sb[i], self.params[i], pl)
        return total

    def memory(self, plan: "Plan") -> dict[str, int]:
        """Bytes per tier (resident chunks + pools). Each term, so a report can show where memory goes:

        device: params on device; ``prefetch_depth + 1`` buffers of the largest streamed param chunk; state on
        device; the rest unit's grads plus ``grad_buffers`` grads of the largest block (all device-updated grads until the step when the
        update waits for backward); ``state_buffers`` of the largest offloaded state updated on the device; every
        unit's checkpointed input plus the largest unit's working activations.
        host: params and state on host; grads of CPU-updated units (``grad_buffers`` of them, or all when the update
        waits for backward, as ZeRO-Offload holds them); staging for nvme: ``prefetch_depth + 1`` param buffers
        and ``state_buffers`` state buffers.
        nvme: params and state there plus room for ``state_buffers`` chunk writes in flight (a write never
        overwrites the committed copy, storage/nvme.py).
        """
        return {k: sum(v.values()) for k, v in self.memory_terms(plan).items()}

    def memory_terms(self, plan: "Plan") -> dict[str, dict[str, int]]:
        return self.memory_terms_of(plan, [(i, pl, 1) for i, pl in enumerate(plan.units)])

    def memory_terms_of(self, plan: "Plan", items) -> dict[str, dict[str, int]]:
        """:meth:`memory` by term, for ``items`` = (unit index, placement, how many such units): the planner
        evaluates groups of identical units with counts instead of one entry per unit."""
        pb, gb, sb = self.pb, self.gb, self.sb
        items = [(i, pl, c) for i, pl, c in items if c]
        mx = lambda xs: max(xs, default=0)  # noqa: E731
        streamed = mx(pb[i] for i, pl, c in items if pl.params is not D)
        dev_upd_off = mx(sb[i] for i, pl, c in items if pl.update == "device" and pl.state is not D)
        rest = [(i, pl, c) for i, pl, c in items if self.has_rest and i == 0]
        blocks = [(i, pl, c) for i, pl, c in items if not (self.has_rest and i == 0)]
        # The rest unit's grads stay whole through backward (the embedding's complete last); blocks rotate
        # through grad_buffers, or all stay until the step when device updates wait for backward.
        dev_grads = sum(gb[i] for i, pl, c in rest) + (
            plan.grad_buffers * mx(gb[i] for i, pl, c in blocks) if plan.overlap_update else
            plan.grad_buffers * mx(gb[i] for i, pl, c in blocks if pl.update == "cpu")
            + sum(c * gb[i] for i, pl, c in blocks if pl.update == "device"))
        acts = self.act_bytes
        device = {"params": sum(c * pb[i] for i, pl, c in items if pl.params is D),
                  "param_buffers": (plan.prefetch_depth + 1) * streamed,
                  "state": sum(c * sb[i] for i, pl, c in items if pl.state is D),
                  "grads": dev_grads, "state_buffers": plan.state_buffers * dev_upd_off, "activations": acts}
        cpu_g = [(gb[i], c) for i, pl, c in items if pl.update == "cpu"]
        host = {"params": sum(c * pb[i] for i, pl, c in items if pl.params is H),
                "state": sum(c * sb[i] for i, pl, c in items if pl.state is H),
                "grads": plan.grad_buffers * mx(g for g, c in cpu_g) if plan.overlap_update else
                sum(g * c for g, c in cpu_g),
                "param_staging": (plan.prefetch_depth + 1) * mx(pb[i] for i, pl, c in items if pl.params is N),
                "state_staging": plan.state_buffers * mx(sb[i] for i, pl, c in items if pl.state is N)}
        nv_chunks = [pb[i] for i, pl, c in items if pl.params is N] + [sb[i] for i, pl, c in items if pl.state is N]
        nvme = {"params": sum(c * pb[i] for i, pl, c in items if pl.params is N),
                "state": sum(c * sb[i] for i, pl, c in items if pl.state is N),
                "write_room": plan.state_buffers * mx(nv_chunks)}
        return {"device": device, "host": host, "nvme": nvme}

    def capacity(self) -> dict[str, int]:
        return {"device": self.hw.device_memory_bytes, "host": self.hw.host_memory_bytes, "nvme": self.hw.nvme_bytes}

    def shortfall(self, plan: "Plan") -> dict[str, int]:
        """Tier -> bytes missing (only tiers that are short)."""
        mem, cap = self.memory(plan), self.capacity()
        return {t: mem[t] - cap[t] for t in mem if mem[t] > cap[t]}

    # -- times --------------------------------------------------------------------------------------------------------
    def rates(self, t: Traffic) -> dict[str, float]:
        """Effective seconds per byte (or per param) of each resource for this traffic, after sharing."""
        hw = self.hw
        h2d, d2h = 1 / (hw.h2d_gbps * 1e9), 1 / (hw.d2h_gbps * 1e9)
        rd, wr = 1 / (hw.disk_read_gbps * 1e9), 1 / (hw.disk_write_gbps * 1e9)
        if t.h2d_bytes and t.d2h_bytes:
            alone = max(t.h2d_bytes * h2d, t.d2h_bytes * d2h)
            stretch = max(1.0, (t.h2d_bytes + t.d2h_bytes) / (hw.bidir_gbps * 1e9) / alone)
            h2d, d2h = h2d * stretch, d2h * stretch
        if t.disk_read_bytes and t.disk_write_bytes:
            alone = max(t.disk_read_bytes * rd, t.disk_write_bytes * wr)
            stretch = max(1.0, (t.disk_read_bytes + t.disk_write_bytes) / (hw.disk_mixed_gbps * 1e9) / alone)
            rd, wr = rd * stretch, wr * stretch
        disk_busy = t.disk_read_bytes or t.disk_write_bytes
        cpu = 1 / (hw.cpu_update_params_per_s_under_io if disk_busy else hw.cpu_update_params_per_s)
        return {"h2d": h2d, "d2h": d2h, "disk_read": rd, "disk_write": wr, "cpu_update": cpu,
                "device_update": 1 / hw.device_update_params_per_s}

    def busy(self, t: Traffic) -> dict[str, float]:
        r = self.rates(t)
        return {"compute": sum(self.fwd_s) + sum(self.bwd_s) + t.device_update_params * r["device_update"],
                "h2d": t.h2d_bytes * r["h2d"], "d2h": t.d2h_bytes * r["d2h"],
                "disk_read": t.disk_read_bytes * r["disk_read"], "disk_write": t.disk_write_bytes * r["disk_write"],
                "cpu_update": t.cpu_update_params * r["cpu_update"]}

    def fill_s(self, plan: "Plan", r: dict[str, float]) -> float:
        """Head: the first block's params must arrive before the first forward. Tail: the unit whose grads
        complete last (``rest``, or the first block) is updated after the last backward, and its new params must
        reach their tier before the iteration ends."""
        head = 0.0
        if self.blocks:
            first = self.blocks[0]
            pl = plan.units[first]
            if pl.params is not D:
                head = self.pb[first] * r["h2d"] + (self.pb[first] * r["disk_read"] if pl.params is N else 0.0)
        last = 0
        pl, pb, gb, sb = plan.units[last], self.pb[last], self.gb[last], self.sb[last]
        if pl.update == "cpu":
            tail = gb * r["d2h"] + self.params[last] * r["cpu_update"]
            after = [pb * r["h2d"] if pl.params is D else pb * r["disk_write"] if pl.params is N else 0.0,
                     sb * r["disk_write"] if pl.state is N else 0.0]
        else:
            tail = self.params[last] * r["device_update"]
            after = [sb * r["d2h"] + (sb * r["disk_write"] if pl.state is N else 0.0) if pl.state is not D else 0.0,
                     pb * r["d2h"] if pl.params is not D else 0.0]
        return head + tail + max(after)

    def bound(self, plan: "Plan", t: Traffic | None = None) -> tuple[float, float, str, dict[str, float]]:
        """(lower bound, fill, the term that sets it, busy times). The bound is
        ``max(forward/backward compute + fill, all compute, h2d, d2h, both link directions / bidir, disk read, write, both / mixed, cpu update)``:
        no schedule of this placement beats it. The fill is added to compute only: the head fetch and the tail
        update are themselves link and CPU work, so adding it to those terms would double count."""
        t = t if t is not None else self.traffic(plan)
        r = self.rates(t)
        b = self.busy(t)
        fill = self.fill_s(plan, r)
        hw = self.hw
        fwd_bwd = sum(self.fwd_s) + sum(self.bwd_s)
        # Device updates may run after the last backward, beside the tail fill, so they join compute, not the fill.
        terms = {"compute+fill": max(fwd_bwd + fill, b["compute"]), "h2d": b["h2d"], "d2h": b["d2h"],
                 "link": (t.h2d_bytes + t.d2h_bytes) / (hw.bidir_gbps * 1e9), "disk_read": b["disk_read"],
                 "disk_write": b["disk_write"],
                 "disk": (t.disk_read_bytes + t.disk_write_bytes) / (hw.disk_mixed_gbps * 1e9)
                 if t.disk_read_bytes and t.disk_write_bytes else 0.0, "cpu_update": b["cpu_update"]}
        by = max(terms, key=terms.get)
        return terms[by], fill, by, b

    # -- simulation ---------------------------------------------------------------------------------------------------
    def predict(self, plan: "Plan", *, events: bool = False) -> Prediction:
        self.check(plan)
        t = self.traffic(plan)
        lb, fill, by, _ = self.bound(plan, t)
        end_s, busy, evs = self._simulate(plan, t, events)
        return Prediction(iteration_s=end_s, traffic=t, busy_s=busy, memory_bytes=self.memory(plan),
                          lower_bound_s=lb, fill_s=fill, bound_by=by, bottleneck=max(busy, key=busy.get),
                          events=tuple(evs))

    def _simulate(self, plan: "Plan", t: Traffic, want_events: bool):
        r = self.rates(t)
        res_idx = {name: k for k, name in enumerate(RESOURCES)}
        op_res: list[int] = []
        op_dur: list[float] = []
        op_name: list[str] = []
        op_deps: list[list[int]] = []

        def add(res: str, name: str, dur: float, deps) -> int:
            op_res.append(res_idx[res])
            op_dur.append(dur)
            op_name.append(name)
            op_deps.append([d for d in deps if d is not None])
            return len(op_res) - 1

        units, blocks, k = plan.units, self.blocks, plan.prefetch_depth
        names = [u.name for u in self.w.units]
        # Compute order: forward blocks, head (rest), head backward, blocks in reverse. Each streamed block is
        # fetched twice (forward, backward) through prefetch_depth + 1 device buffers, in this order.
        compute_seq = [("F", i) for i in blocks] + ([("F", 0), ("B", 0)] if self.has_rest else []) + \
                      [("B", i) for i in reversed(blocks)]
        fetch_for: dict[int, tuple[int, int]] = {}  # position in compute_seq -> (disk op or None, h2d op)
        fetch_consumer: list[int] = []  # per fetch: position in compute_seq of the compute that uses it
        for pos, (_, i) in enumerate(compute_seq):
            if units[i].params is not D:
                fetch_consumer.append(pos)
        compute_op: list[int | None] = [None] * len(compute_seq)
        # Fetch j may start once the compute that used fetch j - (k + 1) is done (its buffer is free). Those are
        # forward references: created as placeholders first, deps patched below.
        fetch_ops = []
        for j, pos in enumerate(fetch_consumer):
            i = compute_seq[pos][1]
            kind = compute_seq[pos][0]
            rd = add("disk_read", f"{kind} fetch {names[i]}", self.pb[i] * r["disk_read"], []) \
                if units[i].params is N else None
            h2d = add("h2d", f"{kind} fetch {names[i]}", self.pb[i] * r["h2d"], [rd])
            fetch_ops.append((rd, h2d))
            fetch_for[pos] = (rd, h2d)
        prev = None
        grad_order = list(reversed(blocks)) + ([0] if self.has_rest else [])
        grad_pos = {u: g for g, u in enumerate(grad_order)}
        grad_release: dict[int, int] = {}  # grad index -> op freeing its device grad buffer (patched below)
        bwd_ops: dict[int, int] = {}
        pending_grad_deps: list[tuple[int, int]] = []  # (op, grad index whose release it waits for)
        for pos, (kind, i) in enumerate(compute_seq):
            deps = [prev]
            if pos in fetch_for:
                deps.append(fetch_for[pos][1])
            dur = self.fwd_s[i] if kind == "F" else self.bwd_s[i]
            op = add("compute", f"{'forward' if kind == 'F' else 'backward'} {names[i]}", dur, deps)
            if kind == "B":
                bwd_ops[i] = op
                g = grad_pos[i]
                # The rest unit's grads complete only with the last backward (embedding): they have their own
                # buffer for the whole backward, outside the rotating ones.
                if g - plan.grad_buffers >= 0 and not (self.has_rest and i == 0):
                    pending_grad_deps.append((op, g - plan.grad_buffers))
            compute_op[pos] = op
            prev = op
        for j, (rd, h2d) in enumerate(fetch_ops):
            if j - (k + 1) >= 0:
                op_deps[h2d].append(compute_op[fetch_consumer[j - (k + 1)]])
                if rd is not None:
                    op_deps[rd].append(fetch_ops[j - (k + 1)][1])
        last_fwd = compute_op[len(blocks) - 1 + (1 if self.has_rest else 0)] if compute_seq else None
        last_bwd = prev
        # Updates, in the order grads complete. The rest unit's grads (embedding) complete with the last backward.
        state_release: list[int] = []  # per offloaded-state update, in order: op that frees its staging buffer
        for g, i in enumerate(grad_order):
            pl = units[i]
            done_grad = bwd_ops[i] if i != 0 or not self.has_rest else last_bwd
            gate = done_grad if plan.overlap_update else last_bwd
            pb, gb, sb, p = self.pb[i], self.gb[i], self.sb[i], self.params[i]
            slot = state_release[-plan.state_buffers] if len(state_release) >= plan.state_buffers else None
            if pl.update == "cpu":
                d2h = add("d2h", f"grad {names[i]}", gb * r["d2h"], [done_grad])
                grad_release[g] = d2h
                rd = add("disk_read", f"state {names[i]}", sb * r["disk_read"], [last_fwd, slot]) \
                    if pl.state is N else None
                upd = add("cpu_update", f"update {names[i]}", p * r["cpu_update"], [d2h, rd, gate])
                if pl.state is N:
                    state_release.append(add("disk_write", f"state {names[i]}", sb * r["disk_write"], [upd]))
                if pl.params is D:
                    add("h2d", f"new params {names[i]}", pb * r["h2d"], [upd])
                elif pl.params is N:
                    add("disk_write", f"new params {names[i]}", pb * r["disk_write"], [upd])
            else:
                up = None
                if pl.state is not D:
                    rd = add("disk_read", f"state {names[i]}", sb * r["disk_read"], [last_fwd, slot]) \
                        if pl.state is N else None
                    up = add("h2d", f"state {names[i]}", sb * r["h2d"], [rd, last_fwd, slot])
                upd = add("compute", f"update {names[i]}", p * r["device_update"], [done_grad, up, gate])
                grad_release[g] = upd
                if pl.state is not D:
                    down = add("d2h", f"state {names[i]}", sb * r["d2h"], [upd])
                    state_release.append(add("disk_write", f"state {names[i]}", sb * r["disk_write"], [down])
                                         if pl.state is N else down)
                if pl.params is not D:
                    pd = add("d2h", f"new params {names[i]}", pb * r["d2h"], [upd])
                    if pl.params is N:
                        add("disk_write", f"new params {names[i]}", pb * r["disk_write"], [pd])
        for op, g in pending_grad_deps:
            # A device grad buffer frees when its grads left (d2h) or were applied (device update). When updates
            # wait for backward, device-updated grads are all held instead (CostModel.memory counts them).
            if g in grad_release and (plan.overlap_update or op_name[grad_release[g]].startswith("grad")):
                op_deps[op].append(grad_release[g])
        return self._run(op_res, op_dur, op_name, op_deps, want_events)

    @staticmethod
    def _run(op_res, op_dur, op_name, op_deps, want_events):
        n = len(op_res)
        waiting = [len(d) for d in op_deps]
        users: list[list[int]] = [[] for _ in range(n)]
        for o, deps in enumerate(op_deps):
            for d in deps:
                users[d].append(o)
        ready_at = [0.0] * n
        end = [0.0] * n
        start = [0.0] * n
        free = [0.0] * len(RESOURCES)
        heap = [(0.0, o) for o in range(n) if waiting[o] == 0]
        heapq.heapify(heap)
        done = 0
        while heap:
            t_ready, o = heapq.heappop(heap)
            rs = op_res[o]
            s = free[rs] if free[rs] > t_ready else t_ready
            e = s + op_dur[o]
            start[o], end[o], free[rs] = s, e, e
            done += 1
            for u in users[o]:
                if e > ready_at[u]:
                    ready_at[u] = e
                waiting[u] -= 1
                if waiting[u] == 0:
                    heapq.heappush(heap, (ready_at[u], u))
        assert done == n, f"simulation deadlock: {n - done} operations never became ready (a dependency cycle)"
        busy = {name: 0.0 for name in RESOURCES}
        for o in range(n):
            busy[RESOURCES[op_res[o]]] += op_dur[o]
        evs = [Event(RESOURCES[op_res[o]], op_name[o], start[o], end[o]) for o in range(n)] if want_events else []
        return (max(end) if n else 0.0), busy, evs
