"""What people watch while a run goes (offload/report.py): each step's line in metrics.jsonl and TensorBoard, the
progress line of a resumed run, and one report summed over the ranks of a multi-rank run. In-process and quick;
the same through `offload run` is in tests/test_launcher.py."""

from __future__ import annotations

import gc
import io
import json
import sys
import types

import pytest
import torch

from helpers import gpt, lm_loss, token_batches
from offload import OffloadConfig, OffloadOptimizer, RunReport, wrap
from offload import report as report_mod
from offload.report import REPORT_DIR_ENV, MetricsLog, merge_rank_reports, moved_bytes, runtime_of, summary_text

LINE_KEYS = {"step", "time", "loss", "tokens", "tokens_per_s", "step_s", "bytes_moved", "held_bytes"}


@pytest.fixture(autouse=True)
def collect():
    """Wrapped models hold pool slabs and hook cycles: collected here, not left to raise later tests' RSS."""
    gc.collect()
    yield
    gc.collect()


@pytest.fixture
def no_tensorboard(monkeypatch):
    """``import torch.utils.tensorboard`` fails, as where tensorboard is not installed (a None entry in
    sys.modules makes the import raise ImportError), whether or not it is installed here."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def all_on_nvme(store):
    store.mkdir(parents=True, exist_ok=True)
    model = gpt()
    return wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2), OffloadConfig(
        param_tier="nvme", grad_tier="nvme", state_tier="nvme", nvme_dirs=str(store), prefetch=1))


def train(model, opt, batches, report=None, after_step=None):
    for i, idx in enumerate(batches):
        loss = lm_loss(model, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if report is not None:
            report.step(loss.item(), tokens=idx[:, 1:].numel())
        if after_step is not None:
            after_step(i + 1)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


# -- metrics.jsonl ---------------------------------------------------------------------------------------------------
def test_each_step_is_one_line_written_as_it_ends(tmp_path, no_tensorboard):
    """One line per step, in the file when the step returns (a killed run keeps it); its bytes are that step's, so
    the lines add up to what the run moved after the report was made; its loss is the one the report recorded."""
    model, opt = all_on_nvme(tmp_path / "store")
    rt = runtime_of(model)
    before = moved_bytes(rt, rt.optimizer)  # wrap moved the weights to the store: before the first step
    out = tmp_path / "run"
    report = RunReport(model, opt, total_steps=4, progress=False, metrics_dir=out)
    seen = []
    train(model, opt, token_batches(4, 96), report, after_step=lambda n: seen.append(len(lines(out / "metrics.jsonl"))))
    assert seen == [1, 2, 3, 4]
    got = lines(report.metrics_file)
    assert report.metrics_file == out / "metrics.jsonl"
    assert [x["step"] for x in got] == [1, 2, 3, 4]
    assert all(set(x) == LINE_KEYS for x in got)
    assert [x["loss"] for x in got] == report.losses and [x["tokens"] for x in got] == report.tokens
    assert [x["step_s"] for x in got] == report.step_s
    assert all(x["tokens_per_s"] == x["tokens"] / x["step_s"] for x in got)
    after = moved_bytes(rt, rt.optimizer)
    for link in ("h2d", "d2h", "disk_read", "disk_write"):
        assert sum(x["bytes_moved"][link] for x in got) == after[link] - before[link], link
    assert all(x["bytes_moved"]["disk_read"] > 0 and x["bytes_moved"]["disk_write"] > 0 for x in got)
    assert all(x["held_bytes"]["nvme"] > 0 for x in got)  # params and state live in the store
    rt.settle_step_io()
    held = report.held_bytes()  # the last step's writes have landed: their buffers are back in the pool
    assert {t: got[-1]["held_bytes"][t] for t in ("device", "nvme")} == {t: held[t] for t in ("device", "nvme")}
    assert got[-1]["held_bytes"]["host"] >= held["host"]
    assert not (out / "tensorboard").exists()  # no tensorboard: the file alone, no error
    rt.close()


def test_no_metrics_file_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(REPORT_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    report = RunReport(progress=False)
    report.step(1.0, tokens=4)
    assert report.metrics_dir is None and report.metrics_file is None and not list(tmp_path.iterdir())


def test_tensorboard_scalars_when_it_is_installed(tmp_path, monkeypatch):
    """A stand-in for torch.utils.tensorboard records what the log writes: every number of each line, at its step,
    flushed each step; a resumed run purges the steps after its start (TensorBoard's purge_step)."""
    writers = []

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir, self.purge_step, self.events, self.closed = log_dir, purge_step, [], False
            writers.append(self)

        def add_scalar(self, tag, value, global_step):
            self.events.append((tag, value, global_step))

        def flush(self):
            self.events.append("flush")

        def close(self):
            self.closed = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    report = RunReport(total_steps=6, start_step=4, progress=False, metrics_dir=tmp_path)
    report.step(2.5, tokens=10)
    report.step(2.0, tokens=10)
    (w,) = writers
    assert w.log_dir == str(tmp_path / "tensorboard") and w.purge_step == 5
    got = lines(tmp_path / "metrics.jsonl")
    want = []
    for line in got:
        want += [("loss", line["loss"], line["step"]), ("tokens_per_s", line["tokens_per_s"], line["step"]),
                 ("step_s", line["step_s"], line["step"])]
        want += [(f"bytes_moved/{k}", 0, line["step"]) for k in ("h2d", "d2h", "disk_read", "disk_write")]
        want += [(f"held_bytes/{k}", 0, line["step"]) for k in ("device", "host", "nvme")]
        want.append("flush")
    assert w.events == want and [x["step"] for x in got] == [5, 6]
    report._metrics.close()
    assert w.closed


def test_tensorboard_event_files(tmp_path):
    """With tensorboard installed: the scalars are in the event file, read back by tensorboard itself."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = RunReport(total_steps=2, progress=False, metrics_dir=tmp_path)
    report.step(3.0, tokens=8)
    report.step(2.0, tokens=8)
    report._metrics.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 3.0), (2, 2.0)]
    assert "bytes_moved/disk_read" in acc.Tags()["scalars"]


def test_under_offload_run_iterations_are_lines_without_a_run_report(tmp_path, monkeypatch, no_tensorboard):
    """A script that only wraps its model (no RunReport) still gets a line per iteration from the runtime's
    history; one that makes a RunReport gets exactly one line per step, the report's, with its loss."""
    monkeypatch.setenv(REPORT_DIR_ENV, str(tmp_path / "rep"))
    monkeypatch.setattr(report_mod, "_at_exit", {})  # the exit handler finds the variable unset at exit: no-op
    model, opt = all_on_nvme(tmp_path / "s1")
    rt = runtime_of(model)
    train(model, opt, token_batches(3, 96))
    got = lines(tmp_path / "rep" / "metrics.jsonl")
    assert [x["step"] for x in got] == [1, 2, 3] and all(set(x) == LINE_KEYS for x in got)
    assert [x["step_s"] for x in got] == [h["wall_s"] for h in rt.history]
    assert all(x["loss"] is None for x in got) and all(x["bytes_moved"]["disk_read"] > 0 for x in got)
    rt.close()

    model, opt = all_on_nvme(tmp_path / "s2")
    report = RunReport(model, opt, total_steps=3, progress=False)
    train(model, opt, token_batches(3, 96), report)
    got = lines(tmp_path / "rep" / "metrics.jsonl")
    assert [x["step"] for x in got] == [1, 2, 3] and [x["loss"] for x in got] == report.losses
    runtime_of(model).close()


# -- a resumed run ---------------------------------------------------------------------------------------------------
class Tty(io.StringIO):
    def isatty(self):
        return False


def test_resumed_run_counts_from_its_start_step(tmp_path, no_tensorboard):
    """Resumed at step 20 of 40: the progress line shows 21/40 .. 40/40, the report says which steps ran, and
    metrics.jsonl keeps the lines of steps 1-20 (a killed run had written up to 23) and goes on from 21."""
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 24):
            f.write(json.dumps({"step": step, "loss": float(step)}) + "\n")
        f.write('{"step": 24, "lo')  # the line the kill cut short
    stream = Tty()
    report = RunReport(total_steps=40, start_step=20, stream=stream, min_interval_s=0, name="resumed",
                       metrics_dir=tmp_path)
    for step in range(20, 40):
        report.step(100.0 + step, tokens=4)
    drawn = [line.split(" | ")[0] for line in stream.getvalue().splitlines()]
    assert drawn == [f"step {n}/40" for n in range(21, 41)]
    assert stream.getvalue().splitlines()[-1].endswith("0s left")
    s = report.summary()
    assert (s["steps"], s["start_step"], s["total_steps"]) == (20, 20, 40)
    assert report.text().startswith("== resumed: 20 steps (21-40 of 40, resumed at step 20) in ")
    got = lines(tmp_path / "metrics.jsonl")
    assert [x["step"] for x in got] == list(range(1, 41))
    assert [x["loss"] for x in got[:20]] == [float(n) for n in range(1, 21)]  # the earlier run's
    assert [x["loss"] for x in got[20:]] == [100.0 + n for n in range(20, 40)]  # this one's


def test_a_fresh_run_starts_the_file_again(tmp_path, no_tensorboard):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    report = RunReport(total_steps=1, progress=False, metrics_dir=tmp_path)
    report.step(1.0)
    assert [x["loss"] for x in lines(tmp_path / "metrics.jsonl")] == [1.0]


def test_start_step_out_of_range_is_named():
    with pytest.raises(ValueError, match="expected start_step >= 0"):
        RunReport(start_step=-1, progress=False)
    with pytest.raises(ValueError, match="start_step 50 is past total_steps 40; total_steps counts the whole run"):
        RunReport(total_steps=40, start_step=50, progress=False)


# -- several ranks: one report summed over them ---------------------------------------------------------------------
def rank_run(tmp_path, rank, steps, monkeypatch):
    """What one rank's exit handler leaves: an OffloadOptimizer with its state on NVMe (several subgroups, fewer
    buffers, so that state moves every step), trained ``steps`` steps, its summary as report.rank<N>.json."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(3 + rank)])
    (tmp_path / f"store{rank}").mkdir()
    opt = OffloadOptimizer(torch.optim.AdamW(model.parameters()), config=OffloadConfig(
        state_tier="nvme", nvme_dirs=str(tmp_path / f"store{rank}"), subgroup_numel=4096, buffers=2))
    report = RunReport(model, opt, progress=False, name="ddp", metrics_dir=tmp_path / "rep")
    for i in range(steps):
        model(torch.randn(4, 64, generator=torch.Generator().manual_seed(i))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        report.step(float(rank), tokens=8)
    written = report.save_rank(tmp_path / "rep", rank)
    assert [p.name for p in written] == [f"report.rank{rank}.json"]  # no runtime: no trace to write
    s = report.summary()
    opt.close()
    return s


def test_merged_report_sums_the_ranks(tmp_path, monkeypatch, no_tensorboard):
    ranks = [rank_run(tmp_path, r, 2 + r, monkeypatch) for r in range(2)]
    assert all(s["bytes_moved"]["disk_write"] > 0 for s in ranks)
    assert ranks[0]["bytes_moved"] != ranks[1]["bytes_moved"]  # so that a sum is told from either rank
    paths = merge_rank_reports(tmp_path / "rep", 2)
    assert [p.name for p in paths] == ["report.json", "report.txt"]
    m = json.loads(paths[0].read_text())
    assert m["ranks"] == 2 and "ranks_missing" not in m
    for key in ("bytes_moved", "held_bytes"):
        assert m[key] == {k: ranks[0][key][k] + ranks[1][key][k] for k in ranks[0][key]}, key
    state = [s["optimizer"]["state_bytes_by_tier"]["nvme"] for s in ranks]
    assert m["optimizer"]["state_bytes_by_tier"] == {"nvme": sum(state)}
    assert [r["bytes_moved"] for r in m["per_rank"]] == [s["bytes_moved"] for s in ranks]
    assert m["losses"] == ranks[0]["losses"] and m["steps"] == 2  # rank 0's own figures
    assert m["tokens"] == 16 + 24
    text = paths[1].read_text()
    assert text.startswith("== ddp: 2 steps, 2 ranks in ")
    assert f"bytes moved (2 ranks together): h2d 0 B, d2h 0 B, disk read " in text
    assert "  rank 0: moved disk read" in text and "  rank 1: moved disk read" in text
    # each rank's metrics file: rank 0 the usual name, the others their own, each line saying whose it is
    got = {r: lines(tmp_path / "rep" / name) for r, name in ((0, "metrics.jsonl"), (1, "metrics.rank1.jsonl"))}
    assert {r: [(x["rank"], x["step"]) for x in v] for r, v in got.items()} == {0: [(0, 1), (0, 2)],
                                                                              1: [(1, 1), (1, 2), (1, 3)]}


def test_merged_report_names_a_rank_that_wrote_none(tmp_path, monkeypatch, no_tensorboard):
    rank0 = rank_run(tmp_path, 0, 2, monkeypatch)
    m = json.loads(merge_rank_reports(tmp_path / "rep", 2)[0].read_text())
    assert m["ranks_missing"] == [1] and m["bytes_moved"] == rank0["bytes_moved"]
    assert "no report from rank 1 (it did not exit normally): the sums above leave it out" in summary_text(m)
    assert merge_rank_reports(tmp_path / "nothing", 2) == []


def test_metrics_log_opens_per_rank(tmp_path, monkeypatch, no_tensorboard):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    log = MetricsLog.open(tmp_path)
    assert log.path == tmp_path / "metrics.rank3.jsonl"
    log.write({"step": 1, "loss": None, "bytes_moved": {}, "held_bytes": {}})
    assert lines(log.path)[0]["rank"] == 3
