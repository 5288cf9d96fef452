"""CostModel: bytes, busy times and a simulated timeline of one iteration, for a workload, a profile and a plan.

Why one module: the byte formulas, the memory count and the simulation must agree with each other, and are
kept in step here.

Everything here is a plain formula with units in its name, or a simulation built from those formulas. Both
describe what the runtime does (offload/runtime.py, offload/optimizer.py), so that a prediction can be checked
against a measured iteration (offload/measure.py).

Bytes per link (exact accounting; ``pb``, ``gb``, ``sb`` = a unit's param, grad and state bytes, ``P`` its params;
``sb`` includes an fp32 master where the workload needs one for this placement, workload.py). Grads, state and
updates are those of the unit's trainable params (``gb``, ``sb`` count only them); ``tpb`` is their share of
``pb``:

====================  =========================================================================================
params on host        h2d ``f pb``; a block is fetched for forward and again for backward (``f = 2``), except the
                      last ``prefetch_depth`` blocks, kept on the device from their forward into backward
                      (``f = 1``); the rest unit is fetched once and held through the iteration (``f = 1``)
params on nvme        disk read ``f pb`` and h2d ``f pb`` (staged through host buffers)
update on cpu         d2h ``gb`` (grads leave as they complete); state on nvme: disk read + write ``sb``;
                      new params: to the device h2d ``tpb`` (params on device), none (host), disk write ``pb``
                      (nvme: the whole chunk). Where the update needs the nvme params in host memory first (it
                      changes them in place, fp32 params having no master, or some are frozen): overlapping
                      backward, nothing more for a unit fetched for backward (its fetch's host copy is kept) and
                      d2h ``pb`` for one that was not (copied as it leaves the device); else disk read ``pb``;
                      grads on nvme: disk write + read ``gb`` when the update waits for backward (spilled after
                      backward, read back by the step), none when it overlaps backward (they go straight to it)
update on device      state on host: h2d + d2h ``sb``; on nvme: also disk read + write ``sb``;
                      new params: none (device), d2h ``tpb`` (host), d2h ``tpb`` + disk write ``pb`` (nvme; read
                      first as above when some are frozen)
no trainable params   fetches only: no grads, no state, no update, no new params (never written back)
====================  =========================================================================================

The ``rest`` unit (embeddings and head) is used at both ends of forward and backward: on the device it stays
there; elsewhere it is fetched once, before the first forward, and held until the end of backward (so keeping it
on the device costs no more device memory, and saves the fetch: the planner does).

Busy time of a resource = its work / its rate: compute FLOPs / (``device_tflops`` x the efficiency a step of the
workload's tokens reaches, ``HardwareProfile.efficiency_at``: small steps reach less),
link bytes / ``h2d_gbps`` or ``d2h_gbps``, disk bytes / ``disk_read_gbps`` or ``disk_write_gbps``, params /
``cpu_update_params_per_s`` (``..._under_io`` when the plan also streams the disk) or
``device_update_params_per_s``. When both directions of the link carry bytes, both durations are stretched by
the same factor so that their sum respects ``bidir_gbps``: an approximation of how two directions share a link,
exact when both are busy all the time. The disk is one device shared by reads and writes: the store's worker
threads serve both from one queue, and the simulation runs them on one resource, one at a time. Its rate depends
on the mix: when reads and writes are both in flight it moves ``disk_mixed_gbps`` (reads plus writes, the probe's
interleaved rate; 5.0 GB/s where a Samsung 990 PRO reads at 7.45 and writes at 6.9 alone), else each at its own
rate. Per iteration, the runtime's pipeline keeps both in flight as far as their bytes pair up (fetches and state
reads beside state and param write-backs), so the disk's busy time is ``2 min(R, W) / disk_mixed_gbps`` plus the
excess of the larger direction at its own rate; both per-byte costs are scaled by one factor so that reads at
``disk_read_gbps`` and writes at ``disk_write_gbps`` add up to that (:meth:`CostModel.disk_share`), in the bound
and the simulated timeline alike: exact when the two directions alternate all the time, as the link's stretch is.

Shared cores: host work can slow the device's compute. Each operation of kind copy (h2d, d2h), update
(cpu_update) or disk (disk_read, disk_write) that takes ``d`` seconds also puts ``cpu_steal[kind] x d`` seconds
of work on the compute stream, ready when the operation is (named ``steal <operation>``). On a GPU the factors
are 0 and nothing changes; where the device is the CPU, compute, copies, updates and the store's checksums share
its cores, and ``offload probe`` measures what each second of that work costs the compute (about 1 or more). The
stolen time is part of the compute's busy time; an operation that runs while compute waits steals nothing extra,
since its steal fits in the wait.

Where the device is the CPU (``HardwareProfile.device_name == "cpu"``), a device update is CPU work on the
runtime's update thread like any other: it runs on the ``cpu_update`` resource (at ``device_update_params_per_s``)
and steals from compute as a CPU update does. On a GPU it is a kernel on the device's compute stream.

Memory per tier is what the runtime holds at its peak: resident chunks plus the buffers in flight, counted by the
rules the runtime itself follows (:mod:`scheduler.buffers`); see :meth:`CostModel.memory`.

The simulation (:meth:`CostModel.simulate`) is a discrete-event list schedule: each operation has a resource, a
duration and the operations it waits for; an operation becomes ready when all of those have ended, and each
resource runs its ready operations one at a time in the order they became ready (creation order on ties), which is
how a runtime that issues each copy or update as soon as its inputs are there behaves on FIFO streams. The disk
serves by urgency first, as the store's worker queues do (storage/workers.py): weight reads that compute waits
for, then state and grads read ahead, then writes; a more urgent operation takes the disk over at once and the
one it interrupts resumes after it (the store's blocks are small enough for that to be close). The operations
and their order follow the runtime:

- fetches run on one copy thread, one after another (a unit's disk read, then its h2d); the fetch for the compute
  at position ``p`` (forward blocks, the rest unit's forward and backward, backward blocks) is issued when the
  compute at ``p - prefetch_depth - 1`` is done, i.e. by the pre-hook ``prefetch_depth`` units ahead;
- grads leave on one grad thread in the order backward completes them;
- updates run on one update thread. Overlapped with backward, units are updated in the order their grads land;
  nvme state is read ahead: the first units' reads are issued when backward starts, the next ones' as soon as
  one of the ``state_buffers - 1`` buffers the update does not hold is free (a write-back frees its buffer when
  it lands, and the update thread then reads further ahead); with one buffer, a unit's state is read after its
  grads land and the previous write-back ended. After a unit's update its state write-back is issued once the
  unit before's has landed (one unit's state writes in flight), then its new params (nvme) once the unit
  before's have landed (one unit's in flight), and the thread goes on to the next unit. After backward,
  host-state units come first, then nvme-state ones, in unit order; state reads run ahead within
  ``state_buffers``, and each unit's new params (nvme) are written when the next unit's state is in.

The iteration ends when the last update does and the writes the step waits for have landed. An overlapped step
that commits as it is (:meth:`CostModel.writes_behind`) does not wait for its last unit's writes (state, new
params): the next forward overlaps them, so each iteration starts with the last one's on the disk, behind the
forward's weight reads (steady state).
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import NamedTuple

from scheduler.buffers import Knobs, UnitBytes, memory_terms
from scheduler.plan import Plan, UnitPlacement
from scheduler.profile import HardwareProfile
from scheduler.workload import REST, Workload
from storage import Tier

RESOURCES = ("compute", "h2d", "d2h", "disk_read", "disk_write", "cpu_update")
LINKS = ("h2d", "d2h", "disk_read", "disk_write")
STEAL_OF = {"h2d": "copy", "d2h": "copy", "cpu_update": "update", "disk_read": "disk", "disk_write": "disk"}
"""The ``HardwareProfile.cpu_steal`` kind of each host-side resource."""
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


def unit_traffic(pb: int, gb: int, sb: int, params: int, pl: UnitPlacement, *, fetches: int = 2,
                 overlap: bool = True, tpb: int | None = None, weights_from: str | None = None,
                 warm: bool = False) -> Traffic:
    """The table in the module note, for one unit fetched ``fetches`` times (when its params are off the device),
    its update overlapped with backward or not. ``params``: the params it updates (0: all frozen, no update);
    ``tpb``: their bytes in the param chunk (default ``pb``); ``weights_from``: where the update takes its NVMe
    params from before it changes them (:meth:`CostModel.update_weights_from`); ``warm``: its first fetch finds
    the weights the last step kept in host memory (:meth:`CostModel.warm`)."""
    tpb = pb if tpb is None else tpb
    h2d = d2h = rd = wr = 0
    if pl.params is H:
        h2d += fetches * pb
    elif pl.params is N:
        rd += (fetches - (1 if warm and fetches else 0)) * pb
        h2d += fetches * pb
    if not params:
        return Traffic(h2d, d2h, rd, wr, 0, 0)
    if pl.params is N:  # the new weights go to the store as a whole chunk; read in first where needed
        wr += pb
        rd += pb if weights_from == "store" else 0
        d2h += pb if weights_from == "device" else 0
    if pl.update == "cpu":
        d2h += gb
        if pl.grad_tier is N and not overlap:
            wr += gb
            rd += gb
        if pl.state is N:
            rd += sb
            wr += sb
        if pl.params is D:
            h2d += tpb
        return Traffic(h2d, d2h, rd, wr, params, 0)
    if pl.state in (H, N):
        h2d += sb
        d2h += sb
    if pl.state is N:
        rd += sb
        wr += sb
    if pl.params in (H, N):
        d2h += tpb
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
    """Resource -> seconds it is busy (sum of its operations' durations, after the sharing stretch; compute
    includes ``steal_s``)."""
    memory_bytes: dict
    """Tier value -> bytes the plan places there (resident chunks plus pools)."""
    lower_bound_s: float
    fill_s: float
    """Unavoidable time with the compute stream idle: fetching the first unit's params before the first forward,
    and after the last backward, the update chain of the unit whose grads complete last (``rest``)."""
    bound_by: str
    """The term of the lower bound that is largest: ``compute+fill``, ``h2d``, ``d2h``, ``link``, ``disk`` or
    ``cpu_update``."""
    bottleneck: str
    """The resource busiest in the simulated iteration."""
    steal_s: float = 0.0
    """Compute time taken by host work on shared cores (module note, "Shared cores"); part of compute's busy."""
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
        self.flops_per_s = profile.flops_per_s(workload.compute_dtype, workload.tokens)
        n = len(workload.units)
        self.pb = [workload.param_bytes(i) for i in range(n)]
        self.gb = [workload.grad_bytes(i) for i in range(n)]
        self.sb = [workload.state_bytes(i) for i in range(n)]
        """State chunks without a master; :meth:`state_bytes` adds one where a placement needs it."""
        self.sb_master = [workload.state_bytes(i, master=True) for i in range(n)]
        self.params = [u.trainable for u in workload.units]
        """Params each unit updates: its trainable ones (0: all frozen, never updated nor written back)."""
        self.tpb = [workload.trainable_param_bytes(i) for i in range(n)]
        self.frozen = [0 < u.trainable < u.params for u in workload.units]
        """Units whose params are partly frozen: an update of their params on nvme reads the chunk in first."""
        self.has_rest = workload.units[0].kind == REST
        self.blocks = list(range(1, n)) if self.has_rest else list(range(n))
        recompute = 1.0 if workload.checkpointing else 0.0
        self.fwd_s = [u.fwd_flops / self.flops_per_s for u in workload.units]
        self.act_bytes = sum(u.act_bytes for u in workload.units) + max(u.work_bytes for u in workload.units)
        """Device bytes for activations: every unit's checkpointed input plus the largest working set."""
        self.bwd_s = [(u.bwd_flops + recompute * u.fwd_flops) / self.flops_per_s for u in workload.units]
        self.steal = {r: profile.cpu_steal[k] for r, k in STEAL_OF.items()}
        self.device_update_res = "cpu_update" if profile.device_name == "cpu" else "compute"
        """Where a device update runs (module note): the update thread when the device is the CPU."""

    # -- validation -------------------------------------------------------------------------------------------------
    def check(self, plan: Plan) -> None:
        if len(plan.units) != len(self.w.units):
            raise ValueError(f"plan {plan.strategy!r}: expected one placement per unit ({len(self.w.units)}), got "
                             f"{len(plan.units)}; was it made for another workload?")

    # -- bytes --------------------------------------------------------------------------------------------------------
    @staticmethod
    def needs_master(pl: UnitPlacement) -> bool:
        """Whether the state carries an fp32 master: the update cannot change the params in place where they
        live (a CPU update of params on the device, a device update of params not on the device). A CPU update
        of params on NVMe stages them in host memory and changes them there."""
        return pl.params is D if pl.update == "cpu" else pl.params is not D

    def in_place(self, i: int, pl: UnitPlacement) -> bool:
        """Whether the update of unit ``i`` changes its NVMe params in place (no master: fp32 params on a CPU
        update), so it needs their bytes in host memory first."""
        return pl.params is N and self.w.master_bytes_per_param > 0 and not self.needs_master(pl)

    def update_weights_from(self, i: int, pl: UnitPlacement, *, fetches: int, overlap: bool) -> str | None:
        """Where the update of unit ``i`` takes its NVMe params from when it needs them in host memory first (it
        changes them in place, or some are frozen: it rewrites the whole chunk); ``None`` when it does not. An
        update that overlaps backward takes the host copy the unit's backward fetch brought (``"fetch"``), or for
        a unit that was not fetched again for backward (the rest unit, blocks kept on the device from their
        forward: ``fetches == 1``) a copy of its device params as it leaves the device (``"device"``, d2h ``pb``);
        else (and for a device update) it reads them from the store (``"store"``). The runtime keeps those copies where the host has room
        beyond the buffers in flight (not counted as required memory)."""
        if not (pl.params is N and (self.frozen[i] or self.in_place(i, pl))):
            return None
        if pl.update != "cpu" or not overlap:  # a device update reads its frozen params itself
            return "store"
        return "fetch" if fetches == 2 else "device"

    def state_bytes(self, i: int, pl: UnitPlacement) -> int:
        return self.sb_master[i] if self.needs_master(pl) else self.sb[i]

    def kept(self, plan: Plan) -> set[int]:
        """Blocks whose params stay on the device from their forward into backward: the last ``prefetch_depth``
        (the runtime keeps them resident instead of fetching them again; the ``prefetch_depth + 1`` param
        buffers of :meth:`memory` hold them)."""
        k = plan.prefetch_depth
        return set(self.blocks[len(self.blocks) - k:]) if k else set()

    def fetches(self, i: int, plan: Plan, kept: set[int] | None = None) -> int:
        """Times unit ``i``'s params travel to the device per iteration when they live off it."""
        if self.has_rest and i == 0:
            return 1
        return 1 if i in (self.kept(plan) if kept is None else kept) else 2

    def unit_traffic(self, i: int, pl: UnitPlacement, *, fetches: int = 2, overlap: bool = True,
                     warm: bool = False) -> Traffic:
        return unit_traffic(self.pb[i], self.gb[i], self.state_bytes(i, pl), self.params[i], pl, fetches=fetches,
                            overlap=overlap, tpb=self.tpb[i],
                            weights_from=self.update_weights_from(i, pl, fetches=fetches, overlap=overlap),
                            warm=warm)

    def warm(self, i: int, plan: Plan) -> bool:
        """Whether unit ``i``'s first fetch of an iteration reads nothing: an overlapped step keeps the new NVMe
        weights of the units a forward fetches before any compute (the rest unit, the first ``prefetch_depth``
        blocks) in host memory after writing them, where the host has room (not counted as required)."""
        pl = plan.units[i]
        first = (self.has_rest and i == 0) or i in self.blocks[:plan.prefetch_depth]
        return pl.params is N and plan.overlap_update and self.params[i] > 0 and first

    def traffic(self, plan: Plan) -> Traffic:
        total, kept = Traffic(), self.kept(plan)
        for i, pl in enumerate(plan.units):
            total = total + self.unit_traffic(i, pl, fetches=self.fetches(i, plan, kept),
                                              overlap=plan.overlap_update, warm=self.warm(i, plan))
        return total

    def memory(self, plan: Plan) -> dict[str, int]:
        """Bytes per tier at the iteration's peak: resident chunks plus the buffers the runtime holds at once, by
        the runtime's own rules (:mod:`scheduler.buffers`, which lists each term and the code it describes)."""
        return {k: sum(v.values()) for k, v in self.memory_terms(plan).items()}

    def memory_terms(self, plan: Plan) -> dict[str, dict[str, int]]:
        return self.memory_terms_of(plan, [(i, pl, 1) for i, pl in enumerate(plan.units)])

    def memory_terms_of(self, plan: Plan, items) -> dict[str, dict[str, int]]:
        """:meth:`memory` by term, for ``items`` = (unit index, placement, how many such units): the planner
        evaluates groups of identical units with counts instead of one entry per unit. The rules are the
        runtime's own (:mod:`scheduler.buffers`)."""
        return memory_terms([(self.unit_bytes(i, pl), pl, c) for i, pl, c in items], self.knobs(plan))

    def unit_bytes(self, i: int, pl: UnitPlacement) -> UnitBytes:
        return UnitBytes(self.pb[i], self.gb[i], self.state_bytes(i, pl), self.tpb[i], rest=self.has_rest and i == 0,
                         state_at_wrap=self.needs_master(pl) or not self.w.master_bytes_per_param)

    def knobs(self, plan: Plan) -> Knobs:
        return Knobs(prefetch=plan.prefetch_depth, grad_buffers=plan.grad_buffers, state_buffers=plan.state_buffers,
                     overlap=plan.overlap_update, speculate=plan.speculate, clip=plan.clip,
                     activation_bytes=self.act_bytes)

    def capacity(self) -> dict[str, int]:
        """Bytes a plan may fill per tier: the profile's capacity less its reserve (CUDA context, fragmentation,
        the OS: ``HardwareProfile.reserve_bytes``)."""
        return {t: self.hw.usable_bytes(t) for t in ("device", "host", "nvme")}

    def required(self, plan: Plan) -> dict[str, int]:
        """Bytes per tier the plan needs to run: :meth:`memory` without what speculation takes only where it is
        free. The runtime gives a speculative step's pre-update copies what the host pool has free beyond the
        buffers in flight, and stops speculating (the rest of the step waits for backward) when a copy does not
        fit (``OffloadRuntime._pre_image_room``); it does not speculate when the store has no room for the
        previous versions (``store_room_to_speculate``). So this is the plan's memory without speculation."""
        return self.memory(dataclasses.replace(plan, speculate=False))

    def shortfall(self, plan: Plan) -> dict[str, int]:
        """Tier -> bytes missing (only tiers that are short) of what the plan needs (:meth:`required`)."""
        mem, cap = self.required(plan), self.capacity()
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
        share = self.disk_share(t)
        rd, wr = rd * share, wr * share
        disk_busy = t.disk_read_bytes or t.disk_write_bytes
        cpu = 1 / (hw.cpu_update_params_per_s_under_io if disk_busy else hw.cpu_update_params_per_s)
        return {"h2d": h2d, "d2h": d2h, "disk_read": rd, "disk_write": wr, "cpu_update": cpu,
                "device_update": 1 / hw.device_update_params_per_s}

    def disk_share(self, t: Traffic) -> float:
        """The factor on both disk directions' per-byte costs for this traffic (module note): reads and writes in
        flight together, as far as their bytes pair up, at ``disk_mixed_gbps``; the excess alone at its rate. 1
        when only one direction moves bytes; above 1 when the mixed rate is below one-at-a-time's, as on every
        disk measured so far."""
        hw, r, w = self.hw, t.disk_read_bytes, t.disk_write_bytes
        if not (r and w):
            return 1.0
        alone = r / (hw.disk_read_gbps * 1e9) + w / (hw.disk_write_gbps * 1e9)
        both = min(r, w)
        mixed = 2 * both / (hw.disk_mixed_gbps * 1e9) + (r - both) / (hw.disk_read_gbps * 1e9) + \
            (w - both) / (hw.disk_write_gbps * 1e9)
        return mixed / alone

    def busy(self, t: Traffic) -> dict[str, float]:
        r = self.rates(t)
        out = {"compute": sum(self.fwd_s) + sum(self.bwd_s),
               "h2d": t.h2d_bytes * r["h2d"], "d2h": t.d2h_bytes * r["d2h"],
               "disk_read": t.disk_read_bytes * r["disk_read"], "disk_write": t.disk_write_bytes * r["disk_write"],
               "cpu_update": t.cpu_update_params * r["cpu_update"]}
        out[self.device_update_res] += t.device_update_params * r["device_update"]
        out["compute"] += sum(s * out[res] for res, s in self.steal.items())  # shared cores (module note)
        return out

    def update_order(self, plan: Plan) -> list[int]:
        """Units in the order the update thread takes them: as their grads land (backward order, the rest unit's
        embedding last) when the update overlaps backward; else host-state units, then nvme-state ones, each in
        unit order (``OffloadOptimizer._update_subgroups``). Units without trainable params are never updated."""
        grad_order = [i for i in list(reversed(self.blocks)) + ([0] if self.has_rest else []) if self.params[i]]
        if plan.overlap_update:
            return grad_order
        n = len(plan.units)
        return [i for i in range(n) if plan.units[i].state is not N and self.params[i]] + [
            i for i in range(n) if plan.units[i].state is N and self.params[i]]

    def writes_behind(self, plan: Plan) -> bool:
        """Whether a step returns before its last unit's writes land (state, new params), which the next forward
        then overlaps: an overlapped step that commits as it is (``OffloadRuntime.finish_overlapped_step``; a
        speculative one that clips is rolled back and redone after backward, priced apart:
        :mod:`scheduler.speculation`)."""
        return plan.overlap_update

    def fill_s(self, plan: Plan, r: dict[str, float]) -> float:
        """Head: the rest unit's and the first block's params must arrive (one after the other, on the copy thread)
        before the first forward. Tail, after the last backward: the update chain of the last unit (module note);
        when the update waits for backward, every CPU update runs after it."""
        head = 0.0
        first = [0] if self.has_rest and plan.units[0].params is not D else []
        first += [self.blocks[0]] if self.blocks and plan.units[self.blocks[0]].params is not D else []
        for i in first:
            read = plan.units[i].params is N and not self.warm(i, plan)
            head += self.pb[i] * r["h2d"] + (self.pb[i] * r["disk_read"] if read else 0.0)
        order = self.update_order(plan)
        if not order:  # nothing trains
            return head
        last = order[-1]
        pl, pb, p = plan.units[last], self.pb[last], self.params[last]
        sb, tpb = self.state_bytes(last, pl), self.tpb[last]
        if pl.update == "cpu":
            g_last = 0 if self.has_rest else self.blocks[0]  # the unit whose grads complete with the last backward
            tail = self.gb[g_last] * r["d2h"] if plan.units[g_last].update == "cpu" else 0.0
            tail += p * r["cpu_update"] if plan.overlap_update else sum(
                self.params[i] * r["cpu_update"] for i, u in enumerate(plan.units) if u.update == "cpu")
            if pl.state is N and plan.overlap_update and plan.state_buffers == 1:  # no read-ahead: read after
                tail += sb * r["disk_read"]
            src = self.update_weights_from(last, pl, fetches=self.fetches(last, plan), overlap=plan.overlap_update)
            tail += pb * r["disk_read"] if src == "store" else pb * r["d2h"] if src == "device" else 0.0
            after = sb * r["disk_write"] if pl.state is N else 0.0
            if pl.params is N:  # written once its update and state write are done (after_step)
                after += pb * r["disk_write"]
            elif pl.params is D:  # beside the state write
                after = max(after, tpb * r["h2d"])
            if self.writes_behind(plan):  # the next forward overlaps the writes; new weights to the device remain
                after = tpb * r["h2d"] if pl.params is D else 0.0
            return head + tail + after
        tail = p * r["device_update"]
        after = [sb * r["d2h"] + (sb * r["disk_write"] if pl.state is N else 0.0) if pl.state is not D else 0.0,
                 tpb * r["d2h"] if pl.params is not D else 0.0]
        return head + tail + max(after)

    def bound(self, plan: Plan, t: Traffic | None = None) -> tuple[float, float, str, dict[str, float]]:
        """(lower bound, fill, the term that sets it, busy times). The bound is
        ``max(forward/backward compute + fill, all compute, h2d, d2h, both link directions / bidir, disk reads + writes, cpu update)``:
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
                 "link": (t.h2d_bytes + t.d2h_bytes) / (hw.bidir_gbps * 1e9),
                 "disk": b["disk_read"] + b["disk_write"], "cpu_update": b["cpu_update"]}
        by = max(terms, key=terms.get)
        return terms[by], fill, by, b

    # -- simulation ---------------------------------------------------------------------------------------------------
    def predict(self, plan: Plan, *, events: bool = False) -> Prediction:
        self.check(plan)
        t = self.traffic(plan)
        lb, fill, by, _ = self.bound(plan, t)
        end_s, busy, steal_s, evs = self._simulate(plan, t, events)
        return Prediction(iteration_s=end_s, traffic=t, busy_s=busy, memory_bytes=self.memory(plan),
                          lower_bound_s=lb, fill_s=fill, bound_by=by, bottleneck=max(busy, key=busy.get),
                          steal_s=steal_s, events=tuple(evs))

    def _simulate(self, plan: Plan, t: Traffic, want_events: bool):
        r = self.rates(t)
        res_idx = {name: k for k, name in enumerate(RESOURCES)}
        op_res: list[int] = []
        op_dur: list[float] = []
        op_name: list[str] = []
        op_deps: list[list[int]] = []
        op_bytes: list[int] = []
        op_prio: list[int] = []

        def add(res: str, name: str, dur: float, deps, nbytes: int = 0, prio: int | None = None) -> int:
            """An operation; ``prio`` on the disk: reads for compute (weights) 0, read-ahead (state, grads) 1,
            writes 2, as the store's queues serve them (storage/workers.py); 0 elsewhere."""
            op_res.append(res_idx[res])
            op_dur.append(dur)
            op_name.append(name)
            op_deps.append([d for d in deps if d is not None])
            op_bytes.append(nbytes)
            op_prio.append(prio if prio is not None else 2 if res == "disk_write" else 0)
            return len(op_res) - 1

        units, blocks, k = plan.units, self.blocks, plan.prefetch_depth
        names = [u.name for u in self.w.units]
        pb, gb, tpb = self.pb, self.gb, self.tpb
        sb = [self.state_bytes(i, pl) for i, pl in enumerate(units)]
        kept = self.kept(plan)
        # Compute order: forward blocks, head (rest), head backward, blocks in reverse.
        compute_seq = [("F", i) for i in blocks] + ([("F", 0), ("B", 0)] if self.has_rest else []) + \
                      [("B", i) for i in reversed(blocks)]

        def fetch(kind: str, i: int, prev_h2d):
            """Disk (nvme params; not the forward fetch of a unit the last step kept warm) then h2d, on the one
            copy thread: after the previous fetch."""
            rd = add("disk_read", f"{kind} fetch {names[i]}", pb[i] * r["disk_read"], [prev_h2d], pb[i], prio=0) \
                if units[i].params is N and not (kind == "F" and self.warm(i, plan)) else None
            return rd, add("h2d", f"{kind} fetch {names[i]}", pb[i] * r["h2d"], [rd, prev_h2d], pb[i])

        prev_h2d = rest_fetch = None
        if self.has_rest and units[0].params is not D:  # fetched once, before the first forward, held
            _, rest_fetch = fetch("F", 0, None)
            prev_h2d = rest_fetch
        fetch_for: dict[int, tuple[int | None, int]] = {}  # position in compute_seq -> (disk op or None, h2d op)
        for pos, (kind, i) in enumerate(compute_seq):
            if units[i].params is not D and not (self.has_rest and i == 0) and not (kind == "B" and i in kept):
                fetch_for[pos] = fetch(kind, i, prev_h2d)
                prev_h2d = fetch_for[pos][1]
        compute_op: list[int] = []
        prev = None
        grad_order = list(reversed(blocks)) + ([0] if self.has_rest else [])
        grad_pos = {u: g for g, u in enumerate(grad_order)}
        grad_release: dict[int, int] = {}  # grad index -> op freeing its device grad buffer (patched below)
        bwd_ops: dict[int, int] = {}
        pending_grad_deps: list[tuple[int, int]] = []  # (op, grad index whose release it waits for)
        for pos, (kind, i) in enumerate(compute_seq):
            deps = [prev, fetch_for[pos][1] if pos in fetch_for else None, rest_fetch if pos == 0 else None]
            dur = self.fwd_s[i] if kind == "F" else self.bwd_s[i]
            op = add("compute", f"{'forward' if kind == 'F' else 'backward'} {names[i]}", dur, deps)
            if kind == "B":
                bwd_ops[i] = op
                g = grad_pos[i]
                # The rest unit's grads complete only with the last backward (embedding): they have their own
                # buffer for the whole backward, outside the rotating ones.
                if g - plan.grad_buffers >= 0 and not (self.has_rest and i == 0):
                    pending_grad_deps.append((op, g - plan.grad_buffers))
            compute_op.append(op)
            prev = op
        # A fetch is issued by the pre-hook of the compute prefetch_depth positions before its own: once the
        # compute before that one is done.
        for pos, (rd, h2d) in fetch_for.items():
            if pos - k - 1 >= 0:
                op_deps[rd if rd is not None else h2d].append(compute_op[pos - k - 1])
        last_fwd = compute_op[len(blocks) - 1 + (1 if self.has_rest else 0)] if compute_seq else None
        last_bwd = prev
        # Grads leave on the grad thread as backward completes them (the rest unit's with the last backward).
        done_grad = {i: bwd_ops[i] if i != 0 or not self.has_rest else last_bwd for i in grad_order}
        grad_d2h: dict[int, int] = {}
        for g, i in enumerate(grad_order):
            if units[i].update == "cpu" and self.params[i]:  # frozen units have no grads
                grad_d2h[i] = grad_release[g] = add("d2h", f"grad {names[i]}", gb[i] * r["d2h"], [done_grad[i]],
                                                    gb[i])
        spill = {i: add("disk_write", f"grads {names[i]}", gb[i] * r["disk_write"], [grad_d2h[i]], gb[i])
                 for i in grad_order if i in grad_d2h and units[i].grad_tier is N and not plan.overlap_update}
        landed = list(grad_d2h.values())[-1:]  # the step starts once every grad has landed
        # Updates, on the update thread, in its order (module note).
        state_release: list[int] = []  # per offloaded-state update, in order: op that frees its staging buffer
        chain = None  # overlapped: the update thread's last op; after backward: the last update
        write_gate = None  # the state write the update thread waits for before its next update
        params_write = None  # the last new-params write (nvme): the next one is issued once it landed
        params_gate = None  # the new-params write the update thread waited for before its next update
        pending_params: tuple[int, int] | None = None  # waiting step: (unit, update) whose new params go next
        behind = self.writes_behind(plan)
        carried: list[tuple[str, str, float, int]] = []  # the last step's writes this one's forward overlaps
        bufs = plan.state_buffers
        order = self.update_order(plan)
        for pos_u, i in enumerate(order):
            pl = units[i]
            p = self.params[i]
            last = pos_u == len(order) - 1
            slot = state_release[-bufs] if len(state_release) >= bufs else None
            if pl.update == "cpu":
                gate = [grad_d2h[i], chain] if plan.overlap_update else [last_bwd, chain, *landed]
                rd = None
                if pl.state is N:
                    if not plan.overlap_update:
                        deps = [last_bwd, *landed, slot]
                    elif bufs == 1:  # no read-ahead: after the grads, the update before and its write-back
                        deps = [*gate, state_release[-1] if state_release else None]
                    else:
                        # Read ahead (module note): the first units' reads are issued when backward starts, the
                        # next ones' as soon as one of the bufs - 1 buffers the update does not hold is free (a
                        # write-back landed).
                        deps = [last_fwd, state_release[-(bufs - 1)] if len(state_release) >= bufs - 1 else None]
                    rd = add("disk_read", f"state {names[i]}", sb[i] * r["disk_read"], deps, sb[i], prio=1)
                if pending_params is not None:  # waiting step: before_update writes the unit before's new params
                    j, after = pending_params
                    params_gate, params_write = params_write, add(
                        "disk_write", f"new params {names[j]}", pb[j] * r["disk_write"], [after, rd, params_write],
                        pb[j])
                    pending_params = None
                grad_rd = add("disk_read", f"grads {names[i]}", gb[i] * r["disk_read"], [spill[i], rd], gb[i],
                              prio=1) if i in spill else None
                # then its own params (nvme) are read in, where the update changes them in place or some are
                # frozen (the update rewrites the whole chunk)
                src = self.update_weights_from(i, pl, fetches=self.fetches(i, plan, kept), overlap=plan.overlap_update)
                old = add("disk_read", f"params {names[i]}", pb[i] * r["disk_read"], [rd, grad_rd, params_gate], pb[i],
                          prio=0) if src == "store" else None
                if src == "device":  # copied as the unit leaves the device after its backward (compute thread)
                    old = add("d2h", f"keep {names[i]}", pb[i] * r["d2h"], [done_grad[i]], pb[i])
                upd = add("cpu_update", f"update {names[i]}", p * r["cpu_update"],
                          [*gate, rd, grad_rd, old, write_gate, params_gate])
                wr = None
                if pl.state is N:
                    if last and behind:  # the step does not wait for it: the next forward overlaps it
                        carried.append(("disk_write", f"state {names[i]}", sb[i] * r["disk_write"], sb[i]))
                    else:
                        wr = add("disk_write", f"state {names[i]}", sb[i] * r["disk_write"], [upd], sb[i])
                        state_release.append(wr)
                # One unit's state writes in flight: the update thread issues this unit's once the unit before's
                # landed (OffloadOptimizer._step_streamed), and only then goes on.
                write_gate = state_release[-2] if wr is not None and len(state_release) >= 2 else None
                if pl.params is D:
                    add("h2d", f"new params {names[i]}", tpb[i] * r["h2d"], [upd], tpb[i])
                if pl.params is N:
                    if not plan.overlap_update:
                        pending_params = (i, upd)
                    elif last and behind:
                        carried.append(("disk_write", f"new params {names[i]}", pb[i] * r["disk_write"], pb[i]))
                    else:
                        # Issued once the update is done and the unit before's landed (finish_unit_update); the
                        # update thread waits for that one, then goes on to the next unit.
                        params_gate, params_write = params_write, add(
                            "disk_write", f"new params {names[i]}", pb[i] * r["disk_write"],
                            [upd, params_write, write_gate], pb[i])
                chain = upd  # write-backs run on while the next units update
            else:
                gate = done_grad[i] if plan.overlap_update else last_bwd
                up = None
                if pl.state is not D:
                    rd = add("disk_read", f"state {names[i]}", sb[i] * r["disk_read"], [last_fwd, slot], sb[i],
                             prio=1) if pl.state is N else None
                    up = add("h2d", f"state {names[i]}", sb[i] * r["h2d"], [rd, last_fwd, slot], sb[i])
                old = add("disk_read", f"params {names[i]}", pb[i] * r["disk_read"], [gate], pb[i], prio=0) \
                    if pl.params is N and self.frozen[i] else None
                upd = add(self.device_update_res, f"update {names[i]}", p * r["device_update"],
                          [done_grad[i], up, gate, old])
                grad_release[grad_pos[i]] = upd
                if pl.state is not D:
                    down = add("d2h", f"state {names[i]}", sb[i] * r["d2h"], [upd], sb[i])
                    state_release.append(add("disk_write", f"state {names[i]}", sb[i] * r["disk_write"], [down],
                                             sb[i]) if pl.state is N else down)
                if pl.params is not D:
                    pd = add("d2h", f"new params {names[i]}", tpb[i] * r["d2h"], [upd], tpb[i])
                    if pl.params is N:
                        add("disk_write", f"new params {names[i]}", pb[i] * r["disk_write"], [pd], pb[i])
        if pending_params is not None:  # waiting step: the last unit's new params, once its state writes landed
            j, after = pending_params
            add("disk_write", f"new params {names[j]}", pb[j] * r["disk_write"],
                [after, params_write, *state_release[-1:]], pb[j])
        # The last step's writes that its return did not wait for: on the disk from the start, behind the forward's
        # reads (steady state: each step leaves the same ones to the next).
        for res, name, dur, nbytes in carried:
            add(res, f"{name} (last step's)", dur, [], nbytes)
        for op, g in pending_grad_deps:
            # A device grad buffer frees when its grads left (d2h) or were applied (device update). When updates
            # wait for backward, device-updated grads are all held instead (CostModel.memory counts them).
            if g in grad_release and (plan.overlap_update or op_name[grad_release[g]].startswith("grad")):
                op_deps[op].append(grad_release[g])
        # Shared cores: host work puts its steal on the compute stream, ready when that work is (module note).
        steal_s = 0.0
        for o in range(len(op_res)):
            s = self.steal.get(RESOURCES[op_res[o]], 0.0)
            if s > 0 and op_dur[o] > 0:
                add("compute", f"steal {op_name[o]}", s * op_dur[o], list(op_deps[o]))
                steal_s += s * op_dur[o]
        end_s, busy, evs = self._run(op_res, op_dur, op_name, op_deps, op_bytes, want_events, op_prio)
        return end_s, busy, steal_s, evs

    @staticmethod
    def _run(op_res, op_dur, op_name, op_deps, op_bytes, want_events, op_prio=None, not_counted=()):
        """Run the list schedule (module note, "The simulation"): each resource serves its ready operations one at
        a time, the most urgent first (``op_prio``, lower first: the disk's reads for compute, then read-ahead,
        then writes; 0 everywhere else) and among equals in the order they became ready (creation order on
        ties). A more urgent operation that becomes ready takes over its resource at once, the one it interrupts
        goes on afterwards (the store's worker queues serve its blocks first: storage/workers.py). Returns (the
        iteration's end: the last operation's, leaving out ``not_counted``; busy seconds per resource; events, one
        per stretch an operation ran)."""
        n = len(op_res)
        prio = op_prio or [0] * n
        waiting = [len(d) for d in op_deps]
        users: list[list[int]] = [[] for _ in range(n)]
        for o, deps in enumerate(op_deps):
            for d in deps:
                users[d].append(o)
        end = [0.0] * n
        runs: list[list[float]] = [[] for _ in range(n)]  # each op's stretches on its resource: start, end, ...
        ready_at = [0.0] * n
        left = list(op_dur)
        # One queue per resource, except the disk: reads and writes share the store's (module note).
        server = [RESOURCES.index("disk_read") if r == "disk_write" else k for k, r in enumerate(RESOURCES)]
        queues: list[list] = [[] for _ in RESOURCES]
        running: list[int | None] = [None] * len(RESOURCES)
        since = [0.0] * len(RESOURCES)
        token = [0] * n  # a completion event counts only with its op's current token (preemption renews it)
        events: list[tuple[float, int, int]] = []
        done = 0

        def begin(rs: int, o: int, now: float) -> None:
            running[rs], since[rs] = o, now
            runs[o].append(now)
            token[o] += 1
            heapq.heappush(events, (now + left[o], token[o], o))

        def arrive(o: int, now: float) -> None:
            rs = server[op_res[o]]
            r = running[rs]
            if r is not None and prio[o] < prio[r]:  # it takes over: r goes on later, with what it has left
                left[r] -= now - since[rs]
                runs[r].append(now)
                token[r] += 1
                heapq.heappush(queues[rs], (prio[r], ready_at[r], r))
                begin(rs, o, now)
            elif r is None:
                begin(rs, o, now)
            else:
                heapq.heappush(queues[rs], (prio[o], ready_at[o], o))

        now = 0.0
        for o in range(n):
            if waiting[o] == 0:
                arrive(o, 0.0)
        while events:
            now = events[0][0]
            freed, newly = [], []
            while events and events[0][0] == now:  # every completion at this instant, then who starts next
                _, tok, o = heapq.heappop(events)
                if tok != token[o]:
                    continue  # preempted since: its later completion counts
                end[o] = now
                runs[o].append(now)
                done += 1
                rs = server[op_res[o]]
                running[rs] = None
                freed.append(rs)
                for u in users[o]:
                    waiting[u] -= 1
                    if waiting[u] == 0:
                        ready_at[u] = now
                        newly.append(u)
            for rs in freed:
                if running[rs] is None and queues[rs]:
                    begin(rs, heapq.heappop(queues[rs])[2], now)
            for u in sorted(newly):
                arrive(u, now)
        assert done == n, f"simulation deadlock: {n - done} operations never became ready (a dependency cycle)"
        busy = {name: 0.0 for name in RESOURCES}
        for o in range(n):
            busy[RESOURCES[op_res[o]]] += op_dur[o]
        # One event per stretch an operation ran (an interrupted one has several; its bytes go with the first;
        # a stretch interrupted as it began is none).
        evs = []
        for o in range(want_events and n):
            spans = [(a, b) for a, b in zip(runs[o][::2], runs[o][1::2]) if b > a] or [(runs[o][0], runs[o][-1])]
            evs += [Event(RESOURCES[op_res[o]], op_name[o], a, b, op_bytes[o] if k == 0 else 0)
                    for k, (a, b) in enumerate(spans)]
        skip = set(not_counted)
        return max((end[o] for o in range(n) if o not in skip), default=0.0), busy, evs
