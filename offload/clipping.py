"""``torch.nn.utils.clip_grad_norm_`` for wrapped models: the grads of a wrapped model's params live in the
runtime's buffers, not in ``param.grad``, so torch's function alone would see none, return 0 and clip nothing.

:func:`install` (called by :func:`offload.wrap`) puts :func:`clip_grad_norm_` in its place, under both names torch
exports it by (``torch.nn.utils.clip_grad_norm_`` and ``torch.nn.utils.clip_grad.clip_grad_norm_``): most loops
look it up there when they call it (accelerate's ``Accelerator.clip_grad_norm_``, which the HF ``Trainer`` calls,
does not: :mod:`offload.trainer` routes it here). Params of a wrapped model are clipped
by their optimizer (the same global norm and arithmetic as torch's, so training stays bit-identical); any other
call goes to torch's function unchanged. A reference taken before ``wrap`` (``from torch.nn.utils import
clip_grad_norm_`` at import time) still points at torch's: call ``opt.clip_grad_norm_(max_norm)`` there.
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad

torch_clip_grad_norm_ = torch.nn.utils.clip_grad.clip_grad_norm_
"""Torch's own function (what :func:`clip_grad_norm_` calls for params that are not offloaded)."""

_OPTIMIZERS: "weakref.WeakSet" = weakref.WeakSet()
"""The live OffloadOptimizers of wrapped models, asked whether they own a param."""


def register(optimizer) -> None:
    """Route ``clip_grad_norm_`` calls over the params of ``optimizer``'s wrapped model to it."""
    _OPTIMIZERS.add(optimizer)


def owns_any(params: Iterable[torch.Tensor]) -> bool:
    """Whether the grad of one of ``params`` is kept by a wrapped model's runtime (not in ``param.grad``)."""
    opts = list(_OPTIMIZERS)
    return bool(opts) and any(opt.owns_grad_of(p) for p in params for opt in opts)


def clip_grad_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``, which also finds the grads of params offloaded by :func:`offload.wrap`."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    owners = {}
    for opt in list(_OPTIMIZERS):
        mine = [p for p in params if opt.owns_grad_of(p)]
        if mine:
            owners[opt] = mine
    if not owners:
        return torch_clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    others = [p for p in params if p.grad is not None]
    if len(owners) > 1 or others:
        raise ValueError("clip_grad_norm_: these parameters mix a wrapped model's with others (another wrapped model's, "
                         "or plain ones with a .grad), and one norm over grads kept in different places is not "
                         "supported: clip each model's parameters in its own call")
    (opt, mine), = owners.items()
    return opt.clip_grad_norm_(max_norm, norm_type, params=mine, error_if_nonfinite=error_if_nonfinite,
                               foreach=foreach)


def install() -> None:
    """Put :func:`clip_grad_norm_` where torch exports its own (idempotent)."""
    torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
    torch.nn.utils.clip_grad.clip_grad_norm_ = clip_grad_norm_
