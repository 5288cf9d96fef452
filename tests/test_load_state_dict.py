"""``model.load_state_dict`` on a wrapped model (loading pretrained or other weights into offloaded params): the
weights land in every tier and the optimizer's fp32 masters follow, so training goes on exactly as a plain model
and optimizer would after the same load; bad state dicts fail as torch's do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import TINY_GPT, gpt, lm_loss, token_batches
from offload import OffloadConfig, wrap
from offload.runtime import runtime_of
from scheduler.workload import build_transformer


def other_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    m = gpt()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.state_dict()


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_loaded_weights_train_on_as_plainly(tier, tmp_path):
    ref, m = gpt(), gpt()
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), OffloadConfig(
        param_tier=tier, grad_tier=tier, state_tier=tier, nvme_dirs=str(tmp_path), impl="as_given"))
    data = token_batches(4, TINY_GPT.vocab)
    for i, idx in enumerate(data):
        if i == 2:  # mid-training: new weights, the optimizer's moments kept (as plainly)
            new = other_weights()
            ref.load_state_dict(new)
            assert model.load_state_dict(new) == ref.load_state_dict(new)  # same (empty) missing/unexpected keys
            sd = model.state_dict()
            assert all(torch.equal(sd[k], v) for k, v in new.items())
        for mm, o in ((ref, plain), (model, opt)):
            lm_loss(mm, idx).backward()
            o.step()
            o.zero_grad()
        sd_ref, sd = ref.state_dict(), model.state_dict()
        assert [k for k in sd_ref if not torch.equal(sd_ref[k], sd[k])] == [], i
    runtime_of(model).close()


def test_partial_and_bad_state_dicts(tmp_path):
    ref, m = gpt(), gpt()
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), OffloadConfig(
        param_tier="nvme", state_tier="nvme", nvme_dirs=str(tmp_path), impl="as_given"))
    new = other_weights()
    before = model.state_dict()
    bad = dict(new, **{"blocks.0.q.weight": torch.zeros(3, 3)})
    with pytest.raises(RuntimeError, match=r"size mismatch for blocks.0.q.weight: copying a param with shape "
                                           r"\(3, 3\) from checkpoint, the shape in current model is \(32, 32\)"):
        model.load_state_dict(bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing written
    partial = {"blocks.1.q.weight": new["blocks.1.q.weight"], "extra.weight": torch.zeros(2)}
    with pytest.raises(RuntimeError, match=r'(?s)Missing key\(s\) in state_dict: "wte.weight".*Unexpected key\(s\) '
                                           r'in state_dict: "extra.weight"'):
        model.load_state_dict(partial)
    result = model.load_state_dict(partial, strict=False)
    assert result.unexpected_keys == ["extra.weight"] and "wte.weight" in result.missing_keys
    sd = model.state_dict()  # the one param given, the others as they were (same unit: read, then written)
    assert torch.equal(sd["blocks.1.q.weight"], new["blocks.1.q.weight"])
    assert all(torch.equal(sd[k], before[k]) for k in before if k != "blocks.1.q.weight")
    runtime_of(model).close()


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_a_model_built_on_meta_is_wrapped_without_its_weights_and_loaded_shard_by_shard(tier, tmp_path):
    """Nothing of the model is ever materialized whole: wrap allocates each unit on its tier, and the weights come
    one piece of the checkpoint at a time (as from the shards of a HF checkpoint)."""
    ref, m = gpt(), build_transformer(TINY_GPT, device="meta")
    assert all(p.is_meta for p in m.parameters())
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), OffloadConfig(
        param_tier=tier, grad_tier=tier, state_tier=tier, nvme_dirs=str(tmp_path), impl="as_given"))
    rt = runtime_of(model)
    assert not any(p.is_meta for p in m.parameters())
    assert rt.num_parameters() == sum(p.numel() for p in ref.parameters())
    sd = ref.state_dict()
    keys = list(sd)
    for shard in (keys[:len(keys) // 2], keys[len(keys) // 2:]):
        result = model.load_state_dict({k: sd[k] for k in shard}, strict=False)
        assert result.unexpected_keys == [] and set(result.missing_keys) == set(keys) - set(shard)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for idx in token_batches(3, TINY_GPT.vocab):
        for mm, o in ((ref, plain), (model, opt)):
            lm_loss(mm, idx).backward()
            o.step()
            o.zero_grad()
    sd_ref, sd = ref.state_dict(), model.state_dict()
    assert [k for k in sd_ref if not torch.equal(sd_ref[k], sd[k])] == []
    rt.close()


def test_a_model_whose_buffers_are_on_meta_is_refused():
    m = build_transformer(TINY_GPT, device="meta")
    m.register_buffer("inv_freq", torch.ones(4, device="meta"))
    with pytest.raises(ValueError, match=r"buffers inv_freq are on the meta device.*init_empty_weights"):
        wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), OffloadConfig(param_tier="host"))


def test_a_meta_buffer_the_models_initializer_leaves_unset_is_refused():
    """A buffer built on meta is recomputed by the model's own ``_init_weights`` (transformers' way); one that the
    initializer does not set would hold garbage, so it is named instead."""
    m = build_transformer(TINY_GPT, device="meta")
    table = nn.Module()
    table.register_buffer("freqs", torch.ones(4, device="meta"), persistent=False)
    m.table = table
    m._init_weights = lambda module: None  # knows nothing of `table`
    with pytest.raises(ValueError, match=r"buffers table\.freqs are on the meta device"):
        wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), OffloadConfig(param_tier="host"))
    m2 = build_transformer(TINY_GPT, device="meta")
    m2.table = nn.Module()
    m2.table.register_buffer("freqs", torch.ones(4, device="meta"), persistent=False)
    m2._init_weights = lambda module: module.freqs.copy_(torch.arange(4.0)) if module is m2.table else None
    model, _ = wrap(m2, torch.optim.AdamW(m2.parameters(), lr=1e-2), OffloadConfig(param_tier="host"))
    assert torch.equal(model.table.freqs, torch.arange(4.0))
    runtime_of(model).close()


def test_state_dict_reads_each_offloaded_unit_once(tmp_path):
    """model.state_dict() gives every weight from the unit's one copy: a unit on NVMe is read once, not once per
    tensor in it (a GPT block holds a dozen)."""
    ref, m = gpt(), gpt()
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), OffloadConfig(
        param_tier="nvme", grad_tier="host", state_tier="host", nvme_dirs=str(tmp_path), impl="as_given"))
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    idx = token_batches(1, TINY_GPT.vocab)[0]
    for mm, o in ((ref, plain), (model, opt)):
        lm_loss(mm, idx).backward()
        o.step()
        o.zero_grad()
    rt = runtime_of(model)
    rt.settle_step_io()  # the step's last writes land after it returned; then its copies for the next forward are kept
    before = rt.swap.moved("params")["disk_read"]
    stored = [u for u in rt.units if u.weights is not None and u.weights.home.value == "nvme"]
    warm = [u for u in stored if u.weights.kept]  # kept in memory for the next forward: nothing to read
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert len(stored) >= 2 and any(len(list(u.params)) > 2 for u in stored)
    assert rt.swap.moved("params")["disk_read"] - before == sum(u.weights.nbytes for u in stored if u not in warm)
    assert all(u.weights.kept for u in warm)  # and still kept after the read
    assert [k for k in sd_ref if not torch.equal(sd_ref[k], sd[k])] == []
    rt.close()
