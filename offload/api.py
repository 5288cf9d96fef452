"""The public entry point: :func:`wrap` a model and its optimizer (and :func:`~offload.runtime.runtime_of` to
reach what it made). Kept apart from :mod:`offload.runtime` so that the runtime imports none of the modules that
build on it (re-planning, reports)."""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch
from torch import nn

from offload import clipping, trainer
from offload.autoplan import from_config as replan_from_config
from offload.config import OffloadConfig, config_from_env
from offload.optimizer import OffloadOptimizer
from offload.report import placement_text, report_at_exit
from offload.runtime import OffloadRuntime, runtime_of  # noqa: F401 - runtime_of: named in the docstrings
from scheduler.planner import Plan


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, config: OffloadConfig | None = None, *,
         units: Callable[[nn.Module], list[tuple[str, list[nn.Module]]]] | None = None,
         plan: Plan | None = None) -> tuple[nn.Module, OffloadOptimizer]:
    """Offload ``model``'s params, grads and ``optimizer``'s state per ``config``; returns the same module and
    the :class:`OffloadOptimizer` to use instead of ``optimizer``. The training loop stays
    ``loss = model(x); loss.backward(); opt.step(); opt.zero_grad()``.

    A model whose params are on the meta device (buffers real: ``accelerate.init_empty_weights()``) is wrapped
    without weights: each unit is allocated on its tier, zeroed, and each param object becomes an empty param
    on the compute device (CUDA when available, else the CPU); load the weights with ``model.load_state_dict``
    (shard by shard with ``strict=False``).

    What it changes, all of it (``runtime_of(model).close()`` removes the hooks and frees the memory):

    - the model: forward, backward and post-accumulate-grad hooks on its units; each param's ``.data`` is an
      empty tensor between uses (``model.state_dict()`` still returns the real weights); ``model.zero_grad``
      also forgets the offloaded grads; ``model.load_state_dict`` writes the offloaded params into their tiers
      unit by unit (and the optimizer's fp32 masters follow); ``model._offload_runtime`` holds the runtime
      (reach it with :func:`runtime_of`); on a peft model, ``merge_and_unload``, ``merge_adapter`` and ``unload``
      raise (:func:`_refuse_peft_merges`); each HF ``PreTrainedModel`` in it gets a ``num_parameters`` that counts
      the real sizes (the HF ``Trainer`` computes its FLOPs from it);
    - the optimizer: its state moves into the returned one; do not step the original;
    - with ``OffloadConfig(replan=True)``: a re-planner is attached (:func:`offload.autoplan.from_config`);
    - under ``offload run`` (``OFFLOAD_PRINT_PLAN`` set): the placement is printed to stderr on rank 0;
    - the process, where memory is short (a host budget, or a model larger than the host's memory): glibc's
      malloc serves allocations of 1 MiB and more from mappings of their own, so what a step frees goes back to
      the system and the budgets bound the memory (:func:`storage.memory.give_large_frees_back`; a
      ``MALLOC_MMAP_THRESHOLD_`` you set is kept);
    - at interpreter exit (and under ``offload run``, to its report directory): the run report
      (:func:`offload.report.report_at_exit`);
    - ``torch.nn.utils.clip_grad_norm_`` is replaced (once per process) by :func:`offload.clipping.clip_grad_norm_`,
      which clips a wrapped model's grads through its optimizer (they are not in ``param.grad``) and passes
      every other call to torch's own function; accelerate's ``Accelerator.clip_grad_norm_`` (the HF ``Trainer``'s)
      likewise, and the step of any other optimizer holding the model's params (which would change nothing) raises
      (:mod:`offload.trainer`).

    ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` and ``opt.clip_grad_norm_(max_norm)`` clip
    and return the true norm, between backward and the step; with the overlapped update on, the update has run
    by then, speculatively: the step is validated against that ``max_norm`` and undone and redone exactly when
    it clips (``OffloadConfig.speculate``). Without ``config``, the one
    ``offload run`` was given (``OFFLOAD_CONFIG``) is used, else the defaults.

    ``plan``: a :class:`scheduler.Plan` placing each unit on its own (unit 0 is ``rest``, then the blocks, the
    order of :func:`offload.measure.workload_of`): params on host, nvme or device (kept resident), grads on host or
    nvme, state on host, nvme or device, updated on cpu or device; its ``prefetch_depth``, ``state_buffers`` and
    ``overlap_update`` replace the config's. The config gives the rest (``nvme_dirs``, budgets, clipping, ...).
    ``runtime_of(model).apply_plan(plan)`` switches plans between iterations; with
    ``OffloadConfig(replan=True)`` the runtime re-plans from its measured rates (:mod:`offload.autoplan`).
    """
    runtime = OffloadRuntime(model, optimizer, config or config_from_env() or OffloadConfig(), units=units,
                             plan=plan)
    model._offload_runtime = runtime
    clipping.install()
    clipping.register(runtime.optimizer)
    trainer.install()
    orig_zero_grad = model.zero_grad

    def zero_grad(set_to_none: bool = True):
        runtime.zero_grad()
        orig_zero_grad(set_to_none)

    model.zero_grad = zero_grad
    orig_load_state_dict = model.load_state_dict

    def load_state_dict(state_dict, strict: bool = True, assign: bool = False):
        if assign:
            raise ValueError("load_state_dict(assign=True) on a model wrapped by offload: its params are the runtime's "
                             "buffers; load without assign (the values are copied into them)")
        return runtime.load_state_dict(state_dict, orig_load_state_dict, strict=strict)

    model.load_state_dict = load_state_dict
    _refuse_peft_merges(model)
    trainer.count_hf_parameters(model, runtime)
    if runtime.config.replan:  # re-plan from measured rates
        replan_from_config(model, runtime.config)
    if os.environ.get("OFFLOAD_PRINT_PLAN") and int(os.environ.get("RANK", "0")) == 0:  # under `offload run`
        print(placement_text(runtime), file=sys.stderr, flush=True)
    report_at_exit(model, runtime.optimizer)
    return model, runtime.optimizer


PEFT_MERGES = ("merge_and_unload", "merge_adapter", "unload")
"""The peft tuner methods that change or hand out the base layers' weights, refused on a wrapped model."""


def _refuse_peft_merges(model: nn.Module) -> None:
    """peft merges an adapter by adding its delta into ``base_layer.weight`` in place, and unloads by handing back
    the base layers. Between uses those weights are empty tensors (the runtime holds the real ones), so a merge
    would change nothing and the model handed back would have no weights: refused instead, naming what works."""
    peft = sys.modules.get("peft")
    if peft is None:  # never imported: the model is no peft model
        return
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    def refuse(name: str) -> Callable:
        def refused(*args, **kwargs):
            raise NotImplementedError(
                f"{name}() on a model wrapped by offload: the base weights live in the runtime's tiers and the "
                f"params hold empty tensors between uses, so peft would merge into those. Save the adapter instead "
                f"(model.save_pretrained(dir), or peft.get_peft_model_state_dict(model)) and merge it into the base "
                f"model outside offload (PeftModel.from_pretrained(base, dir).merge_and_unload())")
        return refused

    for mod in model.modules():
        if isinstance(mod, BaseTuner):  # PeftModel forwards these to its tuner (LoraModel, ...)
            for name in PEFT_MERGES:
                setattr(mod, name, refuse(name))
        elif isinstance(mod, BaseTunerLayer):  # what every merge comes down to, however it was asked for
            mod.merge = refuse(f"{type(mod).__name__}.merge")
