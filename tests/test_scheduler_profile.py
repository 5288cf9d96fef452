"""Hardware profiles: JSON round trip, version check, sources required, shipped files valid, memory reserves,
doubts about a cached probe, the probe's parts at small sizes and its plausibility checks, probe --quick."""

from __future__ import annotations

import dataclasses
import datetime
import json
import threading
import time

import pytest
import torch

from offload.cli import main
from scheduler import probe, profile
from scheduler.profile import HardwareProfile
from storage import NvmeStore, StoreConfig


def test_round_trip(tmp_path):
    p = profile.resolve("h100-pcie5-gen4nvme")
    path = p.save(tmp_path / "p.json")
    q = HardwareProfile.load(path)
    assert q.to_dict() == p.to_dict()
    assert q.device_tflops["bf16"] == 756.0 and "vendor spec" in q.sources["device_tflops"]


def test_version_and_format_are_checked(tmp_path):
    d = profile.resolve("cpu-dev-2core").to_dict()
    (tmp_path / "v.json").write_text(json.dumps(dict(d, version=99)))
    with pytest.raises(ValueError, match="expected profile version 3, got 99; re-run `offload probe`"):
        HardwareProfile.load(tmp_path / "v.json")
    (tmp_path / "f.json").write_text(json.dumps(dict(d, format="other")))
    with pytest.raises(ValueError, match="is this a hardware profile"):
        HardwareProfile.load(tmp_path / "f.json")


def test_every_number_needs_a_source_and_a_sane_value():
    p = profile.resolve("cpu-dev-2core")
    with pytest.raises(ValueError, match=r"missing \['h2d_gbps'\]"):
        dataclasses.replace(p, sources={k: v for k, v in p.sources.items() if k != "h2d_gbps"})
    with pytest.raises(ValueError, match="h2d_gbps: expected a positive number, got -1"):
        dataclasses.replace(p, h2d_gbps=-1)


@pytest.mark.parametrize("name", profile.shipped_profiles())
def test_shipped_profiles_load_with_sources(name):
    p = profile.resolve(name)
    assert all(p.sources[f] for f in profile.RATE_FIELDS + profile.CAPACITY_FIELDS)
    assert {"h100-pcie5-gen4nvme", "a100-pcie4-gen4nvme", "rtx4090-pcie4-gen4nvme", "cpu-dev-2core"} <= set(
        profile.shipped_profiles())


def test_cpu_steal_needs_every_kind():
    p = profile.resolve("h100-pcie5-gen4nvme")
    assert dict(p.cpu_steal) == {"copy": 0.0, "update": 0.0, "disk": 0.0}
    with pytest.raises(ValueError, match=r"cpu_steal: expected a number >= 0 for each of \('copy', 'update', 'disk'\)"):
        dataclasses.replace(p, cpu_steal={"copy": 1.0})
    with pytest.raises(ValueError, match="cpu_steal"):
        dataclasses.replace(p, cpu_steal={"copy": 1.0, "update": -1.0, "disk": 0.0})


def test_overrides_record_their_source():
    p = profile.resolve("h100-pcie5-gen4nvme").with_capacities(device_memory_bytes=24 << 30)
    assert p.device_memory_bytes == 24 << 30 and p.sources["device_memory_bytes"] == "given on the command line"


def test_reserves_are_kept_when_the_capacity_is_given():
    """A GPU's CUDA context and fragmentation, the host's OS: plans may fill capacity less reserve, also after
    ``--device-memory 24GiB``; a reserve given replaces the profile's (bytes, no fraction)."""
    p = profile.resolve("rtx4090-pcie4-gen4nvme")
    assert dict(p.device_reserve) == {"bytes": 1 << 30, "fraction": 0.05}
    q = p.with_capacities(device_memory_bytes=24 << 30, host_memory_bytes=128 << 30)
    assert q.reserve_bytes("device") == (1 << 30) + int(0.05 * (24 << 30))
    assert q.usable_bytes("device") == (24 << 30) - q.reserve_bytes("device")
    assert q.usable_bytes("host") == 96 << 30 and q.usable_bytes("nvme") == q.nvme_bytes
    r = q.with_capacities(device_reserve_bytes=3 << 30, host_reserve_bytes=0)
    assert (r.usable_bytes("device"), r.usable_bytes("host")) == (21 << 30, 128 << 30)
    assert r.sources["device_reserve"] == "given on the command line"
    with pytest.raises(ValueError, match="host_reserve: expected"):
        dataclasses.replace(p, host_reserve={"bytes": 0, "fraction": 1.5})


def test_plan_report_says_what_is_reserved(capsys):
    argv = ["plan", "gpt2", "--seq", "256", "--profile", "rtx4090-pcie4-gen4nvme", "--device-memory", "24GiB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "device   " in out and "(24.0 GiB less 2.2 GiB reserved)" in out
    assert main(argv + ["--device-reserve", "0", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["reserve_bytes"]["device"] == 0 and d["usable_bytes"]["device"] == 24 << 30


def test_version_2_loads_without_reserve_and_says_so(tmp_path):
    d = profile.resolve("cpu-dev-2core").to_dict()
    del d["device_reserve"], d["host_reserve"]
    (tmp_path / "v2.json").write_text(json.dumps(dict(d, version=2)))
    p = HardwareProfile.load(tmp_path / "v2.json")
    assert p.usable_bytes("host") == p.host_memory_bytes  # what it planned with
    assert any("version-2 profile: no memory reserve" in x for x in p.doubts())


def test_doubts_carry_the_probes_warnings_and_its_age(tmp_path):
    p = dataclasses.replace(profile.resolve("cpu-dev-2core"), measured_at="2026-01-02T03:04:05",
                            spread={"h2d_gbps": 0.4}, warnings=("h2d noisy",))
    q = HardwareProfile.load(p.save(tmp_path / "p.json"))
    assert (q.measured_at, dict(q.spread), q.warnings) == (p.measured_at, {"h2d_gbps": 0.4}, ("h2d noisy",))
    assert q.doubts(today=datetime.date(2026, 2, 1)) == ["h2d noisy"]
    assert "measured 120 days ago (2026-01-02): re-run `offload probe`" in q.doubts(today=datetime.date(2026, 5, 2))
    assert profile.resolve("h100-pcie5-gen4nvme").doubts() == []  # hand-written: nothing to doubt


def test_plan_flags_a_suspect_cached_profile(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OFFLOAD_CACHE_DIR", str(tmp_path))
    bad = dataclasses.replace(profile.resolve("cpu-dev-2core"), name="probe-x", measured_at="2026-01-02T03:04:05",
                              warnings=("the CPU update ran faster under disk traffic than alone",))
    bad.save(profile.cached_path())
    assert main(["plan", "gpt2", "--seq", "64"]) == 0
    err = capsys.readouterr().err
    assert f"warning: profile probe-x ({profile.cached_path()}, the default): the CPU update ran faster" in err
    assert main(["plan", "gpt2", "--seq", "64", "--profile", "cpu-dev-2core"]) == 0
    assert "warning" not in capsys.readouterr().err


# -- the probe's parts, small ---------------------------------------------------------------------------------------
def test_measure_rounds_interleaves_and_reports_spread():
    calls, prepared = [], []
    jobs = {"a": (lambda: calls.append("a"), 10.0), "b": (lambda: calls.append("b"), 20.0)}
    r = probe.measure_rounds(jobs, rounds=3, repeats=2, prepare={"b": lambda: prepared.append("b")})
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3  # one warm-up each, then rounds alternate the jobs
    assert len(prepared) == 4 and set(r) == {"a", "b"} and len(r["a"].rounds) == 3
    assert all(v > 0 for v in r["b"].rounds) and r["a"].spread >= 0
    assert probe.Rate((1.0, 2.0, 4.0)).value == 2.0 and probe.Rate((1.0, 2.0, 4.0)).spread == 1.5
    with pytest.raises(ValueError, match="rounds >= 1"):
        probe.measure_rounds(jobs, rounds=0)


def test_matmul_disk_and_update_rates_at_small_sizes(tmp_path):
    mm, sizes = probe.matmul_rates(torch.device("cpu"), 64, rounds=2, budget_s=1.0)
    assert set(mm) == set(profile.DTYPES) and all(r.value > 0 and len(r.rounds) == 2 for r in mm.values())
    assert sizes["fp32"] == 64
    cfg = StoreConfig(block_bytes=1 << 20)
    with NvmeStore(str(tmp_path), capacity_bytes=64 << 20, config=cfg) as store:
        bufs = [torch.full((1 << 20,), i, dtype=torch.uint8) for i in range(2)]
        outs = [torch.zeros(1 << 20, dtype=torch.uint8) for _ in range(2)]
        dk, mixed = probe.disk_rates(store, bufs, outs, rounds=2)
        assert set(dk) == {"read", "write", "mixed"} and all(r.value > 0 for r in dk.values())
        assert torch.equal(outs[1], bufs[1])  # the mixed job read back what was written
    beside = []

    def side():  # records whether it ran while a step was timed
        beside.append(threading.get_ident())
        time.sleep(0.002)
    alone, under, step = probe.update_rates(4096, side, rounds=2, repeats=2)
    assert alone.value > 0 and under.value > 0 and len(alone.rounds) == 2 and beside
    step()


def test_plausibility_flags_what_this_machine_once_reported():
    """fp32 matmul at 0.045 TFLOP/s against bf16 at 1.34 on a CPU without bf16 instructions, the step faster than
    fp32 matmul, AdamW faster under disk traffic than alone, a wide spread, other processes busy."""
    bad = probe.plausibility(device="cpu", tflops={"fp32": 0.045, "bf16": 1.34, "fp16": 0.001}, step_tflops=0.14,
                             cpu_update=0.9e9, cpu_update_io=1.5e9, disk={"read": 2.8, "write": 4.5, "mixed": 3.4},
                             spread={"device_tflops": 0.6, "h2d_gbps": 0.1}, foreign_cpu=0.4)
    text = "\n".join(bad)
    assert len(bad) == 5, text
    assert "faster than the fp32 matmul alone" in text and "30x fp32" in text
    assert "faster under disk traffic" in text and "device_tflops 60%" in text and "h2d_gbps" not in text
    assert "other processes used 40%" in text
    good = probe.plausibility(device="cpu", tflops={"fp32": 0.18, "bf16": 0.002, "fp16": 0.001}, step_tflops=0.14,
                              cpu_update=1.9e9, cpu_update_io=1.0e9, disk={"read": 2.8, "write": 4.5, "mixed": 3.4},
                              spread={"device_tflops": 0.05}, foreign_cpu=0.02)
    assert good == []
    # A GPU's bf16 tensor cores are 2-28x its fp32: not flagged; an AMX CPU's bf16 neither.
    gpu = dict(device="cuda", tflops={"fp32": 51.0, "bf16": 756.0}, step_tflops=20.0, cpu_update=2e9,
               cpu_update_io=1.7e9, disk={"read": 7.45, "write": 6.9, "mixed": 5.0}, spread={}, foreign_cpu=None)
    assert probe.plausibility(**gpu) == []
    assert probe.plausibility(**dict(gpu, device="cpu", cpu_bf16=True)) == []
    assert "mixed disk traffic" in probe.plausibility(**dict(gpu, disk={"read": 1.0, "write": 1.0, "mixed": 5.0}))[0]


@pytest.mark.slow
def test_probe_quick_caches_a_profile(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OFFLOAD_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["probe", "--quick", "--dir", str(tmp_path)]) == 0
    files = list((tmp_path / "cache" / "profiles").glob("*.json"))
    assert len(files) == 1 and files[0].stem == profile.fingerprint(str(tmp_path))
    p = HardwareProfile.load(files[0])
    assert p.disk_read_gbps > 0 and p.cpu_update_params_per_s > 0 and "offload probe --quick" in p.sources["h2d_gbps"]
    assert 0 < p.compute_efficiency <= 1 and set(p.cpu_steal) == set(profile.STEAL_KINDS)
    assert all(v >= 0 for v in p.cpu_steal.values()) and "training step" in p.sources["cpu_steal"]
    err = capsys.readouterr().err
    assert "[6/7] cpu steal" in err  # progress shown
    assert f"saved to {files[0]}: the default profile of every later `offload plan`" in err
    assert p.measured_at and set(p.spread) >= {"disk_read_gbps", "cpu_update_params_per_s", "device_tflops"}
    assert p.warnings[0].startswith("--quick") and p.reserve_bytes("host") > 0
    # compute by step size: the quick shapes' tokens, each a fraction of the fp32 rate, with where they came from
    assert sorted(p.compute_curve) == sorted({b * s for b, s in probe.CURVE_SHAPES_QUICK})
    assert all(0 < e <= 1 for e in p.compute_curve.values()) and "1 x 16, 2 x 32" in p.sources["compute_curve"]
    fresh = tmp_path / "not" / "yet"  # a --dir that does not exist is made, as --measure's is
    assert main(["probe", "--quick", "--dir", str(fresh), "--no-save", "--rounds", "1", "--json"]) == 0
    assert fresh.is_dir()
    out, err = capsys.readouterr()
    assert json.loads(out)["probe"]["warnings"] and "not saved (--no-save)" in err
    assert list((tmp_path / "cache" / "profiles").glob("*.json")) == files
    (tmp_path / "file").write_text("")
    assert main(["probe", "--quick", "--dir", str(tmp_path / "file" / "sub")]) == 2
    assert "--dir" in capsys.readouterr().err


def test_compute_curve_prices_steps_by_their_tokens(tmp_path):
    """Small steps reach less of the peak than large ones: the cost model prices each workload at its own
    tokens per step, interpolated in log(tokens) between the probe's points and flat beyond them."""
    from scheduler.cost import CostModel
    from scheduler.workload import preset

    shipped = profile.resolve("cpu-dev-2core")
    assert shipped.efficiency_at(64) < shipped.efficiency_at(512) == shipped.compute_efficiency  # measured curve
    base = dataclasses.replace(shipped, compute_curve={},
                               sources={k: v for k, v in shipped.sources.items() if k != "compute_curve"})
    p = dataclasses.replace(base, compute_curve={64: 0.4, 1024: 0.8},
                            sources={**base.sources, "compute_curve": "test"})
    assert p.efficiency_at(64) == 0.4 and p.efficiency_at(16) == 0.4 and p.efficiency_at(10**6) == 0.8
    assert p.efficiency_at(256) == pytest.approx(0.6)  # halfway in log(tokens)
    assert p.efficiency_at(None) == base.compute_efficiency == base.efficiency_at(256)  # no curve: flat
    q = HardwareProfile.load(p.save(tmp_path / "c.json"))
    assert dict(q.compute_curve) == {64: 0.4, 1024: 0.8} and q.sources["compute_curve"] == "test"
    assert "compute_curve" not in base.to_dict()  # optional: profiles without one stay as they were
    with pytest.raises(ValueError, match="compute_curve: expected tokens"):
        dataclasses.replace(p, compute_curve={64: 1.5})
    with pytest.raises(ValueError, match="a source for compute_curve"):
        dataclasses.replace(base, compute_curve={64: 0.5})

    def compute_s(prof, batch, seq):
        w = preset("gpt2", batch=batch, seq=seq)
        cm = CostModel(w, prof)
        return sum(cm.fwd_s) + sum(cm.bwd_s), w.model_flops
    (t_small, f_small), (t_big, f_big) = compute_s(p, 1, 64), compute_s(p, 4, 256)
    flat_small, _ = compute_s(base, 1, 64)
    # 64 tokens at 0.4, 1024 at 0.8: per FLOP, the small step takes twice as long
    assert t_small / f_small == pytest.approx(2 * t_big / f_big, rel=1e-6)
    assert t_small == pytest.approx(flat_small * base.compute_efficiency / 0.4, rel=1e-6)


@pytest.mark.parametrize("name", ["h100-pcie5-gen4nvme", "a100-pcie4-gen4nvme", "rtx4090-pcie4-gen4nvme"])
def test_shipped_gpu_profiles_price_small_steps_below_the_ridge_point(name):
    """A GPU's small steps are bound by its memory bandwidth (a GEMM of `tokens` rows does about `tokens` FLOP per
    bf16 weight byte): the shipped curve rises linearly to the datasheet's ridge point, flat at
    compute_efficiency beyond, and says where its figures came from."""
    p = profile.resolve(name)
    ridge = min(t for t, e in p.compute_curve.items() if e >= p.compute_efficiency)
    assert p.efficiency_at(64) < p.efficiency_at(128) < p.compute_efficiency == p.efficiency_at(4096)
    assert p.efficiency_at(64) == pytest.approx(p.compute_efficiency * 64 / ridge, rel=0.02)
    assert "datasheet" in p.sources["compute_curve"] or "whitepaper" in p.sources["compute_curve"]
    assert "roofline" in p.sources["compute_curve"]
