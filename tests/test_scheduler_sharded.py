"""`offload plan --nproc N` (scheduler/sharded.py): one rank's share of the machine, the runtime's bucket layout, the
collectives ShardedOffloadOptimizer issues (counted in a real 2-rank gloo run), and bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.distributed as dist

import offload.distributed
import offload.optimizer
from offload import OffloadConfig, ShardedOffloadOptimizer
from offload.cli import main
from offload.measure import workload_of
from scheduler import sharded
from scheduler.profile import HardwareProfile, resolve
from scheduler.workload import PRESETS, TransformerShape, build_transformer, preset

SHAPE = TransformerShape(n_layer=2, d_model=64, n_head=4, d_ff=128, vocab=128, n_pos=16, bias=False,
                         norm="layernorm", tied=True)
BUCKET = 64 << 10  # several buckets for SHAPE


def numels(shape=SHAPE):
    return [p.numel() for p in build_transformer(shape).parameters()]


def test_constants_are_the_runtimes():
    """scheduler/ cannot import offload/ (layers): the numbers it mirrors are checked here."""
    assert sharded.SPLIT_ALIGN == offload.optimizer.SPLIT_ALIGN
    assert sharded.SLOT_ALIGN == offload.optimizer.SLOT_ALIGN
    assert sharded.DEFAULT_BUCKET_BYTES == offload.distributed.DEFAULT_BUCKET_BYTES
    cfg = OffloadConfig()
    assert (sharded.DEFAULT_SUBGROUP_NUMEL, sharded.DEFAULT_BUFFERS) == (cfg.subgroup_numel, cfg.buffers)


# -- one process: the CLI is today's, bad input is one line ---------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_nproc_1_is_todays_plan(extra, capsys):
    args = ["plan", "gpt2", "--batch", "2", "--seq", "256", "--profile", "cpu-dev-2core", *extra]
    assert main(args) == 0
    today = capsys.readouterr()
    assert main([*args, "--nproc", "1"]) == 0
    assert capsys.readouterr() == today


@pytest.mark.parametrize("n", ["0", "-3"])
def test_bad_nproc_is_one_line(n, capsys):
    assert main(["plan", "gpt2", "--nproc", n]) == 2
    assert capsys.readouterr().err == f"offload plan: --nproc: expected a number of ranks >= 1, got {n}\n"
    w = preset("gpt2", batch=1, seq=64)
    with pytest.raises(ValueError, match=f"--nproc: expected a number of ranks >= 1, got {n}"):
        sharded.ShardedCost(w, resolve("cpu-dev-2core"), int(n))


# -- per rank ---------------------------------------------------------------------------------------------------------
def test_two_ranks_halve_the_sharded_state_not_the_replicated_params():
    w = preset("gpt2", batch=1, seq=256)
    hw = resolve("cpu-dev-2core")
    ns = numels(PRESETS["gpt2"][0])
    one, two = (sharded.ShardedCost(w, hw, n, numels=ns).predict("host") for n in (1, 2))
    assert one.owned_params == sum(ns)  # one rank owns every element: no padding is a param
    assert abs(two.owned_params / one.owned_params - 0.5) < 1e-3
    for tier in ("host", "nvme"):
        s1, s2 = (sharded.ShardedCost(w, hw, n, numels=ns).predict(tier) for n in (1, 2))
        state = "state" if tier == "host" else "state_staging"
        if tier == "host":
            assert abs(s2.memory["host"][state] / s1.memory["host"][state] - 0.5) < 1e-3
        else:
            assert s2.memory["nvme"]["store"] < 0.51 * s1.memory["nvme"]["store"] + (64 << 20)
    d1, d2 = one.memory["device"], two.memory["device"]
    assert d2["params"] >= d1["params"] and d2["grads"] >= d1["grads"]  # replicated (padding to 1024 x 2 aside)
    assert d2["params"] < d1["params"] * 1.001
    assert abs(d2["grad_shares"] / d1["grad_shares"] - 0.5) < 1e-3
    # Contention: the ranks of one machine split its host, NVMe and (a CPU device) the device.
    for t in ("host", "nvme", "device"):
        assert abs(two.capacity[t] - one.capacity[t] / 2) <= 1, t
    # Each rank computes on one of the 2 cores: at one thread's share of the all-core rate (1 / 1.74 measured).
    assert two.busy_s["compute"] == pytest.approx(one.busy_s["compute"] * hw.cpu_thread_speedup[2])
    assert sharded.compute_share(hw, 4)[0] == pytest.approx(0.5 / hw.cpu_thread_speedup[2])  # 2 ranks per core
    assert sharded.compute_share(hw, 2, threads=2)[0] == pytest.approx(0.5)  # 4 threads on 2 cores take turns
    with pytest.raises(ValueError, match="threads per rank: expected a positive integer, got 0"):
        sharded.ShardedCost(w, hw, 2, threads_per_rank=0)
    plain = dataclasses.replace(hw, cpu_thread_speedup={})  # without the figures: 1/N of the rate
    assert sharded.ShardedCost(w, plain, 2, numels=ns).predict("host").busy_s["compute"] == pytest.approx(
        2 * one.busy_s["compute"])


def test_gpu_ranks_keep_their_device_and_share_the_host():
    hw = resolve("rtx4090-pcie4-gen4nvme")
    r = sharded.per_rank(hw, 4)
    assert r.device_memory_bytes == hw.device_memory_bytes and r.device_tflops == hw.device_tflops
    assert r.host_memory_bytes == hw.host_memory_bytes // 4 and r.nvme_bytes == hw.nvme_bytes // 4
    assert r.disk_read_gbps == hw.disk_read_gbps / 4
    assert r.cpu_update_params_per_s == hw.cpu_update_params_per_s / 4
    assert r.h2d_gbps == hw.h2d_gbps  # no pcie_root_gbps: each GPU its own link
    shared = dataclasses.replace(hw, pcie_root_gbps=40.0, sources={**hw.sources, "pcie_root_gbps": "test"})
    assert sharded.per_rank(shared, 4).h2d_gbps == 10.0
    assert "/ 4: 4 ranks share it" in r.sources["host_memory_bytes"]
    # Without collective figures the estimate says it is one.
    assert "estimate" in sharded.collective_rates(hw)[2]


def test_collective_fields_round_trip_and_are_checked(tmp_path):
    hw = resolve("cpu-dev-2core")
    assert set(hw.collective_gbps) == {"reduce_scatter", "all_gather", "all_reduce"}
    back = HardwareProfile.load(hw.save(tmp_path / "p.json"))
    assert back == hw
    with pytest.raises(ValueError, match="collective_gbps: expected a positive bus bandwidth for each of"):
        dataclasses.replace(hw, collective_gbps={"all_reduce": 1.0})
    d = hw.to_dict()
    d["collective_latency_s"]["source"] = ""
    with pytest.raises(ValueError, match="expected a source for collective_latency_s"):
        HardwareProfile.from_dict(d)


def test_plan_nproc_2_prints_per_rank(capsys):
    assert main(["plan", "gpt2", "--batch", "1", "--seq", "256", "--profile", "cpu-dev-2core", "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert "gpt2 on 2 ranks of cpu-dev-2core (ShardedOffloadOptimizer" in out
    for word in ("memory per rank", "reduce_scatter", "all_gather", "all_reduce", "contention"):
        assert word in out, word
    assert main(["plan", "gpt2", "--batch", "1", "--seq", "256", "--profile", "cpu-dev-2core", "--nproc", "2",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["nproc"] == 2 and plan["fits"]
    # Too big for one rank's share: said per tier, exit 1, for the state tier nearest to fitting (not the fastest:
    # on a 24 GiB GPU Llama-7B's params and grads alone leave no room for its state).
    assert main(["plan", "llama-7b", "--seq", "2048", "--profile", "rtx4090-pcie4-gen4nvme", "--nproc", "2"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT: optimizer state on host" in out or "DOES NOT FIT: optimizer state on nvme" in out
    w = preset("llama-7b", batch=1, seq=2048)
    best, preds = sharded.plan(w, resolve("rtx4090-pcie4-gen4nvme"), 2, numels=numels(PRESETS["llama-7b"][0]))
    assert set(best.shortfall) == {"device"}
    assert best.shortfall["device"] == min(sum(p.shortfall.values()) for p in preds)
    assert "short per rank: device by " in out


# -- the layout is the runtime's (one rank, in this process) ----------------------------------------------------------
def test_bucket_layout_and_memory_match_the_runtime(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_transformer(SHAPE, device="cpu")
        opt = ShardedOffloadOptimizer(torch.optim.AdamW(model.parameters()), config=OffloadConfig(state_tier="host"),
                                      bucket_bytes=BUCKET)
        rep = opt.report()
        opt.close()
    finally:
        dist.destroy_process_group()
    layout = sharded.buckets(numels(), 1, 4, BUCKET)
    assert len(layout) == rep["buckets"] > 1
    assert sum(b.numel for b in layout) == rep["padded"]
    w = workload_of(SHAPE, batch=2, seq=8)
    mem = sharded.ShardedCost(w, resolve("cpu-dev-2core"), 1, numels=numels(), bucket_bytes=BUCKET).memory("host", "cpu")
    assert {k: mem["device"][k] for k in rep["bucket_bytes"]} == rep["bucket_bytes"]


# -- two ranks: what the optimizer sends and holds ----------------------------------------------------------------------
@pytest.mark.slow
def test_two_rank_run_sends_and_holds_what_the_plan_says():
    """A real 2-rank gloo run of a tiny GPT (several buckets, clipping on): every collective's calls and bytes per
    iteration, counted by wrapping torch.distributed's functions, equal the plan's, and so do each rank's buffers
    on the device and its state in host memory."""
    from offload import measure_sharded

    w = workload_of(SHAPE, batch=2, seq=8)
    cost = sharded.ShardedCost(w, resolve("cpu-dev-2core"), 2, numels=numels(), bucket_bytes=BUCKET, clip=True)
    pred = cost.predict("host")
    ranks = measure_sharded.run(SHAPE, world=2, batch=2, seq=8, iters=2, bucket_bytes=BUCKET,
                                config={"state_tier": "host", "max_grad_norm": 1e6}, timeout_s=120)
    cmp = measure_sharded.compare(pred, ranks)
    print(measure_sharded.text(cmp))
    assert set(cmp["collectives"]) == {"reduce_scatter", "all_gather", "all_reduce"}
    assert cmp["collectives"]["reduce_scatter"]["predicted"]["calls"] == len(cost.layout) > 1
    assert cmp["collectives"]["all_reduce"]["predicted"]["calls"] == 2  # the grad flags, the squared norm
    for kind, c in cmp["collectives"].items():
        assert c["equal"], (kind, c)
    for r in cmp["ranks"]:
        assert r["device_buffers"]["predicted"] == r["device_buffers"]["measured"]
    # The plan prices the larger share (rank 0's or the last's); the other is within the padding.
    assert max(r["host"]["measured"] for r in cmp["ranks"]) == pred.memory_totals["host"]


@pytest.mark.slow
def test_plan_nproc_2_measure_prints_predicted_vs_measured(tmp_path, monkeypatch, capsys):
    (tmp_path / "tinysharded.py").write_text("from scheduler.workload import TransformerShape, build_transformer\n"
                                             f"def make():\n    return build_transformer({SHAPE!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["plan", "tinysharded:make", "--batch", "2", "--seq", "8", "--profile", "cpu-dev-2core", "--nproc",
                 "2", "--measure", "--iters", "1", "--dir", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "2 ranks, state on host: predicted vs measured per rank" in out
    lines = out.splitlines()
    assert sum(ln.split()[:1] == ["device_buffers"] and ln.rstrip().endswith("1.000") for ln in lines) == 2
    assert sum(ln.rstrip().endswith("equal") and ln.split()[0] in ("reduce_scatter", "all_gather", "all_reduce")
               for ln in lines) == 3
    assert main(["plan", "gpt2", "--nproc", "2", "--out", str(tmp_path / "o")]) == 2
    assert "with --nproc > 1 use --json" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmarks_run_end_to_end(tmp_path):
    """benchmarks/nproc_validate.py --quick and benchmarks/collective_bw.py at tiny sizes (their numbers are this
    machine's load; only that they are there and consistent is checked)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "nproc.json"
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "nproc_validate.py"), "--quick", "--dir",
                        str(tmp_path), "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["state_tier"] for r in rows} == {"host", "nvme"}
    for r in rows:
        assert r["collectives_equal"], r["collectives"]
        assert all(m["device_buffers"]["predicted"] == m["device_buffers"]["measured"] for m in r["memory"])
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "collective_bw.py"), "--sizes", "0.25", "1",
                        "--rounds", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    kinds = json.loads(p.stdout)["kinds"]
    assert set(kinds) == {"reduce_scatter", "all_gather", "all_reduce"}
    assert all(len(k["sizes"]) == 2 and all(s["median_s"] > 0 for s in k["sizes"]) for k in kinds.values())
