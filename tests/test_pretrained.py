"""offload.load_pretrained / offload.save_pretrained: transformers' safetensors checkpoints streamed unit by unit
into a wrapped model built on the meta device, and the fine-tuned weights written back in the same format.
Checked against transformers' own from_pretrained and plain PyTorch training, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TextbookMixedPrecision

from offload import CheckpointError, OffloadConfig, load_pretrained, runtime_of, save_pretrained, wrap

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _config(tied: bool = False, **kw):
    return transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                    tie_word_embeddings=tied, **kw)


def _checkpoint(path, cfg, dtype=torch.float32, shard="20KB"):
    """A pretrained checkpoint as transformers writes it (sharded with an index when ``shard`` is small)."""
    torch.manual_seed(0)
    src = transformers.LlamaForCausalLM(cfg).to(dtype)
    src.save_pretrained(path, max_shard_size=shard)
    return path


def _on_meta(cfg, dtype=torch.float32):
    with torch.device("meta"):  # from_config with a dtype: the params in it, the rotary buffers in fp32
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def _offload_config(tier, tmp_path, **kw):
    (tmp_path / "store").mkdir(parents=True, exist_ok=True)
    return OffloadConfig(param_tier=tier, state_tier=tier, grad_tier=tier, nvme_dirs=str(tmp_path / "store"),
                         impl="as_given", **kw)


def _batches(n, vocab=96):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (2, 12), generator=g) for _ in range(n)]


def _train(model, opt, data):
    losses = []
    for x in data:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _differ(a: dict, b: dict) -> list[str]:
    assert set(a) == set(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_streamed_load_trains_bit_identically_to_from_pretrained(tier, tied, tmp_path):
    """Built under torch.device("meta") (buffers too: the rotary inv_freq is recomputed), wrapped, loaded from a
    sharded checkpoint: the weights equal from_pretrained's, and training equals plain training of that model."""
    cfg = _config(tied)
    ckpt = _checkpoint(tmp_path / "ckpt", cfg)
    assert (ckpt / "model.safetensors.index.json").exists()
    ref = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    m = _on_meta(cfg)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), _offload_config(tier, tmp_path))
    result = load_pretrained(model, ckpt, progress=False)
    assert result.missing == [] and result.unexpected == [] and result.initialized == []
    assert result.nbytes == sum(v.numel() * v.element_size() for f in ckpt.glob("*.safetensors")
                                for v in safetensors_torch.load_file(f).values())
    assert _differ(ref.state_dict(), model.state_dict()) == []
    assert all(torch.equal(b, dict(ref.named_buffers())[n]) for n, b in model.named_buffers())
    data = _batches(4)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    losses_ref = _train(ref, ref_opt, data)
    assert _train(model, opt, data) == losses_ref
    assert _differ(ref.state_dict(), model.state_dict()) == []
    state, ref_state = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    assert set(state) == set(ref_state)
    assert all(torch.equal(state[i][k], ref_state[i][k]) for i in ref_state for k in ("exp_avg", "exp_avg_sq"))
    runtime_of(model).close()


def test_a_model_built_on_meta_is_sized_as_the_same_model_built_whole(tmp_path):
    """The optimizer and the budgets see the recorded shapes of params built on meta (which hold empty
    tensors): subgroups, host minimum and device state are those of the model built with its weights."""
    cfg = _config()
    whole = transformers.LlamaForCausalLM(cfg)
    a, _ = wrap(whole, torch.optim.AdamW(whole.parameters(), lr=1e-2), _offload_config("nvme", tmp_path))
    meta = _on_meta(cfg)
    b, _ = wrap(meta, torch.optim.AdamW(meta.parameters(), lr=1e-2), _offload_config("nvme", tmp_path / "b"))
    ra, rb = runtime_of(a), runtime_of(b)
    assert rb.host_minimum() == ra.host_minimum() and ra.host_minimum()["state_in_flight"] > 0
    assert [s.numel for s in rb.optimizer._subgroups] == [s.numel for s in ra.optimizer._subgroups]
    ra.close()
    rb.close()


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_bf16_checkpoint_loads_into_bf16_params_with_fp32_masters(tier, tmp_path):
    """A bf16 checkpoint into a bf16 model: the params stay bf16, the optimizer's masters are their fp32 values,
    and training equals the textbook mixed-precision loop on from_pretrained's model."""
    cfg = _config()
    ckpt = _checkpoint(tmp_path / "ckpt", cfg, torch.bfloat16)
    ref = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    m = _on_meta(cfg, torch.bfloat16)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=3e-3), _offload_config(tier, tmp_path))
    load_pretrained(model, ckpt, progress=False)
    assert all(v.dtype == torch.bfloat16 for v in model.state_dict().values() if v.is_floating_point())
    textbook = TextbookMixedPrecision(ref, lr=3e-3)
    for x in _batches(3):
        textbook.step(ref(input_ids=x, labels=x).loss)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert _differ(ref.state_dict(), model.state_dict()) == []
    runtime_of(model).close()


@pytest.mark.parametrize("shard", ["30KB", "1GB"], ids=["sharded", "one-file"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_is_read_back_by_from_pretrained(tied, shard, tmp_path):
    """Fine-tuned on NVMe, written with save_pretrained (shards planned from the shapes, filled unit by unit):
    transformers' from_pretrained reads back the same weights, tied ones tied again."""
    cfg = _config(tied)
    ckpt = _checkpoint(tmp_path / "ckpt", cfg)
    m = _on_meta(cfg)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), _offload_config("nvme", tmp_path))
    load_pretrained(model, ckpt, progress=False)
    _train(model, opt, _batches(2))
    files = save_pretrained(model, tmp_path / "out", max_shard_size=shard, progress=False)
    names = {f.name for f in files}
    assert "config.json" in names
    if shard == "30KB":
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) > 1 and shards <= names
        for f in shards:  # each shard within the limit, unless one tensor alone is larger
            sizes = [v.numel() * v.element_size() for v in safetensors_torch.load_file(tmp_path / "out" / f).values()]
            assert sum(sizes) <= 30_000 or len(sizes) == 1
    else:
        assert "model.safetensors" in names and "model.safetensors.index.json" not in names
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert _differ(back.state_dict(), model.state_dict()) == []
    if tied:
        assert back.lm_head.weight is back.model.embed_tokens.weight
    runtime_of(model).close()


def _rewrite(ckpt, change):
    """Apply ``change(tensors)`` to the checkpoint's first shard, in place."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    tensors = safetensors_torch.load_file(ckpt / first)
    change(tensors)
    safetensors_torch.save_file(tensors, ckpt / first, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != first or k in tensors}
    index["weight_map"].update({k: first for k in tensors})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    return first, sorted(tensors)


def _wrapped(cfg, tmp_path, dtype=torch.float32):
    m = _on_meta(cfg, dtype)
    return wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), _offload_config("host", tmp_path))[0]


def test_a_checkpoint_that_does_not_fit_is_refused_naming_each_key_and_its_file(tmp_path):
    """Missing, unexpected and mis-shaped keys are found before anything is written, reported together, each
    with its file; strict=False loads the rest and returns what was left out."""
    cfg = _config()
    ckpt = _checkpoint(tmp_path / "ckpt", cfg)
    state = {}

    def change(t):
        k = sorted(t)[0]
        state["dropped"] = k
        del t[k]
        t["model.extra.weight"] = torch.zeros(3)

    first, _ = _rewrite(ckpt, change)
    lm = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    _rewrite_one(ckpt / lm, "lm_head.weight", torch.zeros(5, 32))
    model = _wrapped(cfg, tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(model, ckpt, progress=False)
    msg = str(e.value)
    assert f"missing: {state['dropped']}" in msg
    assert f"unexpected: model.extra.weight in {first}" in msg
    assert f"shape: lm_head.weight in {lm} is [5, 32], the model's lm_head.weight is [96, 32]" in msg
    assert "strict=False" in msg
    before = model.state_dict()
    assert all(not v.any() for k, v in before.items() if k.endswith("proj.weight"))  # nothing was written
    runtime_of(model).close()


def _rewrite_one(file, key, value):
    tensors = safetensors_torch.load_file(file)
    tensors[key] = value
    safetensors_torch.save_file(tensors, file, metadata={"format": "pt"})


def test_strict_false_loads_what_matches_and_returns_the_rest(tmp_path):
    cfg = _config()
    ckpt = _checkpoint(tmp_path / "ckpt", cfg)
    ref = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    dropped = []
    _rewrite(ckpt, lambda t: (dropped.append(sorted(t)[0]), t.pop(sorted(t)[0]), t.update({"extra": torch.ones(2)})))
    model = _wrapped(cfg, tmp_path)
    result = load_pretrained(model, ckpt, strict=False, progress=False)
    assert result.missing == dropped and result.unexpected == ["extra"]
    assert result.initialized == dropped  # built on meta: set by the model's own initializer, not left at zero
    sd = model.state_dict()
    assert _differ({k: v for k, v in ref.state_dict().items() if k not in dropped},
                   {k: v for k, v in sd.items() if k not in dropped}) == []
    assert sd[dropped[0]].abs().sum() > 0
    runtime_of(model).close()


def test_dtype_mismatch_is_an_error_unless_cast(tmp_path):
    cfg = _config()
    ckpt = _checkpoint(tmp_path / "ckpt", cfg, torch.float32)
    ref = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    model = _wrapped(cfg, tmp_path, torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"dtype: model\.embed_tokens\.weight in model-0000\d-of-0000\d"
                                              r"\.safetensors is torch\.float32, the model's .* is torch\.bfloat16"
                                              r"(.|\n)*cast=True"):
        load_pretrained(model, ckpt, progress=False)
    load_pretrained(model, ckpt, cast=True, progress=False)
    assert _differ(ref.state_dict(), model.state_dict()) == []
    runtime_of(model).close()


def test_a_broken_checkpoint_directory_is_named(tmp_path):
    cfg = _config()
    model = _wrapped(cfg, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_pretrained(model, tmp_path / "empty", progress=False)
    ckpt = _checkpoint(tmp_path / "ckpt", cfg)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    (ckpt / gone).unlink()
    with pytest.raises(CheckpointError, match=f"lists {gone}, which is not in .*incomplete"):
        load_pretrained(model, ckpt, progress=False)
    with pytest.raises(TypeError, match="wrapped by offload.wrap"):
        load_pretrained(transformers.LlamaForCausalLM(cfg), ckpt, progress=False)
    runtime_of(model).close()


def test_peft_lora_on_a_meta_base_loads_the_base_and_starts_from_it(tmp_path):
    """peft's LoRA on a base built on meta: the base weights come from the base checkpoint (under peft's
    names), the adapters, which it lacks, are set by peft's own initializer (B at zero: the model starts as the
    base), training moves only the adapters, and the exported adapter is what PeftModel.from_pretrained reads."""
    peft = pytest.importorskip("peft")
    cfg = _config()
    ckpt = _checkpoint(tmp_path / "ckpt", cfg)
    base = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.device("meta"):
        meta_base = transformers.LlamaForCausalLM(cfg)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    pm = peft.get_peft_model(meta_base, lora)
    model, opt = wrap(pm, torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2),
                      _offload_config("nvme", tmp_path))
    result = load_pretrained(model, ckpt, progress=False)
    assert result.unexpected == [] and len(result.initialized) == 2 * 2 * cfg.num_hidden_layers
    assert set(result.missing) == set(result.initialized) and all("lora_" in k for k in result.missing)
    sd = model.state_dict()
    assert all(not sd[k].any() for k in sd if "lora_B" in k) and all(sd[k].any() for k in sd if "lora_A" in k)
    x = _batches(1)[0]
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)
    _train(model, opt, _batches(3))
    after = model.state_dict()
    moved = [k for k in after if not torch.equal(after[k], sd[k])]
    assert moved and all("lora_" in k for k in moved)
    save_pretrained(model, tmp_path / "adapter", progress=False)
    back = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    back_sd = back.state_dict()
    assert _differ(back_sd, after) == []
    runtime_of(model).close()


def test_wrapping_on_meta_reads_each_unit_once_to_seed_the_masters(tmp_path):
    """Params on NVMe updated on the device keep fp32 masters in the optimizer's state, seeded at wrap from the
    weights in the store: a unit cut into many subgroups is read once for all of them, not once per subgroup.
    Updated on the CPU, fp32 params on NVMe are changed in place in host memory: no masters, nothing read."""
    m = _on_meta(_config())
    model, _ = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2),
                    _offload_config("nvme", tmp_path / "device", subgroup_numel=2048, update_on="device"))
    rt = runtime_of(model)
    assert max(len(rt.optimizer._subgroups_of(u.index)) for u in rt.units) > 4
    assert all(s.has_master for s in rt.optimizer._subgroups)
    assert 0 < rt.stats["disk_read_bytes"] <= sum(u.nbytes for u in rt.units)
    rt.close()
    m = _on_meta(_config())
    model, _ = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2),
                    _offload_config("nvme", tmp_path / "cpu", subgroup_numel=2048))
    rt = runtime_of(model)
    assert not any(s.has_master for s in rt.optimizer._subgroups)
    assert rt.stats["disk_read_bytes"] == 0
    rt.close()


def test_loading_before_the_first_step_writes_the_masters_without_reading_them(tmp_path):
    """Before the first step an NVMe state chunk holds fp32 masters only (params on NVMe, updated on the device),
    which the load rewrites whole: nothing of the optimizer's is read back from the store, and the masters are the
    loaded weights (training matches)."""
    cfg = _config()
    ckpt = _checkpoint(tmp_path / "ckpt", cfg)
    m = _on_meta(cfg)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2),
                      _offload_config("nvme", tmp_path, update_on="device"))
    before = opt.stats["read_bytes"]
    load_pretrained(model, ckpt, progress=False)
    assert opt.stats["read_bytes"] == before and opt.stats["write_bytes"] > 0
    ref = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    data = _batches(2)
    assert _train(model, opt, data) == _train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), data)
    assert _differ(ref.state_dict(), model.state_dict()) == []
    runtime_of(model).close()
