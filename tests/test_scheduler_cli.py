"""`offload plan`: the 70B dry run is fast and small, its memory totals match a hand count, it writes its files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from offload.cli import main

GiB = 1 << 30
ARGS_70B = ["plan", "llama-70b", "--batch", "4", "--seq", "2048", "--profile", "rtx4090-pcie4-gen4nvme",
            "--device-memory", "24GiB", "--host-memory", "128GiB", "--nvme", "2TB"]


def test_plan_70b_under_5s_and_1gib(tmp_path):
    cmd = [sys.executable, "-c", "import sys; from offload.cli import main; sys.exit(main(sys.argv[1:]))",
           *ARGS_70B, "--json"]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        p = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True)
        # This child's own peak RSS (wait4), not RUSAGE_CHILDREN's: that is the largest of every child this test
        # session has waited for, so an earlier test's subprocess would count.
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall_s = time.perf_counter() - t0
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    rss_bytes = usage.ru_maxrss * 1024  # Linux reports KiB
    assert p.returncode == 0, stderr
    # The < 5 s half of the bar is a timing: printed here (pytest -s), never asserted (a loaded machine would fail
    # it). Measured: see the issue note.
    print(f"offload plan llama-70b: {wall_s:.2f} s wall, peak RSS {rss_bytes / GiB:.2f} GiB")
    assert rss_bytes < GiB, f"offload plan llama-70b peaked at {rss_bytes / GiB:.2f} GiB"
    out = json.loads(stdout)
    assert out["fits"] and out["params"] == 68_976_648_192

    # Memory totals by hand, from the placement it printed. Llama-2-70B: block = 2*8192^2 (q, o) + 2*8192*1024
    # (k, v: 8 kv heads) + 3*8192*28672 (SwiGLU) + 2*8192 (norms); rest = 2*32000*8192 (embed, head) + 8192.
    block, rest = 855_654_400, 524_296_192
    assert [u["kind"] for u in out["workload"]["units"]].count("block") == 80
    units = out["plan"]["units"]
    k = out["plan"]["prefetch_depth"]
    sizes = [rest] + [block] * 80
    pb = [2 * n for n in sizes]
    sb = [12 * n for n in sizes]
    # activations, batch 4 x seq 2048: kept inputs 2*2048*4*8192 for 80 blocks + rest; plus the largest working
    # set, a block's 2048*4*(18*8192 + 4*28672*1.5)
    acts = 81 * 2 * 2048 * 4 * 8192 + 2048 * 4 * (18 * 8192 + 6 * 28672)
    streamed = any(u["params"] != "device" for u in units[1:])
    device = (sum(pb[i] for i, u in enumerate(units) if u["params"] == "device")
              + ((k + 1) * 2 * block if streamed else 0)
              + sum(sb[i] for i, u in enumerate(units) if u["state"] == "device")
              + 2 * rest + 2 * (2 * block)  # rest grads + 2 rotating block grad buffers (bf16)
              + (4 * 12 * block if any(u["update"] == "device" and u["state"] != "device" for u in units[1:]) else 0)
              + acts)
    cpu_grads = [2 * sizes[i] for i, u in enumerate(units) if u["update"] == "cpu"]
    host = (sum(pb[i] for i, u in enumerate(units) if u["params"] == "host")
            + sum(sb[i] for i, u in enumerate(units) if u["state"] == "host")
            + 2 * max(cpu_grads, default=0)
            + (k + 1) * max((pb[i] for i, u in enumerate(units) if u["params"] == "nvme"), default=0)
            + 4 * max((sb[i] for i, u in enumerate(units) if u["state"] == "nvme"), default=0))
    nv = [pb[i] for i, u in enumerate(units) if u["params"] == "nvme"] + \
         [sb[i] for i, u in enumerate(units) if u["state"] == "nvme"]
    nvme = sum(nv) + 4 * max(nv, default=0)
    assert out["memory_bytes"] == {"device": device, "host": host, "nvme": nvme}
    assert device <= 24 * GiB and host <= 128 * GiB and nvme <= 2 * 10**12
    assert out["iteration_s"] >= out["lower_bound_s"] > 0
    assert {r["strategy"] for r in out["strategies"]} >= {"no offload", "ZeRO-Offload", "ZeRO-Infinity", "Fuyou",
                                                          "ours"}


def test_plan_text_and_files(tmp_path, capsys):
    assert main(["plan", "gpt2", "--batch", "2", "--seq", "256", "--profile", "cpu-dev-2core", "--device-memory",
                 "700MiB", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for needle in ("FITS", "memory per tier", "placement", "bytes per iteration", "predicted iteration",
                   "tokens/s", "TFLOP/s", "bottleneck", "lower bound", "ZeRO-Infinity"):
        assert needle in text
    trace = json.loads((tmp_path / "trace.json").read_text())
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert xs and all(e["dur"] >= 0 and "tid" in e for e in xs)
    assert (tmp_path / "timeline.svg").read_text().startswith("<svg")
    assert json.loads((tmp_path / "plan.json").read_text())["plan"]["strategy"] == "ours"


def test_plan_that_cannot_fit_exits_1_and_says_what_to_change(capsys):
    assert main([*ARGS_70B[:-6], "--device-memory", "2GiB", "--host-memory", "128GiB", "--nvme", "2TB"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT: device memory is short by" in out and ("--batch" in out or "--device-memory" in out)


def test_bad_input_errors(capsys):
    assert main(["plan", "no-such-model"]) == 2
    assert "expected a preset" in capsys.readouterr().err
