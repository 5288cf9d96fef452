"""Re-planning while training, for a wrapped model: ``offload.autoplan.enable(model)``.

After each step the runtime calls ``runtime.on_iteration`` with the iteration's history record and applies a
returned plan before the next forward (offload/runtime.py). ``enable`` appends one such callback: a
:class:`scheduler.replan.Replanner` for this model's workload on a hardware profile, starting from the plan that
runs now, which switches plans when measured rates make another one faster (scheduler/replan.py says how).

    model, opt = offload.wrap(model, opt, config)
    replanner = offload.autoplan.enable(model, batch=8, seq=1024)     # batch, seq: guesses are fine
    ...                                                                # train as before
    print(offload.autoplan.decisions(model))                         # what it decided, and why

Or from the config: ``OffloadConfig(replan=True, profile=...)`` (``offload run --set replan=true``), which
:func:`from_config` turns into the same call.
"""

from __future__ import annotations

import dataclasses

import torch

from offload.config import OffloadConfig
from offload.plans import config_to_plan
from offload.runtime import PARAM_ALIGN, OffloadRuntime
from scheduler.cost import CostModel
from scheduler.planner import Plan
from scheduler.profile import HardwareProfile, resolve
from scheduler.replan import Replanner
from scheduler.workload import REST, UnitWork, Workload, from_module, precision

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _runtime(model_or_runtime) -> OffloadRuntime:
    rt = getattr(model_or_runtime, "_offload_runtime", model_or_runtime)
    if not hasattr(rt, "on_iteration") or not hasattr(rt, "units"):
        raise ValueError(f"autoplan: expected a model returned by offload.wrap (or its runtime), got "
                         f"{type(model_or_runtime).__name__}; wrap the model first")
    return rt


def workload_of_runtime(runtime: OffloadRuntime, *, batch: int, seq: int) -> Workload:
    """The workload of the wrapped model (:func:`scheduler.workload.from_module`), in the runtime's layout (fp32
    grads, chunks padded per tensor, no recomputation). Between uses a param holds an empty tensor, so for the call
    each one is given a view of its recorded shape over a single element (no memory), and then its own back."""
    saved = []
    try:
        for unit in runtime.units:
            for k, p in enumerate(unit.params):
                saved.append((p, p.data))
                p.data = torch.empty((), dtype=unit.dtypes[k], device=p.device).expand(unit.shapes[k])
        numel: dict[torch.dtype, int] = {}
        for unit in runtime.units:
            for n, dt in zip(unit.numels, unit.dtypes):
                numel[dt] = numel.get(dt, 0) + n
        dtype = max(numel, key=numel.get)  # the dtype most params have (norms may be kept in fp32)
        if dtype not in _DTYPES:
            raise ValueError(f"autoplan: expected params in {sorted(_DTYPES.values())}, got {dtype}; pass workload=")
        w = from_module(runtime.model, batch=batch, seq=seq, name=type(runtime.model).__name__,
                        checkpointing=False, chunk_align_bytes=PARAM_ALIGN, **precision(_DTYPES[dtype]))
        if w.units[0].kind != REST:  # every param is in a block: the runtime still has its (empty) rest unit
            empty = UnitWork(name="rest", kind=REST, params=0, fwd_flops=0, bwd_flops=0, act_bytes=0, work_bytes=0)
            w = dataclasses.replace(w, units=(empty, *w.units))
        return w
    finally:
        for p, data in saved:
            p.data = data


def _check_units(runtime: OffloadRuntime, w: Workload) -> None:
    """The workload must describe the runtime's units, in its order (``rest``, then the blocks)."""
    have, want = [sum(u.numels) for u in runtime.units], [u.params for u in w.units]
    if have != want:
        raise ValueError(f"autoplan: expected a workload with the runtime's units (params per unit: {have}), got "
                         f"{want}; build it for the same model and unit cut (offload.measure.workload_of), or "
                         f"pass workload=")


def _profile(profile, config, w: Workload, plan: Plan) -> HardwareProfile:
    """``profile`` (a HardwareProfile, a shipped name or a path; ``None``: this machine's cached probe, else the
    development VM's) with the capacities the runtime's config enforces. The device budget holds params and
    optimizer state, not activations or grads (offload/runtime.py), which the cost model counts in device memory:
    those are added, at the most the planner may place there (the grads of ``grad_buffers`` blocks plus the rest
    unit's), so that any plan fitting the capacity fits the budget."""
    hw = profile if isinstance(profile, HardwareProfile) else resolve(profile)
    changes, sources = {}, dict(hw.sources)
    if config.device_budget_bytes:
        cm = CostModel(w, hw)
        rest = [0] if cm.has_rest else []
        grads = sum(cm.gb[i] for i in rest) + plan.grad_buffers * max((cm.gb[i] for i in cm.blocks), default=0)
        changes["device_memory_bytes"] = config.device_budget_bytes + cm.act_bytes + grads
        sources["device_memory_bytes"] = ("the runtime's OffloadConfig.device_budget_bytes, plus the activations "
                                          "and grads it does not count")
    for field, key in (("host_memory_bytes", "host_budget_bytes"), ("nvme_bytes", "nvme_capacity_bytes")):
        if getattr(config, key):
            changes[field], sources[field] = int(getattr(config, key)), f"the runtime's OffloadConfig.{key}"
    # A budget is what the runtime may use: all of it usable, no reserve taken off it again.
    for field, reserve in (("device_memory_bytes", "device_reserve"), ("host_memory_bytes", "host_reserve")):
        if field in changes:
            changes[reserve] = {"bytes": 0, "fraction": 0.0}
            sources[reserve] = "none: the capacity is the runtime's budget, already net of any reserve"
    return dataclasses.replace(hw, **changes, sources=sources) if changes else hw


def _same(a: Plan, b: Plan) -> bool:
    return (a.units, a.prefetch_depth, a.state_buffers, a.overlap_update) == \
        (b.units, b.prefetch_depth, b.state_buffers, b.overlap_update)


def enable(model_or_runtime, *, profile: HardwareProfile | str | None = None, workload: Workload | None = None,
           batch: int | None = None, seq: int | None = None, **replanner_kw) -> Replanner:
    """Re-plan ``model_or_runtime`` (a model returned by :func:`offload.wrap`, or its runtime) while it trains.

    ``workload``: else built from the model for ``batch`` x ``seq`` (default 1 x 1): guesses are fine for time,
    since calibration absorbs the FLOPs they get wrong, but activations set device memory, so give them when the
    device is tight. ``profile``: a :class:`HardwareProfile`, a shipped name or a path; default this machine's
    cached ``offload probe``, else ``cpu-dev-2core``. The runtime's budgets (``device_budget_bytes``, ...) replace
    its capacities. ``replanner_kw`` go to :class:`scheduler.replan.Replanner` (``drift``, ``patience``,
    ``min_gain``, ``options``, ...). Returns the Replanner; its ``log`` lists the decisions (:func:`decisions`)."""
    rt = _runtime(model_or_runtime)
    if replanner_of(rt) is not None:
        raise ValueError("autoplan.enable: expected a runtime without a Replanner, got one that has one (two would "
                         "each apply their own plans); call enable once per wrapped model")
    if rt.config.accumulation_steps != 1:
        raise NotImplementedError(f"autoplan.enable: expected accumulation_steps=1, got "
                                  f"{rt.config.accumulation_steps}; the cost model prices one backward per step")
    if workload is None:
        workload = workload_of_runtime(rt, batch=batch or 1, seq=seq or 1)
    _check_units(rt, workload)
    current = rt.plan if rt.plan is not None else config_to_plan(rt.config, workload, strategy="config")
    hw = _profile(profile, rt.config, workload, current)
    replanner = Replanner(workload, hw, current, **{"run": type(rt.model).__name__, **replanner_kw})

    def observe(record: dict) -> Plan | None:
        # The plan that ran this iteration: ours if the runtime applied it, else one applied from outside (or ours
        # refused), which is then measured afresh.
        running = rt.plan if rt.plan is not None else current
        if not _same(running, replanner.plan):
            replanner.set_plan(running)
        return replanner.observe(record)

    observe.replanner = replanner
    rt.on_iteration.append(observe)
    return replanner


def from_config(model_or_runtime, config: OffloadConfig) -> Replanner | None:
    """What ``config`` asks of a wrapped model: re-planning (:func:`enable` on ``config.profile``) when
    ``config.replan``, else nothing. Returns the model's Replanner, or ``None``; called again (by ``offload.wrap``
    and by a script), it returns the one already attached instead of adding another."""
    rt = _runtime(model_or_runtime)
    if not config.replan:
        return None
    attached = replanner_of(rt)
    return attached if attached is not None else enable(rt, profile=config.profile)


def replanner_of(model_or_runtime) -> Replanner | None:
    """The Replanner :func:`enable` attached to a wrapped model (or its runtime), or ``None``."""
    for fn in _runtime(model_or_runtime).on_iteration:
        if isinstance(getattr(fn, "replanner", None), Replanner):
            return fn.replanner
    return None


def decisions(model_or_runtime) -> list[dict]:
    """The decisions of every Replanner :func:`enable` attached to the runtime, in order (JSON-able, for the run
    report): iteration, what drifted, old and new predicted iteration time, old and new plan codes."""
    rt = _runtime(model_or_runtime)
    out = []
    for fn in rt.on_iteration:
        rp = getattr(fn, "replanner", None)
        if isinstance(rp, Replanner):
            out.extend(rp.log)
    return sorted(out, key=lambda e: e["iteration"])
