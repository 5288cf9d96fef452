"""Hardware profiles: JSON round trip, version check, sources required, shipped files valid, probe --quick."""

from __future__ import annotations

import dataclasses
import json

import pytest

from offload.cli import main
from scheduler import profile
from scheduler.profile import HardwareProfile


def test_round_trip(tmp_path):
    p = profile.resolve("h100-pcie5-gen4nvme")
    path = p.save(tmp_path / "p.json")
    q = HardwareProfile.load(path)
    assert q.to_dict() == p.to_dict()
    assert q.device_tflops["bf16"] == 756.0 and "vendor spec" in q.sources["device_tflops"]


def test_version_and_format_are_checked(tmp_path):
    d = profile.resolve("cpu-dev-2core").to_dict()
    (tmp_path / "v.json").write_text(json.dumps(dict(d, version=99)))
    with pytest.raises(ValueError, match="expected profile version 2, got 99; re-run `offload probe`"):
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
    assert "[6/7] cpu steal" in capsys.readouterr().err  # progress shown
