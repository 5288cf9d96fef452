"""Cost model: bytes per link and memory against hand counts; the simulation against its own bounds."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler import profile, workload
from scheduler.cost import CostModel, Traffic
from scheduler.planner import Plan, UnitPlacement
from scheduler.workload import REST, UnitWork, Workload
from storage import Tier

D, H, N = Tier.DEVICE, Tier.HOST, Tier.NVME


def _tiny() -> Workload:
    """rest (1000 params) and three blocks (100, 200, 300 params): bf16 params/grads, 12 B/param state."""
    mk = lambda name, kind, p: UnitWork(name=name, kind=kind, params=p, fwd_flops=2e6 * p, bwd_flops=4e6 * p,  # noqa
                                        act_bytes=10, work_bytes=100)
    return Workload(name="tiny", batch=1, seq=8, units=(mk("rest", REST, 1000), mk("b0", "block", 100),
                                                         mk("b1", "block", 200), mk("b2", "block", 300)))


def test_bytes_per_link_equal_a_hand_count():
    w, hw = _tiny(), profile.resolve("h100-pcie5-gen4nvme")
    plan = Plan(strategy="t", prefetch_depth=1,                       # b2 (on the device) is the block kept
                units=(UnitPlacement(D, H, "cpu"),      # rest: grads out 2000, new params in 2000
                       UnitPlacement(H, N, "cpu"),      # b0: fetch 2x200, grads 200, state r/w 1200
                       UnitPlacement(N, H, "device"),   # b1: fetch 2x400 (disk + h2d), state in/out
                       UnitPlacement(D, N, "device")))  # 2400, new params: none; b2 state 3600 r/w
    t = CostModel(w, hw).traffic(plan)
    # h2d: rest new params 2000 + b0 fetches 400 + b1 fetches 800 + b1 state 2400 + b2 state 3600
    assert t.h2d_bytes == 2000 + 400 + 800 + 2400 + 3600
    # d2h: rest grads 2000 + b0 grads 200 + b1 state 2400 + b1 new params 400 + b2 state 3600
    assert t.d2h_bytes == 2000 + 200 + 2400 + 400 + 3600
    # disk read: b0 state 1200 + b1 fetches 800 + b2 state 3600; write: b0 state 1200 + b1 new params 400 + b2 3600
    assert t.disk_read_bytes == 1200 + 800 + 3600
    assert t.disk_write_bytes == 1200 + 400 + 3600
    assert (t.cpu_update_params, t.device_update_params) == (1100, 500)
    # Prefetch depth 2 keeps b1 too from its forward into backward: one fetch (disk + h2d) of 400 fewer; and b1,
    # now fetched before any compute, finds the new weights the last step kept in memory: its fetch reads nothing.
    t2 = CostModel(w, hw).traffic(dataclasses.replace(plan, prefetch_depth=2))
    assert t - t2 == Traffic(h2d_bytes=400, disk_read_bytes=800)
    assert t2 - CostModel(w, hw).traffic(dataclasses.replace(plan, prefetch_depth=2, overlap_update=False)) == \
        Traffic(disk_read_bytes=-400)  # kept only by a step whose update overlaps backward


def test_bytes_with_the_rest_unit_off_the_device_grads_on_nvme_and_fp32_masters():
    """fp32 (4/4/8 B per param, a 4-byte master where the update cannot work in place: none here, a CPU update
    changes params on nvme in host memory), the rest unit on nvme (fetched once), grads on nvme (spilled only when
    the update waits for backward), no kept blocks."""
    w = dataclasses.replace(_tiny(), **workload.precision("fp32"))
    hw = profile.resolve("cpu-dev-2core")
    rest, b0 = UnitPlacement(N, N, "cpu", grad_tier=N), UnitPlacement(H, N, "cpu")
    b1, b2 = UnitPlacement(N, H, "cpu"), UnitPlacement(H, H, "cpu", grad_tier=N)
    for overlap in (True, False):
        t = CostModel(w, hw).traffic(Plan(strategy="t", prefetch_depth=0, overlap_update=overlap,
                                          units=(rest, b0, b1, b2)))
        spill = 0 if overlap else 4 * 1000 + 4 * 300  # rest's and b2's grads, written and read back
        # h2d: rest once 4000, b0 2x400, b1 2x800, b2 2x1200; d2h: every grad, 4 B per param, and when the
        # update overlaps backward the rest's params 4000, copied for its update as they leave the device
        assert t.h2d_bytes == 4000 + 800 + 1600 + 2400 and t.d2h_bytes == 4 * 1600 + (4000 if overlap else 0)
        # disk read: rest state 8000 + b0 state 800 + b1 fetches 1600. Overlapping backward, b1's update takes
        # its backward fetch's host copy, and the rest's one fetch finds the new weights the last step kept in
        # memory; waiting for backward, the rest's params are read (4000) and both updates read theirs again
        # (4000 + 800)
        assert t.disk_read_bytes == 8000 + 800 + 1600 + (0 if overlap else 4000 + 4000 + 800) + spill
        # disk write: rest new params 4000 + rest state 8000 + b0 state 800 + b1 new params 800
        assert t.disk_write_bytes == 4000 + 8000 + 800 + 800 + spill
    # A device update of params off the device keeps a master: the rest's state is 12 B per param
    t = CostModel(w, hw).traffic(Plan(strategy="t", prefetch_depth=0, units=(
        UnitPlacement(N, N, "device"), b0, b1, b2)))
    assert t.disk_read_bytes == 12000 + 800 + 1600  # the rest's fetch finds the weights kept warm, as above


def test_memory_equals_a_hand_count():
    w, hw = _tiny(), profile.resolve("h100-pcie5-gen4nvme")
    plan = Plan(strategy="t", prefetch_depth=2, grad_buffers=2, state_buffers=3,
                units=(UnitPlacement(D, H, "cpu"), UnitPlacement(H, N, "cpu"), UnitPlacement(N, H, "device"),
                       UnitPlacement(D, D, "device")))
    m = CostModel(w, hw).memory(plan)
    # device: params rest 2000 + b2 600; 3 param buffers x largest streamed (b1 400); state b2 3600;
    # grads: rest 2000 + 2 x largest block grad 600; 3 state buffers x b1's 2400; activations 4 x 10 + 100
    assert m["device"] == 2600 + 3 * 400 + 3600 + 2000 + 2 * 600 + 3 * 2400 + 140
    # Host and store chunks take whole 4 KiB pages, as the pool and the store allocate them: every chunk of this
    # workload takes one page (4096) but the rest unit's state (12000: three pages).
    page = 4096
    # host: params b0; one grad buffer per CPU-updated unit (rest, b0); state rest 3 pages + b1. At the peak (the
    # first step): b1's new params on their way to the store, b0's state being made, and the pre-update copies
    # of the params in memory of every unit that trains (rest, b0, b2; b1's are on nvme: its version is held).
    assert m["host"] == page + 2 * page + 4 * page + (page + page + 3 * page)
    # nvme: b1 params + b0 state; a state and a param write beside their committed versions (in a later step;
    # the first rewrites b0's state, made at wrap with its master, and writes b1's params beside the previous
    # version its speculation holds anyway: as many bytes)
    assert m["nvme"] == 2 * page + 2 * page
    # Clipping: every step copies the state in memory too (rest 3 pages, b1, b2) and reads b0's state ahead.
    clipped = CostModel(w, hw).memory(dataclasses.replace(plan, clip=True))
    assert clipped["host"] == 7 * page + (page + page + 3 * page + 5 * page)
    assert clipped["device"] == m["device"]
    # Without speculation nothing is copied: the peak is the later steps' (two state chunks read ahead, but b0's
    # is the only one) with b1's params write.
    plain = CostModel(w, hw).memory(dataclasses.replace(plan, speculate=False))
    assert plain["host"] == 7 * page + 2 * page and plain["nvme"] == 4 * page


@pytest.mark.parametrize("overlap", [True, False])
def test_simulation_is_between_bound_and_serial_sum(overlap):
    w, hw = _tiny(), profile.resolve("cpu-dev-2core")
    cm = CostModel(w, hw)
    plan = Plan(strategy="t", overlap_update=overlap, units=(UnitPlacement(D, H, "cpu"), UnitPlacement(H, N, "cpu"),
                                                             UnitPlacement(N, H, "device"), UnitPlacement(D, D, "device")))
    p = cm.predict(plan, events=True)
    assert p.lower_bound_s * (1 - 1e-9) <= p.iteration_s <= sum(p.busy_s.values()) * (1 + 1e-9)
    for r, busy in p.busy_s.items():  # the timeline is the busy time: each resource runs one thing at a time
        evs = sorted((e for e in p.events if e.resource == r), key=lambda e: e.start_s)
        assert sum(e.end_s - e.start_s for e in evs) == pytest.approx(busy)
        assert all(a.end_s <= b.start_s + 1e-12 for a, b in zip(evs, evs[1:]))


def test_no_offload_is_pure_compute():
    w, hw = _tiny(), profile.resolve("h100-pcie5-gen4nvme")
    cm = CostModel(w, hw)
    p = cm.predict(Plan(strategy="t", units=(UnitPlacement(D, D, "device"),) * 4))
    assert p.traffic.h2d_bytes == p.traffic.d2h_bytes == p.traffic.disk_read_bytes == 0
    assert p.iteration_s == pytest.approx(p.busy_s["compute"])
    assert p.bottleneck == "compute"


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("params,state,grads", [(H, H, H), (N, N, N), (H, N, H), (N, H, N)])
def test_runtime_placements_simulate_between_bound_and_serial_sum(params, state, grads, overlap):
    """The placements offload.wrap runs (every unit alike, the rest unit fetched once), fp32, on a CPU device
    whose host work takes compute time (cpu_steal > 0)."""
    w = dataclasses.replace(_tiny(), **workload.precision("fp32"))
    hw = profile.resolve("cpu-dev-2core")
    assert min(hw.cpu_steal.values()) > 0
    pl = UnitPlacement(params, state, "cpu", grad_tier=grads)
    for k in (0, 1, 3):
        p = CostModel(w, hw).predict(Plan(strategy="t", units=(pl,) * 4, prefetch_depth=k, overlap_update=overlap,
                                          grad_buffers=3), events=True)
        assert p.lower_bound_s * (1 - 1e-9) <= p.iteration_s <= sum(p.busy_s.values()) * (1 + 1e-9)
        moved = {r: sum(e.nbytes for e in p.events if e.resource == r) for r in ("h2d", "d2h", "disk_read",
                                                                                 "disk_write")}
        t = p.traffic  # the simulated operations move exactly the accounted bytes
        assert moved == {"h2d": t.h2d_bytes, "d2h": t.d2h_bytes, "disk_read": t.disk_read_bytes,
                         "disk_write": t.disk_write_bytes}


def test_shared_cores_put_host_work_on_the_compute_stream():
    """cpu_steal: each host operation of d seconds adds steal x d to compute; zero on a GPU profile."""
    w = dataclasses.replace(_tiny(), **workload.precision("fp32"))
    base = profile.resolve("cpu-dev-2core")
    plan = Plan(strategy="t", units=(UnitPlacement(N, N, "cpu"),) * 4)
    free = dataclasses.replace(base, cpu_steal={"copy": 0.0, "update": 0.0, "disk": 0.0})
    shared = dataclasses.replace(base, cpu_steal={"copy": 1.0, "update": 2.0, "disk": 0.5})
    p0, p1 = CostModel(w, free).predict(plan, events=True), CostModel(w, shared).predict(plan, events=True)
    b = p0.busy_s
    expect = b["h2d"] + b["d2h"] + 2.0 * b["cpu_update"] + 0.5 * (b["disk_read"] + b["disk_write"])
    assert p0.steal_s == 0 and not any(e.name.startswith("steal") for e in p0.events)
    assert p1.steal_s == pytest.approx(expect)
    assert p1.busy_s["compute"] == pytest.approx(b["compute"] + expect)
    assert CostModel(w, shared).busy(p1.traffic)["compute"] == pytest.approx(p1.busy_s["compute"])
    assert p1.iteration_s > p0.iteration_s


def test_a_device_update_runs_where_the_device_is():
    """On a GPU the device update is a kernel on the compute stream; where the device is the CPU it is CPU work on
    the update thread (cpu_update), which takes compute time through its steal like a CPU update."""
    w = dataclasses.replace(_tiny(), **workload.precision("fp32"))
    plan = Plan(strategy="t", units=(UnitPlacement(D, D, "device"),) * 4)
    gpu, cpu = profile.resolve("h100-pcie5-gen4nvme"), profile.resolve("cpu-dev-2core")
    assert (gpu.device_name, cpu.device_name) != ("cpu", "cpu") and cpu.device_name == "cpu"
    upd = sum(w.units[i].trainable for i in range(4))
    for hw, res in ((gpu, "compute"), (cpu, "cpu_update")):
        p = CostModel(w, hw).predict(plan, events=True)
        updates = [e for e in p.events if e.name.startswith("update")]
        assert len(updates) == 4 and {e.resource for e in updates} == {res}
        assert p.busy_s[res] >= upd / hw.device_update_params_per_s * (1 - 1e-9)
    p = CostModel(w, cpu).predict(plan, events=True)
    steal = [e for e in p.events if e.name.startswith("steal update")]
    assert len(steal) == 4 and p.steal_s == pytest.approx(cpu.cpu_steal["update"] * upd / cpu.device_update_params_per_s)


def _frozen() -> Workload:
    """_tiny with frozen params: rest all frozen, b0 10 of its 100 trainable (a LoRA block), b1 all frozen, b2 all
    trainable."""
    w = _tiny()
    trained = (0, 10, 0, 300)
    return dataclasses.replace(w, units=tuple(dataclasses.replace(u, trainable=t) for u, t in zip(w.units, trained)))


def test_frozen_params_get_no_grads_no_state_no_update_and_no_write_back():
    w, hw = _frozen(), profile.resolve("h100-pcie5-gen4nvme")
    assert [w.grad_bytes(i) for i in range(4)] == [0, 20, 0, 600]
    assert [w.state_bytes(i) for i in range(4)] == [0, 120, 0, 3600]
    cm = CostModel(w, hw)
    nvme = UnitPlacement(N, N, "cpu")
    plan = Plan(strategy="t", prefetch_depth=0, units=(UnitPlacement(D, H, "cpu"),) + (nvme,) * 3)
    t = cm.traffic(plan)
    # h2d: every block fetched twice (200, 400, 600 B each time); d2h: the trainable params' grads only
    assert (t.h2d_bytes, t.d2h_bytes) == (2 * (200 + 400 + 600), 20 + 600)
    # disk read: the fetches; b0's state 120 (its update rewrites the chunk whole from its backward fetch's host
    # copy, frozen params and all); b2's state 3600. b1 (all frozen) is only fetched.
    assert t.disk_read_bytes == 2 * (200 + 400 + 600) + 120 + 3600
    # Waiting for backward, the fetch is long gone: b0's params 200 are read in first.
    assert cm.traffic(dataclasses.replace(plan, overlap_update=False)).disk_read_bytes == t.disk_read_bytes + 200
    # disk write: b0's state and whole params, b2's state and params; nothing of rest and b1
    assert t.disk_write_bytes == 120 + 200 + 3600 + 600
    assert (t.cpu_update_params, t.device_update_params) == (310, 0)
    # New weights that travel alone are the trainable params' only (2 B each here): after a CPU update to params
    # on the device, after a device update to params on the host.
    on_device = cm.unit_traffic(1, UnitPlacement(D, H, "cpu"))
    device_update = cm.unit_traffic(1, UnitPlacement(H, D, "device"), fetches=0)
    assert (on_device.h2d_bytes, device_update.d2h_bytes) == (20, 20)
    assert cm.update_order(plan) == [3, 1]  # frozen units are never updated
    m = cm.memory_terms(plan)
    # One host grad buffer (a 4 KiB page each) per unit that trains (b0, b2), none for rest and b1; state likewise
    assert m["host"]["grads"] == 2 * 4096 and m["nvme"]["state"] == 4096 + 4096
    p = cm.predict(plan, events=True)
    assert not [e for e in p.events if e.name.endswith(("rest", "b1")) and not e.name.startswith(
        ("F fetch", "B fetch", "forward", "backward", "steal"))]  # b1 and rest: fetches and compute only
    moved = {r: sum(e.nbytes for e in p.events if e.resource == r) for r in ("h2d", "d2h", "disk_read", "disk_write")}
    assert moved == {"h2d": t.h2d_bytes, "d2h": t.d2h_bytes, "disk_read": t.disk_read_bytes,
                     "disk_write": t.disk_write_bytes}
    assert p.lower_bound_s * (1 - 1e-9) <= p.iteration_s <= sum(p.busy_s.values()) * (1 + 1e-9)


def test_disk_is_one_device_at_the_mixed_rate_when_reads_and_writes_pair_up():
    """Reads and writes in flight together move ``disk_mixed_gbps`` (reads plus writes); the excess of the larger
    direction runs alone at its own rate. The bound and the simulated timeline both take it: the disk's busy time
    is 2 min(R, W) / mixed + (R - W) / read for a plan that reads more than it writes."""
    w = dataclasses.replace(_tiny(), **workload.precision("fp32"))
    hw = dataclasses.replace(profile.resolve("rtx4090-pcie4-gen4nvme"), disk_read_gbps=8.0, disk_write_gbps=4.0,
                             disk_mixed_gbps=2.0)
    # waiting for backward, each update reads its params again: the plan reads more than it writes
    plan = Plan(strategy="t", units=(UnitPlacement(N, N, "cpu"),) * 4, overlap_update=False)
    cm = CostModel(w, hw)
    p = cm.predict(plan, events=True)
    r, wr = p.traffic.disk_read_bytes, p.traffic.disk_write_bytes
    assert r > wr > 0
    disk_s = 2 * wr / 2e9 + (r - wr) / 8e9
    assert p.busy_s["disk_read"] + p.busy_s["disk_write"] == pytest.approx(disk_s)
    assert p.lower_bound_s >= disk_s * (1 - 1e-9) and p.iteration_s >= disk_s * (1 - 1e-9)
    evs = [e for e in p.events if e.resource in ("disk_read", "disk_write")]  # one device: never two at once
    evs.sort(key=lambda e: e.start_s)
    assert all(a.end_s <= b.start_s + 1e-12 for a, b in zip(evs, evs[1:]))
    assert sum(e.end_s - e.start_s for e in evs) == pytest.approx(disk_s)
    # One direction only: its own rate, the mixed one plays no part.
    reads_only = cm.disk_share(Traffic(disk_read_bytes=r))
    assert reads_only == 1.0 and cm.rates(Traffic(disk_read_bytes=r))["disk_read"] == pytest.approx(1 / 8e9)
    # A mixed rate equal to one-at-a-time's (harmonic mean of the two for equal bytes) changes nothing.
    even = dataclasses.replace(hw, disk_mixed_gbps=2 / (1 / 8 + 1 / 4))
    assert CostModel(w, even).disk_share(Traffic(disk_read_bytes=wr, disk_write_bytes=wr)) == pytest.approx(1.0)


def test_an_update_waits_for_the_state_write_two_units_back():
    """One state write in flight (OffloadOptimizer._step_streamed): the update thread issues a unit's state write
    once the one before it landed, and only then goes on, so each update starts after the state write two units
    back ended; without that wait a slow disk would let the updates run ahead of the writes."""
    w, hw = _tiny(), dataclasses.replace(profile.resolve("cpu-dev-2core"), disk_write_gbps=0.01)
    plan = Plan(strategy="t", prefetch_depth=0, overlap_update=False,
                units=(UnitPlacement(D, N, "cpu"),) + (UnitPlacement(H, N, "cpu"),) * 3)
    p = CostModel(w, hw).predict(plan, events=True)
    ups = [e for e in p.events if e.resource == "cpu_update" and e.name.startswith("update")]
    writes = [e for e in p.events if e.resource == "disk_write" and e.name.startswith("state")]
    assert [e.name.split()[-1] for e in ups] == [e.name.split()[-1] for e in writes] and len(ups) == 4
    for k in range(2, 4):
        assert ups[k].start_s >= writes[k - 2].end_s - 1e-12
    assert any(ups[k].start_s > ups[k - 1].end_s + 1e-9 for k in range(2, 4))  # the wait shows


def test_the_disk_serves_weight_reads_before_read_ahead_and_writes_and_resumes_them():
    """The simulated disk serves by urgency as the store's queues do: a weight read that becomes ready while a
    write (or a state read-ahead) runs takes the disk at once, and the interrupted one resumes after it, its
    stretches recorded as separate events that never overlap and add up to its duration."""
    res = {r: k for k, r in enumerate(("compute", "h2d", "d2h", "disk_read", "disk_write", "cpu_update"))}
    # 0: a write of 10 s from t=0; 1: compute of 2 s; 2: a weight read of 3 s once the compute ends; 3: a state
    # read-ahead of 1 s ready at 0 (behind the write: less urgent than a weight read, more than a write).
    op_res = [res["disk_write"], res["compute"], res["disk_read"], res["disk_read"]]
    op_dur = [10.0, 2.0, 3.0, 1.0]
    deps = [[], [], [1], []]
    end, busy, evs = CostModel._run(op_res, op_dur, ["w", "c", "weights", "state"], deps, [0] * 4, True,
                                    op_prio=[2, 0, 0, 1])
    disk = sorted((e for e in evs if e.resource in ("disk_read", "disk_write")), key=lambda e: e.start_s)
    assert [(e.name, e.start_s, e.end_s) for e in disk] == [
        ("state", 0.0, 1.0), ("w", 1.0, 2.0), ("weights", 2.0, 5.0), ("w", 5.0, 14.0)]
    assert end == 14.0 and busy["disk_read"] == 4.0 and busy["disk_write"] == 10.0
    # the end may leave out operations the step does not wait for
    assert CostModel._run(op_res, op_dur, ["w", "c", "weights", "state"], deps, [0] * 4, False,
                          op_prio=[2, 0, 0, 1], not_counted=(0,))[0] == 5.0


def test_a_step_that_commits_leaves_its_last_writes_to_the_next_forward():
    """An overlapped step returns before its last unit's writes land: the prediction puts them at the start of the
    iteration (the last step's), behind the forward's weight reads, and the fill has no write tail. A step that
    waits for backward writes everything before it returns."""
    w = dataclasses.replace(_tiny(), **workload.precision("fp32"))
    hw = profile.resolve("cpu-dev-2core")
    plan = Plan(strategy="t", units=(UnitPlacement(N, N, "cpu"),) * 4, prefetch_depth=1)
    waiting = dataclasses.replace(plan, overlap_update=False)
    cm = CostModel(w, hw)
    assert cm.writes_behind(plan) and not cm.writes_behind(waiting)
    p = cm.predict(plan, events=True)
    carried = [e for e in p.events if e.name.endswith("(last step's)")]
    last = w.units[cm.update_order(plan)[-1]].name
    assert sorted(e.name for e in carried if e.nbytes) == [f"new params {last} (last step's)",
                                                         f"state {last} (last step's)"]
    assert min(e.start_s for e in carried) == 0.0
    # a weight read of the forward is not held up by them: it runs as soon as it is issued
    first_read = min((e for e in p.events if e.resource == "disk_read" and "fetch" in e.name), key=lambda e: e.start_s)
    assert not any(e.start_s < first_read.start_s < e.end_s for e in p.events if e.resource == "disk_write")
    assert sum(e.nbytes for e in p.events if e.resource == "disk_write") == p.traffic.disk_write_bytes
    assert not any(e.name.endswith("(last step's)") for e in cm.predict(waiting, events=True).events)
    # the write tail is what the fill loses (same traffic: the writes move to the next iteration)
    r = cm.rates(p.traffic)
    last_i = cm.update_order(plan)[-1]
    tail = cm.state_bytes(last_i, plan.units[last_i]) * r["disk_write"] + cm.pb[last_i] * r["disk_write"]


    class Waits(CostModel):  # the same runtime, if its step waited for every write
        def writes_behind(self, plan):
            return False

    assert tail > 0 and Waits(w, hw).fill_s(plan, r) - cm.fill_s(plan, r) == pytest.approx(tail)
