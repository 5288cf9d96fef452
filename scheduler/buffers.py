"""The runtime's memory rules, in one place: how many buffers of which size each tier holds for a placement.

Both sides call :func:`memory_terms`: the cost model (:meth:`scheduler.cost.CostModel.memory`, from a workload's
sizes) and the runtime (:meth:`offload.runtime.OffloadRuntime.memory_terms`, from its units' real chunk sizes), so
that what the planner predicts and what the runtime is built to hold cannot drift apart; the runtime's bounds
that set a count read their number from here too (:func:`state_read_ahead`, :func:`param_buffers`).
``benchmarks/memory_validate.py`` and ``tests/test_memory_truth.py`` check the result against the peaks the
runtime measures (its device :class:`~storage.TierBudget`, its :class:`~storage.HostPool`, the store's extents).

Each rule, and the runtime code that it describes (``pb``, ``gb``, ``sb`` = a unit's param, grad and state
chunk; host and store chunks are rounded up to :data:`storage.alloc.ALIGN`, as the pool and the store hand them
out):

device (what the device budget counts; grads and activations are autograd's, outside it, and listed apart)
    ``params``: units kept on the device, and the rest unit (held from the first forward to the end of backward
    wherever it lives); ``param_buffers``: ``prefetch + 1`` of the largest streamed block (the unit computing and
    the ``prefetch`` fetched ahead: ``OffloadRuntime._prefetch``); ``state``: state on the device;
    ``state_buffers``: ``state_buffers`` of the largest offloaded state updated on the device.
    Outside the budget: ``grads`` (the rest unit's, whole through backward, plus ``grad_buffers`` blocks': the
    runtime waits for the oldest once they would pass that, ``_await_grads_on_device``; every device-updated
    block's when the update waits for backward) and ``activations``.
host (the pool)
    ``params``, ``state``: chunks that live there; ``grads``: one fp32 buffer per trainable unit whose grads live
    on the host, for the whole run (``OffloadRuntime._init_tiers``), however many the device holds at once;
    ``grad_staging`` (grads on NVMe): the rest unit's buffer (its head's grads come first in backward, its
    embedding's last) plus ``grad_buffers`` blocks' waiting for their update; ``param_staging`` (params on NVMe):
    the ``prefetch + 1`` fetches' reads, and in the step two units' weights, the one updating and the one before
    on its way to the store (``OffloadRuntime.finish_unit_update`` writes one at a time);
    ``state_staging`` (state on NVMe): :func:`state_read_ahead` chunks, read ahead or updating or being written
    (the first step, which makes the state: the chunk it makes and the one before on its way to the store);
    ``last_step_writes``: a step that returns before its last unit's writes land (``CostModel.writes_behind``)
    leaves that unit's state in flight into the next forward, beside its fetches (its new weights too, in the
    buffer the forward's first fetch takes: counted there);
    ``pre_images`` (speculation): a host copy of each host- or device-resident chunk an update changes, all held
    until the step is validated. Every speculative step copies the trainable params; a step that clips or
    scales the loss also copies the state. The first step always speculates (how a loop that clips is found out,
    ``OffloadOptimizer.step_needs_validation``) and has no state yet, so without clipping only the params are
    copied, once.
nvme (the store's extents)
    ``params``, ``state``, ``grads``: chunks that live there (grads stay allocated once written: a consumed grad
    chunk is forgotten, not deleted); ``write_room``: a write puts the new version beside the committed one until
    it lands: one unit's state (the update issues a unit's state writes once the unit before's landed,
    ``OffloadOptimizer._step_streamed``; in the first step only chunks made at wrap, which hold masters, have an
    earlier version) and one param chunk (none in a speculating step: the previous version is held anyway);
    ``held_versions`` (speculation): the previous version of every chunk a speculative step rewrites is held
    until validation (params of trainable units; with clipping also state and the grads kept for a redo).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from storage import Tier
from storage.alloc import round_up

D, H, N = Tier.DEVICE, Tier.HOST, Tier.NVME

DEVICE_BUDGET_TERMS = ("params", "param_buffers", "state", "state_buffers")
"""The device terms the runtime's device budget counts (the rest are autograd's: grads, activations)."""


DEFAULT_GRAD_BUFFERS = 2
"""A plan's ``grad_buffers`` where the runtime runs without one (a uniform config): units' worth of grads that may
wait on the device to be moved off, and NVMe grads that may wait for their update (:func:`nvme_grad_blocks`)."""


def param_buffers(prefetch: int) -> int:
    """Streamed units resident on the device at once: the one computing and ``prefetch`` fetched ahead."""
    return prefetch + 1


def nvme_grad_blocks(grad_buffers: int) -> int:
    """Blocks whose NVMe grads have a host buffer at once under the overlapped update: the one accumulating, and
    at most ``grad_buffers`` waiting for their update or being updated (``OffloadRuntime._await_update_backlog``
    waits for the oldest update beyond that)."""
    return grad_buffers + 1


def state_read_ahead(buffers: int) -> int:
    """NVMe state chunks with a host buffer at once under the overlapped update: the optimizer reads ahead while
    the chunks held (read ahead, updating, being written) leave one of its ``buffers`` free
    (``OffloadOptimizer.prefetch_state``), and a unit with nothing read ahead takes one: ``buffers - 1``, at
    least 1."""
    return max(1, buffers - 1)


@dataclasses.dataclass(frozen=True)
class UnitBytes:
    """One unit's chunk sizes as the runtime lays them out: params (the flat chunk, frozen params included), fp32
    grads and the state chunk (its master included where the placement needs one) of its trainable params, and
    the bytes of its trainable params within the param chunk."""

    params: int
    grads: int
    state: int
    trainable_params: int
    rest: bool = False
    """The unit of everything outside the repeated blocks (embeddings, head): held on the device through the
    iteration, its grads complete only with the last backward."""
    state_at_wrap: bool = True
    """The state chunk exists before the first step (it carries fp32 masters, seeded at wrap); else the first
    step makes it, and rewrites no earlier version of it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Knobs:
    """The pipeline's sizes and the step's kind, as the runtime runs them."""

    prefetch: int
    grad_buffers: int
    state_buffers: int
    overlap: bool
    speculate: bool = True
    """The overlapped update speculates where a step needs validation (``OffloadConfig.speculate``): the first
    step always, and every step that clips or scales the loss."""
    clip: bool = False
    """Every step needs validation: ``max_grad_norm`` or ``loss_scale`` (or a loop that clips)."""
    activation_bytes: int = 0


def r(n: int) -> int:
    """A host or store chunk's size as the pool and the store allocate it."""
    return round_up(n) if n else 0


def largest(sizes: Iterable[tuple[int, int]], n: int) -> int:
    """The sum of the ``n`` largest of ``sizes`` = (size, how many of that size)."""
    total = 0
    for size, count in sorted(sizes, reverse=True):
        take = min(n, count)
        total += take * size
        n -= take
        if n <= 0:
            break
    return total


def memory_terms(units: Iterable[tuple[UnitBytes, object, int]], k: Knobs) -> dict[str, dict[str, int]]:
    """Bytes per tier and term at the iteration's peak (module note) for ``units`` = (sizes, placement, how many
    such units); a placement has ``params``, ``state``, ``update`` and ``grads`` (a
    :class:`scheduler.plan.UnitPlacement`). Transient terms are those of the phase with the most of them on the
    tier: forward (fetches), the first step (speculative, state being made) or a later step."""
    items = [(u, pl, c) for u, pl, c in units if c]
    mx = lambda xs: max(xs, default=0)  # noqa: E731
    blocks = [(u, pl, c) for u, pl, c in items if not u.rest]
    rest = [(u, pl, c) for u, pl, c in items if u.rest]
    trains = lambda u: u.grads > 0  # noqa: E731 - frozen units have no grads, no state, no update
    # -- device ---------------------------------------------------------------------------------------------------
    streamed = mx(u.params for u, pl, c in blocks if pl.params is not D)
    dev_upd_off = mx(u.state for u, pl, c in items if pl.update == "device" and pl.state is not D and trains(u))
    dev_grads = sum(u.grads for u, pl, c in rest) + (
        k.grad_buffers * mx(u.grads for u, pl, c in blocks) if k.overlap else
        k.grad_buffers * mx(u.grads for u, pl, c in blocks if pl.update == "cpu")
        + sum(c * u.grads for u, pl, c in blocks if pl.update == "device"))
    device = {"params": sum(c * u.params for u, pl, c in items if pl.params is D or u.rest),
              "param_buffers": param_buffers(k.prefetch) * streamed,
              "state": sum(c * u.state for u, pl, c in items if pl.state is D and trains(u)),
              "state_buffers": k.state_buffers * dev_upd_off,
              "grads": dev_grads, "activations": k.activation_bytes}
    # -- host -----------------------------------------------------------------------------------------------------
    nvme_grads = [(u, c) for u, pl, c in items if trains(u) and pl.grads is N]
    nvme_state = [(r(u.state), c) for u, pl, c in items if pl.state is N and trains(u)]
    speculating = k.overlap and k.speculate
    pre_params = sum(c * r(u.params) for u, pl, c in items if trains(u) and pl.params is not N) if speculating \
        else 0
    pre_state = sum(c * r(u.state) for u, pl, c in items if trains(u) and pl.state is not N)
    host = {"params": sum(c * r(u.params) for u, pl, c in items if pl.params is H),
            "grads": sum(c * r(u.grads) for u, pl, c in items if trains(u) and pl.grads is H),
            "state": sum(c * r(u.state) for u, pl, c in items if pl.state is H and trains(u))}
    step = {"grad_staging": sum(r(u.grads) for u, c in nvme_grads if u.rest) + largest(
                [(r(u.grads), c) for u, c in nvme_grads if not u.rest], nvme_grad_blocks(k.grad_buffers)),
            "param_staging": largest([(r(u.params), c) for u, pl, c in items if pl.params is N and trains(u)], 2)}
    # The first step makes the state (one chunk at a time, nothing to read ahead: the one it makes, and the one
    # before on its way to the store) and speculates on the params; a later step reads state ahead, and copies
    # params and state when it clips.
    first = {**step, "state_staging": largest(nvme_state, 2), "pre_images": pre_params}
    later = {**step, "state_staging": largest(nvme_state, state_read_ahead(k.state_buffers)),
             "pre_images": pre_params + pre_state if speculating and k.clip else 0}
    forward = {"param_staging": largest([(r(u.params), c) for u, pl, c in items if pl.params is N],
                                        param_buffers(k.prefetch))}
    if k.overlap:  # the last unit updated: the rest unit, else a block (the largest counts)
        last = [r(u.state) for u, pl, c in rest if trains(u) and pl.state is N] if any(
            trains(u) for u, pl, c in rest) else [r(u.state) for u, pl, c in blocks if trains(u) and pl.state is N]
        forward["last_step_writes"] = max(last, default=0)
    host.update(_peak_phase([forward, first, later]))
    # -- nvme -----------------------------------------------------------------------------------------------------
    nvme = {"params": sum(c * r(u.params) for u, pl, c in items if pl.params is N),
            "grads": sum(c * r(u.grads) for u, c in nvme_grads),
            "state": sum(c * r(u.state) for u, pl, c in items if pl.state is N and trains(u))}
    param_write = mx(r(u.params) for u, pl, c in items if pl.params is N and trains(u))
    held_params = sum(c * r(u.params) for u, pl, c in items if trains(u) and pl.params is N)
    # The first step rewrites only the state chunks made at wrap; while it speculates, each param chunk's new
    # version is written beside the previous one, which is held anyway. Later steps rewrite every state chunk.
    at_wrap = [(r(u.state), c) for u, pl, c in items if pl.state is N and trains(u) and u.state_at_wrap]
    phases = [{"write_room": largest(at_wrap, 1) + (0 if speculating else param_write),
               "held_versions": held_params if speculating else 0},
              {"write_room": largest(nvme_state, 1) + param_write}]
    if speculating and k.clip:  # every state chunk's previous version is held: its new one is no extra room
        phases.append({"write_room": param_write, "held_versions": held_params + sum(s * c for s, c in nvme_state)})
    nvme.update(_peak_phase(phases))
    return {"device": device, "host": host, "nvme": nvme}


def _peak_phase(phases: list[dict[str, int]]) -> dict[str, int]:
    """The terms of the phase with the most bytes (each term present in every result, 0 where absent)."""
    keys = list(dict.fromkeys(key for p in phases for key in p))
    top = max(phases, key=lambda p: sum(p.values()))
    return {key: top.get(key, 0) for key in keys}
