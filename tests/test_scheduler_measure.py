"""Predicted vs measured (offload/measure.py): the config <-> plan seam, the cost model's bytes against the runtime's
and the store's counters, and `offload plan --measure`. Tiny models: no timing is asserted."""

from __future__ import annotations

import dataclasses
import json

import pytest

from offload import OffloadConfig
from offload.cli import main
from offload.measure import RUNNABLE, config_to_plan, measure, plan_to_config, runnable_plan, workload_of
from scheduler import profile
from scheduler.buffers import DEFAULT_GRAD_BUFFERS
from scheduler.cost import LINKS, CostModel
from scheduler.planner import Plan, UnitPlacement
from scheduler.workload import TransformerShape
from storage import Tier

D, H, N = Tier.DEVICE, Tier.HOST, Tier.NVME
# Widths that are not multiples of 16 floats: every tensor of a chunk is padded to 64 bytes, which the bytes must
# account for exactly.
SHAPE = TransformerShape(n_layer=3, d_model=36, n_head=4, d_ff=70, vocab=97, n_pos=16, bias=True, norm="layernorm",
                         tied=True)
FIELDS = ("param_tier", "state_tier", "grad_tier", "prefetch", "buffers", "overlap_update")


def _w():
    return workload_of(SHAPE, batch=2, seq=8)


@pytest.mark.parametrize("fields", [dict(param_tier="host", state_tier="host"),
                                    dict(param_tier="nvme", state_tier="nvme", grad_tier="nvme", prefetch=0,
                                         overlap_update=False, buffers=2),
                                    dict(param_tier="host", state_tier="nvme", prefetch=3)])
def test_config_to_plan_to_config_round_trips(fields, tmp_path):
    cfg = OffloadConfig(nvme_dirs=str(tmp_path), **fields)
    plan = config_to_plan(cfg, _w())
    back = plan_to_config(plan, _w(), nvme_dirs=str(tmp_path))
    assert {f: getattr(back, f) for f in FIELDS} == {f: getattr(cfg, f) for f in FIELDS}
    assert config_to_plan(back, _w()) == plan
    assert plan.units[0].params is cfg.param_tier  # the rest unit too: the runtime fetches it once
    # the runtime without a plan bounds the grads waiting on the device (and NVMe grads waiting for their update)
    assert plan.grad_buffers == DEFAULT_GRAD_BUFFERS


def test_plan_to_config_takes_any_planner_plan(tmp_path):
    w = _w()
    planned = Plan(strategy="ours", units=(UnitPlacement(D, N, "cpu"),) + (UnitPlacement(N, N, "cpu"),) * 3)
    cfg = plan_to_config(planned, w, nvme_dirs=str(tmp_path))  # the rest unit on the device: fetched once instead
    assert (cfg.param_tier, cfg.state_tier, cfg.update_on) == (N, N, "cpu")
    # Mixed: the most common block placement, and wrap(..., plan=mixed) runs the plan unit by unit
    # (tests/test_runtime_plan.py).
    mixed = dataclasses.replace(planned, units=planned.units[:2] + (UnitPlacement(H, N, "cpu"),) * 2)
    cfg = plan_to_config(mixed, w, nvme_dirs=str(tmp_path))
    assert (cfg.param_tier, cfg.state_tier, cfg.update_on, cfg.prefetch) == (H, N, "cpu", mixed.prefetch_depth)
    on_device = Plan(strategy="x", units=(UnitPlacement(D, D, "device"),) * 4)
    cfg = plan_to_config(on_device, w)
    assert (cfg.param_tier, cfg.state_tier, cfg.update_on) == (D, D, "device")
    with pytest.raises(ValueError, match=r"one placement per unit of 'model' \(4\), got 3"):
        plan_to_config(dataclasses.replace(planned, units=planned.units[:3]), w)
    with pytest.raises(NotImplementedError, match="update_on='cpu'"):
        config_to_plan(OffloadConfig(update_on="device"), w)
    with pytest.raises(NotImplementedError, match="accumulation_steps=1"):
        config_to_plan(OffloadConfig(accumulation_steps=2), w)


@pytest.mark.parametrize("fields", [dict(param_tier="host", state_tier="host"),
                                    dict(param_tier="nvme", state_tier="nvme", prefetch=2),
                                    dict(param_tier="nvme", state_tier="host", grad_tier="nvme", prefetch=1,
                                         overlap_update=False),
                                    dict(param_tier="host", state_tier="nvme", grad_tier="nvme", prefetch=0,
                                         overlap_update=False, buffers=2)])
def test_predicted_bytes_per_link_equal_the_counted_bytes(fields, tmp_path):
    """Fetches (the kept tail, the rest unit once), grads, state with and without fp32 masters, new params, grads
    spilled when the step waits for backward: the cost model's accounting against what moved, every iteration."""
    cfg = OffloadConfig(nvme_dirs=str(tmp_path), **fields)
    c = measure(SHAPE, cfg, profile.resolve("cpu-dev-2core"), batch=2, seq=8, iters=2, warmup=1)
    assert c.bytes_equal, c.text()
    assert c.bytes_counted["disk_read"] == c.bytes_counted["disk_read_counted_by_runtime"]
    assert c.bytes_counted["disk_write"] == c.bytes_counted["disk_write_counted_by_runtime"]
    assert c.bytes_counted["h2d"] > 0 and c.bytes_counted["d2h"] > 0
    assert (c.bytes_counted["disk_read"] > 0) == (Tier.NVME in (cfg.param_tier, cfg.state_tier))
    assert c.measured_s > 0 and len(c.iterations_s) == 2
    assert c.busy_measured_s["compute"] > 0 and c.busy_measured_s["cpu_update"] > 0
    assert set(c.busy_predicted_s) == set(c.busy_measured_s)


def test_runnable_plan_is_the_fastest_uniform_placement_wrap_runs():
    w, hw = _w(), profile.resolve("cpu-dev-2core")
    plan, pred = runnable_plan(w, hw, depths=(1, 2))
    cm = CostModel(w, hw)
    assert plan.units[1] in RUNNABLE and len(set(plan.units)) == 1
    for pl in RUNNABLE:
        for k in (1, 2):
            other = dataclasses.replace(plan, units=(pl,) * len(w.units), prefetch_depth=k)
            assert pred.iteration_s <= cm.predict(other).iteration_s * (1 + 1e-9)


def test_plan_measure_prints_predicted_vs_measured(tmp_path, monkeypatch, capsys):
    mod = tmp_path / "tinymeasure.py"
    mod.write_text("from scheduler.workload import TransformerShape, build_transformer\n"
                   f"def make():\n    return build_transformer({SHAPE!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["plan", "tinymeasure:make", "--batch", "2", "--seq", "8", "--profile", "cpu-dev-2core", "--measure",
                 "--iters", "1", "--dir", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "the fastest placement offload.wrap runs" in out
    lines = out.splitlines()
    assert any(ln.split()[:1] == ["iteration"] and ln.count("s ") >= 2 for ln in lines)
    for r in ("compute", "h2d", "d2h", "disk_read", "disk_write", "cpu_update"):
        assert any(ln.split()[:1] == [r] for ln in lines), r
    # The planner's plan may update units on the device: the runtime's d2h then also carries their grads, which
    # the output says in one line (offload/cli.py); every other link's bytes equal the prediction.
    explained = any("exactly the grads of the device-updated units" in ln for ln in lines)
    assert sum(ln.strip().endswith("equal") for ln in lines) == len(LINKS) - explained


def test_plan_measure_bad_input(tmp_path, capsys):
    cfg = tmp_path / "config.json"  # plans fine, but --measure builds our own GPT only
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 32,
                               "vocab_size": 100}))
    assert main(["plan", str(cfg), "--seq", "8", "--measure"]) == 2
    assert "--measure: expected a preset or a module:function returning" in capsys.readouterr().err
    assert main(["plan", "gpt2", "--measure", "--iters", "0"]) == 2
    assert "expected --iters >= 1, got 0" in capsys.readouterr().err
