"""peft's LoRA on a HF Llama (built from a config, nothing downloaded) through offload.wrap: found unit by unit through
peft's wrapping, trained bit-identical to the same peft model trained plainly, its adapter state dict the trained
one, and the frozen base given no grad buffer, no optimizer state and no write-back (checked from the runtime's
counters, the store's versions and the recorded timeline). ``merge_and_unload`` is refused on a wrapped model."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadConfig, wrap
from offload.runtime import runtime_of
from storage import Tier

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
# peft asks transformers a question transformers 5 has renamed; theirs to settle, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

ATTN = ["q_proj", "v_proj"]
ATTN_MLP = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 3


def base_llama():
    """A tiny LlamaForCausalLM, the same on every call (seed 0)."""
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float()


def lora_llama(targets=ATTN, **lora):
    """:func:`base_llama` with LoRA adapters from peft (seed 1), the same on every call. The adapters start random
    (``init_lora_weights=False``: B is not zero), so the first step already moves A and B."""
    base = base_llama()
    torch.manual_seed(1)
    return peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0,
                                                     init_lora_weights=False, **lora))


def trainable(m):
    return [p for p in m.parameters() if p.requires_grad]


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (4, 12), generator=g) for _ in range(n)]


def hf_loss(model, idx):
    return model(input_ids=idx, labels=idx).loss


def block_names():
    return [f"base_model.model.model.layers.{i}" for i in range(LAYERS)]


@pytest.mark.parametrize("targets", [ATTN, ATTN_MLP], ids=["attn", "attn+mlp"])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "step"])
@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_peft_lora_trains_bit_identical(tier, overlap, targets, tmp_path):
    ref, m = lora_llama(targets), lora_llama(targets)
    plain = torch.optim.AdamW(trainable(ref), lr=1e-2)
    base_before = {k: v.clone() for k, v in ref.state_dict().items() if "lora_" not in k}
    cfg = OffloadConfig(param_tier=tier, grad_tier=tier, state_tier=tier, nvme_dirs=str(tmp_path), impl="as_given",
                        overlap_update=overlap, prefetch=1)
    model, opt = wrap(m, torch.optim.AdamW(trainable(m), lr=1e-2), cfg)
    rt = runtime_of(model)
    # PeftModel -> LoraModel -> LlamaForCausalLM -> model.layers: one unit per decoder layer, the rest frozen.
    assert [u.name for u in rt.units] == ["rest"] + block_names()
    blocks = ref.base_model.model.model.layers
    assert [u.grad_nbytes for u in rt.units] == [0] + [4 * sum(p.numel() for p in trainable(b)) for b in blocks]
    assert rt.units[0].grads is None and opt.unit_placements(0) == []  # no grad buffer, no state: all frozen
    assert rt.num_parameters(trainable_only=True) == sum(p.numel() for p in trainable(ref))
    losses, expected = [], []
    for idx in batches(3):
        loss_ref = hf_loss(ref, idx)
        loss_ref.backward()
        plain.step()
        plain.zero_grad()
        loss = hf_loss(model, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        expected.append(loss_ref.item())
    assert losses == expected
    sd_ref, sd = ref.state_dict(), model.state_dict()
    assert sd.keys() == sd_ref.keys()
    assert [k for k in sd_ref if not torch.equal(sd_ref[k], sd[k])] == []
    assert [k for k, v in base_before.items() if not torch.equal(sd[k], v)] == []  # the base did not move
    adapters_ref, adapters = peft.get_peft_model_state_dict(ref), peft.get_peft_model_state_dict(model)
    assert adapters.keys() == adapters_ref.keys() and len(adapters) == len(trainable(ref))
    assert all(torch.equal(adapters[k], adapters_ref[k]) for k in adapters_ref)
    assert all(v.numel() for v in adapters.values())  # the weights, not the empty tensors of released params
    osd, osd_ref = opt.state_dict(), plain.state_dict()
    assert len(osd["state"]) == len(osd_ref["state"]) == len(trainable(ref))  # state for the adapters only
    for k, entry in osd_ref["state"].items():
        for key, v in entry.items():
            assert torch.equal(v, osd["state"][k][key]), (k, key)
    rt.close()


def test_peft_save_pretrained_writes_the_trained_adapter(tmp_path):
    """``PeftModel.save_pretrained`` (what a LoRA run keeps) reads the wrapped model's state dict: the adapter it
    writes loads onto a fresh base and gives the trained model's logits."""
    ref, m = lora_llama(), lora_llama()
    plain = torch.optim.AdamW(trainable(ref), lr=1e-2)
    model, opt = wrap(m, torch.optim.AdamW(trainable(m), lr=1e-2),
                      OffloadConfig(param_tier="nvme", state_tier="nvme", nvme_dirs=str(tmp_path), impl="as_given"))
    for idx in batches(2):
        hf_loss(ref, idx).backward()
        plain.step()
        plain.zero_grad()
        hf_loss(model, idx).backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    runtime_of(model).close()
    loaded = peft.PeftModel.from_pretrained(base_llama(), tmp_path / "adapter")
    idx = batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=idx).logits, ref(input_ids=idx).logits)


@pytest.mark.parametrize("call", ["merge_and_unload", "merge_adapter", "unload"])
def test_peft_merge_on_a_wrapped_model_is_refused(call, tmp_path):
    """Between uses the base weights are empty tensors (the runtime holds the real ones): peft would merge the
    adapters into those and hand back a model of empty weights. Refused, naming what to do instead; the model
    trains on unchanged."""
    m = lora_llama()
    model, opt = wrap(m, torch.optim.AdamW(trainable(m), lr=1e-2), OffloadConfig(param_tier="host"))
    before = model.state_dict()
    with pytest.raises(NotImplementedError, match=rf"{call}\(\) on a model wrapped by offload.*save_pretrained"):
        getattr(model, call)()
    with pytest.raises(NotImplementedError, match=rf"{call}\(\) on a model wrapped by offload"):
        getattr(model.base_model, call)()  # peft's LoraModel, which PeftModel forwards to
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(NotImplementedError, match=r"Linear.merge\(\) on a model wrapped by offload"):
        q_proj.merge()  # what every merge comes down to
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    hf_loss(model, batches(1)[0]).backward()
    opt.step()
    runtime_of(model).close()


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "step"])
def test_frozen_params_get_no_grads_no_state_and_no_write_back(overlap, tmp_path):
    """Adapters on layers 0 and 2 only: the rest unit (embeddings, norm, head) and layer 1 are all frozen. They get
    no grad buffer and no optimizer state, and their params, written to the store once at wrap, are never written
    again: the store's version of their chunk stays, no disk write of theirs is on the timeline, and the params'
    disk writes of a step are exactly the new weights of the two units that train."""
    ref, m = lora_llama(layers_to_transform=[0, 2]), lora_llama(layers_to_transform=[0, 2])
    plain = torch.optim.AdamW(trainable(ref), lr=1e-2)
    cfg = OffloadConfig(param_tier="nvme", grad_tier="nvme", state_tier="nvme", nvme_dirs=str(tmp_path),
                        impl="as_given", overlap_update=overlap, prefetch=1)
    model, opt = wrap(m, torch.optim.AdamW(trainable(m), lr=1e-2), cfg)
    rt = runtime_of(model)
    frozen, trained = [rt.units[0], rt.units[2]], [rt.units[1], rt.units[3]]
    assert [u.trainable for u in frozen] == [0, 0] and all(u.trainable for u in trained)
    assert [(u.grad_nbytes, u.grads) for u in frozen] == [(0, None), (0, None)]
    assert [opt.unit_placements(u.index) for u in frozen] == [[], []]
    assert [len(opt.unit_placements(u.index)) for u in trained] == [1, 1]  # one state chunk per training unit
    store = rt.swap.store
    assert {u.weights.home for u in rt.units} == {Tier.NVME}
    versions = {u.key: store.info(u.key).version for u in rt.units}
    grad_bytes = sum(4 * p.numel() for p in trainable(ref))
    assert grad_bytes == sum(u.grad_nbytes for u in trained)
    for idx in batches(3):
        hf_loss(ref, idx).backward()
        plain.step()
        plain.zero_grad()
        before = rt.swap.moved("params"), rt.swap.moved("grads")
        loss = hf_loss(model, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
        params, grads = rt.swap.moved("params"), rt.swap.moved("grads")
        assert params["disk_write"] - before[0]["disk_write"] == sum(u.nbytes for u in trained)
        assert grads["d2h"] - before[1]["d2h"] == grad_bytes  # grads of the adapters only
        rt.settle_step_io()  # the step's last writes land during the next forward: wait for them here
        written = [e.name for e in rt.timeline.events if e.resource == "disk_write" and e.name.endswith(".params")]
        assert sorted(written) == sorted(u.key for u in trained), written  # this iteration's, as they landed
    assert {u.key: store.info(u.key).version for u in frozen} == {u.key: versions[u.key] for u in frozen}
    assert all(store.info(u.key).version > versions[u.key] for u in trained)
    sd_ref, sd = ref.state_dict(), model.state_dict()
    assert [k for k in sd_ref if not torch.equal(sd_ref[k], sd[k])] == []
    rt.close()


def _counted(rt, opt) -> dict[str, int]:
    """Bytes moved so far per link: h2d and d2h as the runtime and its optimizer count them, the disk as the store
    does (offload.measure.Run.counters)."""
    r, o = rt.report(), opt.report()
    store = o.get("store") or {}
    return {"h2d": r["h2d_bytes"] + o["h2d_bytes"], "d2h": r["d2h_bytes"] + o["d2h_bytes"],
            "disk_read": store.get("nvme.read", {}).get("issued_bytes", 0),
            "disk_write": store.get("nvme.write", {}).get("issued_bytes", 0)}


D, H, N = Tier.DEVICE, Tier.HOST, Tier.NVME


@pytest.mark.parametrize("placement", [
    dict(param_tier="nvme", state_tier="nvme", grad_tier="nvme"),
    dict(param_tier="nvme", state_tier="host", grad_tier="nvme", overlap_update=False),
    dict(param_tier="host", state_tier="nvme", prefetch=0),
    # every path of new weights that are only the trainable part of a chunk: to the device after a CPU update, and
    # from a device update to the host and to the store
    ("DHc", "DHc", "HHd", "NNd"),
], ids=["nvme", "nvme-params-step", "host-params", "plan"])
def test_planned_bytes_equal_the_counted_bytes_for_lora(placement, tmp_path):
    """The cost model prices a LoRA model (adapters on layers 0 and 2; embeddings, head and layer 1 all frozen) as
    the runtime runs it: grads, optimizer state and updates of the adapters only, no write-back of frozen units,
    a unit with frozen params on NVMe read in before its update rewrites it whole. Predicted bytes per link equal
    the counted ones every iteration; predicted grad and state bytes equal the runtime's buffers."""
    from offload.autoplan import workload_of_runtime
    from offload.plans import config_to_plan
    from scheduler import profile
    from scheduler.cost import CostModel
    from scheduler.planner import Plan, UnitPlacement

    m = lora_llama(ATTN_MLP, layers_to_transform=[0, 2])
    cfg = OffloadConfig(nvme_dirs=str(tmp_path), impl="as_given",
                        **({"prefetch": 1} | placement if isinstance(placement, dict) else {}))
    plan = None
    if not isinstance(placement, dict):
        tier = {"D": D, "H": H, "N": N}
        plan = Plan(strategy="t", prefetch_depth=1, grad_buffers=LAYERS, units=tuple(
            UnitPlacement(tier[p[0]], tier[p[1]], "cpu" if p[2] == "c" else "device") for p in placement))
    model, opt = wrap(m, torch.optim.AdamW(trainable(m), lr=1e-2), cfg, plan=plan)
    rt = runtime_of(model)
    w = workload_of_runtime(rt, batch=4, seq=12)
    assert [u.trainable for u in w.units] == [sum(n for p, n in zip(u.params, u.numels) if p.requires_grad)
                                              for u in rt.units]
    assert w.units[0].trainable == w.units[2].trainable == 0 < w.units[1].trainable < w.units[1].params
    plan = plan or config_to_plan(cfg, w)
    cm = CostModel(w, profile.resolve("cpu-dev-2core"))
    t = cm.traffic(plan)
    # exactly the cost model's bytes: a device update's grads stay on the device, a CPU update's go to the host
    predicted = {"h2d": t.h2d_bytes, "d2h": t.d2h_bytes, "disk_read": t.disk_read_bytes,
                 "disk_write": t.disk_write_bytes}
    assert [w.grad_bytes(i) for i in range(len(w.units))] == [u.grad_nbytes for u in rt.units]
    assert t.cpu_update_params + t.device_update_params == rt.num_parameters(trainable_only=True)
    for i, idx in enumerate(batches(3)):
        before = _counted(rt, opt)
        hf_loss(model, idx).backward()
        opt.step()
        opt.zero_grad()
        after = _counted(rt, opt)
        if i:  # the first iteration learns the forward order and makes the state: the plan prices the next ones
            assert {k: after[k] - before[k] for k in after} == predicted
    state = {tier.value: sum(cm.state_bytes(i, pl) for i, pl in enumerate(plan.units) if pl.state is tier)
             for tier in (D, H, N)}
    assert opt.report()["state_bytes_by_tier"] == {k: v for k, v in state.items() if v}
    rt.close()


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_host_minimum_counts_grads_and_state_of_the_adapters_only(tier, tmp_path):
    """The host memory a placement cannot train without: the frozen base still lives there (or passes through),
    but grads and state are the adapters' only, against the same model trained whole."""
    r4k = lambda n: (n + 4095) // 4096 * 4096  # noqa: E731 - the pool's 4 KiB-aligned buffers
    cfg = OffloadConfig(param_tier=tier, grad_tier=tier, state_tier=tier, nvme_dirs=str(tmp_path))
    lora, full = lora_llama(), lora_llama().requires_grad_(True)
    adapters = [4 * sum(p.numel() for p in trainable(b)) for b in lora.base_model.model.model.layers]
    needs = []
    for m in (lora, full):
        model, _ = wrap(m, torch.optim.AdamW(trainable(m), lr=1e-2), cfg)
        rt = runtime_of(model)
        needs.append((rt.host_minimum(), [r4k(u.grad_nbytes) for u in rt.units if u.grad_nbytes]))
        rt.close()
    (need, grads), (need_full, grads_full) = needs
    assert grads == [r4k(n) for n in adapters]
    assert need["params"] == need_full["params"] and need["params_in_flight"] == need_full["params_in_flight"]
    if tier == "host":
        assert (need["grads"], need_full["grads"]) == (sum(grads), sum(grads_full))
        assert 0 < need["state"] < need_full["state"] / 4
    else:
        assert (need["grads_in_flight"], need_full["grads_in_flight"]) == (2 * max(grads), 2 * max(grads_full))
        assert 0 < need["state_in_flight"] < need_full["state_in_flight"] / 4


LORA_FACTORIES = """
import peft
import transformers


def full():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def lora():
    return peft.get_peft_model(full(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
"""


def test_offload_plan_of_a_lora_model_fits_where_training_it_whole_does_not(tmp_path, monkeypatch, capsys):
    """``offload plan module:function`` builds the model on the meta device, peft's adapters too: the plan counts
    grads and state for the adapters only, so the LoRA model fits a machine the whole model's training does not."""
    import json

    from offload.cli import main

    (tmp_path / "lorafactories.py").write_text(LORA_FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    machine = ["--batch", "2", "--seq", "8", "--profile", "cpu-dev-2core", "--device-memory", "300KB",
               "--host-memory", "200KB", "--nvme", "1MB"]
    assert main(["plan", "lorafactories:full", *machine, "--json"]) == 1
    full = json.loads(capsys.readouterr().out)
    assert main(["plan", "lorafactories:lora", *machine, "--json"]) == 0
    lora = json.loads(capsys.readouterr().out)
    adapters = 3 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))  # 3 layers x (q, v) x (A: r x 32, B: out x r; v: 16 out)
    assert (full["trainable"], lora["trainable"]) == (full["params"], adapters)
    assert lora["params"] == full["params"] + adapters
    assert [u["trainable"] for u in lora["workload"]["units"]] == [0] + [adapters // 3] * 3
    assert not full["fits"] and "host" in full["shortfall"]["short"]
    assert lora["fits"]
    assert main(["plan", "lorafactories:lora", *machine]) == 0
    assert f"({adapters:,} trainable, " in capsys.readouterr().out
