"""Loops that are not ours (the HF ``Trainer``, accelerate, any plain torch optimizer) on a wrapped model: what
:func:`offload.wrap` installs so that they work, or fail loudly instead of training wrongly.

A wrapped model's grads live in the runtime's buffers, not in ``param.grad``, and its released params hold empty
tensors. Three places outside torch's ``clip_grad_norm_`` (:mod:`offload.clipping`) read those directly:

- ``accelerate.Accelerator.clip_grad_norm_``, which the HF ``Trainer`` calls at every step (with
  ``max_norm=inf`` when ``TrainingArguments.max_grad_norm`` is 0, to log the norm), sums the norms of ``p.grad``
  itself: it would return 0 and clip nothing. :func:`install` replaces it (when accelerate is installed) by
  :func:`accelerator_clip_grad_norm_`, which sends a wrapped model's params to :func:`offload.clipping.clip_grad_norm_`.
- any optimizer other than the one ``wrap`` returned (the original one, or the AdamW the ``Trainer`` builds when
  it is given none) finds no grads and its ``step()`` silently does nothing: a global step pre-hook refuses it
  (:func:`refuse_foreign_step`).
- ``PreTrainedModel.num_parameters`` (the ``Trainer``'s FLOP count) sums ``p.numel()``, 0 for released params:
  :func:`count_hf_parameters` gives each HF model inside a wrapped one a version that counts the real sizes.

With the ``Trainer``: ``model, opt = offload.wrap(model, torch.optim.AdamW(model.parameters(), lr=...),
OffloadConfig(...))`` (``accumulation_steps=`` the Trainer's ``gradient_accumulation_steps`` saves one undo at the
first step, when the runtime learns it), then ``Trainer(model=model, args=..., optimizers=(opt, scheduler))``. The Trainer reads the grad norm after backward at every step (to clip, or
to log it when ``max_grad_norm`` is 0): the overlapped update answers that call speculatively (the step is
validated against the clip afterwards, and undone and redone exactly when it clips; see OffloadConfig.speculate),
or set ``overlap_update=False`` to update after backward. Clipping, the LR scheduler, gradient accumulation,
evaluation, checkpoints (``model.safetensors``, ``optimizer.pt``) and resuming then work as they do without
offload, bit-identically (tests/test_hf_trainer.py).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from typing import Callable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from offload import clipping
from offload.optimizer import OffloadOptimizer

_accelerate_clip: Callable | None = None
"""``accelerate.Accelerator.clip_grad_norm_`` as accelerate defines it, once :func:`install` replaced it."""
_step_hook = None
"""The handle of :func:`refuse_foreign_step`, once installed."""


def install() -> None:
    """Install :func:`accelerator_clip_grad_norm_` (when accelerate is installed) and :func:`refuse_foreign_step`
    (idempotent; called by :func:`offload.wrap`)."""
    global _accelerate_clip, _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_pre_hook(refuse_foreign_step)
    if _accelerate_clip is None and importlib.util.find_spec("accelerate") is not None:
        # Imported now rather than when it is first used: a later `import accelerate` would bring back its own
        # version, which sees no grads.
        import accelerate

        _accelerate_clip = accelerate.Accelerator.clip_grad_norm_
        accelerate.Accelerator.clip_grad_norm_ = accelerator_clip_grad_norm_


def accelerator_clip_grad_norm_(accelerator, parameters, max_norm, norm_type=2):
    """``Accelerator.clip_grad_norm_``: over a wrapped model's params, :func:`offload.clipping.clip_grad_norm_`;
    anything else goes to accelerate's own.

    For one process without a GradScaler, accelerate's version adds nothing to torch's function (its unscaling is
    a no-op there), so routing it is exact. Several processes or fp16 loss scaling would need accelerate's
    reductions or unscaling, which never see offloaded grads: refused, naming what works instead."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if not clipping.owns_any(params):
        return _accelerate_clip(accelerator, params, max_norm, norm_type)
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind != "NO":
        raise NotImplementedError(f"Accelerator.clip_grad_norm_ on a model wrapped by offload: expected one process "
                                  f"(distributed_type NO), got {kind}; offload.wrap does not reduce grads across "
                                  f"processes: run one process, or use offload.ShardedOffloadOptimizer without wrap")
    if getattr(accelerator, "scaler", None) is not None:
        raise NotImplementedError("Accelerator.clip_grad_norm_ on a model wrapped by offload: accelerate's fp16 "
                                  "GradScaler cannot see offloaded grads; use mixed_precision 'bf16' or 'no' (for "
                                  "fp16, OffloadConfig(loss_scale='dynamic') and opt.scale_loss(loss).backward())")
    return clipping.clip_grad_norm_(params, max_norm, norm_type)


def refuse_foreign_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global optimizer step pre-hook: refuse the step of an optimizer that is not ``wrap``'s but holds a wrapped
    model's params (it would find no grads and change nothing, silently)."""
    inner = optimizer
    while inner is not None:  # ours, or a wrapper around ours (accelerate's AcceleratedOptimizer)
        if isinstance(inner, OffloadOptimizer):
            return
        inner = getattr(inner, "optimizer", None)
    if not clipping.owns_any(p for g in optimizer.param_groups for p in g["params"]):
        return
    raise RuntimeError(f"{type(optimizer).__name__}.step(): this optimizer holds params of a model wrapped by "
                       f"offload.wrap, whose grads the runtime keeps (not in param.grad), so its step would change "
                       f"nothing. Step the optimizer that offload.wrap returned instead (with the HF Trainer: "
                       f"Trainer(..., optimizers=(opt, scheduler)) with that one; the Trainer builds its own "
                       f"otherwise)")


def count_hf_parameters(model: nn.Module, runtime) -> None:
    """Give each HF ``PreTrainedModel`` in ``model`` (the model, or the one inside a ``peft.PeftModel``) a
    ``num_parameters`` that counts the real sizes from ``runtime``."""
    hf = sys.modules.get("transformers")  # a HF model's class imported it
    if hf is None:
        return
    for m in model.modules():
        if isinstance(m, hf.PreTrainedModel):
            m.num_parameters = _num_parameters(m, runtime)


def _num_parameters(model: nn.Module, runtime) -> Callable[..., int]:
    def num_parameters(only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """``PreTrainedModel.num_parameters``, with each offloaded param's size from its recorded shape."""
        embeddings = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
        total = 0
        for name, p in model.named_parameters():
            if (exclude_embeddings and name in embeddings) or (only_trainable and not p.requires_grad):
                continue
            total += math.prod(runtime.param_shape(p)) if runtime.home_of(p) is not None else p.numel()
        return total
    return num_parameters
