"""The seam between the scheduler and the runtime: :func:`config_to_plan` (the placement a uniform
:class:`~offload.OffloadConfig` runs, as a :class:`~scheduler.Plan`) and :func:`plan_to_config` (the config that
runs a plan, with ``offload.wrap(..., plan=plan)`` when the plan places units differently)."""

from __future__ import annotations

import collections

from offload.config import OffloadConfig
from scheduler.buffers import DEFAULT_GRAD_BUFFERS
from scheduler.planner import Plan, UnitPlacement
from scheduler.workload import REST, Workload
from storage import Tier

D = Tier.DEVICE


def _overlaps(config: OffloadConfig) -> bool:
    """Whether the runtime overlaps the update with backward: with clipping or loss scaling only speculatively, and
    this is the steady state of steps that do not clip (scheduler/speculation.py prices the others)."""
    return config.overlap_update and (config.speculate or (config.max_grad_norm is None and config.loss_scale is None))


def config_to_plan(config: OffloadConfig, workload: Workload, *, strategy: str = "config") -> Plan:
    """The placement ``offload.wrap(model, opt, config)`` runs, in the cost model's terms.

    Every unit gets ``param_tier`` (the rest unit too: the runtime fetches it once per iteration and holds it),
    ``state_tier`` and ``grad_tier``, updated on the CPU. ``prefetch`` is the prefetch depth, ``buffers`` the
    state buffers. ``grad_buffers`` is the runtime's without a plan (:data:`scheduler.buffers.DEFAULT_GRAD_BUFFERS`:
    the grads waiting on the device to leave, and NVMe grads waiting for their update)."""
    if not isinstance(config.update_on, str) or config.update_on != "cpu" or config.state_tier is D:
        raise NotImplementedError(f"config_to_plan: expected update_on='cpu' and state_tier 'host' or 'nvme', got "
                                  f"update_on={config.update_on!r}, state_tier={config.state_tier.value!r}; the cost "
                                  f"model prices device updates, but offload.wrap's are the CPU's own on this "
                                  f"runtime: measure CPU updates")
    if config.accumulation_steps != 1:
        raise NotImplementedError(f"config_to_plan: expected accumulation_steps=1, got {config.accumulation_steps}; "
                                  f"the cost model prices one backward per step")
    pl = UnitPlacement(config.param_tier, config.state_tier, "cpu", grad_tier=config.grad_tier)
    return Plan(strategy=strategy, units=(pl,) * len(workload.units), prefetch_depth=config.prefetch,
                grad_buffers=DEFAULT_GRAD_BUFFERS, state_buffers=config.buffers, overlap_update=_overlaps(config),
                speculate=config.speculate, clip=config.max_grad_norm is not None or config.loss_scale is not None)


def plan_to_config(plan: Plan, workload: Workload, **base) -> OffloadConfig:
    """The :class:`~offload.OffloadConfig` for ``plan`` (``base``: the other fields, e.g. ``nvme_dirs``).

    When every unit is placed alike (the rest unit may keep its params on the device: a config fetches it once
    per iteration instead), the config alone runs the plan. Otherwise its placement fields hold the most common
    block placement and ``offload.wrap(model, opt, config, plan=plan)`` runs the plan itself, unit by unit."""
    check_plan_units(plan, workload)
    rest = workload.units[0].kind == REST
    blocks = plan.units[1:] if rest else plan.units
    counts = collections.Counter(blocks or plan.units)
    pl = max(counts, key=lambda u: counts[u])  # the first of the most common (Counter keeps insertion order)
    return OffloadConfig(param_tier=pl.params, state_tier=pl.state, grad_tier=pl.grad_tier, update_on=pl.update,
                         prefetch=plan.prefetch_depth, buffers=plan.state_buffers,
                         overlap_update=plan.overlap_update, speculate=plan.speculate, **base)


def check_plan_units(plan: Plan, workload: Workload) -> None:
    """Raise unless ``plan`` has one placement per unit of ``workload``."""
    if len(plan.units) != len(workload.units):
        raise ValueError(f"expected a plan with one placement per unit of {workload.name!r} ({len(workload.units)}), "
                         f"got {len(plan.units)}; was it made for another workload?")
