"""Planner: close to exhaustive search on small cases, deterministic, and a clear answer when nothing fits."""

from __future__ import annotations

import dataclasses
import itertools

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
    assert not res.fits and res.shortfall.tier == "device" and not res.shortfall.joint
    (fix,) = res.shortfall.fixes  # no --batch or --seq: the params held on the device alone exceed 8 MiB
    flag, need = fix.values[0]
    assert flag == "--device-memory" and res.shortfall.short_bytes == need - (8 << 20) > 0
    assert str(res.shortfall).startswith("device memory is short by ") and f"fits with {fix}" in str(res.shortfall)
    assert planner.plan(w, hw.with_capacities(device_memory_bytes=need)).fits
    # the least, to the digits printed: "356MiB" fits, "355MiB" does not
    text = fix.changes[0][1]
    assert text.endswith("MiB") and not planner.plan(
        w, hw.with_capacities(device_memory_bytes=(int(text[:-3]) - 1) << 20)).fits
    w2, hw2 = _small(4096, 4096)
    hw2 = hw2.with_capacities(host_memory_bytes=1 << 20, nvme_bytes=1 << 20, device_memory_bytes=400 << 20)
    res2 = planner.plan(w2, hw2)
    # Offloading needs host staging even for NVMe, so the NVMe alone cannot help; more device (all of it on the
    # device) or more host (the rest there) can, each alone: short together, both listed.
    assert not res2.fits and res2.shortfall.joint and [t for t, _ in res2.shortfall.short] == ["device", "host"]
    assert str(res2.shortfall).startswith("device memory is short by ") and ", or host memory by " in str(
        res2.shortfall)
    for fix, key in zip(res2.shortfall.fixes, ("device_memory_bytes", "host_memory_bytes")):
        assert planner.plan(w2, hw2.with_capacities(**{key: fix.values[0][1]})).fits


def _brute_force_fits(cm, options, depth=1, **priced):
    """Every placement's memory per tier, as a plan needs it (CostModel.required), or priced with ``priced``."""
    rest = cm.w.units[0].kind == "rest"
    per = [[o for o in options if not (rest and i == 0 and o.params is not D)] for i in range(len(cm.w.units))]
    seen = set()
    for units in itertools.product(*per):
        p = Plan(strategy="x", units=units, prefetch_depth=depth)
        m = cm.memory(dataclasses.replace(p, **priced)) if priced else cm.required(p)
        seen.add((m["device"], m["host"], m["nvme"]))
    return seen


def _lora_like():
    """A rest unit with nothing to train and blocks partly frozen (a LoRA base with adapters)."""
    base = workload.from_shape(dataclasses.replace(SMALL, n_layer=2), batch=2, seq=256)
    units = [dataclasses.replace(base.units[0], trainable=0)] + [dataclasses.replace(u, trainable=u.params // 50)
                                                                 for u in base.units[1:]]
    return dataclasses.replace(base, units=tuple(units))


@pytest.mark.parametrize("priced", [{}, {"speculate": True, "clip": True}], ids=["needed", "clipping-peak"])
@pytest.mark.parametrize("case", ["bf16", "fp32", "frozen"])
def test_feasibility_agrees_with_every_placement(case, priced):
    """Over every placement of 2 blocks and the rest unit, on random capacities around the memory the placements
    need: the bounds never call a fitting case unfittable, and their witness fits. With 16-bit state (no
    masters) they decide every case; with fp32 masters they may leave a case to the search, never wrong. Both
    for what a plan needs (no speculation: its copies take only free room) and for the peak of a plan whose
    every step speculates (clipping: pre-update copies of params and state, the store's previous versions)."""
    import random

    small = dataclasses.replace(SMALL, n_layer=2)
    w = {"bf16": lambda: workload.from_shape(small, batch=2, seq=256),
         "fp32": lambda: workload.from_shape(small, batch=2, seq=256, **workload.precision("fp32")),
         "frozen": _lora_like}[case]()
    cm = CostModel(w, profile.resolve("rtx4090-pcie4-gen4nvme"))
    feas = planner.Feasibility(cm, planner.OPTIONS, depth=1, grad_buffers=2, state_buffers=4, **priced)
    mems = _brute_force_fits(cm, planner.OPTIONS, **priced)
    lo = [min(m[k] for m in mems) for k in range(3)]
    hi = [max(m[k] for m in mems) for k in range(3)]
    rng = random.Random(0)
    undecided = 0
    for _ in range(300):
        cap = [rng.randint(lo[k] - 1, hi[k]) if rng.random() < 0.85 else planner.UNBOUNDED for k in range(3)]
        truth = any(all(m[k] <= cap[k] for k in range(3)) for m in mems)
        v = feas.decide(cap)
        if v is None:
            undecided += 1
            continue
        assert (v is not False) == truth, (cap, truth)
        if v is not False:
            m = cm.memory(dataclasses.replace(v, **priced)) if priced else cm.required(v)
            assert all(m[t] <= c for t, c in zip(("device", "host", "nvme"), cap))
    assert undecided == 0 if case != "fp32" else undecided < 30


@pytest.mark.parametrize("priced", [{"speculate": False, "clip": False}, {"speculate": True, "clip": False},
                                    {"speculate": True, "clip": True}])
def test_feasibility_closed_form_is_the_memory_rules(priced):
    """Feasibility prices a plan from how many blocks keep params and state on each tier (Feasibility.tiers, the
    rules of scheduler/buffers.py in closed form for identical blocks); on random whole plans that is exactly
    CostModel.memory, per tier."""
    import random

    from scheduler.buffers import r

    w = workload.from_shape(dataclasses.replace(SMALL, n_layer=5), batch=2, seq=256)
    cm = CostModel(w, profile.resolve("cpu-dev-2core"))
    feas = planner.Feasibility(cm, planner.OPTIONS, depth=2, grad_buffers=2, state_buffers=3, **priced)
    rng = random.Random(1)
    rest_opts = [o for o in planner.OPTIONS if o.params is D]
    tier = {D: 0, H: 1, N: 2}
    for _ in range(200):
        units = [rng.choice(rest_opts)] + [rng.choice(planner.OPTIONS) for _ in w.units[1:]]
        x, y = [0, 0, 0], [0, 0, 0]
        for o in units[1:]:
            x[tier[o.params]] += 1
            y[tier[o.state]] += 1
        host_grads = sum(r(cm.gb[1]) for o in units[1:] if o.update == "cpu")
        dev_offloaded = any(o.update == "device" and o.state is not D for o in units[1:])
        got = feas.tiers(units[0], x, y, host_grads, dev_offloaded, cm.sb[1])
        m = cm.memory(Plan(strategy="x", units=tuple(units), prefetch_depth=2, state_buffers=3, **priced))
        assert [int(v) for v in got] == [m["device"], m["host"], m["nvme"]], [o.code for o in units]


@pytest.mark.parametrize("priced", [{}, {"speculate": True, "clip": True}], ids=["needed", "clipping-peak"])
def test_feasibility_breakpoints_find_what_every_y_finds(priced):
    """The bounds evaluate the host only at the breakpoints of its dependence on the states on NVMe; on a
    12-block model (more blocks than the read-ahead and the buffers) they decide as evaluating every count does,
    at the least capacity that fits (found with every count) and one step either side."""
    import random

    w = workload.preset("gpt2", batch=2, seq=256)
    cm = CostModel(w, profile.resolve("rtx4090-pcie4-gen4nvme"))
    feas = planner.Feasibility(cm, planner.OPTIONS, depth=2, grad_buffers=2, state_buffers=8, **priced)
    fits = lambda cap, **k: feas.decide(cap, **k) not in (None, False)  # noqa: E731
    top = [max(cm.memory(planner.uniform(w, o, "x"))[t] for o in planner.OPTIONS) for t in planner.TIERS]
    rng = random.Random(2)
    checked = 0
    for _ in range(40):
        k = rng.randrange(3)
        cap = [rng.randint(0, top[j]) for j in range(3)]
        cap[k] = planner.UNBOUNDED
        if not fits(cap, every_y=True):
            continue
        lo, hi = -1, 2 * top[k]  # the least capacity of tier k that fits, with every count evaluated
        while hi - lo > 1:
            cap[k] = (lo + hi) // 2
            lo, hi = (lo, cap[k]) if fits(cap, every_y=True) else (cap[k], hi)
        for c in (lo, hi, hi + 4096, lo - 4096):
            cap[k] = c
            assert fits(cap) == fits(cap, every_y=True), (k, cap)
            checked += 1
    assert checked >= 40


GRID = [(4, 24 << 30, 64 << 30, 1), (32, 10 << 30, 128 << 30, 2 * 10**12), (1, 24 << 30, 128 << 30, 2 * 10**12),
        (8, 2 << 30, 16 << 30, 100 << 30), (1, 24 << 30, 8 << 30, 1 << 40)]
"""(batch, device, host, nvme): the machines of the grid, at seq 2048."""


@pytest.mark.parametrize("name", list(workload.PRESETS))
@pytest.mark.parametrize("batch,device,host,nvme", GRID,
                         ids=[f"b{g[0]}-{g[1] >> 30}G-{g[2] >> 30}G-{g[3]}" for g in GRID])
def test_does_not_fit_is_proved_without_search_and_every_fix_fits(name, batch, device, host, nvme, monkeypatch):
    """Every preset on a grid of machines. Where it does not fit: the bounds prove it before any search (the greedy
    is never called), with bounded work; every printed fix, fed back, fits; a capacity fix one printed step
    smaller does not (it is the least, as printed); no tier is short by nothing. Where it fits, it does."""
    hw = profile.resolve("rtx4090-pcie4-gen4nvme").with_capacities(
        device_memory_bytes=device, host_memory_bytes=host, nvme_bytes=nvme)
    w = workload.preset(name, batch=batch, seq=2048)
    # what a plan may fill: the capacities less the profile's reserves, as the planner sees them
    cm = CostModel(w, hw)
    if planner.Feasibility(cm, planner.OPTIONS, depth=1, grad_buffers=2, state_buffers=4).decide(
            list(cm.capacity().values())):
        res = planner.plan(w, hw, max_sims=1)
        assert res.fits and res.shortfall is None and not CostModel(w, hw).shortfall(res.plan)
        return
    checks = []
    real = planner._Fits.__call__

    def counted(self, *a, **k):
        checks.append(1)
        return real(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(planner._Search, "greedy", lambda *a, **k: pytest.fail("searched a case the bounds prove"))
        m.setattr(planner._Fits, "__call__", counted)
        res = planner.plan(w, hw)
    assert not res.fits and len(checks) <= 150, len(checks)  # ~ms each: 3 tiers x ~13 bisection steps, twice
    sf = res.shortfall
    assert sf.fixes and all(b > 0 for _, b in sf.short)
    flags = {"--device-memory": "device_memory_bytes", "--host-memory": "host_memory_bytes", "--nvme": "nvme_bytes"}
    for fix in sf.fixes:
        values = dict(fix.values)
        tokens = {"batch": values.pop("--batch", batch), "seq": values.pop("--seq", 2048)}
        hw2 = hw.with_capacities(**{flags[f]: v for f, v in values.items()})
        assert planner.plan(workload.preset(name, **tokens), hw2, max_sims=1).fits, str(fix)
        if len(values) == 1 and fix.changes[0][0] not in ("--batch", "--seq"):
            (f, v), = values.items()
            text = fix.changes[0][1]
            number = text.rstrip("KMGTiB")
            step = int(v / float(number) * 10 ** -(len(number.split(".")[1]) if "." in number else 0))
            assert not planner.plan(w, hw.with_capacities(**{flags[f]: v - step}), max_sims=1).fits, str(fix)
    for t, b in sf.short:  # each tier named is short: at its current capacity, with the others as they are
        assert b > 0 and t in ("device", "host", "nvme")


@pytest.mark.parametrize("n", [1, 1023, 1024, 1536, 11_600_000_000, 987_654_321_000, 3 << 40])
def test_size_at_least_prints_what_reads_back_at_least(n):
    from offload.config import parse_bytes

    text, value = planner.size_at_least(n)
    assert parse_bytes(text) == value >= n and value < n * 1.01 + 1


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
