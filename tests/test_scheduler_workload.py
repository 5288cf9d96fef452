"""Workload: presets match published sizes; shape math agrees with a meta-device build of the same shape."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys

import pytest

from scheduler import workload
from scheduler.workload import PRESETS, build_transformer, from_module, from_shape


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_counts_match_published_sizes(name):
    shape, published, _source = PRESETS[name]
    assert abs(workload.preset(name, batch=1, seq=128).params / published - 1) < 0.02


@pytest.mark.parametrize("base", ["gpt2", "llama-70b"])
def test_shape_math_agrees_with_a_meta_build(base):
    small = dataclasses.replace(PRESETS[base][0], n_layer=3, d_model=256, n_head=8, d_ff=704, vocab=1000,
                                n_kv_head=2 if PRESETS[base][0].n_kv_head else 0)
    model = build_transformer(small)  # meta: no memory
    assert next(model.parameters()).device.type == "meta"
    built = from_module(model, batch=2, seq=64)
    math = from_shape(small, batch=2, seq=64)
    assert [u.params for u in built.units] == [u.params for u in math.units]
    assert built.params == sum(p.numel() for p in model.parameters())
    assert built.units == math.units  # FLOPs and activation bytes too


def test_flops_follow_the_6n_rule_plus_attention():
    w = workload.preset("gpt2", batch=4, seq=1024)
    s = PRESETS["gpt2"][0]
    blocks_n = s.block_matmul_params() * s.n_layer
    head_n = s.vocab * s.d_model
    attn = 12 * s.n_layer * s.d_model * 1024 * w.tokens  # PaLM app. B: 12 L H Q T per token for training
    assert w.model_flops == pytest.approx(6 * (blocks_n + head_n) * w.tokens + attn)


def test_factory_and_hf_config(tmp_path, monkeypatch):
    mod = tmp_path / "tinymodels.py"
    mod.write_text("from scheduler.workload import TransformerShape, build_transformer\n"
                   "def make():\n    return build_transformer(TransformerShape(n_layer=2, d_model=64, n_head=4, "
                   "d_ff=256, vocab=100, n_pos=32, bias=True, norm='layernorm', tied=True), device='cpu')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    w = workload.load("tinymodels:make", batch=1, seq=32)
    assert len(w.units) == 3 and w.units[0].kind == "rest"
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                               "vocab_size": 32000, "tie_word_embeddings": False}))
    if importlib.util.find_spec("transformers") is None:
        assert workload.load(str(cfg), batch=1, seq=128).params == PRESETS["llama-7b"][1]
    with pytest.raises(ValueError, match="expected a preset"):
        workload.load("nonsense", batch=1, seq=1)


def test_hf_config_through_transformers(tmp_path):
    pytest.importorskip("transformers", reason="transformers is optional; the shape path is tested without it")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_embd": 128, "n_layer": 2, "n_head": 4, "n_positions": 64,
                               "vocab_size": 500}))
    w = workload.load(str(cfg), batch=1, seq=64)
    assert w.params == from_shape(workload.shape_from_hf_config(json.loads(cfg.read_text())), batch=1, seq=64).params


def test_frozen_params_from_a_module():
    """``requires_grad=False`` params (a LoRA base) are counted, but not as trainable: no grads, state or update,
    and backward computes no grads for frozen weights (2 n FLOPs per token fewer)."""
    shape = dataclasses.replace(PRESETS["gpt2"][0], n_layer=2, d_model=64, n_head=4, d_ff=256, vocab=100, n_pos=32)
    model = build_transformer(shape)
    whole = from_module(model, batch=2, seq=8, chunk_align_bytes=64)
    model.requires_grad_(False)
    model.blocks[0].q.weight.requires_grad_(True)
    w = from_module(model, batch=2, seq=8, chunk_align_bytes=64)
    assert [u.params for u in w.units] == [u.params for u in whole.units]
    assert [u.trainable for u in w.units] == [0, 64 * 64, 0] and w.trainable == 64 * 64
    assert w.units[1].trainable_numels == (64 * 64,) and whole.units[1].trainable_numels == whole.units[1].tensor_numels
    assert [w.grad_bytes(i) for i in range(3)] == [0, 2 * 64 * 64, 0]
    assert w.state_bytes(1) == 12 * 64 * 64 and w.state_bytes(0) == w.state_bytes(2) == 0
    assert w.param_bytes(1) == whole.param_bytes(1) and w.trainable_param_bytes(1) == 2 * 64 * 64
    frozen_mm = shape.block_matmul_params() - 64 * 64
    assert w.units[1].bwd_flops == whole.units[1].bwd_flops - 2 * frozen_mm * w.tokens
    assert w.units[0].bwd_flops == w.units[0].fwd_flops  # the head: its input's grad only
    with pytest.raises(ValueError, match=r"UnitWork.trainable of 'b': expected 0 to params \(10\), got 11"):
        workload.UnitWork(name="b", kind="block", params=10, trainable=11, fwd_flops=0, bwd_flops=0, act_bytes=0,
                          work_bytes=0)
    with pytest.raises(ValueError, match=r"UnitWork.trainable_numels of 'b': expected the trainable tensors"):
        workload.UnitWork(name="b", kind="block", params=10, trainable=4, tensor_numels=(4, 6), fwd_flops=0,
                          bwd_flops=0, act_bytes=0, work_bytes=0)


def test_hf_directory_without_transformers(tmp_path, monkeypatch):
    """Without transformers the families known by heart are sized from config.json alone: the same numbers, the
    dtype it names, and a size it lacks named."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    cfg = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False,
           "torch_dtype": "float32"}
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(cfg))
    w = workload.load(str(tmp_path / "llama"), batch=1, seq=128)
    assert w.params == PRESETS["llama-7b"][1] and w.name == "llama"
    assert (w.compute_dtype, w.param_bytes_per_param, w.state_bytes_per_param) == ("fp32", 4, 8)
    del cfg["intermediate_size"]
    (tmp_path / "llama" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: expected the sizes of a llama model, got no intermediate_size"):
        workload.load(str(tmp_path / "llama"), batch=1, seq=128)
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    with pytest.raises(ValueError, match="got no num_hidden_layers, num_attention_heads, intermediate_size, "
                                         "vocab_size$"):
        workload.load(str(tmp_path / "llama"), batch=1, seq=128)
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 64}))
    with pytest.raises(ValueError, match="model_type 'mamba' is not an architecture offload plan can price"):
        workload.load(str(tmp_path / "llama"), batch=1, seq=128)


@pytest.mark.parametrize("field,value", [("n_layer", -2), ("d_model", 0), ("vocab", -1), ("n_kv_head", -1)])
def test_shape_sizes_must_be_positive(field, value):
    with pytest.raises(ValueError, match=f"TransformerShape.{field}: expected"):
        dataclasses.replace(PRESETS["gpt2"][0], **{field: value})
