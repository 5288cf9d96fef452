"""Planner: close to exhaustive search on small cases, deterministic, and a clear answer when nothing fits."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler import planner, profile, workload
from scheduler.cost import CostModel
from scheduler.planner import Plan, UnitPlacement
from storage import Tier

D, H, N = Tier.DEVICE, Tier.HOST, Tier.NVME
SMALL = dataclasses.replace(workload.PRESETS["gpt2"][0], n_layer=4)
OPTS = [UnitPlacement(D, D, "device"), UnitPlacement(D, H, "cpu"), UnitPlacement(H, H, "cpu"),
        UnitPlacement(H, N, "cpu"), UnitPlacement(N, N, "cpu"), UnitPlacement(H, H, "device")]


def _small(device_mib: int, host_mib: int, name="rtx4090-pcie4-gen4nvme"):
    w = workload.from_shape(SMALL, batch=2, seq=256, name="gpt2-4layer")
    hw = profile.resolve(name).with_capacities(device_memory_bytes=device_mib << 20, host_memory_bytes=host_mib << 20,
                                               nvme_bytes=8 << 30, device_reserve_bytes=0, host_reserve_bytes=0)
    return w, hw


@pytest.mark.parametrize("device_mib,host_mib,prof", [(900, 4096, "rtx4090-pcie4-gen4nvme"),
                                                      (600, 4096, "cpu-dev-2core"),
                                                      (600, 1200, "h100-pcie5-gen4nvme")])
def test_planner_within_5_percent_of_exhaustive(device_mib, host_mib, prof):
    w, hw = _small(device_mib, host_mib, prof)
    best = planner.exhaustive(w, hw, options=OPTS, depths=(2,))
    assert best is not None, "the case must have a fitting plan"
    res = planner.plan(w, hw, options=OPTS, depths=(2,))
    assert res.fits
    assert res.prediction.iteration_s <= best[1] * 1.05, (res.plan.compact(), best[0].compact(),
                                                          res.prediction.iteration_s, best[1])


def test_planner_is_deterministic_and_respects_capacity():
    w, hw = _small(700, 4096)
    a, b = planner.plan(w, hw), planner.plan(w, hw)
    assert a.plan == b.plan and a.prediction.iteration_s == b.prediction.iteration_s
    assert not CostModel(w, hw).shortfall(a.plan)
    assert a.prediction.iteration_s >= a.prediction.lower_bound_s * (1 - 1e-9)


def test_everything_on_device_when_it_fits():
    w, hw = _small(64 << 10, 64 << 10)
    res = planner.plan(w, hw)
    assert all(u == UnitPlacement(D, D, "device") for u in res.plan.units)


def test_plan_that_cannot_fit_names_tier_and_amount():
    w, hw = _small(8, 4096)  # 8 MiB device: activations alone exceed it
    res = planner.plan(w, hw)
    assert not res.fits and res.shortfall.tier == "device"
    need = CostModel(w, hw).memory(planner.uniform(w, UnitPlacement(N, N, "cpu"), "x", prefetch_depth=0,
                                                   grad_buffers=1, state_buffers=1))["device"]
    assert res.shortfall.short_bytes == need - (8 << 20)
    assert "--device-memory" in res.shortfall.fix and "device memory is short by" in str(res.shortfall)
    w2, hw2 = _small(4096, 4096)
    hw2 = hw2.with_capacities(host_memory_bytes=1 << 20, nvme_bytes=1 << 20, device_memory_bytes=400 << 20)
    res2 = planner.plan(w2, hw2)
    assert not res2.fits and res2.shortfall.tier in ("host", "nvme") and res2.shortfall.short_bytes > 0


def test_plan_validation_errors():
    with pytest.raises(ValueError, match="expected update='device'"):
        UnitPlacement(D, D, "cpu")
    with pytest.raises(ValueError, match="expected 'cpu' or 'device'"):
        UnitPlacement(D, H, "gpu")
    with pytest.raises(ValueError, match="prefetch_depth: expected >= 0"):
        Plan(strategy="x", units=(), prefetch_depth=-1)
    with pytest.raises(ValueError, match="grad_tier: expected 'host' \\(or 'nvme' with a CPU update\\)"):
        UnitPlacement(H, H, "device", grad_tier=N)
    w, hw = _small(4096, 4096)
    bad = Plan(strategy="x", units=(UnitPlacement(H, H, "cpu"),) * (len(w.units) - 1))
    with pytest.raises(ValueError, match="expected one placement per unit"):
        CostModel(w, hw).predict(bad)


def test_strategies_are_plans_in_the_same_model():
    w, hw = _small(4096, 4096)
    s = planner.strategies(w, hw)
    assert {"no offload", "ZeRO-Offload", "ZeRO-Infinity", "Fuyou"} <= set(s)
    cm = CostModel(w, hw)
    for p in s.values():
        assert cm.predict(p).iteration_s > 0
    assert not s["ZeRO-Infinity"].overlap_update and s["Fuyou"].overlap_update


@pytest.mark.parametrize("device_mib,host_mib,prof", [(450, 2000, "rtx4090-pcie4-gen4nvme"),
                                                      (500, 800, "cpu-dev-2core"),
                                                      (450, 2000, "h100-pcie5-gen4nvme")])
def test_planner_within_5_percent_of_exhaustive_over_all_options(device_mib, host_mib, prof):
    """Every one of the 15 placements for each of 3 blocks (the rest unit: the 5 that keep its params on the
    device) at prefetch depth 2: the whole space, searched."""
    w = workload.from_shape(dataclasses.replace(SMALL, n_layer=3), batch=2, seq=256)
    hw = profile.resolve(prof).with_capacities(device_memory_bytes=device_mib << 20,
                                               host_memory_bytes=host_mib << 20, nvme_bytes=8 << 30,
                                               device_reserve_bytes=0, host_reserve_bytes=0)
    best = planner.exhaustive(w, hw, options=planner.OPTIONS, depths=(2,))
    res = planner.plan(w, hw, depths=(2,))
    assert best is not None and res.fits
    assert res.prediction.iteration_s <= best[1] * 1.05


def test_plan_with_options_that_leave_out_device_updates():
    """Options without the all-on-device placement (e.g. CPU updates only) are searched too: the greedy starts
    from the first option instead of failing."""
    from scheduler.planner import OPTIONS, plan
    from scheduler.profile import resolve
    from scheduler.workload import preset

    w = preset("gpt2", batch=2, seq=256)
    options = [o for o in OPTIONS if o.update == "cpu"]
    res = plan(w, resolve("cpu-dev-2core"), options=options)
    assert res.plan is not None and all(u.update == "cpu" for u in res.plan.units)
