"""benchmarks/placement_bench.py --quick runs end to end: every placement's numbers are in its JSON, the idle gaps
name what ran meanwhile, and the all-NVMe weights equal plain PyTorch's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # starts another process


def test_placement_bench_quick(tmp_path):
    out_json = tmp_path / "results" / "placement_bench.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "placement_bench.py"), "--quick",
                          "--json", str(out_json), "--dir", str(tmp_path / "stores")],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    r = json.loads(out_json.read_text())
    assert [(b["batch"], b["seq"]) for b in r["batches"]] == [(1, 16), (2, 32)]
    assert [b["kind"] for b in r["batches"]] == ["I/O-bound", "compute-bound"]
    for b in r["batches"]:
        assert b["bit_identical"] is True, b
        assert b["iterations_compared"] >= r["warmup"] + r["iters"]
        assert set(b["placements"]) == {"nvme", "host-params", "host-state", "planner"}
        assert len(b["plain"]["iterations"]) == r["iters"]
        for key, p in b["placements"].items():
            assert p["lower_bound_s"] > 0 and p["predicted_s"] >= p["lower_bound_s"] * (1 - 1e-9)
            assert p["measured_over_lower_bound"] == pytest.approx(p["measured_s"] / p["lower_bound_s"])
            assert p["predicted_over_measured"] == pytest.approx(p["predicted_s"] / p["measured_s"])
            assert p["bound_by"] in ("compute+fill", "h2d", "d2h", "link", "disk", "cpu_update")
            # the cost model's bytes, plus the refetches the device budget forces (which it does not price); a unit
            # fetched again for backward gives its update the fetch's host copy instead of one of its device params
            refetched = p["bytes_counted"]["h2d"] - p["bytes_predicted"]["h2d"]
            assert refetched >= 0, key
            assert all(p["bytes_counted"][k] + (refetched if k == "d2h" else 0) >= v
                       for k, v in p["bytes_predicted"].items()), key
            assert len(p["iterations"]) == r["iters"] and all(i["busy_s"]["compute"] > 0 for i in p["iterations"])
            g = p["last_iteration_gaps"]
            assert g["resource"] in p["busy_measured_s"] and 0 <= g["idle_total_s"] <= g["window_s"]
            assert sum(x["idle_s"] for x in g["gaps"]) <= g["idle_total_s"] + 1e-9
            assert all(d["what"].split()[0] != g["resource"] for x in g["gaps"] for d in x["during"])
            trace = json.loads(Path(p["trace"]).read_text())
            assert any(e.get("ph") == "X" for e in trace["traceEvents"])
        # NVMe params and state move through the disk; the host-held placement of each does not.
        assert b["placements"]["nvme"]["bytes_counted"]["disk_read"] > 0
        assert b["placements"]["host-params"]["bytes_counted"]["disk_read"] \
            < b["placements"]["nvme"]["bytes_counted"]["disk_read"]
    # the planner's plan mixes tiers (the host holds only half the model)
    assert "N" in r["batches"][0]["placements"]["planner"]["plan"]
    assert any("bit-identical" in x["bar"] for x in r["bars"]) and "PASS" in out.stdout
    assert not list((tmp_path / "stores").glob("offload-measure-*")), "the benchmark left a store behind"
