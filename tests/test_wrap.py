"""offload.wrap against plain PyTorch: params, grads and state off the device, bit-identical training."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from helpers import TINY_GPT, TextbookMixedPrecision, gpt, lm_loss, model_bytes, token_batches
from offload import OffloadConfig, wrap
from offload.runtime import runtime_of
from offload.swap import ChunkState
from storage import Tier


def batches(n, seed=1):
    return token_batches(n, TINY_GPT.vocab, seed=seed)


def run(model, opt, data, accum, clip, wrapped):
    losses = []
    it = iter(data)
    for _ in range(len(data) // accum):
        for _ in range(accum):
            loss = lm_loss(model, next(it))
            loss.backward()
            losses.append(loss.item())
        if clip is not None:
            if wrapped:
                opt.clip_grad_norm_(clip)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return losses


GATE_S = 30
"""How long a gated backward waits for what it waits for: only a runtime that never does it gets near this."""


def hold_backward_before(block, until: threading.Event, seen: list, armed=lambda: True) -> None:
    """Make backward, when it reaches ``block`` (before any of its own backward runs), wait until ``until`` is set,
    and append to ``seen`` whether it was (False: it timed out). Order from a gate instead of from timing: what
    the test expects to happen during backward has to happen while backward is held, or the wait fails."""
    def register(module, args, out):
        if out.requires_grad and armed():
            out.register_hook(lambda grad: seen.append(until.wait(GATE_S)))
    block.register_forward_hook(register)


@pytest.mark.parametrize("overlap", [False, True], ids=["step", "overlap"])
@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
@pytest.mark.parametrize("param_tier,state_tier", [("host", "host"), ("nvme", "nvme")])
def test_gpt_parity(param_tier, state_tier, clip, overlap, tmp_path):
    """Params, grads and state all on NVMe (or all on the host), a device budget of half the model, grad
    accumulation 2, clipping on and off, overlapped update on and off: bit-identical to plain training."""
    ref, m = gpt(), gpt()
    data = batches(10)
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    losses_ref = run(ref, plain, data, accum=2, clip=clip, wrapped=False)

    budget = model_bytes(m) // 2  # the whole model does not fit on the "device"
    cfg = OffloadConfig(param_tier=param_tier, state_tier=state_tier, grad_tier=param_tier, nvme_dirs=str(tmp_path),
                        impl="as_given", device_budget_bytes=budget, prefetch=1, overlap_update=overlap,
                        accumulation_steps=2,
                        max_grad_norm=clip if overlap else None)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1), cfg)
    assert model is m
    # With the overlapped update, clipping is configured (the runtime clips before it updates); without, the
    # user calls opt.clip_grad_norm_ as with torch's.
    losses = run(model, opt, data, accum=2, clip=None if overlap else clip, wrapped=True)
    assert losses == losses_ref
    rt = runtime_of(model)
    assert rt.device_budget.peak_bytes <= budget
    assert all(p.numel() == 0 for p in m.parameters()), "params must be released between uses"
    if param_tier == "nvme":  # the first micro-batch's grads went to the store and came back
        assert any(k.endswith(".grads") for k in rt.swap.store.keys())
        assert all(u.grads.state is ChunkState.EMPTY for u in rt.units)  # consumed by the step
    sd_ref, sd = ref.state_dict(), model.state_dict()
    assert sd_ref.keys() == sd.keys()
    for k in sd_ref:
        assert torch.equal(sd_ref[k], sd[k]), k
    osd_ref, osd = plain.state_dict(), opt.state_dict()
    for k, entry in osd_ref["state"].items():
        for key, v in entry.items():
            assert torch.equal(v, osd["state"][k][key]), (k, key)
    rt.close()


def test_too_small_device_budget_names_the_unit(tmp_path):
    m = gpt()
    with pytest.raises(ValueError, match=r"unit 'rest'.*blocks\.\d"):
        wrap(m, torch.optim.AdamW(m.parameters()), OffloadConfig(device_budget_bytes=1024))


def test_overlapped_update_overlaps_backward(tmp_path):
    """The update of a later unit starts while backward still has an earlier one to run: backward is held before
    blocks.0 until an update has begun, which happens only if updates start during backward. The recorded timeline
    shows the same order: that update's span starts before blocks.0's grads are copied out and before the backward
    span ends."""
    m = gpt()
    cfg = OffloadConfig(param_tier="host", state_tier="host", overlap_update=True, impl="as_given")
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), cfg)
    rt = runtime_of(model)
    update_began, held = threading.Event(), []
    real_update = opt._update_subgroups

    def update_subgroups(*args, **kw):
        update_began.set()  # called inside the unit's "update" span, so the span's recorded start comes first
        return real_update(*args, **kw)

    opt._update_subgroups = update_subgroups
    hold_backward_before(m.blocks[0], update_began, held)
    lm_loss(model, batches(1)[0]).backward()
    opt.step()
    opt.zero_grad()
    assert held == [True], "no update began while backward still had blocks.0 to run"
    ev = rt.timeline.events
    first_update = min(e.start_s for e in ev if e.resource == "cpu_update")
    (bwd,) = [e for e in ev if e.resource == "compute" and e.name == "backward"]
    grads0 = [e.start_s for e in ev if e.resource == "d2h" and e.name == "grad blocks.0"]
    assert grads0 and first_update < min(grads0), "the timeline has blocks.0's grads before any update"
    assert first_update < bwd.end_s
    rt.close()


def test_clip_after_overlap_is_refused_without_speculation(tmp_path):
    m = gpt()
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), OffloadConfig(overlap_update=True,
                                                                                   speculate=False))
    lm_loss(model, batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="max_grad_norm"):
        opt.clip_grad_norm_(1.0)
    opt.step()
    lm_loss(model, batches(1)[0]).backward()
    opt.step()


def _hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float()


@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
@pytest.mark.parametrize("overlap", [False, True], ids=["step", "overlap"])
def test_hf_llama_parity_all_on_nvme(overlap, clip, tmp_path):
    """HF LlamaForCausalLM from a config (no download): params and state on NVMe, device budget below the
    model, grad accumulation 2: bit-identical losses and weights to plain training."""
    ref, m = _hf_llama(), _hf_llama()
    data = batches(10)  # 5 steps of 2 micro-batches

    def hf_run(model, opt, wrapped):
        losses = []
        for i in range(0, len(data), 2):
            for idx in data[i:i + 2]:
                loss = model(input_ids=idx, labels=idx).loss
                loss.backward()
                losses.append(loss.item())
            if clip is not None and not wrapped:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
        return losses

    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    l_ref = hf_run(ref, plain, False)
    cfg = OffloadConfig(param_tier="nvme", state_tier="nvme", grad_tier="nvme", nvme_dirs=str(tmp_path),
                        impl="as_given", device_budget_bytes=model_bytes(m) // 2, overlap_update=overlap,
                        accumulation_steps=2, max_grad_norm=clip)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), cfg)
    assert [u.name for u in runtime_of(model).units][1:] == [f"model.layers.{i}" for i in range(3)]
    l = hf_run(model, opt, True)
    assert l == l_ref
    sd_ref, sd = ref.state_dict(), model.state_dict()
    for k in sd_ref:
        assert torch.equal(sd_ref[k], sd[k]), k
    runtime_of(model).close()


def test_gpt_with_activation_checkpointing_and_frozen_params(tmp_path):
    """torch.utils.checkpoint recomputes a block inside backward; a frozen block gets no grads or state."""
    from torch.utils.checkpoint import checkpoint

    def ckpt_forward(model):
        blocks = model.blocks

        def fwd(idx):
            x = model.wte(idx) + model.wpe(torch.arange(idx.shape[1]))
            for blk in blocks:
                x = checkpoint(blk, x, use_reentrant=False)
            return model.lm_head(model.ln_f(x))
        return fwd

    ref, m = gpt(), gpt()
    for model in (ref, m):
        model.blocks[0].requires_grad_(False)
        model.forward = ckpt_forward(model)
    data = batches(4)
    plain = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    l_ref = run(ref, plain, data, accum=1, clip=None, wrapped=False)
    model, opt = wrap(m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2),
                      OffloadConfig(impl="as_given", device_budget_bytes=model_bytes(m) // 2))
    l = run(model, opt, data, accum=1, clip=None, wrapped=True)
    assert l == l_ref
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert len(opt.state_dict()["state"]) == len(plain.state_dict()["state"])
    runtime_of(model).close()


def test_bf16_autocast_and_chrome_trace(tmp_path):
    """bf16 autocast over fp32 params: the same results as plain autocast training; the iteration's timeline
    exports as a Chrome trace with every resource's events."""
    import json

    ref, m = gpt(), gpt()
    data = batches(4)

    def auto_run(model, opt, wrapped):
        losses = []
        for idx in data:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = lm_loss(model, idx)
            loss.backward()
            losses.append(loss.item())
            opt.step()
            opt.zero_grad()
        return losses

    l_ref = auto_run(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), False)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2),
                      OffloadConfig(param_tier="nvme", state_tier="nvme", nvme_dirs=str(tmp_path),
                                    impl="as_given"))
    assert auto_run(model, opt, True) == l_ref
    rt = runtime_of(model)
    rt.settle_step_io()  # the step's last writes land after it returned: on the timeline once they have
    path = tmp_path / "trace.json"
    rt.timeline.save_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert {"compute", "h2d", "d2h", "disk_read", "disk_write", "cpu_update"} <= names
    used = {e["tid"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert len(used) >= 5, "expected events on compute, copies, disk and update"
    timed = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert sorted(e["name"] for e in timed) == sorted(e.name for e in rt.timeline.events), "trace != timeline"
    # The order the timeline must show whatever the machine's speed: forward before backward; a unit's update
    # only after the last of its grads was copied out (each grad copy ends before the unit is handed to update).
    ev = rt.timeline.events
    (fwd,) = [e for e in ev if e.resource == "compute" and e.name == "forward"]
    (bwd,) = [e for e in ev if e.resource == "compute" and e.name == "backward"]
    assert fwd.end_s <= bwd.start_s
    updates = {e.name.split(" ", 1)[1]: e for e in ev if e.resource == "cpu_update"}
    assert set(updates) == {u.name for u in rt.units}
    for name, upd in updates.items():
        grads = [e for e in ev if e.resource == "d2h" and e.name == f"grad {name}"]
        assert grads and max(g.end_s for g in grads) <= upd.start_s, f"{name} updated before its grads landed"
    assert rt.report()["timeline"]["span_s"] > 0
    rt.close()


def test_blocks_run_twice_or_skipped(tmp_path):
    """A block called twice in one forward (weights shared across depth) and a block skipped on some steps:
    units are fetched when they run, whatever the recorded order says, and training matches plain."""
    def odd_forward(model):
        def fwd(idx, step=[0]):
            x = model.wte(idx) + model.wpe(torch.arange(idx.shape[1]))
            x = model.blocks[0](x)
            x = model.blocks[0](x)  # twice
            if step[0] % 2 == 0:
                x = model.blocks[1](x)  # only on even steps
            x = model.blocks[2](x)
            step[0] += 1
            return model.lm_head(model.ln_f(x))
        return fwd

    ref, m = gpt(), gpt()
    ref.forward, m.forward = odd_forward(ref), odd_forward(m)
    data = batches(6)
    l_ref = run(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), data, accum=1, clip=None, wrapped=False)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2),
                      OffloadConfig(param_tier="nvme", state_tier="nvme", nvme_dirs=str(tmp_path),
                                    impl="as_given", device_budget_bytes=model_bytes(m) // 2, prefetch=2))
    assert run(model, opt, data, accum=1, clip=None, wrapped=True) == l_ref
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert runtime_of(model).device_budget.used_bytes == 0, "everything released after the step"
    runtime_of(model).close()


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_bf16_params_with_fp32_masters(tier, tmp_path):
    """A bf16 model under wrap: fp32 masters and state off the device, grads cast up as they leave it. Equals
    the textbook mixed-precision loop (fp32 master copy, grads cast up, update, cast down) bit for bit."""
    ref, m = gpt().bfloat16(), gpt().bfloat16()
    textbook = TextbookMixedPrecision(ref, lr=3e-3)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=3e-3),
                      OffloadConfig(param_tier=tier, state_tier=tier, grad_tier=tier, nvme_dirs=str(tmp_path),
                                    impl="as_given", device_budget_bytes=model_bytes(m) // 2))
    for idx in batches(4):
        textbook.step(lm_loss(ref, idx))
        lm_loss(model, idx).backward()
        opt.step()
        opt.zero_grad()
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert b.dtype == torch.bfloat16 and torch.equal(a, b), k
    runtime_of(model).close()


@pytest.mark.parametrize("buffers", [1, 2, 4])
def test_overlapped_update_reads_state_ahead(buffers, tmp_path):
    """With NVMe state and the overlapped update, a unit's state is read before its update starts: the first
    units' reads are issued when backward begins, the next ones' as a buffer frees (the start of an update, a
    write-back landing), as far as ``buffers`` allows (one is kept for the update itself, and write-backs in flight
    count: with 1 there is no read-ahead). Training stays bit-identical to plain AdamW, and nothing is left in
    flight or held once the step's writes have landed.

    Order comes from gates, not from the machine's speed: backward is held before blocks.0 until a state read
    has been issued, and each read-ahead waits for the write-backs in flight to finish, so how far it reads
    depends on ``buffers`` alone."""
    ref, m = gpt(), gpt()
    data = batches(4)
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    losses_ref = run(ref, plain, data, accum=1, clip=None, wrapped=False)
    cfg = OffloadConfig(param_tier="host", state_tier="nvme", nvme_dirs=str(tmp_path), impl="as_given",
                        overlap_update=True, buffers=buffers)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), cfg)
    rt = runtime_of(model)

    read_issued, held, step_no = threading.Event(), [], [0]
    real_trace, real_prefetch = rt.swap.trace, opt.prefetch_state
    stored = [s for s in opt._subgroups if s.tier is Tier.NVME]

    def trace(resource, chunk):
        done = real_trace(resource, chunk)  # records the issue time first
        if resource == "disk_read" and chunk.kind == "state":
            read_issued.set()
        return done

    def prefetch_state(subs):
        deadline = time.monotonic() + GATE_S
        while any(s.chunk.state is ChunkState.WRITING for s in stored):
            assert time.monotonic() < deadline, "a state write-back did not finish"
            time.sleep(0.001)
        return real_prefetch(subs)

    rt.swap.trace, opt.prefetch_state = trace, prefetch_state
    # From the second step: the first creates the state, so there is nothing stored to read yet.
    hold_backward_before(m.blocks[0], read_issued, held, armed=lambda: step_no[0] > 0)
    losses = []
    for step, idx in enumerate(data):
        step_no[0] = step
        read_issued.clear()
        loss = lm_loss(model, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        rt.settle_step_io()  # the step returns with its last writes in flight; they land and let go of their buffers
        assert all(s.chunk.state is ChunkState.STORED for s in stored), "read-ahead or write-backs outlived the step"
        if step == 0:
            continue
        assert held[-1], "no state read was issued while backward still had blocks.0 to run"
        tl = rt.timeline
        # A read's span is recorded by its handle's done-callback, which may run just after the step's wait for
        # it returned: wait (bounded) until every stored chunk's read of this step is on the timeline.
        deadline = time.monotonic() + GATE_S
        while sum(e.resource == "disk_read" and e.name.startswith("state ") for e in tl.events) < len(stored):
            assert time.monotonic() < deadline, "state reads missing from the timeline"
            time.sleep(0.001)
        ev = tl.events
        bwd_end = max(e.end_s for e in ev if e.resource == "compute" and e.name == "backward")
        order = rt._update_seq
        read_start = {}
        for idx_u in order:
            keys = {f"state {s.key}" for s in opt._subgroups_of(idx_u)}
            starts = [e.start_s for e in ev if e.resource == "disk_read" and e.name in keys]
            if starts:
                read_start[idx_u] = min(starts)
        upd_start = {int(e.name.split()[-1].split(".")[-1]) + 1 if e.name.startswith("update blocks.") else 0: e.start_s
                     for e in ev if e.resource == "cpu_update" and e.name.startswith("update ")}
        # Reads of units after the first (whose read comes at backward's start) that began before their own
        # update did: read ahead. Without read-ahead, the update reads its unit's state itself, inside its span.
        ahead = [b for b in order[1:] if b in read_start and b in upd_start and read_start[b] <= upd_start[b]]
        if buffers == 1:
            assert not ahead
        else:
            assert ahead, f"no unit's state was read ahead of its update (step {step})"
        assert min(read_start.values()) < bwd_end, "no state read overlapped backward"
    assert losses == losses_ref
    for a, b in zip(ref.parameters(), (rt.param_value(p) for p in m.parameters())):
        assert torch.equal(a, b)
    rt.close()


def test_cpu_device_reuses_released_buffers_within_the_budget(tmp_path, monkeypatch):
    """On a CPU device, a fetch takes the buffer a released unit of the same size left (as CUDA's caching
    allocator would) instead of fresh memory, which costs a page fault per 4 KiB: after the first iteration no
    fetch allocates. Live plus spare device memory never exceeds the device budget."""
    import offload.swap as rt_mod

    allocs = []
    real = rt_mod.aligned_empty

    def counting(nbytes, **kw):
        allocs.append(nbytes)
        return real(nbytes, **kw)

    monkeypatch.setattr(rt_mod, "aligned_empty", counting)
    for budget in (None, model_bytes(gpt()) // 2):
        m = gpt()
        cfg = OffloadConfig(param_tier="host", state_tier="host", prefetch=1, device_budget_bytes=budget)
        model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), cfg)
        rt = runtime_of(model)
        seen = []
        orig_issue = rt._issue_fetch

        def issue(u, **kw):
            ok = orig_issue(u, **kw)
            seen.append(rt.device_budget.used_bytes + rt.swap.device.spare_bytes)
            return ok

        rt._issue_fetch = issue
        per_iter = []
        for idx in batches(3):
            allocs.clear()
            lm_loss(model, idx).backward()
            opt.step()
            opt.zero_grad()
            per_iter.append(len(allocs))
        assert per_iter[0] > 0 and per_iter[1:] == [0, 0], per_iter
        assert max(seen) <= rt.device_budget.capacity_bytes
        rt.close()


@pytest.mark.parametrize("param_tier", ["host", "nvme"])
def test_backward_reads_the_weights_forward_saved_after_their_memory_was_reused(param_tier, tmp_path):
    """A linear layer's forward saves ``weight.t()``, a view of the memory the unit's params were fetched into;
    the unit is released after forward and fetched again before its backward. That view must see the unit's
    weights then, whatever took the released memory meanwhile (here: every released buffer is taken, filled
    with NaN and given back in another order, as the overlapped device updates do with their scratch)."""
    ref, m = gpt(), gpt()
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    cfg = OffloadConfig(param_tier=param_tier, state_tier="host", prefetch=1, impl="as_given", nvme_dirs=str(tmp_path))
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), cfg)
    rt = runtime_of(model)
    sizes = {u.nbytes for u in rt.units[1:]}
    for idx in batches(2):
        lm_loss(ref, idx).backward()
        loss = lm_loss(model, idx)
        taken = [rt.swap.scratch(n, Tier.DEVICE) for n in sizes for _ in range(len(rt.units))]
        for buf, _ in taken:
            buf.fill_(0xFF)
        for _, release in reversed(taken):
            release()
        loss.backward()
        plain.step()
        opt.step()
        plain.zero_grad()
        opt.zero_grad()
        for a, p in zip(ref.parameters(), m.parameters()):
            assert torch.equal(a, rt.param_value(p))
    rt.close()


@pytest.mark.parametrize("overlap", [False, True], ids=["step", "overlap"])
def test_state_on_nvme_is_cut_into_subgroups_within_a_unit(overlap, tmp_path):
    """State streamed from the store is cut to subgroup_numel inside each unit (params sliced on 1024-element
    boundaries), so the host holds `buffers` small chunks instead of a unit's whole state: the host minimum
    shrinks, and training stays bit-identical."""
    ref, m = gpt(), gpt()
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    cfg = dict(param_tier="nvme", state_tier="nvme", grad_tier="nvme", nvme_dirs=str(tmp_path), impl="as_given",
               device_budget_bytes=model_bytes(m) // 2, overlap_update=overlap)
    whole_m = gpt()
    whole, _ = wrap(whole_m, torch.optim.AdamW(whole_m.parameters(), lr=1e-2), OffloadConfig(**cfg))
    whole_min = runtime_of(whole).host_minimum()["state_in_flight"]
    runtime_of(whole).close()
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), OffloadConfig(**cfg, subgroup_numel=2048))
    rt = runtime_of(model)
    per_unit = [len(opt._subgroups_of(u.index)) for u in rt.units]
    assert max(per_unit) > 1 and all(s.numel <= 2048 for s in opt._subgroups)
    assert any(not pc.whole for s in opt._subgroups for pc in s.pieces)  # a param cut across subgroups
    assert rt.host_minimum()["state_in_flight"] < whole_min
    data = batches(4)
    assert run(model, opt, data, 1, None, True) == run(ref, plain, data, 1, None, False)
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    rt.close()


def test_backward_waits_for_device_grads_beyond_grad_buffers_units(monkeypatch):
    """Grads handed to the grad thread are device memory until it has moved them: backward waits once they pass
    grad_buffers times the largest unit's grads (what the cost model counts on the device) instead of piling up
    while the grad thread is held. The grad thread is gated until the compute thread waits, or until the grads
    outstanding pass the bound (which the check then reports)."""
    import concurrent.futures

    from offload.runtime import DEFAULT_GRAD_BUFFERS

    m = gpt()
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2),
                      OffloadConfig(param_tier="host", grad_tier="host", state_tier="host", overlap_update=False))
    rt = runtime_of(model)
    limit = DEFAULT_GRAD_BUFFERS * max(u.grad_nbytes for u in rt.units)
    assert sum(u.grad_nbytes for u in rt.units) > limit  # backward would pass the bound without waiting
    gate, lock, outstanding, seen = threading.Event(), threading.Lock(), [0], []
    real_work, real_submit, real_wait = rt._grad_work, rt._grad_pool.submit, concurrent.futures.wait

    def work(u, k, g, event):
        gate.wait(GATE_S)
        real_work(u, k, g, event)
        with lock:
            outstanding[0] -= g.numel() * g.element_size()

    def submit(fn, *args):
        if fn is work:
            with lock:
                outstanding[0] += args[2].numel() * args[2].element_size()
                seen.append(outstanding[0])
                if outstanding[0] > limit:
                    gate.set()
        return real_submit(fn, *args)

    def wait(fs, *a, **kw):
        if threading.current_thread() is threading.main_thread():
            gate.set()  # the compute thread waits for the grad thread: let it go
        return real_wait(fs, *a, **kw)

    rt._grad_work, rt._grad_pool.submit = work, submit
    monkeypatch.setattr(concurrent.futures, "wait", wait)
    lm_loss(model, batches(1)[0]).backward()
    opt.step()
    assert gate.is_set() and seen and max(seen) <= limit, (max(seen), limit)
    rt.close()


def _all_nvme_against_plain(tmp_path, rule, *, forward=None, after_step=None):
    """Train a GPT all on NVMe and the same GPT plainly on four batches, with ``rule`` injected at the fault sites
    (:mod:`storage.faults`, ``rule(runtime, site, key)``); ``forward(step, idx, model)`` computes the loss where
    given, ``after_step(step, runtime)`` runs after each optimizer step. Checks the two bit-identical; returns
    the runtime."""
    from storage import faults

    ref, m = gpt(), gpt()
    data = batches(4)
    losses_ref = run(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), data, accum=1, clip=None, wrapped=False)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2),
                      OffloadConfig(param_tier="nvme", state_tier="nvme", nvme_dirs=str(tmp_path), impl="as_given"))
    rt = runtime_of(model)
    losses = []
    with faults.inject_delays(seed=None, rule=lambda site, key: rule(rt, site, key)):
        for step, idx in enumerate(data):
            loss = forward(step, idx, model) if forward is not None else lm_loss(model, idx)
            loss.backward()
            losses.append(loss.item())
            opt.step()
            opt.zero_grad()
            if after_step is not None:
                after_step(step, rt)
    rt.settle_step_io()
    assert losses == losses_ref
    for a, b in zip(ref.parameters(), (rt.param_value(p) for p in m.parameters())):
        assert torch.equal(a, b)
    return rt


def test_step_returns_before_its_last_writes_land_and_the_next_forward_runs_beside_them(tmp_path):
    """An overlapped step that commits as it is returns once every update ran: its last unit's writes (the rest
    unit's state and new weights) land during the next forward, which fetches those weights from the buffer
    being written instead of waiting. Held in flight by a gate (not by timing): the step returns, the next
    forward runs to the end, and only then do they land. Training stays bit-identical to plain AdamW."""
    armed, land, held, tail = threading.Event(), threading.Event(), [], set()

    def gate(rt, site, key):
        if not tail:
            tail.update({rt.units[0].weights.key} | {s.key for s in rt.optimizer._subgroups_of(0)})
        if site == "store.write_done" and key in tail and armed.is_set():
            held.append(key)
            assert land.wait(GATE_S), "the gated writes were never let land"
        return 0.0

    def arm(step, rt):
        if step == 0:  # from the next step's writes on (the update thread writes the rest unit's during backward)
            rt.settle_step_io()
            armed.set()

    def forward(step, idx, model):
        if step != 2:
            return lm_loss(model, idx)
        rest = runtime_of(model).units[0]
        assert rest.weights.state is ChunkState.WRITING  # the step before left its last writes held
        loss = lm_loss(model, idx)  # the whole forward, with them still held
        assert rest.weights.state is ChunkState.WRITING
        land.set()
        return loss

    rt = _all_nvme_against_plain(tmp_path, gate, forward=forward, after_step=arm)
    assert tail and set(held) == tail  # every one of them was held, and landed
    rt.close()


def test_a_failed_write_the_step_left_in_flight_is_raised_and_its_bytes_kept(tmp_path):
    """The step's last writes land after it returned; one that fails (a full disk) is raised by whatever waits for
    them next (here ``settle_step_io``, as reading the weights, a checkpoint, the next step or ``close`` do), never
    dropped: its new bytes stay in memory and are written with the unit's next weights, so training goes on
    bit-identical to plain AdamW."""
    import errno

    fail, raised = threading.Event(), []

    def full_disk(rt, site, key):
        if site == "store.write" and key == rt.units[0].weights.key and fail.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        return 0.0

    def after_step(step, rt):
        if step == 0:  # from the next step's writes on (the update thread writes the rest unit's during backward)
            rt.settle_step_io()
            fail.set()
        if step == 1:
            with pytest.raises(Exception, match="disk full|No space"):
                rt.settle_step_io()
            raised.append(rt.units[0].weights.state)
            fail.clear()

    rt = _all_nvme_against_plain(tmp_path, full_disk, after_step=after_step)
    assert raised == [ChunkState.DIRTY]  # the new weights, kept in memory
    rt.close()
