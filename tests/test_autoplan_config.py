"""Re-planning from the config (``OffloadConfig(replan=True, profile=...)``, ``offload run --set replan=true``:
offload.autoplan.from_config) and the run report's re-plans section (offload/report.py). No timing is asserted: a
switch is forced by hand, by a callback, or by a store slowed 1000x below what the profile claims."""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import TINY_GPT, gpt
from offload import OffloadConfig, RunReport, autoplan, wrap
from offload.runtime import runtime_of
from offload.measure import workload_of
from scheduler import profile
from scheduler.planner import Plan, UnitPlacement, uniform
from scheduler.replan import Replanner
from storage import Tier

D, H, N = Tier.DEVICE, Tier.HOST, Tier.NVME
ROOT = Path(__file__).resolve().parent.parent
SHAPE = TINY_GPT


@pytest.fixture(autouse=True)
def collect():
    """Wrapped models hold pool slabs and hook cycles: collected here, not left to raise later forks' RSS."""
    gc.collect()
    yield
    gc.collect()


def wrapped(tmp_path, **cfg):
    tmp_path.mkdir(parents=True, exist_ok=True)
    model = gpt()
    cfg = OffloadConfig(**{"param_tier": "nvme", "state_tier": "nvme", "nvme_dirs": str(tmp_path), **cfg})
    model, opt = wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2), cfg)
    return model, opt, cfg


def train_step(model, opt, gen) -> float:
    idx = torch.randint(0, SHAPE.vocab, (2, 9), generator=gen)
    logits = model(idx[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, SHAPE.vocab), idx[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def fast_disk_profile(path: Path) -> str:
    """The development VM's profile with a disk claimed 100 GB/s each way, as a JSON file."""
    hw = profile.resolve("cpu-dev-2core")
    dataclasses.replace(hw, name="fast-disk", disk_read_gbps=100.0, disk_write_gbps=100.0).save(path)
    return str(path)


# -- from_config ---------------------------------------------------------------------------------------------------
def test_from_config_attaches_one_replanner_on_the_named_profile(tmp_path):
    model, _, cfg = wrapped(tmp_path)
    assert autoplan.from_config(model, cfg) is None  # replan off: nothing attached
    assert autoplan.replanner_of(model) is None and runtime_of(model).on_iteration == []
    path = fast_disk_profile(tmp_path / "fast.json")
    on = dataclasses.replace(cfg, replan=True, profile=path)
    rp = autoplan.from_config(model, on)
    assert isinstance(rp, Replanner) and rp.profile.name == "fast-disk" and rp.profile.disk_read_gbps == 100.0
    assert rp.plan.compact() == "NNc x4"  # the config's placement, as the runtime runs it
    # Called again (offload.wrap does it, and a script may too): the same Replanner, not a second one.
    assert autoplan.from_config(model, on) is rp and len(runtime_of(model).on_iteration) == 1
    runtime_of(model).close()


def test_from_config_default_profile_is_what_offload_plan_resolves(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE_DIR", str(tmp_path / "cache"))  # no cached probe: the shipped default
    model, _, cfg = wrapped(tmp_path / "store", replan=True)
    rp = autoplan.from_config(model, cfg)
    assert rp.profile.name == profile.resolve(None).name == "cpu-dev-2core"
    runtime_of(model).close()


def test_wrap_enables_replan_from_config(tmp_path):
    model, _, _ = wrapped(tmp_path, replan=True, profile="cpu-dev-2core")
    try:
        assert autoplan.replanner_of(model) is not None
    finally:
        runtime_of(model).close()


# -- the run report's re-plans section -------------------------------------------------------------------------------
def test_report_shows_each_switch_in_text_and_json(tmp_path):
    """A plan applied by hand after step 2 and one returned by an on_iteration callback after step 3: each is in
    the report with the iteration it first ran, who chose it, old -> new placement and the bytes it moved."""
    model, opt, _ = wrapped(tmp_path / "store")
    rt = runtime_of(model)
    report = RunReport(model, opt, progress=False)
    by_hand = Plan(strategy="test", units=(UnitPlacement(D, H, "cpu"), UnitPlacement(H, N, "cpu"),
                                           UnitPlacement(N, H, "cpu"), UnitPlacement(H, D, "device")), prefetch_depth=1)
    by_callback = Plan(strategy="test", units=(UnitPlacement(H, H, "cpu"),) * 4, prefetch_depth=1)
    rt.on_iteration.append(lambda rec: by_callback if rec["iteration"] == 3 else None)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 6):
        report.step(train_step(model, opt, gen), tokens=16)
        if step == 1:  # nothing switched yet: no section
            assert "replans" not in report.summary() and "re-plans" not in report.text()
        if step == 2:
            rt.apply_plan(by_hand)
    records = {h["iteration"]: h["replan"] for h in rt.history if "replan" in h}
    assert sorted(records) == [3, 4]
    s = report.summary()
    first, second = s["replans"]
    assert first == {"iteration": 3, "chosen_after": None, "by": "runtime.apply_plan", "drifted": None,
                     "old_plan": "NNc x4", "new_plan": by_hand.compact(), "predicted_old_s": None,
                     "predicted_new_s": None, "units_moved": records[3]["units_moved"], "bytes": records[3]["bytes"],
                     "switch_s": records[3]["s"]}
    assert second["by"] == "runtime.on_iteration" and second["chosen_after"] == 3 and second["iteration"] == 4
    assert second["old_plan"] == by_hand.compact() and second["new_plan"] == "HHc x4"
    assert len(first["units_moved"]) == 4 and first["bytes"]["disk_read"] > 0  # params and state left the store
    text = report.text()
    assert "re-plans: 2 applied" in text
    assert "from iteration 3 (runtime.apply_plan)" in text
    assert f"NNc x4 -> {by_hand.compact()}; 4 units moved" in text
    assert "from iteration 4 (runtime.on_iteration after iteration 3)" in text
    assert "placement at the end: params on host" in text
    # The per-iteration medians are those of the plan the run ended with: iteration 5 alone here (3 and 4 carry
    # the switches), and the prediction made for the first plan is not set beside them.
    assert s["medians_since_iteration"] == 5 and s["median_iterations"] == 1
    (last,) = [h for h in rt.history if h["iteration"] == 5]
    assert s["iteration_s_median"] == last["wall_s"]
    assert "per iteration (median of 1 from iteration 5, the plan at the end)" in text
    report.predicted = {"iteration_s": 9.0, "busy_s": {"compute": 9.0}, "profile": "x"}
    assert "9000 ms" not in report.text()  # the first plan's prediction; by_callback came with none of its own
    report.save(tmp_path / "rep")
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["replans"] == json.loads(json.dumps(s["replans"]))
    assert "re-plans: 2 applied" in (tmp_path / "rep" / "report.txt").read_text()
    rt.close()


def test_report_shows_the_per_unit_placement_of_a_mixed_plan(tmp_path):
    model = gpt()
    mixed = Plan(strategy="test", units=(UnitPlacement(D, H, "cpu"), UnitPlacement(N, N, "cpu"),
                                         UnitPlacement(N, N, "cpu"), UnitPlacement(H, D, "device")), prefetch_depth=1)
    model, opt = wrap(model, torch.optim.AdamW(model.parameters()), OffloadConfig(nvme_dirs=str(tmp_path)),
                      plan=mixed)
    report = RunReport(model, opt, progress=False)
    report.step(train_step(model, opt, torch.Generator().manual_seed(1)))
    s = report.summary()
    assert s["placement"]["params"] == "mixed" and "replans" not in s
    assert [g["units"] for g in s["placement"]["per_unit"]] == ["rest", "blocks.0 .. blocks.1", "blocks.2"]
    text = report.text()
    assert "placement per unit (4 units" in text and "re-plans" not in text
    assert "  blocks.0 .. blocks.1: params on nvme, grads on host, state on nvme, updated on cpu" in text
    assert "  blocks.2: params on host, grads on device, state on device, updated on device" in text
    runtime_of(model).close()


# -- offload run --set replan=true, end to end ------------------------------------------------------------------------
SCRIPT = """
import time

import torch

import offload
import storage.nvme
from offload import autoplan
from scheduler.workload import TransformerShape, build_transformer

full_io = storage.nvme._full_io


def slow_io(fn, fd, views, offset, total):  # ~100 MB/s per request: 1000x below the profile's disk
    time.sleep(total / 100e6)
    return full_io(fn, fd, views, offset, total)


storage.nvme._full_io = slow_io
shape = TransformerShape(n_layer=3, d_model=128, n_head=4, d_ff=512, vocab=256, n_pos=32, bias=True,
                         norm="layernorm", tied=True)
torch.manual_seed(0)
model = build_transformer(shape, device="cpu")
model, opt = offload.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
autoplan.from_config(model, offload.config_from_env())  # what offload.wrap will do; the same Replanner then
gen = torch.Generator().manual_seed(1)
for _ in range(8):
    idx = torch.randint(0, shape.vocab, (4, 17), generator=gen)
    logits = model(idx[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, shape.vocab), idx[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad()
"""


@pytest.mark.slow
def test_offload_run_set_replan_switches_and_reports_why(tmp_path):
    """`offload run --set replan=true --set profile=fast.json`: the config reaches the script, the re-planner sees
    the disk run far below the profile and switches after warm-up + patience (iteration 4), and the run report
    (text printed by the launcher, and report.json) says when, why, old -> new and the predicted times. The device
    budget holds the whole model: whichever plan the measured rates favour, the runtime can run it."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    (tmp_path / "store").mkdir()
    prof = fast_disk_profile(tmp_path / "fast.json")
    sets = ["param_tier=nvme", "state_tier=nvme", f"nvme_dirs={tmp_path / 'store'}", "device_budget_bytes=16MiB",
            "replan=true", f"profile={prof}"]
    cmd = [sys.executable, "-m", "offload.cli", "run", *[a for kv in sets for a in ("--set", kv)],
           "--report", str(tmp_path / "rep"), str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    (switch,) = rep["replans"]
    (decision,) = rep["replan_decisions"]
    assert switch["by"] == "autoplan" and switch["chosen_after"] == 4 and switch["iteration"] == 5
    assert decision["decision"] == "replan" and decision["iteration"] == 4
    assert switch["drifted"] == decision["drifted"] and switch["drifted"]["disk_read_gbps"] < 0.1
    assert switch["old_plan"] == "NNc x4" == decision["old_plan"] and switch["new_plan"] == decision["new_plan"]
    assert "N" not in switch["new_plan"].replace(" x", "")  # off the slow store
    assert switch["predicted_new_s"] < switch["predicted_old_s"]
    assert switch["bytes"]["disk_read"] > 0
    assert "re-plans: 1 applied, 1 decided by autoplan" in out.stderr
    assert f"; re-planning from profile {prof}" in out.stderr.splitlines()[1]  # the launch line says so
    assert "from iteration 5 (autoplan after iteration 4: " in out.stderr
    assert f"disk_read_gbps at {switch['drifted']['disk_read_gbps']:.2g}x" in out.stderr
    assert f"NNc x4 -> {switch['new_plan']}; predicted " in out.stderr
    # Medians of the 3 iterations after the switch (6-8), beside the re-planner's prediction for that plan.
    from offload.report import _ms

    assert rep["medians_since_iteration"] == 6 and rep["median_iterations"] == 3
    assert "per iteration (median of 3 from iteration 6, the plan at the end)" in out.stderr
    assert "predicted (re-planner, for this plan)" in out.stderr
    assert f"{_ms(switch['predicted_new_s']):>8} ms  (measured " in out.stderr


def test_report_of_kept_decisions_and_of_a_history_that_lost_older_switches():
    """From the records alone: a switch chosen by autoplan gets its decision's drift and predictions; a decision
    that kept the plan is listed with its reason; when the history (the last 1000 iterations) no longer holds an
    earlier switch, the first old placement it holds is the decision's, or unknown ("?"), never a wrong one."""
    from types import SimpleNamespace

    from offload.report import _replans_text, replans_of

    kept = {"iteration": 1500, "decision": "kept", "why": "predicted gain below min_gain (0.05)",
            "drifted": {"h2d_gbps": 0.7}, "old_s": 0.2, "new_s": 0.195, "old_plan": "HHc x4", "new_plan": "HHc x4"}
    chose = {"iteration": 1800, "decision": "replan", "why": None, "drifted": {"disk_read_gbps": 0.5},
             "old_s": 0.3, "new_s": 0.2, "old_plan": "HHc x4", "new_plan": "DHc x1 | HHc x3"}
    w = workload_of(SHAPE, batch=1, seq=1)
    rp = Replanner(w, profile.resolve("cpu-dev-2core"), uniform(w, UnitPlacement(H, H, "cpu"), "config"))
    rp.log = [kept, chose]  # what it would have logged over a long run

    def observe(record):
        return None

    observe.replanner = rp
    moved = {"h2d": 10, "d2h": 0, "disk_read": 0, "disk_write": 0}
    rt = SimpleNamespace(units=[], on_iteration=[observe], stats={"replans": 3}, history=[
        {"iteration": 1700, "replan": {"plan": "HHc x4", "units_moved": ["blocks.0"], "bytes": moved, "s": 0.01}},
        {"iteration": 1801, "replan": {"plan": "DHc x1 | HHc x3", "units_moved": ["rest"], "bytes": moved,
                                       "s": 0.02, "requested_after": 1800}}])
    out = replans_of(rt)
    assert [e["old_plan"] for e in out["replans"]] == [None, "HHc x4"]
    assert out["replans"][1]["by"] == "autoplan" and out["replans"][1]["predicted_new_s"] == 0.2
    assert out["replan_decisions"] == [kept, chose]
    text = "\n".join(_replans_text(out))
    assert "re-plans: 2 applied, 2 decided by autoplan" in text
    assert "    ? -> HHc x4; 1 units moved (h2d 10 B) in 10 ms" in text
    assert "from iteration 1801 (autoplan after iteration 1800: disk_read_gbps at 0.5x of the profile)" in text
    assert "HHc x4 -> DHc x1 | HHc x3; predicted 300 -> 200 ms per iteration" in text
    assert "kept the plan after iteration 1500 (predicted gain below min_gain (0.05))" in text
