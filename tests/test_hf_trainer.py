"""A wrapped model trained by loops that are not ours: the HF ``Trainer`` and an accelerate loop, fp32 on the CPU,
each beside the same loop without offload: the same losses, the same logged grad norms (the true norm, before
clipping), bit-identical weights, checkpoints and resumes; and a clear error where a step would do nothing."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from offload import OffloadConfig, wrap  # noqa: E402 - after the skips
from offload.runtime import runtime_of  # noqa: E402

VOCAB = 96
MAX_NORM = 1.0
"""The Trainer's default clip, below the tiny Llama's grad norms on some of the first steps (about 1-3)."""


def llama(tied: bool = False) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float()


class Tokens(torch.utils.data.Dataset):
    """``n`` random sequences of 12 tokens, each its own labels (the model shifts them)."""

    def __init__(self, n: int, seed: int = 1):
        self.idx = torch.randint(0, VOCAB, (n, 12), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.idx[i], "labels": self.idx[i]}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, which the first Accelerator (a Trainer's, or the test's) fixes."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiers(tier: str, tmp_path, **cfg) -> OffloadConfig:
    return OffloadConfig(param_tier=tier, grad_tier=tier, state_tier=tier, nvme_dirs=str(tmp_path), impl="as_given",
                         **cfg)


def trainer(model, opt, out, *, steps: int = 4, eval_data=None, **args) -> transformers.Trainer:
    """A Trainer on 4-sequence batches in order (no shuffling: the same data in every run), its linear LR schedule
    made after one warm-up step."""
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2, warmup_steps=1,
        report_to="none", seed=0, use_cpu=True, logging_steps=1, train_sampling_strategy="sequential",
        disable_tqdm=True, **{"max_grad_norm": MAX_NORM, "save_strategy": "no", **args})
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(32), eval_dataset=eval_data,
                                optimizers=(opt, None))


def logged(tr: transformers.Trainer) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.endswith(("runtime", "per_second"))} for h in tr.state.log_history]


def assert_same_weights(ref, model):
    sd_ref, sd = ref.state_dict(), model.state_dict()
    assert sd_ref.keys() == sd.keys()
    assert [k for k in sd_ref if not torch.equal(sd_ref[k], sd[k])] == []


def plain_run(tmp_path, **args):
    ref = llama()
    tr = trainer(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), tmp_path / "plain", **args)
    tr.train()
    return ref, tr


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("how", ["overlap_update=False", "max_grad_norm"])
@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_trainer_parity(tier, how, accumulation, tmp_path):
    """Params, grads and state on ``tier``; the overlapped update turned off either way the Trainer's error names.
    The Trainer clips (through accelerate), logs the norm, schedules the LR and accumulates."""
    ref, tr_ref = plain_run(tmp_path, gradient_accumulation_steps=accumulation)
    # With max_grad_norm the update overlaps backward speculatively, so the runtime must know which backward
    # ends a step (accumulation_steps), as for any overlapped update.
    cfg = {"overlap_update": False} if how == "overlap_update=False" else {"max_grad_norm": MAX_NORM,
                                                                          "accumulation_steps": accumulation}
    m = llama()
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), tiers(tier, tmp_path, **cfg))
    tr = trainer(model, opt, tmp_path / "offload", gradient_accumulation_steps=accumulation)
    tr.train()
    norms = [h["grad_norm"] for h in logged(tr_ref) if "grad_norm" in h]
    assert len(norms) == 4 and max(norms) > MAX_NORM  # a run that really clips
    assert logged(tr) == logged(tr_ref)  # losses, true grad norms, learning rates, and the FLOPs count
    assert tr.state.total_flos == tr_ref.state.total_flos > 0
    assert model.num_parameters() == ref.num_parameters() == runtime_of(model).num_parameters()
    assert model.num_parameters(exclude_embeddings=True) == ref.num_parameters(exclude_embeddings=True)
    assert_same_weights(ref, model)
    runtime_of(model).close()


def test_trainer_norm_only_leaves_the_configs_clip(tmp_path):
    """With ``max_grad_norm=0`` the Trainer still asks for the norm (``clip_grad_norm_(..., inf)``) to log it:
    that clips nothing, so ``OffloadConfig(max_grad_norm=...)`` still clips in the step, as the plain Trainer's
    ``max_grad_norm`` does."""
    ref, tr_ref = plain_run(tmp_path)
    m = llama()
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), tiers("host", tmp_path, max_grad_norm=MAX_NORM))
    tr = trainer(model, opt, tmp_path / "offload", max_grad_norm=0.0)
    tr.train()
    assert logged(tr) == logged(tr_ref)
    assert_same_weights(ref, model)
    runtime_of(model).close()


def test_trainer_checkpoints_and_resume(tmp_path):
    """Everything on NVMe, evaluated and saved every 2 steps: the checkpoint's weights and optimizer state are the
    plain run's, and a fresh wrapped model resumed from it ends where the uninterrupted plain run does."""
    safetensors = pytest.importorskip("safetensors.torch")
    args = {"save_strategy": "steps", "save_steps": 2, "eval_strategy": "steps", "eval_steps": 2}
    ref = llama(tied=True)
    tr_ref = trainer(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), tmp_path / "plain", eval_data=Tokens(4, 2),
                     **args)
    tr_ref.train()

    def offloaded(store):
        store.mkdir()
        m = llama(tied=True)
        return wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), tiers("nvme", store, overlap_update=False))

    model, opt = offloaded(tmp_path / "store1")
    tr = trainer(model, opt, tmp_path / "offload", eval_data=Tokens(4, 2), **args)
    tr.train()
    assert logged(tr) == logged(tr_ref) and any("eval_loss" in h for h in logged(tr))
    assert_same_weights(ref, model)
    runtime_of(model).close()
    ck, ck_ref = tmp_path / "offload" / "checkpoint-2", tmp_path / "plain" / "checkpoint-2"
    w, w_ref = safetensors.load_file(ck / "model.safetensors"), safetensors.load_file(ck_ref / "model.safetensors")
    assert w.keys() == w_ref.keys() and all(torch.equal(w[k], w_ref[k]) for k in w)
    o, o_ref = (torch.load(d / "optimizer.pt", weights_only=True) for d in (ck, ck_ref))
    assert o["param_groups"] == o_ref["param_groups"] and o["state"].keys() == o_ref["state"].keys()
    for i, entry in o_ref["state"].items():  # fp32 params on NVMe are updated in place: no "master" beside
        assert set(o["state"][i]) == set(entry)
        assert all(torch.equal(o["state"][i][k], v) for k, v in entry.items())

    model, opt = offloaded(tmp_path / "store2")
    tr = trainer(model, opt, tmp_path / "offload", eval_data=Tokens(4, 2), **args)
    tr.train(resume_from_checkpoint=str(ck))
    assert_same_weights(ref, model)
    # The history up to step 2 comes from the checkpoint, steps 3-4 from the resumed run; the summary (train_loss)
    # averages over the steps the resumed run made, so it is left out.
    history = [h for h in logged(tr_ref) if "train_loss" not in h]
    assert [h for h in logged(tr) if "train_loss" not in h] == history and history[-1]["step"] == 4
    runtime_of(model).close()


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("trainer_clip", [MAX_NORM, 0.0], ids=["clip", "norm-only"])
def test_trainer_with_the_default_config_overlaps_speculatively(trainer_clip, accumulation, tmp_path):
    """The default config (the overlapped update on, nothing about clipping or accumulation): the Trainer reads
    the grad norm after backward at every step (to clip it, or only to log it with ``max_grad_norm=0``). The first
    step speculates, so its call is answered from the norms the updates recorded (and, accumulating, the forward
    of the next micro-batch undoes the updates of the backward taken as last); the loop is then known to read the
    norm and every later step speculates too. Bit-identical to the plain Trainer either way."""
    ref, tr_ref = plain_run(tmp_path, max_grad_norm=trainer_clip, gradient_accumulation_steps=accumulation)
    m = llama()
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), tiers("host", tmp_path))
    tr = trainer(model, opt, tmp_path / "out", max_grad_norm=trainer_clip, gradient_accumulation_steps=accumulation)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.train()
    assert sum("accumulates" in str(w.message) for w in caught) == accumulation - 1
    assert logged(tr) == logged(tr_ref)
    assert_same_weights(ref, model)
    st = opt.stats
    assert st["speculative_steps"] >= 1 and st["speculative_steps"] + st["spec_declined"] + st["spec_waited_timing"] \
        == st["steps"], st
    runtime_of(model).close()


def test_trainer_without_speculation_says_how_to_turn_the_overlap_off(tmp_path):
    """With ``speculate=False`` the overlapped update has consumed the grads by the time the Trainer reads them:
    refused at the first step, naming the setting."""
    m = llama()
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), tiers("host", tmp_path, speculate=False))
    with pytest.raises(RuntimeError, match=r"OffloadConfig\(overlap_update=False\)"):
        trainer(model, opt, tmp_path / "out", max_grad_norm=MAX_NORM).train()
    runtime_of(model).close()


def test_a_trainer_without_wraps_optimizer_is_refused(tmp_path):
    """Given no optimizer, the Trainer builds AdamW over the model's params: it would find no grads (they are the
    runtime's) and change nothing. Its step raises, naming ``optimizers=``; so does the original optimizer's."""
    m = llama()
    original = torch.optim.AdamW(m.parameters(), lr=1e-2)
    model, opt = wrap(m, original, tiers("host", tmp_path, overlap_update=False))
    tr = trainer(model, opt, tmp_path / "out")
    tr.optimizer = tr.lr_scheduler = None  # what Trainer(optimizers=(None, None)), the default, leaves
    with pytest.raises(RuntimeError, match=r"AdamW.step\(\): .*optimizers=\(opt, scheduler\)"):
        tr.train()
    with pytest.raises(RuntimeError, match="Step the optimizer that offload.wrap returned"):
        original.step()
    runtime_of(model).close()


def accelerate_run(model, opt, accelerator) -> list[float]:
    """The loop accelerate documents, with gradient accumulation and clipping; the losses and norms it saw."""
    dl = torch.utils.data.DataLoader(Tokens(16).idx, batch_size=4, shuffle=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model, opt, dl, sched = accelerator.prepare(model, opt, dl, sched)
    model.train()
    seen = []
    for idx in dl:
        with accelerator.accumulate(model):
            loss = model(input_ids=idx, labels=idx).loss
            accelerator.backward(loss)
            seen.append(loss.item())
            if accelerator.sync_gradients:
                seen.append(accelerator.clip_grad_norm_(model.parameters(), MAX_NORM).item())
            opt.step()
            sched.step()
            opt.zero_grad()
    return seen


def test_accelerate_loop_parity(tmp_path):
    ref = llama()
    seen_ref = accelerate_run(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2),
                              accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2))
    m = llama()
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), tiers("nvme", tmp_path, overlap_update=False))
    seen = accelerate_run(model, opt, accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2))
    assert seen == seen_ref
    assert max(seen_ref[2::3]) > MAX_NORM  # the norms (after each second loss): a run that clips
    assert_same_weights(ref, model)
    runtime_of(model).close()
