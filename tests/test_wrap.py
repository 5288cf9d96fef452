"""offload.wrap against plain PyTorch: params, grads and state off the device, bit-identical training."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadConfig, wrap
from offload.swap import ChunkState
from scheduler.workload import TransformerShape, build_transformer

SHAPE = TransformerShape(n_layer=3, d_model=32, n_head=4, d_ff=64, vocab=96, n_pos=16, bias=True, norm="layernorm",
                         tied=True)


def gpt():
    torch.manual_seed(0)
    return build_transformer(SHAPE, device="cpu")


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SHAPE.vocab, (4, 12), generator=g) for _ in range(n)]


def lm_loss(model, idx):
    logits = model(idx[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


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


def model_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


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
    rt = model._offload_runtime
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
    """In the recorded timeline, the update of a unit runs while backward of an earlier unit computes."""
    m = gpt()
    cfg = OffloadConfig(param_tier="host", state_tier="host", overlap_update=True, impl="as_given")
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), cfg)
    rt = model._offload_runtime
    overlapped = False
    for idx in batches(4):
        lm_loss(model, idx).backward()
        opt.step()
        opt.zero_grad()
        tl = rt.timeline
        updates = [e for e in tl.events if e.resource == "cpu_update" and e.name.startswith("update blocks.")]
        grads = [e for e in tl.events if e.resource == "d2h"]
        # a later grad copy (backward of an earlier unit) started before some update ended
        overlapped |= any(g.start_s < u.end_s and g.name != "grad " + u.name.split(" ", 1)[1]
                          and g.start_s > u.start_s for u in updates for g in grads)
    assert overlapped, "no update ran concurrently with backward"
    rt.close()


def test_clip_after_overlap_is_refused(tmp_path):
    m = gpt()
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), OffloadConfig(overlap_update=True))
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
    assert [u.name for u in model._offload_runtime.units][1:] == [f"model.layers.{i}" for i in range(3)]
    l = hf_run(model, opt, True)
    assert l == l_ref
    sd_ref, sd = ref.state_dict(), model.state_dict()
    for k in sd_ref:
        assert torch.equal(sd_ref[k], sd[k]), k
    model._offload_runtime.close()


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
    model._offload_runtime.close()


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
    rt = model._offload_runtime
    path = tmp_path / "trace.json"
    rt.timeline.save_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert {"compute", "h2d", "d2h", "disk_read", "disk_write", "cpu_update"} <= names
    used = {e["tid"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert len(used) >= 5, "expected events on compute, copies, disk and update"
    summary = rt.report()["timeline"]
    assert summary["span_s"] > 0 and summary["overlap_efficiency"] >= 1.0
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
    assert model._offload_runtime.device_budget.used_bytes == 0, "everything released after the step"
    model._offload_runtime.close()


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_bf16_params_with_fp32_masters(tier, tmp_path):
    """A bf16 model under wrap: fp32 masters and state off the device, grads cast up as they leave it. Equals
    the textbook mixed-precision loop (fp32 master copy, grads cast up, update, cast down) bit for bit."""
    ref, m = gpt().bfloat16(), gpt().bfloat16()
    masters = [p.detach().float().clone().requires_grad_(True) for p in ref.parameters()]
    ref_opt = torch.optim.AdamW(masters, lr=3e-3)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=3e-3),
                      OffloadConfig(param_tier=tier, state_tier=tier, grad_tier=tier, nvme_dirs=str(tmp_path),
                                    impl="as_given", device_budget_bytes=model_bytes(m) // 2))
    for idx in batches(4):
        lm_loss(ref, idx).backward()
        for mp, p in zip(masters, ref.parameters()):
            mp.grad, p.grad = p.grad.float(), None
        ref_opt.step()
        with torch.no_grad():
            for mp, p in zip(masters, ref.parameters()):
                p.copy_(mp)
        lm_loss(model, idx).backward()
        opt.step()
        opt.zero_grad()
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert b.dtype == torch.bfloat16 and torch.equal(a, b), k
    model._offload_runtime.close()


@pytest.mark.parametrize("buffers", [1, 2, 4])
def test_overlapped_update_reads_state_ahead(buffers, tmp_path):
    """With NVMe state and the overlapped update, a unit's state is read before its update starts: the first
    units' reads are issued when backward begins, the next ones' before the update of the unit before them, as far
    as ``buffers`` allows (one is kept for the update itself: with 1 there is no read-ahead). Write-backs go on
    while later units update. Training stays bit-identical to plain AdamW, and nothing is left in flight or held
    after the step."""
    ref, m = gpt(), gpt()
    data = batches(4)
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    losses_ref = run(ref, plain, data, accum=1, clip=None, wrapped=False)
    cfg = OffloadConfig(param_tier="host", state_tier="nvme", nvme_dirs=str(tmp_path), impl="as_given",
                        overlap_update=True, buffers=buffers)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), cfg)
    rt = model._offload_runtime
    losses, ahead_seen = [], 0
    for step, idx in enumerate(data):
        loss = lm_loss(model, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        assert not opt._ahead and not opt._late_writes, "read-ahead or write-backs outlived the step"
        if step == 0:
            continue  # the first step creates the state: nothing stored to read yet
        ev = rt.timeline.events
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
        # Reads that began before the update of the unit before them (in update order) ended: read ahead.
        ahead = [b for a, b in zip(order, order[1:]) if b in read_start and a in upd_start
                 and read_start[b] <= upd_start[a]]
        ahead_seen += len(ahead)
        if buffers == 1:
            assert not ahead
        assert min(read_start.values()) < bwd_end, "no state read overlapped backward"
    if buffers > 1:
        assert ahead_seen > 0, "no unit's state was read ahead of the update before it"
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
        rt = model._offload_runtime
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
