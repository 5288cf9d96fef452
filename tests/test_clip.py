"""Clipping and stepping the way plain PyTorch loops (and the HF Trainer) do it, on a wrapped model: the grads
live in the runtime's buffers, not in ``param.grad``, and nothing may be silently skipped."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import TINY_GPT, gpt, lm_loss, token_batches
from offload import OffloadConfig, wrap
from offload.runtime import runtime_of

MAX_NORM = 0.5
"""Below the tiny GPT's grad norms in the first steps (about 1-3), so every step here clips."""


def pair(tmp_path, **cfg):
    ref, m = gpt(), gpt()
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    cfg = {"nvme_dirs": str(tmp_path), "impl": "as_given", "overlap_update": False, **cfg}
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), OffloadConfig(**cfg))
    return ref, plain, model, opt


def assert_same(ref, model):
    sd_ref, sd = ref.state_dict(), model.state_dict()
    assert [k for k in sd_ref if not torch.equal(sd_ref[k], sd[k])] == []


@pytest.mark.parametrize("config_clips", [False, True], ids=["loop", "loop-and-config"])
@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_torch_clip_grad_norm_returns_the_true_norm_and_clips_once(tier, config_clips, tmp_path):
    """What the HF Trainer calls. With ``OffloadConfig(max_grad_norm=...)`` as well, a step still clips once, as
    plainly (a second clip would scale the grads again by about 1 - 1e-6)."""
    cfg = {"max_grad_norm": MAX_NORM} if config_clips else {}
    ref, plain, model, opt = pair(tmp_path, param_tier=tier, grad_tier=tier, state_tier=tier, **cfg)
    for idx in token_batches(3, TINY_GPT.vocab):
        lm_loss(ref, idx).backward()
        expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        lm_loss(model, idx).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        assert norm.item() == expected.item() > MAX_NORM  # the true norm, and a step that clips
        plain.step()
        opt.step()
        plain.zero_grad()
        opt.zero_grad()
        assert_same(ref, model)
    runtime_of(model).close()


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_a_loop_that_clips_itself_keeps_the_overlapped_update(tier, tmp_path):
    """Nothing configured, the overlapped update on (the default), and the loop clips after backward as the HF
    Trainer does: the first step speculates (so the call is answered), the loop is then known to clip, and later
    steps speculate too; each is validated against the loop's max_norm, so results stay bit-identical whether a
    step clips (undone and redone) or not (committed)."""
    ref, plain, model, opt = pair(tmp_path, param_tier=tier, grad_tier=tier, state_tier=tier, overlap_update=True)
    max_norm = 5.0  # the tiny GPT's first steps clip at this (norms 7.6 down to 6.1), its later ones do not
    clipped = []
    for idx in token_batches(8, TINY_GPT.vocab):
        lm_loss(ref, idx).backward()
        expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        lm_loss(model, idx).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        assert norm.item() == expected.item()
        clipped.append(expected.item() > max_norm)
        plain.step()
        opt.step()
        plain.zero_grad()
        opt.zero_grad()
        assert_same(ref, model)
    st = opt.stats
    assert any(clipped) and not all(clipped)
    assert st["spec_rollbacks"] >= 1 and st["spec_commits"] >= 1, st
    runtime_of(model).close()


def test_clipping_after_the_overlapped_update_is_refused_without_speculation(tmp_path):
    m = gpt()
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2), OffloadConfig(param_tier="host",
                                                                                   speculate=False))
    lm_loss(model, token_batches(1, TINY_GPT.vocab)[0]).backward()
    with pytest.raises(RuntimeError, match=r"OffloadConfig\(max_grad_norm=\.\.\.\)"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    opt.step()
    runtime_of(model).close()


def test_clip_of_a_wrapped_model_with_other_params_is_refused_and_plain_models_are_torch(tmp_path):
    ref, plain, model, opt = pair(tmp_path)
    other = gpt()
    lm_loss(model, token_batches(1, TINY_GPT.vocab)[0]).backward()
    lm_loss(other, token_batches(1, TINY_GPT.vocab)[0]).backward()
    with pytest.raises(ValueError, match="clip each model's parameters in its own call"):
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(other.parameters()), MAX_NORM)
    lm_loss(ref, token_batches(1, TINY_GPT.vocab)[0]).backward()
    assert torch.nn.utils.clip_grad_norm_(other.parameters(), 1e9).item() == \
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9).item() > 0  # a plain model: torch's own
    opt.step()
    runtime_of(model).close()


def test_a_second_step_without_backward_is_never_silent(tmp_path):
    # Host grads stay after a step, as param.grad does: a second step applies them again, as plainly.
    ref, plain, model, opt = pair(tmp_path / "host")
    idx = token_batches(1, TINY_GPT.vocab)[0]
    lm_loss(ref, idx).backward()
    lm_loss(model, idx).backward()
    for _ in range(2):
        plain.step()
        opt.step()
    assert_same(ref, model)
    # After zero_grad there is nothing to apply: plain torch does nothing; we do nothing and say so.
    plain.zero_grad()
    opt.zero_grad()
    with pytest.warns(RuntimeWarning, match="no parameter has a gradient"):
        opt.step()
    plain.step()
    assert_same(ref, model)
    runtime_of(model).close()
    # Grads on NVMe are consumed by the step: a second one cannot apply them again, so it refuses.
    (tmp_path / "nvme").mkdir()
    ref, plain, model, opt = pair(tmp_path / "nvme", grad_tier="nvme")
    lm_loss(model, idx).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="without a backward: the last step consumed the gradients kept on NVMe"):
        opt.step()
    lm_loss(model, idx).backward()  # a backward makes the next step legal again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    runtime_of(model).close()
