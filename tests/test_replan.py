"""Re-planning from measured rates (scheduler/replan.py) and its glue to the runtime (offload/autoplan.py).

The scheduler tests feed the Replanner synthetic history records: what the runtime would measure if the machine
ran at the rates of a "true" profile, made from the cost model's own prediction for that profile (busy seconds and
bytes per resource, the update thread's spans holding the disk work it waits for, compute spans holding fetch
waits). No timing is asserted; the end-to-end test compares losses with plain torch bit for bit."""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import pytest

from offload.runtime import runtime_of
from scheduler import profile, workload
from scheduler.cost import CostModel
from scheduler.planner import Plan, UnitPlacement, uniform
from scheduler.replan import Replanner, calibrate, estimate
from storage import Tier

D, H, N = Tier.DEVICE, Tier.HOST, Tier.NVME
SHAPE = workload.TransformerShape(n_layer=4, d_model=256, n_head=4, d_ff=1024, vocab=4096, n_pos=128, bias=True,
                                  norm="layernorm", tied=True)
FETCH_WAIT_S = 0.002
"""Seconds per iteration the synthetic compute spans spend waiting for fetches (the runtime's ``fetch_wait_s``)."""


def _workload(batch: int = 2, seq: int = 128) -> workload.Workload:
    return workload.from_shape(SHAPE, batch=batch, seq=seq, name="gpt-4x256", checkpointing=False,
                               **workload.precision("fp32"))


W = _workload()
ALL_NVME = uniform(W, UnitPlacement(N, N, "cpu"), "config")
ALL_HOST = uniform(W, UnitPlacement(H, H, "cpu"), "config")


def _profile() -> profile.HardwareProfile:
    """The development VM's rates; a device just large enough for everything on NVMe, room on the host."""
    hw = profile.resolve("cpu-dev-2core")
    device = CostModel(W, hw).memory(ALL_NVME)["device"]
    return hw.with_capacities(device_memory_bytes=device, host_memory_bytes=1 << 30, nvme_bytes=8 << 30)


HW = _profile()


def _scaled(hw, **factors):
    """``hw`` with rates multiplied: ``disk=1/3`` scales both disk directions, ``cpu`` both CPU update rates."""
    out = {}
    for k, f in factors.items():
        fields = {"disk": ("disk_read_gbps", "disk_write_gbps", "disk_mixed_gbps"),
                  "cpu": ("cpu_update_params_per_s", "cpu_update_params_per_s_under_io")}.get(k, (k,))
        out.update({name: getattr(hw, name) * f for name in fields})
        if k == "compute_efficiency":  # the efficiency at every step size
            out["compute_curve"] = {t: v * f for t, v in hw.compute_curve.items()}
    return dataclasses.replace(hw, **out)


def _records(true, plan, n, *, start=1, noise=0.0, seed=0, w=W):
    """``n`` history records (iterations ``start``...) of ``plan`` on a machine whose rates are ``true``'s, as the
    runtime records them: busy seconds per resource (each multiplied by an independent uniform factor in
    ``1 +- noise``), bytes per link, cumulative fetch waits. The update thread's spans include the disk work it
    waits for when the update overlaps backward (state reads and writes, params read in before an update that
    changes them in place, the new params of every unit but the last to update, which are written after the
    step)."""
    rng = random.Random(seed)
    cm = CostModel(w, true)
    p = cm.predict(plan, events=True)
    t = p.traffic
    last = w.units[cm.update_order(plan)[-1]].name
    chain = sum(e.end_s - e.start_s for e in p.events if e.resource in ("disk_read", "disk_write") and (
        e.name.startswith(("state ", "params ")) or (e.name.startswith("new params ") and e.name != f"new params {last}")))
    out = []
    for it in range(start, start + n):
        busy = dict(p.busy_s)
        if plan.overlap_update:
            busy["cpu_update"] += chain
        busy["compute"] += FETCH_WAIT_S
        busy = {k: v * (1 + rng.uniform(-noise, noise)) for k, v in busy.items()}
        out.append({"iteration": it, "wall_s": p.iteration_s,
                    "timeline": {"span_s": p.iteration_s, "busy_s": busy,
                                 "bytes": {"compute": 0, "h2d": t.h2d_bytes, "d2h": t.d2h_bytes,
                                           "disk_read": t.disk_read_bytes, "disk_write": t.disk_write_bytes,
                                           "cpu_update": 0}},
                    "stats": {"fetch_wait_s": FETCH_WAIT_S * it}})
    return out


def _run(rp: Replanner, true, plan: Plan, iterations: int, *, noise=0.0, seed=0):
    """Feed ``rp`` one record per iteration of whichever plan it says runs; the plans it returned, by iteration."""
    switches = []
    for it in range(1, iterations + 1):
        rec = _records(true, plan, 1, start=it, noise=noise, seed=seed * 100_003 + it)[0]
        new = rp.observe(rec)
        if new is not None:
            switches.append((it, new))
            plan = new
    return switches


def _rel(a, b):
    return abs(a - b) / abs(b)


# -- calibration -------------------------------------------------------------------------------------------------------
def test_calibration_recovers_known_rates():
    """Disk 3x / 2x slower, compute efficiency 0.8x and h2d 0.5x: each comes back exactly (no noise here). (The
    mixed rate is scaled so that the disk's mixed-traffic share stays the profile's: from a run that reads and
    writes together, only the rates under that mix can be known.)"""
    true = _scaled(HW, disk_read_gbps=1 / 3, disk_write_gbps=1 / 2, compute_efficiency=0.8, h2d_gbps=0.5)
    t = CostModel(W, HW).traffic(ALL_NVME)
    k = CostModel(W, HW).disk_share(t)
    both = min(t.disk_read_bytes, t.disk_write_bytes)
    pair_s = k * (t.disk_read_bytes / true.disk_read_gbps + t.disk_write_bytes / true.disk_write_gbps) - \
        (t.disk_read_bytes - both) / true.disk_read_gbps - (t.disk_write_bytes - both) / true.disk_write_gbps
    true = dataclasses.replace(true, disk_mixed_gbps=2 * both / pair_s)
    recs = _records(true, ALL_NVME, 6)
    recs[0] = _records(_scaled(HW, disk=1 / 10), ALL_NVME, 1)[0]  # a slow warm-up iteration: not measured
    est = estimate(recs, W, ALL_NVME, HW)
    assert est["disk_read_gbps"].iterations == 5
    assert _rel(est["disk_read_gbps"].ratio, 1 / 3) < 1e-9 and _rel(est["disk_write_gbps"].ratio, 1 / 2) < 1e-9
    cal = calibrate(recs, W, ALL_NVME, HW, run="test-run", min_busy_s=0)  # d2h too (1.4 ms)
    for f in ("disk_read_gbps", "disk_write_gbps", "disk_mixed_gbps", "compute_efficiency"):
        assert _rel(getattr(cal, f), getattr(true, f)) < 1e-9, f
        assert cal.sources[f].startswith("calibrated from 5 iterations of test-run")
    # h2d and d2h share the link: the calibrated profile predicts the measured busy times for the plan that ran.
    got, want = CostModel(W, cal).predict(ALL_NVME), CostModel(W, true).predict(ALL_NVME)
    for r in ("h2d", "d2h", "disk_read", "disk_write", "compute"):
        assert _rel(got.busy_s[r], want.busy_s[r]) < 1e-9, r
    assert (cal.device_memory_bytes, cal.host_memory_bytes, cal.nvme_bytes) == \
        (HW.device_memory_bytes, HW.host_memory_bytes, HW.nvme_bytes)
    # The update thread waits for the disk most of its time here: too little of it is the CPU's to measure.
    assert "cpu_update_params_per_s" not in est and cal.cpu_update_params_per_s == HW.cpu_update_params_per_s


def test_calibration_of_cpu_updates_keeps_the_profiles_ratio_under_io():
    true = _scaled(HW, cpu=0.7)
    cal = calibrate(_records(true, ALL_HOST, 4), W, ALL_HOST, HW, run="host-run")
    # ALL_HOST streams no disk: the rate alone is measured, the one under I/O scaled alike.
    for f in ("cpu_update_params_per_s", "cpu_update_params_per_s_under_io"):
        assert _rel(getattr(cal, f), getattr(true, f)) < 1e-9
    assert "scaled as cpu_update_params_per_s" in cal.sources["cpu_update_params_per_s_under_io"]
    # With state on NVMe and a disk fast enough that the CPU's share of the update spans is large, it is measured.
    fast = _scaled(HW, disk=40)
    cal2 = calibrate(_records(_scaled(fast, cpu=0.7), ALL_NVME, 4), W, ALL_NVME, fast)
    assert _rel(cal2.cpu_update_params_per_s_under_io, fast.cpu_update_params_per_s_under_io * 0.7) < 1e-9


def test_too_few_bytes_or_seconds_are_not_measured():
    recs = _records(HW, ALL_NVME, 3)
    # 17 MB of grads and the rest unit's params (copied for its update as they leave the device) at 12 GB/s
    assert 1e-3 < CostModel(W, HW).predict(ALL_NVME).busy_s["d2h"] < 3e-3
    assert "d2h_gbps" in estimate(recs, W, ALL_NVME, HW)
    assert "d2h_gbps" not in estimate(recs, W, ALL_NVME, HW, min_busy_s=3e-3)
    assert estimate(recs, W, ALL_NVME, HW, min_bytes=1 << 40, min_busy_s=10).keys() == set()
    assert calibrate(recs[:1], W, ALL_NVME, HW) is HW  # nothing past the warm-up: the profile as it was
    # A rate over its threshold in fewer than half the measured iterations got there by noise: not trusted.
    recs = _records(HW, ALL_NVME, 6)
    for k, rec in enumerate(recs[1:]):
        rec["timeline"]["busy_s"]["d2h"] = 2.5e-3 if k < 2 else 1.5e-3
    assert "d2h_gbps" not in estimate(recs, W, ALL_NVME, HW, min_busy_s=2e-3)  # 2 of 5
    recs[3]["timeline"]["busy_s"]["d2h"] = 2.5e-3
    assert estimate(recs, W, ALL_NVME, HW, min_busy_s=2e-3)["d2h_gbps"].iterations == 3  # 3 of 5


@pytest.mark.parametrize("guessed_batch", [1, 8])
def test_compute_calibration_absorbs_a_guessed_batch(guessed_batch):
    """Records of batch 4; the workload was built for another batch. The calibrated profile predicts the measured
    compute for the guessed workload: above an efficiency of 1, the rest goes into device_tflops."""
    real, guess = _workload(batch=4), _workload(batch=guessed_batch)
    recs = _records(HW, ALL_NVME, 4, w=real)
    cal = calibrate(recs, guess, ALL_NVME, HW)
    want = CostModel(real, HW).predict(ALL_NVME).busy_s["compute"]
    assert _rel(CostModel(guess, cal).predict(ALL_NVME).busy_s["compute"], want) < 1e-9
    if guessed_batch > 4:
        assert cal.compute_efficiency == 1.0 and cal.device_tflops["fp32"] > HW.device_tflops["fp32"]
    else:
        assert cal.compute_efficiency < HW.compute_efficiency and cal.device_tflops == HW.device_tflops


# -- re-planning -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_no_replan_when_measured_rates_match_the_profile(noise):
    rp = Replanner(W, HW, ALL_NVME)
    assert _run(rp, HW, ALL_NVME, 60, noise=noise) == [] and rp.log == []
    assert rp.profile is HW


def test_a_drift_that_does_not_matter_to_the_plan_is_ignored():
    """h2d at a fifth of the profile's rate: the plan's h2d traffic still takes under min_share (10%) of the
    iteration."""
    true = _scaled(HW, h2d_gbps=0.2)
    assert estimate(_records(true, ALL_NVME, 3), W, ALL_NVME, HW)["h2d_gbps"].ratio < 0.5
    assert CostModel(W, true).predict(ALL_NVME).busy_s["h2d"] < 0.1 * CostModel(W, HW).predict(ALL_NVME).iteration_s
    rp = Replanner(W, HW, ALL_NVME, min_share=0.1)
    assert _run(rp, true, ALL_NVME, 20) == [] and rp.log == []
    rp = Replanner(W, HW, ALL_NVME, min_share=0.0)
    assert _run(rp, true, ALL_NVME, 20) and "h2d_gbps" in rp.log[0]["drifted"]


def test_replan_after_patience_iterations_when_the_disk_is_slower():
    rp = Replanner(W, HW, ALL_NVME, patience=3, warmup=1, run="slow-disk")
    switches = _run(rp, _scaled(HW, disk=1 / 3), ALL_NVME, 12)
    # Iteration 1 is warm-up; 2, 3 and 4 measure the drift; the plan changes after the 4th, and only then.
    assert [it for it, _ in switches] == [4]
    new = switches[0][1]
    assert all(u.state is not N and u.params is not N for u in new.units), new.compact()
    (entry,) = rp.log
    assert entry["decision"] == "replan" and entry["iteration"] == 4
    assert set(entry["drifted"]) == {"disk_read_gbps", "disk_write_gbps"}
    assert entry["old_plan"] == ALL_NVME.compact() and entry["new_plan"] == new.compact()
    assert entry["new_s"] <= entry["old_s"] * (1 - rp.min_gain)
    assert _rel(rp.profile.disk_read_gbps, HW.disk_read_gbps / 3) < 1e-9  # the calibration was adopted
    assert "calibrated from 3 iterations of slow-disk" in rp.profile.sources["disk_read_gbps"]
    assert new.overlap_update == ALL_NVME.overlap_update and new.state_buffers == ALL_NVME.state_buffers


def test_no_plan_when_the_gain_is_below_min_gain():
    slow = _scaled(HW, disk=1 / 3)
    probe = Replanner(W, HW, ALL_NVME, min_gain=0.0)
    _run(probe, slow, ALL_NVME, 4)
    gain = probe.log[0]["gain"]
    assert gain > 0.05
    above = Replanner(W, HW, ALL_NVME, min_gain=gain + 0.01)
    assert _run(above, slow, ALL_NVME, 12) == []
    assert [e["decision"] for e in above.log] == ["kept"]
    assert _rel(above.profile.disk_write_gbps, slow.disk_write_gbps) < 1e-9  # calibration adopted: no more drift
    below = Replanner(W, HW, ALL_NVME, min_gain=gain - 0.01)
    assert [it for it, _ in _run(below, slow, ALL_NVME, 12)] == [4]


def test_no_flip_flop_over_a_long_noisy_run():
    """300 iterations at 15% noise (below the 20% drift) with the disk 3x slower than the profile: one switch,
    then the new plan stays."""
    rp = Replanner(W, HW, ALL_NVME)
    switches = _run(rp, _scaled(HW, disk=1 / 3), ALL_NVME, 300, noise=0.15, seed=7)
    assert len(switches) == 1, [(it, p.compact()) for it, p in switches]
    assert [e["decision"] for e in rp.log] == ["replan"]


def test_hysteresis_waits_after_a_switch():
    """The machine keeps changing under a new plan (compute 2x slower at once): nothing is judged during the
    cooldown (the new plan's warm-up and a window of its own), then patience applies again."""
    rp = Replanner(W, HW, ALL_NVME, patience=2, warmup=1, window=4)
    slow, plan = _scaled(HW, disk=1 / 3), ALL_NVME
    for it in range(1, 4):
        new = rp.observe(_records(slow, plan, 1, start=it)[0])
    assert new is not None and rp.log[-1]["iteration"] == 3
    slower = _scaled(slow, compute_efficiency=0.5)
    for it in range(4, 20):
        rp.observe(_records(slower, new, 1, start=it)[0])
    # Iterations 4-8 (the cooldown: warm-up 1 + window 4) are not judged; 9 and 10 drift; decided after the 10th.
    assert [e["iteration"] for e in rp.log] == [3, 3 + rp.cooldown + rp.patience]
    assert set(rp.log[1]["drifted"]) == {"compute_efficiency"}


def test_replanner_is_deterministic():
    slow = _scaled(HW, disk=1 / 3, compute_efficiency=0.7)
    runs = []
    for _ in range(2):
        rp = Replanner(W, HW, ALL_NVME)
        runs.append(([(it, p) for it, p in _run(rp, slow, ALL_NVME, 40, noise=0.1, seed=3)], rp.log))
    assert runs[0] == runs[1] and runs[0][0]


def test_bad_input_is_refused_with_the_problem_named():
    with pytest.raises(ValueError, match="Replanner.drift: expected > 0, got 0"):
        Replanner(W, HW, ALL_NVME, drift=0)
    with pytest.raises(ValueError, match=r"Replanner.min_gain: expected in \[0, 1\), got 1.5"):
        Replanner(W, HW, ALL_NVME, min_gain=1.5)
    with pytest.raises(ValueError, match="expected one placement per unit"):
        Replanner(W, HW, Plan(strategy="x", units=ALL_NVME.units[:2]))
    rp = Replanner(W, HW, ALL_NVME)
    with pytest.raises(ValueError, match="expected a history record of OffloadRuntime.after_step"):
        rp.observe({"iteration": 1, "wall_s": 0.1})


# -- the glue: offload.autoplan ----------------------------------------------------------------------------------------
class FakeRuntime:
    """What autoplan needs of OffloadRuntime: its units (params per unit), config, plan and on_iteration; ``step``
    calls the callbacks with a record and applies a returned plan, as the runtime does before the next forward."""

    def __init__(self, plan=None):
        from offload import OffloadConfig

        self.units = [SimpleNamespace(numels=[u.params]) for u in W.units]
        self.config, self.plan, self.on_iteration, self.model = OffloadConfig(), plan, [], SimpleNamespace()

    def step(self, record):
        for fn in self.on_iteration:
            new = fn(record)
            if new is not None:
                self.plan = new


def test_autoplan_follows_the_runtimes_plan():
    from offload import autoplan

    rt = FakeRuntime(plan=ALL_NVME)
    rp = autoplan.enable(rt, workload=W, profile=HW, run="fake")
    assert rp.plan is ALL_NVME and rp.profile is HW and len(rt.on_iteration) == 1
    slow = _scaled(HW, disk=1 / 3)
    for it in range(1, 5):
        rt.step(_records(slow, rt.plan, 1, start=it)[0])
    assert rt.plan is rp.plan and rt.plan is not ALL_NVME
    assert [e["decision"] for e in autoplan.decisions(rt)] == ["replan"]
    # A plan applied from outside: the replanner measures it afresh (warm-up first) instead of judging the old one.
    other = uniform(W, UnitPlacement(H, N, "cpu"), "by hand")
    rt.plan = other
    rt.step(_records(slow, other, 1, start=5)[0])
    assert rp.plan is other and rp._since_change == 1
    with pytest.raises(ValueError, match=r"expected a workload with the runtime's units \(params per unit"):
        autoplan.enable(FakeRuntime(), workload=_workload_of_3_blocks(), profile=HW)
    with pytest.raises(ValueError, match="expected a model returned by offload.wrap"):
        autoplan.enable(object())
    with pytest.raises(ValueError, match="expected a runtime without a Replanner"):
        autoplan.enable(rt, workload=W, profile=HW)


def _workload_of_3_blocks():
    return workload.from_shape(dataclasses.replace(SHAPE, n_layer=3), batch=1, seq=8)


def test_autoplan_reads_the_wrapped_model_and_the_runtimes_budgets(tmp_path):
    import torch

    from offload import OffloadConfig, autoplan, wrap
    from offload.measure import config_to_plan, workload_of

    shape = workload.TransformerShape(n_layer=3, d_model=36, n_head=4, d_ff=70, vocab=97, n_pos=16, bias=True,
                                      norm="layernorm", tied=True)
    model = workload.build_transformer(shape, device="cpu")
    cfg = OffloadConfig(param_tier="nvme", state_tier="nvme", nvme_dirs=str(tmp_path), device_budget_bytes=1 << 20,
                        host_budget_bytes=64 << 20, max_grad_norm=1.0)
    model, _ = wrap(model, torch.optim.AdamW(model.parameters()), cfg)
    rp = autoplan.enable(model, profile="cpu-dev-2core", batch=2, seq=8)
    # The workload of the model's shapes, though its params are empty between uses (and stay so).
    assert rp.workload == workload_of(shape, batch=2, seq=8, name="TransformerLM")
    assert all(p.numel() == 0 for p in model.parameters())
    # Clipping overlaps speculatively: priced as the steady state of steps that do not clip.
    assert rp.plan == config_to_plan(cfg, rp.workload, strategy="config") and rp.plan.overlap_update
    cm = CostModel(rp.workload, rp.profile)
    grads = cm.gb[0] + rp.plan.grad_buffers * max(cm.gb[1:])
    assert rp.profile.device_memory_bytes == (1 << 20) + cm.act_bytes + grads
    assert rp.profile.host_memory_bytes == 64 << 20
    assert "OffloadConfig.host_budget_bytes" in rp.profile.sources["host_memory_bytes"]
    runtime_of(model).close()


def test_autoplan_switches_a_real_run_and_training_stays_bit_identical(tmp_path, monkeypatch):
    """State and params on a store slowed to ~100 MB/s per request, a profile claiming a 100 GB/s disk: after the
    warm-up and `patience` iterations the runtime runs another plan, without NVMe, and every loss, weight and
    optimizer state equals plain torch's bit for bit."""
    import time

    import torch

    import storage.nvme
    from offload import OffloadConfig, autoplan, wrap

    full_io = storage.nvme._full_io

    def slow_io(fn, fd, views, offset, total):
        time.sleep(total / 100e6)
        return full_io(fn, fd, views, offset, total)

    monkeypatch.setattr(storage.nvme, "_full_io", slow_io)
    shape = workload.TransformerShape(n_layer=3, d_model=128, n_head=4, d_ff=512, vocab=256, n_pos=32, bias=True,
                                      norm="layernorm", tied=True)

    def gpt():
        torch.manual_seed(0)
        return workload.build_transformer(shape, device="cpu")

    ref, model = gpt(), gpt()
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    cfg = OffloadConfig(param_tier="nvme", state_tier="nvme", nvme_dirs=str(tmp_path), impl="as_given",
                        device_budget_bytes=4 << 20)
    model, opt = wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1), cfg)
    fast = dataclasses.replace(profile.resolve("cpu-dev-2core"), disk_read_gbps=100.0, disk_write_gbps=100.0)
    rp = autoplan.enable(model, profile=fast, batch=4, seq=16, patience=3, warmup=1)
    rt = runtime_of(model)
    gen = torch.Generator().manual_seed(1)
    plans = []
    for _ in range(8):
        idx = torch.randint(0, shape.vocab, (4, 17), generator=gen)
        losses = []
        for m, o in ((ref, plain), (model, opt)):
            logits = m(idx[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, shape.vocab), idx[:, 1:].reshape(-1))
            loss.backward()
            o.step()
            o.zero_grad()
            losses.append(loss.item())
        assert losses[0] == losses[1]
        plans.append(rt.plan)
    assert plans[:4] == [None] * 4  # the config's placement through warm-up and patience
    assert plans[4] is rp.plan and plans[4:] == [rp.plan] * 4  # chosen after the 4th step, run from the 5th
    assert all(u.params is not N and u.state is not N for u in rp.plan.units), rp.plan.compact()
    (entry,) = autoplan.decisions(model)
    assert entry["decision"] == "replan" and entry["iteration"] == 4 and entry["drifted"]["disk_read_gbps"] < 0.1
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    osd = opt.state_dict()
    for k, entry in plain.state_dict()["state"].items():
        for key, v in entry.items():
            assert torch.equal(v, osd["state"][k][key]), (k, key)
    rt.close()
