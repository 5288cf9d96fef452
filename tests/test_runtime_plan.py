"""offload.wrap running a per-unit scheduler Plan, and switching plans between iterations (apply_plan,
on_iteration): bit-identical to plain PyTorch (fp32, CPU) at every step, and nothing left behind by a switch."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

import helpers
from helpers import TINY_GPT, lm_loss, token_batches
from offload import OffloadConfig, RunReport, load_checkpoint, save_checkpoint, wrap
from offload.runtime import OffloadRuntime, runtime_of
from offload.measure import measure, workload_of
from scheduler.cost import CostModel
from offload.report import placement_text
from offload.swap import ChunkState
from scheduler import profile
from scheduler.cost import RESOURCES
from scheduler.planner import Plan, UnitPlacement
from scheduler.workload import build_transformer
from storage import Tier
from storage.alloc import round_up

D, H, N = Tier.DEVICE, Tier.HOST, Tier.NVME
SHAPE = dataclasses.replace(TINY_GPT, n_layer=5)
UNITS = SHAPE.n_layer + 1  # "rest", then the blocks


@pytest.fixture(autouse=True)
def one_runtime_at_a_time():
    """A wrapped model holds host-pool slabs (~140 MiB of RSS here) and reference cycles (hooks): collect them
    before and after each test, so that this file does not raise the test process's peak memory, which every
    child process it forks later inherits (tests/test_scheduler_cli.py measures a child's peak RSS)."""
    gc.collect()
    yield
    gc.collect()


def close(*runtimes) -> None:
    for rt in runtimes:
        rt.close()
    gc.collect()


def up(params, state, update, grads=H):
    return UnitPlacement(params, state, update, grad_tier=grads)


# Every tier for params and for state, grads on host and nvme, updates on cpu and device, unit by unit.
MIXED = (up(D, H, "cpu"), up(H, N, "cpu", N), up(N, H, "cpu"), up(H, D, "device"), up(N, N, "device"),
         up(D, D, "device"))
ALL_NVME = (up(N, N, "cpu", N),) * UNITS
ALL_HOST = (up(H, H, "cpu"),) * UNITS


def plan(units, **kw) -> Plan:
    return Plan(strategy="test", units=tuple(units), **{"prefetch_depth": 1, **kw})


def rotated(units, k=1):
    """Each unit takes the placement of the unit ``k`` further on: every unit changes tier."""
    return units[k:] + units[:k]


def gpt():
    return helpers.gpt(SHAPE)


def batches(n, seed=1):
    return token_batches(n, SHAPE.vocab, seed=seed)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


class Pair:
    """Plain torch and the wrapped model, stepped side by side on the same batches."""

    def __init__(self, tmp_path, first: Plan, **cfg):
        self.ref, m = gpt(), gpt()
        self.plain = adamw(self.ref)
        tmp_path.mkdir(parents=True, exist_ok=True)
        cfg = {"nvme_dirs": str(tmp_path), "impl": "as_given", **cfg}
        self.model, self.opt = wrap(m, adamw(m), OffloadConfig(**cfg), plan=first)
        self.rt = runtime_of(self.model)

    def step(self, idx) -> None:
        for model, opt in ((self.ref, self.plain), (self.model, self.opt)):
            loss = lm_loss(model, idx)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if model is self.ref:
                expected = loss.item()
        assert loss.item() == expected
        self.assert_same()

    def assert_same(self) -> None:
        assert_same(self.ref, self.plain, self.model, self.opt)


def assert_same(ref, plain, model, opt) -> None:
    """Weights and optimizer state bit for bit."""
    sd_ref, sd = ref.state_dict(), model.state_dict()
    for k in sd_ref:
        assert torch.equal(sd_ref[k], sd[k]), k
    osd = opt.state_dict()
    for k, entry in plain.state_dict()["state"].items():
        for key, v in entry.items():
            assert torch.equal(v, osd["state"][k][key]), (k, key)


def device_bytes_expected(rt) -> int:
    """What the device budget holds between iterations: the units kept there and the state chunks there."""
    return sum(u.nbytes for u in rt.units if u.param_tier is D) + sum(
        s.chunk_bytes for s in rt.optimizer._subgroups if s.tier is D)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "step"])
def test_mixed_plan_trains_bit_identical(overlap, tmp_path):
    p = Pair(tmp_path, plan(MIXED, overlap_update=overlap))
    rt = p.rt
    assert rt.plan.units == MIXED and rt.overlap is overlap
    assert [(x["params"], x["grads"], x["state"], x["update"]) for x in rt.placements()] == [
        (u.params.value, u.grads.value, u.state.value, u.update) for u in MIXED]
    assert [u.grads for u in MIXED] == [H, N, H, D, D, D]  # a device update's grads stay on the device
    for idx in batches(5):
        p.step(idx)
    # The units the plan keeps on the device stay there, counted against the budget; the others are released.
    for u, pl in zip(rt.units, MIXED):
        assert (u.state.value == "resident") == (pl.params is D)
        assert all(x.numel() == 0 for x in u.params) == (pl.params is not D)
    assert rt.device_budget.used_bytes == device_bytes_expected(rt) > 0
    # fp32 masters exactly where the update cannot work on the params in place (the cost model's rule).
    for s in p.opt._subgroups:
        pl = MIXED[s.unit]
        assert s.has_master == CostModel.needs_master(pl), (s.unit, pl)
        assert s.has_master == (pl.params is D if pl.update == "cpu" else pl.params is not D), (s.unit, pl)
    keys = set(rt.swap.store.keys())
    assert {"unit2.params", "unit4.params"} <= keys and "unit1.params" not in keys
    text = placement_text(rt)  # printed by `offload run`: unit by unit when units differ
    assert "blocks.3: params on nvme, grads on device, state on nvme, updated on device" in text
    assert RunReport(p.model, p.opt, progress=False).summary()["placement"]["per_unit"][0] == {
        "units": "rest", "params": "device", "grads": "host", "state": "host", "update": "cpu"}
    rt.close()


def test_apply_plan_switches_keep_bit_identity_and_free_what_they_left(tmp_path):
    p = Pair(tmp_path, plan(ALL_NVME))
    rt = p.rt
    data = iter(batches(14))
    steps = [(plan(MIXED), 2), (plan(rotated(MIXED), prefetch_depth=2), 2),  # every unit moves
             (plan(rotated(MIXED, 3), overlap_update=False), 2),
             (plan(ALL_NVME), 2), (plan(ALL_HOST, state_buffers=2), 2), (plan(MIXED), 2)]
    for k, (pl, n) in enumerate(steps):
        # Wrapped all on NVMe: the first switch comes before any step (no state yet, masters only).
        rt.apply_plan(pl)
        assert rt.plan is pl and rt.stats["replans"] == k + 1
        assert (rt.config.prefetch, rt.config.buffers, rt.overlap) == (pl.prefetch_depth, pl.state_buffers,
                                                                      pl.overlap_update)
        assert [(x["params"], x["grads"], x["state"], x["update"]) for x in rt.placements()] == [
            (u.params.value, u.grads.value, u.state.value, u.update) for u in pl.units]
        p.assert_same()  # a switch changes no value
        spans = {e.resource for e in rt.timeline.events if e.name.startswith("replan")}
        assert spans and spans <= set(RESOURCES), spans  # drawn on the scheduler's resources
        assert rt.device_budget.used_bytes == device_bytes_expected(rt)
        if pl.units == ALL_NVME:  # nothing on the host or the device any more
            assert rt.pool.stats()["in_use_bytes"] == 0
            assert rt.device_budget.used_bytes == 0
            assert all(u.weights.state is ChunkState.STORED and u.grads.state in (ChunkState.EMPTY, ChunkState.STORED)
                       for u in rt.units)
        if pl.units == ALL_HOST:  # the store is empty: params, state and spilled grads deleted
            assert rt.swap.store.keys() == []
            assert rt.device_budget.used_bytes == 0
        for _ in range(n):
            p.step(next(data))
    moved = {k: rt.stats[f"replan_{k}_bytes"] for k in ("h2d", "d2h", "disk_read", "disk_write")}
    assert all(moved.values()), moved
    rt.close()


def test_grads_not_zeroed_move_with_the_switch(tmp_path):
    """Without zero_grad() after a step, torch adds the next grads to the old ones: host grads moved to NVMe by a
    switch keep that."""
    p = Pair(tmp_path, plan(ALL_HOST))
    a, b, c = batches(3)
    for model, opt in ((p.ref, p.plain), (p.model, p.opt)):
        lm_loss(model, a).backward()
        opt.step()  # no zero_grad: the grads stay
    p.rt.apply_plan(plan((up(H, H, "cpu", N),) * UNITS))
    assert all(u.grads.state is ChunkState.STORED for u in p.rt.units if u.grad_nbytes)
    p.step(b)  # adds to them, steps, and zeroes
    p.step(c)
    p.rt.close()


def test_on_iteration_plan_is_applied_before_the_next_forward(tmp_path):
    q = Pair(tmp_path / "q", plan(ALL_NVME))
    wrap_capacity = q.rt.swap.store.capacity_bytes
    close(q.rt)
    del q
    p = Pair(tmp_path, plan(ALL_HOST))
    rt = p.rt
    nxt = plan(rotated(MIXED, 2))
    records = []

    def replanner(record):
        records.append(record)
        return nxt if record["iteration"] == 2 else None

    rt.on_iteration.append(replanner)
    seen = []  # the placement in force when the first block computes, per forward
    p.model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(rt.plan.units))
    data = batches(4)
    for idx in data[:2]:
        p.step(idx)
    assert rt.plan.units == ALL_HOST and rt.stats["replans"] == 0  # chosen, not applied yet
    p.step(data[2])
    assert seen == [ALL_HOST, ALL_HOST, nxt.units]
    assert rt.plan is nxt and rt.stats["replans"] == 1
    rec = rt.history[-1]
    assert rec["iteration"] == 3 and rec["replan"]["requested_after"] == 2 and len(rec["replan"]["units_moved"]) == 6
    assert "replan" not in records[0] and "replan" not in records[1] and records[2] is rec
    assert any(e.name.startswith("replan") for e in rt.timeline.events)
    p.step(data[3])
    assert rt.stats["replans"] == 1
    # Wrapped all on the host, it had no store: the switch opened one, sized as wrap sizes it.
    assert rt.swap.store.capacity_bytes == wrap_capacity
    rt.close()


def test_apply_plan_refused_inside_an_iteration_and_for_the_wrong_unit_count(tmp_path):
    with pytest.raises(ValueError, match=r"one placement per unit \(6: 'rest', then the blocks\), got 5"):
        m = gpt()
        wrap(m, adamw(m), OffloadConfig(), plan=plan(ALL_HOST[:5]))
    for overlap in (True, False):
        check_refusals(tmp_path / str(overlap), overlap)
        gc.collect()  # one runtime at a time


def check_refusals(tmp_path, overlap: bool) -> None:
    p = Pair(tmp_path, plan(ALL_HOST, overlap_update=overlap))
    rt = p.rt
    with pytest.raises(ValueError, match=r"\(6: 'rest', then the blocks\), got 7"):
        rt.apply_plan(plan(ALL_HOST + ALL_HOST[:1]))
    errors = []

    def during_backward(grad):
        try:
            rt.apply_plan(plan(ALL_NVME))
        except RuntimeError as e:
            errors.append(str(e))  # not the exception: its traceback would tie this frame to the autograd graph

    def watch(mod, args, out):  # in backward once the later blocks are done (and the loss's, at its start)
        out.register_hook(during_backward)

    hook = p.model.blocks[2].register_forward_hook(watch)
    idx = batches(1)[0]
    loss = lm_loss(p.model, idx)
    hook.remove()
    loss.register_hook(during_backward)
    with pytest.raises(RuntimeError, match="got one after a training forward, before its backward"):
        rt.apply_plan(plan(ALL_NVME))
    loss.backward()
    assert len(errors) == 2 and all("got one during backward" in e for e in errors)
    with pytest.raises(RuntimeError, match="got one after backward, before optimizer.step()"):
        rt.apply_plan(plan(ALL_NVME))
    p.opt.step()
    p.opt.zero_grad()
    rt.on_iteration.append(lambda rec: plan(ALL_HOST[:3]))
    with pytest.raises(ValueError, match=r"runtime.on_iteration: expected a plan .*got 3"):
        lm_loss(p.model, idx).backward()
        p.opt.step()
    assert rt.plan.units == ALL_HOST and rt.stats["replans"] == 0
    rt.close()


def test_plan_over_the_device_budget_is_refused_before_anything_moves(tmp_path):
    m = gpt()
    half = sum(x.numel() * x.element_size() for x in m.parameters()) // 2
    on_device = plan((up(D, H, "cpu"),) * UNITS)
    with pytest.raises(ValueError, match=r"the 6 units the plan keeps on the device .*: raise device_budget_bytes"):
        wrap(m, adamw(m), OffloadConfig(device_budget_bytes=half), plan=on_device)
    p = Pair(tmp_path, plan(ALL_HOST), device_budget_bytes=half)
    with pytest.raises(ValueError, match=r"apply_plan: the device budget of .* cannot hold .*the 6 units"):
        p.rt.apply_plan(on_device)
    assert p.rt.plan.units == ALL_HOST and p.rt.device_budget.used_bytes == 0
    assert all(x["params"] == "host" for x in p.rt.placements())
    p.step(batches(1)[0])
    p.rt.close()


def test_device_state_is_counted_at_the_size_its_first_step_makes(tmp_path):
    """Before the first step a subgroup's chunk holds only its fp32 masters; AdamW's first step adds two moments.
    A plan that keeps state on the device is checked against what the state will take, not what it takes now, so
    it is refused at wrap or apply_plan, not by the update thread in the middle of the first backward."""
    m = gpt()
    model_bytes = sum(x.numel() * x.element_size() for x in m.parameters())
    state_on_device = plan((up(H, D, "device"),) * UNITS)  # masters (1x the params) + moments (2x) there
    budget = model_bytes * 2  # masters and streamed params fit; the moments do not
    with pytest.raises(ValueError, match=r"optimizer state on the device"):
        wrap(m, adamw(m), OffloadConfig(device_budget_bytes=budget, impl="as_given"), plan=state_on_device)
    p = Pair(tmp_path, plan(ALL_HOST), device_budget_bytes=budget)
    with pytest.raises(ValueError, match=r"apply_plan: .*optimizer state on the device"):
        p.rt.apply_plan(state_on_device)
    p.step(batches(1)[0])
    p.rt.close()
    q = Pair(tmp_path / "q", state_on_device, device_budget_bytes=model_bytes * 4)  # room for it: trains
    for idx in batches(2):
        q.step(idx)
    assert q.rt.device_budget.used_bytes == device_bytes_expected(q.rt) > 2 * model_bytes
    q.rt.close()


def test_checkpoint_after_a_switch_resumes_bit_identical(tmp_path):
    p = Pair(tmp_path / "a", plan(ALL_HOST))
    data = batches(6)
    for idx in data[:2]:
        p.step(idx)
    p.rt.apply_plan(plan(MIXED))
    p.step(data[2])
    save_checkpoint(tmp_path / "ckpt", p.model, p.opt, step=3)
    for idx in data[3:]:
        p.step(idx)  # the run that never stopped, checked against plain torch
    ref, plain = p.ref, p.plain
    close(p.rt)
    del p

    m = gpt()
    (tmp_path / "b").mkdir()
    model, opt = wrap(m, adamw(m), OffloadConfig(nvme_dirs=str(tmp_path / "b"), impl="as_given"),
                      plan=plan(rotated(MIXED, 4)))
    assert load_checkpoint(tmp_path / "ckpt", model, opt)["step"] == 3
    for idx in data[3:]:
        lm_loss(model, idx).backward()
        opt.step()
        opt.zero_grad()
    assert_same(ref, plain, model, opt)  # where plain torch (and the run that never stopped) ended
    runtime_of(model).close()


def test_measure_runs_a_mixed_plan_and_its_bytes_match_the_cost_model(tmp_path):
    """Mixed plans, with CPU updates and with device updates (whose grads stay on the device): every byte the
    cost model predicts per link is what moved."""
    shape = dataclasses.replace(SHAPE, n_layer=3)
    w = workload_of(shape, batch=2, seq=8)
    hw = profile.resolve("cpu-dev-2core")
    cpu = plan((up(D, H, "cpu"), up(H, N, "cpu", N), up(N, H, "cpu"), up(D, N, "cpu")), prefetch_depth=1)
    c = measure(shape, OffloadConfig(nvme_dirs=str(tmp_path)), hw, batch=2, seq=8, iters=2, warmup=1, plan=cpu,
                quiet=False)
    assert c.bytes_equal, c.text()
    assert c.placement.startswith(cpu.compact())
    gc.collect()
    dev = plan((up(D, D, "device"), up(H, D, "device"), up(N, H, "device"), up(H, H, "cpu")), prefetch_depth=1,
               overlap_update=False)
    c = measure(shape, OffloadConfig(nvme_dirs=str(tmp_path)), hw, batch=2, seq=8, iters=2, warmup=1, plan=dev,
                quiet=False)
    assert c.bytes_equal, c.text()


def test_apply_plan_sizes_device_state_without_the_masters_it_drops(tmp_path):
    """After a step, a unit's state on NVMe carries an fp32 master (its params are off the device, its update on
    the device); moved to the device with its params it drops the master. The budget check counts what the state will be there, so a switch
    that fits is accepted, and the device then holds no more than its budget."""
    shape = dataclasses.replace(SHAPE, n_layer=3, d_model=128, d_ff=512, vocab=256, n_pos=32)
    torch.manual_seed(0)
    m = build_transformer(shape, device="cpu")
    target = plan((up(D, H, "cpu"), up(D, D, "device"), up(D, H, "cpu"), up(D, H, "cpu")))
    budget = 4 << 20
    m, opt = wrap(m, torch.optim.AdamW(m.parameters()), OffloadConfig(
        param_tier="nvme", state_tier="nvme", update_on="device", nvme_dirs=str(tmp_path),
        device_budget_bytes=budget))
    rt = runtime_of(m)
    idx = torch.randint(0, shape.vocab, (4, 17))
    m(idx[:, :-1]).sum().backward()
    opt.step()
    opt.zero_grad()
    assert all(s.has_master for s in opt._subgroups)  # params on NVMe updated on the device: masters
    with_masters = sum(s.chunk_bytes for s in opt._subgroups if s.unit == 1)
    rt.apply_plan(target)
    unit1 = [s for s in opt._subgroups if s.unit == 1]
    assert not any(s.has_master for s in unit1) and sum(s.chunk_bytes for s in unit1) < with_masters
    assert rt.device_budget.used_bytes <= budget
    close(rt)


def test_a_plan_the_budget_refuses_from_a_callback_is_skipped_not_fatal(tmp_path):
    """An on_iteration callback's plan that does not fit the device budget: a warning, the run goes on under the
    current plan (bit-identical to plain torch), and the refusal is recorded."""
    ref, m = gpt(), gpt()
    data = batches(3)
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    budget = sum(p.numel() * p.element_size() for p in m.parameters()) // 2
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), OffloadConfig(
        param_tier="host", state_tier="host", nvme_dirs=str(tmp_path), device_budget_bytes=budget, impl="as_given"))
    rt = runtime_of(model)
    all_device = plan((up(D, D, "device"),) * UNITS)
    rt.on_iteration.append(lambda rec: all_device if rec["iteration"] == 1 else None)
    for i, idx in enumerate(data):
        ref_loss = lm_loss(ref, idx)
        ref_loss.backward()
        plain.step()
        plain.zero_grad()
        if i == 1:
            with pytest.warns(RuntimeWarning, match="not applied"):
                loss = lm_loss(model, idx)
        else:
            loss = lm_loss(model, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert loss.item() == ref_loss.item()
    assert rt.stats["replans_refused"] == 1 and rt.refused_plans[0]["requested_after"] == 1
    assert rt.plan is None or rt.plan != all_device
    close(rt)


def test_device_grads_wait_for_lagging_updates_and_stay_exact(tmp_path):
    """A device update's grads stay on the device (no bytes to the host) until the update applies them; with the
    update thread held back, backward waits for the oldest update instead of holding more than grad_buffers
    blocks' worth (after the first step, which speculates and keeps every grad until validated); training stays
    bit-identical."""
    import random
    import time as _time

    p = Pair(tmp_path, plan((up(D, D, "device"),) * UNITS, grad_buffers=1))
    rt = p.rt
    largest = max(u.dev_grad_nbytes for u in rt.units[1:])
    held_max = [0]
    keep, update = rt._keep_device_grad, rt.optimizer.update_unit
    rng = random.Random(0)

    def keeping(u, k, g):
        keep(u, k, g)
        held_max[0] = max(held_max[0], sum(x.dev_grad_nbytes for x in rt.units[1:] if x.has_grads))

    def lagging(unit):
        _time.sleep(rng.uniform(0, 0.02))  # the update thread falls behind backward
        update(unit)

    rt._keep_device_grad, rt.optimizer.update_unit = keeping, lagging
    before = rt.swap.moved()
    for i, idx in enumerate(batches(3)):
        if i == 1:  # the first step speculates (is the loop clipping?): its grads stay until it is validated
            held_max[0] = 0
        p.step(idx)
    moved = rt.swap.moved()
    assert moved.get("d2h", 0) == before.get("d2h", 0)  # no grad left the device
    assert 0 < held_max[0] <= largest  # grad_buffers=1: one block's grads at a time (plus the one updating)
    assert all(g is None for u in rt.units for g in u.dev_grads)  # applied, then let go
    rt.close()


@pytest.mark.parametrize("budget", [False, True, "short"], ids=["room", "host-budget-at-minimum", "host-short"])
def test_updates_change_nvme_weights_in_host_memory_from_kept_copies(budget, tmp_path, monkeypatch):
    """fp32 params on NVMe keep no master: the overlapped update changes them in host memory, taking the copy the
    unit's backward fetch brought (or, for units not fetched again for backward, a copy of their device params)
    instead of reading them from the store again, where the host pool has room beyond the transfers in flight.
    Without that room (a host budget at the placement's minimum), or where memory is short and no budget bounds
    the pool, they are read again. Bit-identical either way."""
    first = plan(ALL_NVME)
    p = Pair(tmp_path / "probe", first)
    minimum = sum(p.rt.host_minimum().values())
    close(p.rt)
    if budget == "short":  # the model larger than the memory the process may use
        monkeypatch.setattr(OffloadRuntime, "host_short", lambda self: True)
    p = Pair(tmp_path / "run", first, **({"host_budget_bytes": minimum} if budget is True else {}))
    assert not any(s.has_master for s in p.opt._subgroups)
    for idx in batches(3):
        p.step(idx)
    st = p.rt.stats
    assert st["update_weights_kept"] + st["update_weights_read"] == 3 * UNITS
    if budget == "short":
        assert st["update_weights_kept"] == 0
    elif budget:
        assert st["update_weights_read"] > 0
    else:
        assert st["update_weights_read"] == 0
    # Past the step only the new weights of the units the next forward fetches first stay (rest, first block)
    rt = p.rt
    rt.settle_step_io()  # kept once their writes have landed (after the step returned)
    warm = [u for u in rt.units if u.weights.kept]
    assert {u.index for u in warm} <= {0, rt._fwd_order[0]} and (warm or budget)
    assert not (warm and budget == "short")
    assert rt.swap.pool.stats()["cached_bytes"] == sum(round_up(u.nbytes) for u in warm)
    before = rt.swap.moved("params")["disk_read"]
    loss = lm_loss(p.model, batches(1, seed=7)[0])  # a forward fetches every unit once; the warm ones from memory
    assert rt.swap.moved("params")["disk_read"] - before == sum(u.nbytes for u in rt.units if u not in warm)
    loss.backward()
    p.opt.step()
    close(p.rt)
