"""`offload demo` and `offload run`, run as a user runs them: separate processes, real stores, real reports."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from storage import format_bytes

ROOT = Path(__file__).resolve().parent.parent
OFFLOAD = [sys.executable, "-m", "offload.cli"]
pytestmark = pytest.mark.slow  # every test here starts other processes


def run(args, cwd, timeout=240):
    return subprocess.run(OFFLOAD + args, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_demo_loss_falls_and_reports(tmp_path):
    out = run(["demo", "--steps", "40", "--layers", "2", "--width", "64", "--batch", "8", "--seq", "64",
               "--out", str(tmp_path / "report"), "--nvme", str(tmp_path)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    assert rep["steps"] == 40 and len(rep["losses"]) == 40
    assert rep["loss_last"] < rep["loss_first"] - 0.5, (rep["loss_first"], rep["loss_last"])
    assert rep["placement"] == {"params": "nvme", "grads": "nvme", "state": "nvme", "overlap_update": True,
                                "units": 3}
    # Everything went through the store: params fetched every iteration, state read and written every step.
    moved = rep["bytes_moved_by_what"]
    assert moved["params+grads"]["disk_read"] > 0 and moved["params+grads"]["disk_write"] > 0
    assert moved["optimizer state"]["disk_read"] > 0 and moved["optimizer state"]["disk_write"] > 0
    assert rep["device_peak_bytes"] <= rep["device_budget_bytes"]
    # The overlap efficiency is the report's own arithmetic (median iteration over the busiest resource's median),
    # not a speed to check on a shared machine: check that it is what the report says it is.
    busy = rep["busy_s_median"]
    assert busy["compute"] > 0
    assert rep["overlap_efficiency"] == pytest.approx(rep["iteration_s_median"] / max(busy.values()))
    trace = json.loads((tmp_path / "report" / "trace.json").read_text())
    assert any(e.get("name", "").startswith("update") for e in trace["traceEvents"])
    assert "loss" in out.stdout and "overlap efficiency" in out.stdout


def test_run_script_with_config(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    cfg = tmp_path / "offload.toml"
    cfg.write_text(f'param_tier = "nvme"\ngrad_tier = "host"\nstate_tier = "nvme"\nnvme_dirs = "{store}"\n')
    out = run(["run", "--config", str(cfg), "--set", "prefetch=2", "--report", str(tmp_path / "rep"),
               str(ROOT / "examples" / "finetune_gpt.py"), "--steps", "4", "--batch", "2", "--seq", "32"],
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "plan: 5 units" in out.stderr and "grads: on host" in out.stderr  # the plan, before training
    assert "== finetune_gpt: 4 steps" in out.stderr  # the report, after
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["placement"]["params"] == "nvme" and rep["placement"]["grads"] == "host"
    assert rep["steps"] == 4
    assert any(store.iterdir()), "the launcher's store directory was not used"


def test_run_refuses_bad_config_before_starting(tmp_path):
    marker = tmp_path / "ran"
    script = tmp_path / "s.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    out = run(["run", "--set", "stat_tier=nvme", str(script)], cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "unknown key 'stat_tier'" in out.stderr and "did you mean 'state_tier'" in out.stderr
    out = run(["run", "--set", "state_tier=nvme", "--set", f"nvme_dirs={tmp_path / 'nope'}", str(script)],
              cwd=tmp_path)
    assert out.returncode == 2 and "no such directory" in out.stderr and "mkdir -p" in out.stderr
    assert not marker.exists()


def test_run_passes_exit_status_and_says_when_nothing_was_wrapped(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import sys\nsys.exit(int(sys.argv[1]))\n")
    out = run(["run", str(script), "3"], cwd=tmp_path)
    assert out.returncode == 3
    out = run(["run", str(script), "0"], cwd=tmp_path)
    assert out.returncode == 0 and "never wrapped a model" in out.stderr


def test_demo_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    """Ctrl-C in the middle of the demo finishes the step, saves a checkpoint and exits (130); resuming from it
    gives, step for step, the same losses as a run never stopped: weights, AdamW state on NVMe, LR schedule,
    data position all came back."""
    import signal

    common = ["demo", "--steps", "40", "--layers", "2", "--width", "64", "--batch", "4", "--seq", "32"]
    full = run(common + ["--out", str(tmp_path / "full"), "--nvme", str(tmp_path)], cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    want = json.loads((tmp_path / "full" / "report.json").read_text())["losses"]

    ck = tmp_path / "ck"
    proc = subprocess.Popen(OFFLOAD + common + ["--checkpoint", str(ck), "--out", str(tmp_path / "a"), "--nvme",
                                                str(tmp_path)], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    # Reading stderr line by line has no timeout: a run that hangs silently is killed, which ends the loop.
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        for line in proc.stderr:  # progress lines: interrupt once training is under way
            if line.startswith("step 1/"):  # drawn at once; the signal lands a few steps later
                proc.send_signal(signal.SIGINT)
                break
        else:
            raise AssertionError("no progress line")
        rest, _ = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 130, rest
    meta = json.loads((ck / "manifest.json").read_text())
    stopped = meta["step"]
    assert 1 <= stopped < 40, stopped
    resumed = run(common + ["--checkpoint", str(ck), "--resume", "--out", str(tmp_path / "b"), "--nvme",
                            str(tmp_path)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {ck} at step {stopped}" in resumed.stdout
    got = json.loads((tmp_path / "b" / "report.json").read_text())["losses"]
    assert got == want[stopped:]
    bad = run(common[:2] + ["41"] + common[3:] + ["--checkpoint", str(ck), "--resume", "--nvme", str(tmp_path)],
              cwd=tmp_path)
    assert bad.returncode != 0 and "made with --steps 40" in bad.stderr


def test_run_nproc_2_each_rank_its_own_store(tmp_path):
    """`offload run --nproc 2` starts two ranks through torchrun; each keeps its shard of the state in its own
    directory under the configured one. The report printed at the end sums the ranks' bytes (each rank's own
    beside the sum), and names only the files this run wrote: a stale trace.json is removed, not named."""
    store, rep = tmp_path / "store", tmp_path / "rep"
    store.mkdir()
    rep.mkdir()
    (rep / "trace.json").write_text("{}")  # an earlier run's
    # Small subgroups, so that each rank's state streams through the store every step.
    out = run(["run", "--nproc", "2", "--set", "state_tier=nvme", "--set", f"nvme_dirs={store}", "--set",
               "subgroup_numel=65536", "--report", str(rep), str(ROOT / "examples" / "finetune_ddp.py"), "--steps",
               "2"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 0: owns" in out.stdout and "rank 1: owns" in out.stdout
    assert sorted(p.name for p in store.iterdir()) == ["rank0", "rank1"]
    assert all(any((store / r).iterdir()) for r in ("rank0", "rank1"))
    assert "== finetune_ddp.py: 2 steps, 2 ranks ==" in out.stderr
    m = json.loads((rep / "report.json").read_text())
    ranks = [json.loads((rep / f"report.rank{r}.json").read_text()) for r in range(2)]
    for key in ("bytes_moved", "held_bytes"):
        assert m[key] == {k: ranks[0][key][k] + ranks[1][key][k] for k in m[key]}, key
    assert all(r["bytes_moved"]["disk_read"] > 0 and r["bytes_moved"]["disk_write"] > 0 for r in ranks)
    assert all(r["held_bytes"]["nvme"] > 0 for r in ranks)
    assert f"disk write {format_bytes(m['bytes_moved']['disk_write'])}" in out.stderr
    assert not (rep / "trace.json").exists()  # no wrapped model: no timeline to trace
    assert f"report: {rep}/ (report.txt, report.json, report.rank0.json, report.rank1.json)" in out.stderr


def test_run_resumed_script_counts_from_its_checkpoint(tmp_path):
    """A script resumed at step 2 of 4 under `offload run`: its progress line shows 3/4 and 4/4, its report says
    which steps ran, metrics.jsonl has a line for each as it ran, and the files named are the ones written."""
    ck, rep = tmp_path / "ck", tmp_path / "rep"
    script = [str(ROOT / "examples" / "finetune_gpt.py"), "--batch", "2", "--seq", "32", "--checkpoint", str(ck)]
    first = run(["run", "--report", str(rep), *script, "--steps", "2", "--save-every", "2"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((ck / "manifest.json").read_text())["step"] == 2
    out = run(["run", "--report", str(rep), *script, "--steps", "4", "--resume"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    drawn = [line.split(" | ")[0] for line in out.stderr.splitlines() if line.startswith("step ") and " | " in line]
    assert drawn[0] == "step 3/4" and drawn[-1] == "step 4/4", drawn  # steps between are drawn at most twice a second
    assert "== finetune_gpt: 2 steps (3-4 of 4, resumed at step 2)" in out.stderr
    rep_json = json.loads((rep / "report.json").read_text())
    assert (rep_json["steps"], rep_json["start_step"], rep_json["total_steps"]) == (2, 2, 4)
    lines = [json.loads(x) for x in (rep / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [3, 4] and [x["loss"] for x in lines] == rep_json["losses"]
    assert f"report: {rep}/ (report.txt, report.json, metrics.jsonl; trace.json for https://ui.perfetto.dev)" \
        in out.stderr
