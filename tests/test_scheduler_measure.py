"""Predicted vs measured (offload/measure.py): the config <-> plan seam, the cost model's bytes against the runtime's
and the store's counters, and `offload plan --measure`. Tiny models: no timing is asserted."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from offload import OffloadConfig, cli
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
    c = measure(SHAPE, cfg, profile.resolve("cpu-dev-2core"), batch=2, seq=8, iters=2, warmup=1, quiet=False)
    assert c.bytes_equal, c.text()
    assert c.bytes_counted["disk_read"] == c.bytes_counted["disk_read_counted_by_runtime"]
    assert c.bytes_counted["disk_write"] == c.bytes_counted["disk_write_counted_by_runtime"]
    assert c.bytes_counted["h2d"] > 0 and c.bytes_counted["d2h"] > 0
    assert (c.bytes_counted["disk_read"] > 0) == (Tier.NVME in (cfg.param_tier, cfg.state_tier))
    assert c.measured_s > 0 and len(c.iterations_s) == 2
    assert c.busy_measured_s["compute"] > 0 and c.busy_measured_s["cpu_update"] > 0
    assert set(c.busy_predicted_s) == set(c.busy_measured_s)


def test_disturbed_iterations_are_set_aside_and_replaced(tmp_path, monkeypatch):
    """An iteration the machine disturbed does not count; another is run in its place, up to 4 x iters; when
    none is clean, all count and the comparison says so."""
    import offload.measure as m

    verdicts = iter(["others used 40% of the CPU", None, "the CPU ran 1.50x slower than its best", None])
    monkeypatch.setattr(m.Quiet, "judge", lambda self, rec: next(verdicts))
    cfg = OffloadConfig(nvme_dirs=str(tmp_path))
    lines = []
    c = measure(SHAPE, cfg, profile.resolve("cpu-dev-2core"), batch=2, seq=8, iters=2, warmup=1, progress=lines.append)
    assert (c.set_aside, c.disturbed, len(c.iterations_s)) == (2, False, 2)
    assert sum("set aside: others used 40% of the CPU" in x for x in lines) == 1, lines
    assert "2 disturbed iterations set aside" in c.text()

    monkeypatch.setattr(m.Quiet, "judge", lambda self, rec: "others used 90% of the CPU")
    c = measure(SHAPE, cfg, profile.resolve("cpu-dev-2core"), batch=2, seq=8, iters=1, warmup=0)
    assert (c.set_aside, c.disturbed, len(c.iterations_s)) == (0, True, 4)  # 4 x iters tried, none clean: all count
    assert "every iteration was disturbed" in c.text()


def test_quiet_judges_foreign_cpu_and_a_slow_canary():
    from offload.measure import CANARY_SLACK, FOREIGN_MAX, Quiet

    q = Quiet()
    q.best_s = q.last_s = 0.1
    assert q.judge({"foreign_cpu": FOREIGN_MAX / 2}) is None
    assert q.judge({"foreign_cpu": None}) is None  # /proc/stat unreadable: the canary alone decides
    assert q.judge({"foreign_cpu": 0.5}) == "others used 50% of the CPU"
    q.last_s = 0.1 * CANARY_SLACK * 1.2
    rec = {"foreign_cpu": 0.0}
    assert q.judge(rec) == "the CPU ran 1.50x slower than its best" and rec["canary_s"] == q.last_s


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


def test_a_clipping_row_is_measured_in_a_process_of_its_own(tmp_path):
    """`--measure --clip` runs each row in a fresh process (a run after another in one process pays page faults
    for the memory the first freed, on this VM): the row's inputs travel there and its figures come back."""
    assert cli._in_own_process(os.getpid) != os.getpid()
    w = workload_of(SHAPE, batch=2, seq=8)
    cfg = OffloadConfig(nvme_dirs=str(tmp_path), max_grad_norm=1e6, param_tier="nvme", state_tier="nvme")
    row = cli._in_own_process(cli._clip_row, SHAPE, cfg, profile.resolve("cpu-dev-2core").to_dict(),
                              config_to_plan(cfg, w), False, dict(batch=2, seq=8, iters=1, warmup=1, name="tiny"))
    assert row["measured_s"] > 0 and row["set_aside"] >= 0 and row["disturbed"] in (True, False)


@pytest.mark.parametrize("speculates", [True, False])
def test_plan_measure_clip_runs_the_policy_its_price_chooses(speculates, tmp_path, monkeypatch, capsys):
    """`--measure --clip`: steps that do not clip speculate only where the price says committing beats waiting
    (else they wait, as `offload plan --clip` advises), each row against the matching price; steps that clip are
    priced as waiting. The runs themselves say which policy ran (the optimizer's counters)."""
    import offload.measure as m
    from scheduler import speculation

    mod = tmp_path / "tinyclip.py"
    mod.write_text("from scheduler.workload import TransformerShape, build_transformer\n"
                   f"def make():\n    return build_transformer({SHAPE!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = speculation.price

    def price(cm, plan, p=0.0):  # the decision forced either way, the figures the model's own
        c = real(cm, plan, p)
        return dataclasses.replace(c, speculates=speculates if p == 0.0 else c.speculates)
    monkeypatch.setattr(speculation, "price", price)
    ran, timed = [], []
    measure = m.measure

    def recording(*a, prepare=None, **k):
        ran.append(a[1].speculate)

        def then_record(run):
            if prepare is not None:
                prepare(run)
            timed.append(run.opt.speculation.timed)
        return measure(*a, **k, prepare=then_record)
    monkeypatch.setattr(m, "measure", recording)
    monkeypatch.setattr(cli, "_in_own_process", lambda fn, *a: fn(*a))  # rows in this process: recorded here
    assert main(["plan", "tinyclip:make", "--batch", "2", "--seq", "8", "--profile", "cpu-dev-2core", "--measure",
                 "--clip", "--iters", "1", "--json", "--dir", str(tmp_path / "store")]) == 0
    rows = json.loads(capsys.readouterr().out)["clipping"]
    assert ran[1:] == [speculates, speculates]  # the plan's own run first, speculate at its default
    assert timed[1:] == [False, False]  # each clipping row measures its own kind of step: no timing exploration
    never, always = rows
    assert never["speculate"] is always["speculate"] is speculates
    assert never["how"].startswith("speculative, committed" if speculates else "waiting for backward")
    assert always["how"].startswith("waiting for backward")
    assert all(r["measured_s"] > 0 and r["ratio"] == pytest.approx(r["predicted_s"] / r["measured_s"]) for r in rows)


def test_measurements_run_with_subnormals_flushed():
    """A measured run flushes subnormal floats (scheduler.probe.flush_denormals says why: a data effect the cost
    model cannot price, 3.5x on plain PyTorch's step here); training itself is left as torch has it."""
    import subprocess
    import sys

    code = ("import torch\n"
            "from offload.measure import Run, workload_of\n"
            "from offload import OffloadConfig\n"
            "from scheduler.workload import TransformerShape\n"
            "tiny = torch.tensor([1e-39]) * 1.0\n"  # subnormal, kept
            "assert tiny.item() != 0.0, tiny\n"
            f"r = Run({SHAPE!r}, OffloadConfig(), batch=2, seq=8)\n"
            "assert (torch.tensor([1e-39]) * 1.0).item() == 0.0\n"
            "r.close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
