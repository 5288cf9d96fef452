"""Cost model: bytes per link and memory against hand counts; the simulation against its own bounds."""

from __future__ import annotations

import pytest

from scheduler import profile
from scheduler.cost import CostModel
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
    plan = Plan(strategy="t", units=(UnitPlacement(D, H, "cpu"),      # rest: grads out 2000, new params in 2000
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


def test_memory_equals_a_hand_count():
    w, hw = _tiny(), profile.resolve("h100-pcie5-gen4nvme")
    plan = Plan(strategy="t", prefetch_depth=2, grad_buffers=2, state_buffers=3,
                units=(UnitPlacement(D, H, "cpu"), UnitPlacement(H, N, "cpu"), UnitPlacement(N, H, "device"),
                       UnitPlacement(D, D, "device")))
    m = CostModel(w, hw).memory(plan)
    # device: params rest 2000 + b2 600; 3 param buffers x largest streamed (b1 400); state b2 3600;
    # grads: rest 2000 + 2 x largest block grad 600; 3 state buffers x b1's 2400; activations 4 x 10 + 100
    assert m["device"] == 2600 + 3 * 400 + 3600 + 2000 + 2 * 600 + 3 * 2400 + 140
    # host: params b0 200; state rest 12000 + b1 2400; 2 grad buffers x largest cpu grad (rest 2000);
    # param staging 3 x (b1 400); state staging 3 x (b0 1200)
    assert m["host"] == 200 + 12000 + 2400 + 2 * 2000 + 3 * 400 + 3 * 1200
    # nvme: b1 params 400 + b0 state 1200 + room for 3 writes of the largest nvme chunk (1200)
    assert m["nvme"] == 400 + 1200 + 3 * 1200


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
