"""A host budget below what a placement needs is refused at wrap, naming the minimum; at the minimum, training
runs and matches plain PyTorch (no deadlock between the fetch, grad and update threads)."""

from __future__ import annotations

import concurrent.futures
import gc

import pytest
import torch

from helpers import TINY_GPT as SHAPE, gpt as _gpt, lm_loss as _loss
from offload import OffloadConfig, wrap
from offload.runtime import runtime_of
from offload.runtime import OffloadRuntime
from scheduler.planner import Plan, UnitPlacement
from storage import Tier


def _cfg(tmp_path, budget, **kw):
    tmp_path.mkdir(exist_ok=True)
    return OffloadConfig(param_tier="nvme", grad_tier="nvme", state_tier="nvme", nvme_dirs=str(tmp_path),
                         impl="as_given", prefetch=1, accumulation_steps=2, host_budget_bytes=budget, buffers=2, **kw)


def _minimum(tmp_path, **kw) -> int:
    m = _gpt()
    model, _ = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), _cfg(tmp_path / "probe", None, **kw))
    rt = runtime_of(model)
    need = sum(rt.host_minimum().values())
    rt.close()
    gc.collect()
    return need


def _train(model, opt, steps=3, g=None):
    g = g or torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        for _ in range(2):
            loss = _loss(model, torch.randint(0, SHAPE.vocab, (4, 12), generator=g))
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "step"])
def test_budget_below_the_minimum_is_refused_and_at_it_trains(overlap, tmp_path):
    need = _minimum(tmp_path, overlap_update=overlap)
    m = _gpt()
    with pytest.raises(ValueError, match=rf"host budget of .* is below the .*\({need} B\).*at least {need}"):
        wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), _cfg(tmp_path / "below", need - 4096,
                                                                  overlap_update=overlap))
    assert all(p.numel() > 0 for p in m.parameters()), "a refused wrap must leave the model as it was"
    ref, m = _gpt(), _gpt()
    losses_ref = _train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2))
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), _cfg(tmp_path / "at", need,
                                                                           overlap_update=overlap))
    # A deadlock must fail the test, not stall the suite: train on a thread and give it a bound.
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        losses = ex.submit(_train, model, opt).result(timeout=300)
    assert losses == losses_ref
    rt: OffloadRuntime = runtime_of(model)
    assert rt.pool.stats()["peak_in_use_bytes"] <= need
    rt.close()
    gc.collect()


def test_a_plan_above_the_host_budget_is_refused_before_anything_moves(tmp_path):
    """apply_plan checks the new plan's host minimum first: a plan that would not fit is refused naming it, and
    the run goes on under the placement it had."""
    need = _minimum(tmp_path, overlap_update=False)
    ref, m = _gpt(), _gpt()
    losses_ref = _train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), steps=2)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), _cfg(tmp_path / "run", need,
                                                                           overlap_update=False))
    rt = runtime_of(model)
    g = torch.Generator().manual_seed(1)
    losses = _train(model, opt, steps=1, g=g)
    before = rt.placements()
    all_host = Plan(strategy="test", prefetch_depth=1, state_buffers=2,
                    units=tuple(UnitPlacement(Tier.HOST, Tier.HOST, "cpu", grad_tier=Tier.HOST) for _ in rt.units))
    host_need = sum(rt.host_minimum(all_host).values())
    assert host_need > need
    with pytest.raises(ValueError, match=rf"apply_plan: the host budget of .* is below the .*\({host_need} B\)"):
        rt.apply_plan(all_host)
    assert rt.placements() == before
    losses += _train(model, opt, steps=1, g=g)
    assert losses == losses_ref  # still the plain optimizer's training, step for step
    rt.close()
    gc.collect()
