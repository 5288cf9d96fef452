"""The cost model's memory per tier against the runtime's measured peaks: the same placements trained a few steps
through offload.wrap (benchmarks/memory_validate.py prints them side by side, term by term)."""

from __future__ import annotations

import pytest

from offload.config import OffloadConfig
from offload.measure import MEMORY_PLANS, measure_memory
from scheduler.workload import TransformerShape

SHAPE = TransformerShape(n_layer=4, d_model=64, n_head=4, d_ff=256, vocab=512, n_pos=32, bias=True, norm="layernorm")

@pytest.mark.parametrize("fields,frozen", [p[1:] for p in MEMORY_PLANS], ids=[p[0] for p in MEMORY_PLANS])
def test_predicted_peak_per_tier_within_10_percent_of_measured(tmp_path, fields, frozen):
    c = measure_memory(SHAPE, OffloadConfig(nvme_dirs=str(tmp_path), **fields), batch=2, seq=16, iters=3,
                       frozen=frozen)
    print(c.text())
    for tier in ("device", "host", "nvme"):
        assert abs(c.ratio(tier) - 1) <= 0.10, (
            f"{tier}: expected the predicted peak within 10% of the measured one, got {c.predicted(tier)} B "
            f"predicted against {c.measured[tier]} B measured (ratio {c.ratio(tier):.3f}):\n{c.text()}")
    assert c.measured["host"] > 0 and c.measured["device"] > 0  # the runtime's peaks were read at all


def test_host_grads_are_one_buffer_per_unit_and_clipping_adds_the_state_copies(tmp_path):
    """What the old count missed, term by term: every unit keeps an fp32 host grad buffer (not two blocks' worth),
    the first step's speculation copies the params, and a step that clips copies the state as well."""
    base = measure_memory(SHAPE, OffloadConfig(nvme_dirs=str(tmp_path), param_tier="host", state_tier="host"),
                          batch=2, seq=16, iters=2)
    clip = measure_memory(SHAPE, OffloadConfig(nvme_dirs=str(tmp_path), param_tier="host", state_tier="host",
                                               max_grad_norm=1e9), batch=2, seq=16, iters=2)
    t = base.predicted_terms["host"]
    assert t["grads"] == t["params"]  # fp32: one grad buffer per unit, as large as its params
    assert t["pre_images"] == t["params"]
    assert clip.predicted_terms["host"]["pre_images"] == t["params"] + t["state"]
    assert clip.measured["host"] - base.measured["host"] == t["state"]

