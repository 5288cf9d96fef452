"""Parameter and gradient offload through module hooks: the runtime behind ``offload.wrap(model, optimizer, config)``.

Why one module: the hooks, the fetch pipeline and the grad and update threads act on one iteration's state (which
unit is where, which backward is running, what is being updated); split, they would pass it back and forth.

The model is cut into **units** (by default each child of the model's ModuleLists, i.e. each transformer block,
plus one unit for everything else). A unit's parameters are packed into one flat buffer per tier, so a move is
one transfer. Between uses they are a chunk of the swap manager (:mod:`offload.swap`), on the host or in the
store, as are the unit's fp32 grads; on the device they exist only while needed:

- forward: a unit's pre-forward hook makes its params resident (waiting for the prefetch issued earlier) and
  prefetches the next ``prefetch`` units in the order recorded on the previous pass; its post-forward hook
  releases them (``param.data`` becomes an empty tensor, as FSDP1 did) and registers a pre-backward hook on
  its outputs. Autograd keeps views of the released memory (a linear layer saves ``weight.t()``), so the unit's
  device buffer keeps one storage for its life: released, the storage is emptied and its memory becomes a spare
  others may take; fetched again, the same storage gets memory back and the weights, and those views read them
  (FSDP2 frees and refills its unsharded params the same way);
- backward: the pre-backward hook (the first gradient reaching the unit's outputs) fetches the params again
  and prefetches the units backward will need next; each parameter's post-accumulate-grad hook frees the device
  gradient and hands it to the grad thread, which adds it into the unit's fp32 host buffer (a copy stream under
  CUDA); when a unit's last gradient has been handed off, its params are released, and once its grads have
  landed the unit is updated (overlapped update) or its grads spilled to NVMe. A callback at the end of backward
  waits for the grads in flight and releases what is left (params that got no gradient, the rest unit).
- step: the user's ``optimizer.step()`` runs :class:`~offload.optimizer.OffloadOptimizer` over the units,
  reading weights and gradients from the units' host buffers (its ``ParamHome`` interface). fp32 params on NVMe
  are changed in place in a host buffer (no fp32 master): under the overlapped update that buffer is the one the
  unit's backward fetch brought, kept for it (or a copy of the device params for a unit not fetched again for
  backward), where the pool has room beyond the transfers in flight; else they are read from the store again. Its state chunks
  belong to the same swap manager (one pool, one device budget, one store, one set of byte counters). The
  overlapped step returns once every unit is updated: the writes its last unit left in flight land during the
  next forward, and whatever reads or moves chunks between steps waits for them first (:meth:`settle_step_io`).

Placement is uniform (the config's ``param_tier``, ``grad_tier``, ``state_tier``, ``update_on``) or per unit: a
:class:`scheduler.Plan` gives each unit its own, and a unit whose params the plan keeps on the ``device`` is fetched
once and never released. :meth:`OffloadRuntime.apply_plan` switches plans between iterations, moving what changed
(see its docstring); ``runtime.on_iteration`` callbacks may return the next plan after each step (the re-planner's
seam).

Device memory is the swap manager's budget (:class:`~offload.swap.DeviceCache`) that every fetch reserves from, so
on a CPU-only machine the budget is enforced by our accounting exactly as it bounds a GPU. Activations are not
counted. The host budget is checked at wrap (and a new plan's at ``apply_plan``) against
:meth:`OffloadRuntime.host_minimum`.
"""

from __future__ import annotations

import collections
import contextlib
import concurrent.futures
import dataclasses
import enum
import time
import warnings
import weakref
from typing import Callable, Collection, Iterable, Iterator

import torch
from torch import nn

from offload.config import OffloadConfig
from offload.optimizer import OffloadOptimizer, ParamHome
from offload.swap import Chunk, ChunkState, DeviceCache, SwapManager
from offload.timeline import Timeline
from scheduler.buffers import DEFAULT_GRAD_BUFFERS
from scheduler.planner import Plan, UnitPlacement
from storage import HostPool, NvmeStore, Tier, TierBudget, TierFullError, format_bytes
from storage import faults
from storage.memory import available_host_bytes, give_large_frees_back

PARAM_ALIGN = 64  # byte alignment of each parameter inside a unit's flat buffer


class ParamState(enum.Enum):
    """Where a unit's parameters are with respect to the device."""

    RELEASED = "released"
    """Not on the device: ``param.data`` is an empty tensor; the weights are on the host or NVMe."""
    FETCHING = "fetching"
    """A copy to the device is in flight (its memory is already reserved)."""
    RESIDENT = "resident"
    """On the device: ``param.data`` are views into the unit's device buffer."""


class Unit:
    """The modules moved together, their params' flat layout, and where those params are now."""

    def __init__(self, index: int, name: str, modules: list[nn.Module], params: list[nn.Parameter]):
        self.index = index
        self.name = name
        self.modules = modules
        self.params = params
        # Recorded now: once released, a param's own shape is that of an empty tensor.
        self.shapes = [tuple(p.shape) for p in params]
        self.numels = [p.numel() for p in params]
        self.dtypes = [p.dtype for p in params]
        self.offsets: list[int] = []
        off = 0
        for p in params:
            self.offsets.append(off)
            off += (p.numel() * p.element_size() + PARAM_ALIGN - 1) // PARAM_ALIGN * PARAM_ALIGN
        self.nbytes = off
        self.grad_offsets: list[int] = []
        goff = 0
        for p in params:
            self.grad_offsets.append(goff)
            goff += p.numel() * 4 if p.requires_grad else 0
        self.grad_nbytes = goff
        self.trainable = sum(p.requires_grad for p in params)
        self.state = ParamState.RELEASED
        self.param_tier = Tier.HOST  # where the params live between uses (device: resident, never released)
        self.grad_tier = Tier.HOST  # where accumulated grads wait for the update (device: a device update's)
        self.weights: Chunk | None = None  # the flat params between uses (host or nvme tier; None: device tier)
        self.grads: Chunk | None = None  # the flat fp32 grads (None: no trainable params, or grads on the device)
        self.dev_grads: list[torch.Tensor | None] = [None] * len(params)  # grad_tier device: autograd's own grads
        # ... which are in each param's dtype
        self.dev_grad_nbytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        self.device_buf: torch.Tensor | None = None  # one storage for life: emptied on release, refilled on fetch
        self.fetch: concurrent.futures.Future | None = None
        self.has_grads = False  # some param of the unit has a grad in the current accumulation
        self.got = [False] * len(params)  # which params have one
        self.grad_key = f"unit{index}.grads"
        self.pending = 0  # trainable params whose grad has not arrived in this backward
        self.frozen = self.trainable < len(params)
        self.inputs_pending = 0  # a unit with frozen params: input-grad hooks of its last forward not fired yet
        self.key = f"unit{index}.params"

    def padded_bytes(self, k: int) -> int:
        """Bytes of param ``k``'s slot in the flat buffer (what moves with it, padding included)."""
        return (self.offsets[k + 1] if k + 1 < len(self.offsets) else self.nbytes) - self.offsets[k]

    def view(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        dtype = self.dtypes[k]
        n = self.numels[k] * dtype.itemsize
        return flat[self.offsets[k]:self.offsets[k] + n].view(dtype).view(self.shapes[k])

    def grad_view(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        n = self.numels[k] * 4
        return flat[self.grad_offsets[k]:self.grad_offsets[k] + n].view(torch.float32).view(self.shapes[k])

    def __repr__(self) -> str:
        return f"Unit({self.name}, {len(self.params)} params, {format_bytes(self.nbytes)}, {self.state.value})"




def default_units(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """Each child of the model's top-most ModuleLists (the repeated blocks) is a unit; the rest is one more."""
    units: list[tuple[str, list[nn.Module]]] = []
    taken: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and id(mod) not in taken:
            if any(id(m) in taken for m in mod.modules()):
                continue
            for i, child in enumerate(mod):
                units.append((f"{name}.{i}", [child]))
            taken.update(id(m) for m in mod.modules())
    return units


class _Lane:
    """One worker thread running tasks in the order they were handed to it. Each task passes the hand-off delay
    site first (:mod:`storage.faults`), so tests can make any hand-off late and check that order still holds."""

    def __init__(self, name: str, site: str):
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._site = site

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        return self._executor.submit(self._run, fn, args)

    def _run(self, fn: Callable, args: tuple):
        faults.delay(self._site)
        return fn(*args)

    def shutdown(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait)


class _Home(ParamHome):
    """The optimizer's view of where each parameter's weights and gradient are (see OffloadOptimizer). Every
    answer comes from the unit's chunks through the swap manager, which hands out a buffer only once its bytes
    have landed."""

    def __init__(self, runtime: "OffloadRuntime"):
        self.rt = weakref.proxy(runtime)
        self._read: dict[int, torch.Tensor] | None = None  # inside loading(): the last unit read, by index

    def weights(self, param):
        unit, k = self.rt._owner[param]
        if unit.param_tier is Tier.DEVICE:
            return unit.view(unit.device_buf, k)
        flat = self.rt.swap.buffer(unit.weights)  # NVMe params: only while the update stages them
        return None if flat is None else unit.view(flat, k)

    def on_device(self, param):
        return self.rt._owner[param][0].param_tier is Tier.DEVICE

    def shape(self, param):
        return self.rt.param_shape(param)

    def load_weights(self, param):
        unit, k = self.rt._owner[param]
        if self._read is None or unit.weights is None or not self.rt._released_once:
            return self.rt.param_value(param)
        if unit.index not in self._read:  # a unit's params come together: read it once for all of them
            self._read = {unit.index: self.rt.swap.copy(unit.weights)}
        return unit.view(self._read[unit.index], k)

    @contextlib.contextmanager
    def loading(self):
        self._read = {}
        try:
            yield
        finally:
            self._read = None

    def grad(self, param):
        unit, k = self.rt._owner[param]
        if not (unit.has_grads and unit.got[k]):
            return None
        if unit.grad_tier is Tier.DEVICE:
            return unit.dev_grads[k]
        return unit.grad_view(self.rt.grads_of(unit), k)

    def grad_meta(self, param):
        unit, k = self.rt._owner[param]
        if not (unit.has_grads and unit.got[k]):
            return None
        if unit.grad_tier is Tier.DEVICE:
            return unit.dev_grads[k].dtype, unit.dev_grads[k].device
        return torch.float32, torch.device("cpu")

    def has_grad(self, param):
        unit, k = self.rt._owner[param]
        return unit.has_grads and unit.got[k]

    def before_update(self, sub):
        self.rt._before_update(sub)

    def after_update(self, sub):
        self.rt._after_update(sub)


class OffloadRuntime:
    """Owns the units, their memory on each tier, the hooks and the timeline of one wrapped model."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: OffloadConfig,
                 units: Callable[[nn.Module], list[tuple[str, list[nn.Module]]]] | None = None,
                 plan: Plan | None = None):
        self.model = model
        if plan is None and config.param_tier is Tier.DEVICE:
            raise NotImplementedError("OffloadConfig(param_tier='device'): keeping every param on the device needs "
                                      "no wrap; use OffloadOptimizer alone (or give wrap a plan that keeps some "
                                      "units on the device)")
        if plan is not None:
            _check_plan_type(plan)
            config = _with_plan(config, plan)
        self.config = config
        devices = {p.device for p in model.parameters()}
        real = devices - {torch.device("meta")}
        if len(real) > 1:
            raise ValueError(f"offload.wrap: expected the model on one device, got {sorted(map(str, devices))}")
        # Params on the meta device (a model built under torch.device("meta") or accelerate.init_empty_weights(),
        # in whole or in part) have no weights yet: their chunks start at zero until weights are loaded
        # (offload.load_pretrained, model.load_state_dict). Compute runs where torch would put it.
        self._meta_born = {p for p in model.parameters() if p.is_meta}
        if real:
            self.device = next(iter(real))
        else:
            self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
                else torch.device("cpu")
        if any(b.is_meta for b in model.buffers()):
            materialize_meta_buffers(model, self.device)
        self.timeline = Timeline()
        self._counters = {"fetches": 0, "fetch_wait_s": 0.0, "replans": 0, "replan_h2d_bytes": 0,
                          "replan_d2h_bytes": 0, "replan_disk_read_bytes": 0, "replan_disk_write_bytes": 0,
                          "update_weights_kept": 0, "update_weights_read": 0}
        self._build_units(units or default_units)
        self._owner: dict[nn.Parameter, tuple[Unit, int]] = {}
        for u in self.units:
            for k, p in enumerate(u.params):
                self._owner[p] = (u, k)
        if self._meta_born:
            self._leave_meta()
        if plan is not None:
            self._check_plan(plan, "offload.wrap")
        for i, u in enumerate(self.units):
            u.param_tier = plan.units[i].params if plan else config.param_tier
            u.grad_tier = plan.units[i].grads if plan else config.grad_tier
        # One owner for the memory of every tier: the pool (one host budget for params, grads and optimizer
        # state; without a budget in the config, the machine's memory is the limit), the device budget and its
        # buffers (at most prefetch + 2 spares per size: what the fetch pipeline has alive at once), the store.
        self.swap = SwapManager(
            HostPool(budget_bytes=config.host_budget_bytes or available_host_bytes()),
            DeviceCache(self.device, config.device_budget_bytes or (1 << 62), keep=config.prefetch + 2),
            self._open_store)
        self.swap.trace = self._trace_io
        self._io_label = ""  # what the chunk transfers are part of, on the timeline ("replan " in apply_plan)
        self._check_device_budget([u.param_tier for u in self.units], "offload.wrap")
        states = [pl.state for pl in plan.units] if plan else [config.state_tier]
        if Tier.NVME in [u.param_tier for u in self.units] + [u.grad_tier for u in self.units] + states:
            self.swap.store  # opened now: a store that cannot be made fails at wrap, not in the first backward
        self._bound_malloc(plan)
        self._copy_pool = _Lane("offload-fetch", "handoff.fetch")
        # One thread runs the overlapped updates, in the order units finish backward (the CPU-update resource).
        self._update_pool = _Lane("offload-update", "handoff.update")
        # One thread moves grads off the device as they complete (the d2h resource), in order.
        self._grad_pool = _Lane("offload-grads", "handoff.grad")
        self._grad_futures: list[concurrent.futures.Future] = []
        # Device grads handed to the grad thread and not yet moved off (future, bytes), oldest first: backward
        # waits for the oldest once they pass the plan's grad_buffers largest units (what the cost model counts
        # on the device), instead of piling up there while the grad thread waits for the updates.
        self._grads_on_device: collections.deque[tuple[concurrent.futures.Future, int]] = collections.deque()
        self.overlap = config.overlap_update
        self._backwards = 0  # backward passes since the last step
        self._overlapping = False  # this backward runs the updates
        self._speculating = False  # ... speculatively: the optimizer validates them at step()
        # Backward passes per step: the config's, raised when a loop is seen accumulating more (a speculative step
        # is undone when another backward follows the one taken as its last).
        self._accumulation = config.accumulation_steps
        self._step_pending = False  # updates ran (or run) in backward; step() must collect them
        self._update_futures: list[concurrent.futures.Future] = []
        self._submitted: set[int] = set()
        self._grad_units: set[int] = set()  # units whose grads this overlapped backward has started
        self._update_seq: list[int] = []  # unit indices in the order the overlapped update reaches them
        self._last_update: int | None = None  # the unit the update thread reached last (its thread's)
        self.last_timeline: Timeline | None = None
        # One record per iteration (the last 1000): its measured time, timeline summary and the byte counters
        # after it. Run reports (offload/report.py) and `offload run` read it; it costs a few µs per step.
        self.history: collections.deque[dict] = collections.deque(maxlen=1000)
        self.iterations = 0
        self._new_iteration = True
        # Separate streams for the two directions: a GPU has a copy engine for each.
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._d2h_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._staging: list[Unit] = []  # units whose new weights the update is writing (NVMe params)
        self._params_writing: list[Unit] = []  # their writes in flight, settled before the next unit's is issued
        self._step_io: concurrent.futures.Future | None = None  # the last step's writes left in flight (settle_step_io)
        self._keep_fetched = False  # this backward's fetches keep host copies for the overlapped update
        self._warm_ok = False  # this step's updates keep new weights for the next forward (finish_unit_update)
        self._in_flight_bytes = 0  # _in_flight_need() for this step, taken when its last backward starts
        self._may_keep = config.host_budget_bytes is not None or not self.host_short()  # _room_to_keep
        self._updating: Unit | None = None  # the unit whose subgroups the optimizer is updating
        self._hold = contextlib.ExitStack()  # that unit's chunks, held for its update
        self._fwd_order: list[int] = [u.index for u in self.units[1:]]
        self._fwd_seq: list[int] = []
        self._bwd_seq: list[int] = []
        self._in_backward = False
        self._at_boundary = True  # between iterations: no training forward since the last step (apply_plan may run)
        self.on_iteration: list[Callable[[dict], Plan | None]] = []
        """Called after each step with the history record just appended; a returned plan is applied before the
        next forward starts (the re-planner's seam)."""
        self.refused_plans: list[dict] = []  # callbacks' plans the budgets refused (kept the current one)
        self._pending_plan: tuple[Plan, int] | None = None  # (plan, the iteration whose callback returned it)
        self._replan_record: dict | None = None  # what the last apply_plan did, for the next history record
        self._empty = {}
        self._released_once = bool(self._meta_born)  # until then, params still hold their weights in param.data
        self.grads_consumed = False
        """The last step consumed the grads kept on NVMe (or on the device, by an overlapped update) and no
        backward (or zero_grad) came since."""
        self._dropped_device_grads = False  # this step's overlapped updates consumed device grads
        self.plan: Plan | None = plan
        """The plan running now (``None``: the config's uniform placement)."""
        try:
            self._init_tiers()
            self._home = _Home(self)
            self.optimizer = self._make_optimizer(optimizer)
            if plan is not None:  # optimizer state the plan keeps on the device, at its size after the first step
                self._check_device_budget([u.param_tier for u in self.units], "offload.wrap",
                                          self.optimizer.device_state_bytes(lambda unit: plan.units[unit]))
            self._grad_backlog = self._check_host_budget("offload.wrap")
        except BaseException:  # refused (or failed): the model keeps its params; give back what was taken
            for lane in (self._copy_pool, self._update_pool, self._grad_pool):
                lane.shutdown(wait=True)
            if getattr(self, "optimizer", None) is not None:
                self.optimizer.close()
            self.swap.close()
            raise
        self._release_all_initial()
        self._install_hooks()
        hook = self._state_dict_hook
        # torch marks the hook with an attribute, which a bound method cannot take: pass a plain function.
        self._handles.append(model.register_state_dict_post_hook(lambda *a: hook(*a)))

    # -- construction -------------------------------------------------------------------------------------------
    def _build_units(self, units_fn) -> None:
        blocks = units_fn(self.model)
        seen: dict[nn.Parameter, str] = {}
        self.units = []
        for name, mods in blocks:
            params = []
            for m in mods:
                for p in m.parameters():
                    if p in seen and seen[p] != name:
                        raise ValueError(f"offload.wrap: parameter of shape {list(p.shape)} is shared by units "
                                         f"{seen[p]!r} and {name!r}: put the modules that share it in one unit")
                    if p not in seen:
                        seen[p] = name
                        params.append(p)
            self.units.append(Unit(len(self.units) + 1, name, mods, params))
        rest = [p for p in self.model.parameters() if p not in seen]
        self.units.insert(0, Unit(0, "rest", [self.model], rest))
        for i, u in enumerate(self.units):
            u.index, u.key = i, f"unit{i}.params"

    def _check_plan(self, plan: Plan, who: str) -> None:
        _check_plan_type(plan)
        if len(plan.units) != len(self.units):
            raise ValueError(f"{who}: expected a plan with one placement per unit ({len(self.units)}: 'rest', then "
                             f"the blocks), got {len(plan.units)}; make it from this model's workload "
                             f"(offload.measure.workload_of, scheduler.workload.from_module)")

    def _check_device_budget(self, tiers: list[Tier], who: str, other_bytes: int = 0) -> None:
        """The device must hold the units kept there, the rest unit (held through forward and backward) and the
        largest streamed block at once; ``other_bytes``: device state that stays. Grads and activations are
        autograd's, outside the budget (as on a GPU, where the caching allocator holds them): the grads waiting
        on the device are bounded instead (:meth:`_await_grads_on_device`, :meth:`_await_device_grad_room`)."""
        kept = [u for u, t in zip(self.units, tiers) if t is Tier.DEVICE and u.nbytes]
        rest = self.units[0] if tiers[0] is not Tier.DEVICE else None
        streamed = [u for u, t in zip(self.units[1:], tiers[1:]) if t is not Tier.DEVICE]
        big = max(streamed, key=lambda u: u.nbytes, default=None)
        need = sum(u.nbytes for u in kept) + (rest.nbytes if rest else 0) + (big.nbytes if big else 0) + other_bytes
        if need <= self.device_budget.capacity_bytes:
            return
        parts = []
        if rest is not None:
            parts.append(f"unit {rest.name!r} ({format_bytes(rest.nbytes)}, resident through forward and backward)")
        if big is not None:
            parts.append(f"the largest block {big.name!r} ({format_bytes(big.nbytes)})")
        if kept:
            kept_bytes = format_bytes(sum(u.nbytes for u in kept))
            parts.append(f"the {len(kept)} units the plan keeps on the device ({kept_bytes})")
        if other_bytes:
            parts.append(f"optimizer state on the device ({format_bytes(other_bytes)})")
        raise ValueError(f"{who}: the device budget of {format_bytes(self.device_budget.capacity_bytes)} cannot hold "
                         f"{' plus '.join(parts)}: raise device_budget_bytes to at least {need}, keep fewer units on "
                         f"the device, or cut the model into smaller units")

    def _bound_malloc(self, plan: Plan | None) -> None:
        """Where memory is short, make what a step frees go back to the system (``give_large_frees_back``), so
        that the budgets bound the process: when the host has a budget, or something lives on NVMe because the
        model would not fit in the host's memory (:meth:`host_short`). Not otherwise: every allocation of 1 MiB
        or more then maps fresh memory, which costs page faults at every step (a 124M GPT's plain step at 1 x 64
        here: 0.85-0.93 s with glibc's default, 1.09-1.19 s with the threshold), and on a VM that hands freed
        pages back to its host (free page reporting) a host round trip too: benchmarks/plan_validate.py measured
        every placement of the 124M GPT 5-12% slower with it, NVMe placements whose model fits in memory
        included. Once set, it stays for the process (a re-plan onto NVMe sets it; one back to memory leaves
        it)."""
        tiers = [pl.params for pl in plan.units] + [pl.state for pl in plan.units] + [
            pl.grad_tier for pl in plan.units] if plan else [self.config.param_tier, self.config.state_tier,
                                                               self.config.grad_tier]
        if self.config.host_budget_bytes is not None or (Tier.NVME in tiers and self.host_short()):
            give_large_frees_back()

    def host_short(self) -> bool:
        """Whether the model's params, grads and two fp32 moments per trainable param (Adam's) exceed the host
        memory this process may use (RAM, or its cgroup's limit; unknown counts as short)."""
        need = sum(u.nbytes + u.grad_nbytes + 8 * sum(n for n, p in zip(u.numels, u.params) if p.requires_grad)
                   for u in self.units)  # u.numels: a released param holds no elements
        have = available_host_bytes()
        return have == 0 or need > have

    def host_minimum(self, plan: Plan | None = None) -> dict[str, int]:
        """Host bytes the current placement (or ``plan``'s) cannot train without, by what needs them: what lives on the host
        (params, grads, optimizer state of the units placed there) and the buffers in flight for what lives in
        the store (a unit's params on their way to the device and a unit's new weights being written; the grads
        of the unit accumulating and of the one being updated, or all of them where clipping or loss scaling
        reads every grad at once; the optimizer's ``buffers`` state chunks, and one more for the chunk a first
        step packs)."""
        r4k = lambda n: (n + 4095) // 4096 * 4096  # noqa: E731 - the pool hands out 4 KiB-aligned buffers
        need = {"params": 0, "grads": 0, "state": 0, "params_in_flight": 0, "grads_in_flight": 0,
                "state_in_flight": 0}
        cfg = self.config if plan is None else _with_plan(self.config, plan)
        params = [plan.units[u.index].params if plan else u.param_tier for u in self.units]
        grads = [plan.units[u.index].grads if plan else u.grad_tier for u in self.units]
        nvme_params = [r4k(u.nbytes) for u, t in zip(self.units, params) if t is Tier.NVME and u.nbytes]
        nvme_grads = [r4k(u.grad_nbytes) for u, t in zip(self.units, grads) if t is Tier.NVME and u.grad_nbytes]
        need["params"] = sum(r4k(u.nbytes) for u, t in zip(self.units, params) if t is Tier.HOST and u.nbytes)
        need["grads"] = sum(r4k(u.grad_nbytes) for u, t in zip(self.units, grads) if t is Tier.HOST and u.grad_nbytes)
        need["params_in_flight"] = 2 * max(nvme_params, default=0)
        all_grads = cfg.max_grad_norm is not None or cfg.loss_scale is not None
        need["grads_in_flight"] = sum(nvme_grads) if all_grads else 2 * max(nvme_grads, default=0)
        stored = []
        for u in self.units:
            chunks, tier = self.optimizer.state_bytes_estimate(u.index)
            tier = plan.units[u.index].state if plan else tier
            if tier is Tier.HOST:
                need["state"] += sum(map(r4k, chunks))
            elif tier is Tier.NVME:
                stored += [r4k(n) for n in chunks if n]
        need["state_in_flight"] = (cfg.buffers + 1) * max(stored, default=0)
        return need

    def _check_host_budget(self, who: str, plan: Plan | None = None) -> int:
        """Refuse a host budget below :meth:`host_minimum` (of ``plan`` when given); returns how many units' grads
        may wait for their overlapped update at once with the budget there is (at least one beyond the unit
        accumulating)."""
        need = self.host_minimum(plan)
        total = sum(need.values())
        budget = self.pool.budget.capacity_bytes
        if total > budget:
            parts = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in need.items() if v)
            fixes = [f"raise host_budget_bytes to at least {total}"]
            if need["params"] + need["grads"] + need["state"]:
                fixes.append("put more on NVMe (param_tier, grad_tier, state_tier='nvme')")
            if need["state_in_flight"] and self.config.buffers > 1:
                fixes.append(f"stream state through fewer buffers (buffers={self.config.buffers}; 1 is the least)")
            fixes.append("cut the largest units smaller (wrap's units=...: the in-flight buffers are per unit, "
                         f"the largest holding {format_bytes(max(u.nbytes for u in self.units))} of params)")
            raise ValueError(f"{who}: the host budget of {format_bytes(budget)} is below the {format_bytes(total)} "
                             f"({total} B) this placement needs at least ({parts}): " + ", or ".join(fixes))
        grad_buffers = (plan or self.plan).grad_buffers if (plan or self.plan) is not None else DEFAULT_GRAD_BUFFERS
        return self._grad_backlog_for(total, grad_buffers)

    def _grad_backlog_for(self, minimum: int, grad_buffers: int) -> int:
        """How many units' NVMe grads may wait for their overlapped update at once: one, plus as many more as the
        host budget holds beyond ``minimum``, and at most ``grad_buffers`` (the plan's, as the cost model counts
        them: :func:`scheduler.buffers.nvme_grad_blocks`)."""
        grad = max((u.grad_nbytes for u in self.units if u.grad_tier is Tier.NVME), default=0)
        if not grad:
            return len(self.units)
        return min(grad_buffers,
                   1 + max(0, self.pool.budget.capacity_bytes - minimum) // ((grad + 4095) // 4096 * 4096))

    def _open_store(self) -> NvmeStore:
        cfg = self.config
        if not cfg.nvme_dirs:
            raise ValueError("offload.wrap: an NVMe tier (in the config or the plan) needs "
                             "OffloadConfig(nvme_dirs=...)")
        params = sum(u.nbytes for u in self.units)
        # From the recorded sizes: apply_plan may open the store once params are released (empty).
        numel = sum(n for u in self.units for n, p in zip(u.numels, u.params) if p.requires_grad)
        state = numel * 16  # AdamW-like state plus fp32 masters, an upper estimate
        cap = cfg.nvme_capacity_bytes or int((params + state) * 2.2) + (64 << 20)
        return NvmeStore(list(cfg.nvme_dirs), cap, config=cfg.store, reset=True)

    def _trace_io(self, resource: str, c: Chunk) -> Callable[[], None]:
        """A chunk transfer the swap manager issued: drawn on the timeline when it lands."""
        tl, nbytes = self.timeline, c.nbytes
        name = self._io_label + (f"state {c.key}" if c.kind == "state" else c.key)
        t0 = tl.now()
        return lambda: tl.add(resource, name, t0, tl.now(), nbytes)

    @property
    def stats(self) -> dict:
        """Counters since wrap: fetches and the seconds waited for them, re-plans and the bytes they moved, updates
        of NVMe weights in host memory that took a kept copy (from the backward fetch or the device) or read them
        from the store, and the bytes moved per link for params and grads (``h2d_bytes``, ..., ``disk_write_bytes``; the
        optimizer's ``stats`` has the state's)."""
        params, grads = self.swap.moved("params"), self.swap.moved("grads")
        return {**self._counters, **{f"{link}_bytes": params[link] + grads[link] for link in params}}

    def _init_tiers(self) -> None:
        """Copy every unit's params to their tier, and give each unit its fp32 grad chunk."""
        for u in self.units:
            u.grad_key = f"unit{u.index}.grads"
            if u.grad_nbytes and u.grad_tier is not Tier.DEVICE:
                u.grads = self.swap.chunk(u.grad_key, u.grad_nbytes, u.grad_tier, kind="grads")
            if not u.nbytes:
                continue
            if u.param_tier is Tier.DEVICE:  # the plan keeps it on the device: fetched once, here
                with self.swap.pool.acquire(u.nbytes) as buf:
                    self._copy_params_into(u, buf.tensor[:u.nbytes])
                    self._fetch_now(u, buf.tensor[:u.nbytes])
                continue
            u.weights = self.swap.chunk(u.key, u.nbytes, u.param_tier)
            with self.swap.use(u.weights, write=True) as flat:
                self._copy_params_into(u, flat)
            if u.param_tier is Tier.NVME:
                self.swap.write_back(u.weights, wait=True)

    def _leave_meta(self) -> None:
        """Each meta param becomes an empty param on the compute device, the same Python object (the model's
        modules and the optimizer keep theirs): ``.data`` cannot point a meta tensor at memory. The units
        recorded the shapes and dtypes; their slots start at zero until weights are loaded
        (``offload.load_pretrained``, or ``model.load_state_dict``, which may come one shard at a time)."""
        for u in self.units:
            for p in u.params:
                if p in self._meta_born:
                    torch.utils.swap_tensors(p, nn.Parameter(torch.empty(0, dtype=p.dtype, device=self.device),
                                                             requires_grad=p.requires_grad))

    @torch.no_grad()
    def _copy_params_into(self, u: Unit, flat: torch.Tensor) -> None:
        for k, p in enumerate(u.params):
            if p in self._meta_born:
                u.view(flat, k).zero_()
            else:
                u.view(flat, k).copy_(p.data)

    def meta_born(self, p: nn.Parameter) -> bool:
        """Whether ``p`` was on the meta device at ``wrap`` (no weights until loaded)."""
        return p in self._meta_born

    def _make_optimizer(self, optimizer) -> OffloadOptimizer:
        if isinstance(optimizer, OffloadOptimizer):
            raise ValueError("offload.wrap: pass the plain optimizer (e.g. torch.optim.AdamW(...)); wrap builds "
                             "the OffloadOptimizer itself")
        # One device, one budget, one store: state kept on the device and device updates count against the
        # params' budget; state on the host against the same pool.
        opt = OffloadOptimizer(optimizer, config=self.config, runtime=self)
        opt.state_written = self._state_landed
        return opt

    # -- what the optimizer asks of the runtime (OffloadOptimizer's `runtime`) -----------------------------------
    def home_of(self, param: nn.Parameter) -> tuple[int, ParamHome] | None:
        """The unit that owns ``param`` and the home through which its weights and grads are reached."""
        owner = self._owner.get(param)
        return None if owner is None else (owner[0].index, self._home)

    def state_placement(self, unit: int) -> tuple[Tier, str] | None:
        """The plan's (state tier, update site) for ``unit``; ``None`` without a plan (the config's)."""
        return None if self.plan is None else (self.plan.units[unit].state, self.plan.units[unit].update)

    def _empty_like(self, p: torch.Tensor) -> torch.Tensor:
        key = (p.dtype, p.device)
        if key not in self._empty:
            self._empty[key] = torch.empty(0, dtype=p.dtype, device=p.device)
        return self._empty[key]

    def _release_all_initial(self) -> None:
        self._released_once = True
        for u in self.units:
            if u.param_tier is Tier.DEVICE:
                continue  # resident since _init_tiers, for good
            for p in u.params:
                p.data = self._empty_like(p)
            u.state = ParamState.RELEASED

    # -- fetch / release ----------------------------------------------------------------------------------------
    def _issue_fetch(self, u: Unit, *, required: bool, src: torch.Tensor | None = None) -> bool:
        """Start bringing ``u``'s params to the device (from ``src``, a host copy, when given; else from their
        tier). A prefetch that does not fit the budget is skipped."""
        if u.state is not ParamState.RELEASED or not u.nbytes:
            if not u.nbytes and u.state is ParamState.RELEASED:
                u.state = ParamState.RESIDENT
            return True
        try:
            self.swap.device.reserve(u.nbytes, what=f"unit {u.name!r}", trim=False)
        except TierFullError:
            if not required:
                return False
            resident = ", ".join(x.name for x in self.units if x.state is not ParamState.RELEASED)
            raise TierFullError("device", f"unit {u.name!r} (resident now: {resident})", u.nbytes,
                                self.device_budget.used_bytes, self.device_budget.capacity_bytes) from None
        if u.device_buf is None:
            u.device_buf = self.swap.device.buffer(u.nbytes)
        else:
            # Its own storage again, not another buffer: autograd may still hold views of it from forward.
            self.swap.device.fill(u.device_buf, u.nbytes)
        u.state = ParamState.FETCHING
        self._counters["fetches"] += 1
        # The update that follows this backward changes NVMe weights in host memory: it can take them from this
        # fetch's host copy instead of reading them again, where the pool has room to keep it (_fetch_work).
        keep = self._keep_fetched and self._in_backward and src is None and self._update_takes_weights(u)
        ready = None
        if self.device.type == "cuda":
            # The memory just came from the caching allocator on the compute stream, which may hand out a block
            # that kernels queued there still read (a unit released a moment ago): the copy stream must not write
            # it before they ran. Compute queued after this point still overlaps the copy.
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        if src is None and u.param_tier is Tier.NVME:
            # Start the disk read now, beside the fetches queued before it on the copy thread (which copies one
            # unit at a time): the reads of the next units are in flight together, and the disk is not idle while
            # a unit is copied. Without room in the host budget now, the copy thread reads it in its turn.
            self.swap.prefetch(u.weights)
        u.fetch = self._copy_pool.submit(self._fetch_work, u, src, ready, keep)
        return True

    def _fetch_now(self, u: Unit, src: torch.Tensor) -> None:
        """Make ``u`` resident from the host copy ``src`` now (a unit the plan keeps on the device)."""
        self._issue_fetch(u, required=True, src=src)
        self._wait_resident(u)

    def _fetch_work(self, u: Unit, src: torch.Tensor | None = None, ready=None, keep: bool = False):
        """On the copy thread: (disk ->) host -> device, once the compute stream reached ``ready`` (CUDA). Returns a
        CUDA event when the copy is asynchronous. ``keep``: the unit's update follows and changes its NVMe weights
        in host memory; its host copy stays (READY: the store has the same bytes) for the update to take, where
        the pool has room beyond what this step's transfers need in flight."""
        if src is not None:
            return self._copy_to_device(u, src, ready)
        with self.swap.use(u.weights) as flat:  # read from the store first when the params live there
            event = self._copy_to_device(u, flat, ready)
        if not (keep and self._room_to_keep() and self.swap.keep(u.weights)):
            self.swap.evict(u.weights)  # NVMe params: the host copy was only on the way to the device
        return event

    def _update_takes_weights(self, u: Unit) -> bool:
        """Whether ``u``'s CPU update needs its NVMe weights in host memory first: it changes them in place (fp32,
        no master), or some are frozen (it rewrites the whole chunk). A device update reads frozen ones itself."""
        if u.param_tier is not Tier.NVME or not u.trainable:
            return False
        if self.optimizer.weights_in_place(u.index):
            return True
        return u.frozen and all(site == "cpu" for _, site in self.optimizer.unit_placements(u.index))

    def _room_to_keep(self) -> bool:
        """Whether the pool can keep one more host copy (for an update, or for the next forward) and still hold
        this step's transfers in flight. Never where memory is short and no host budget says how much the pool
        may take: its capacity is then what was free at wrap, which activations and torch's own buffers share."""
        if not self._may_keep:
            return False
        pool = self.swap.pool
        return pool.budget.capacity_bytes - pool.in_use_bytes >= self._in_flight_bytes

    def _keep_device_copy(self, u: Unit) -> None:
        """``u``'s grads of the step's last backward are all produced (or it leaves the device), and the
        overlapped update that follows takes its NVMe weights, which its backward fetch did not bring (the rest
        unit, blocks kept on the device from their forward): copy its device params to a host buffer for the
        update, instead of reading them from the store again. Nothing when a copy is there already."""
        if not (self._keep_fetched and u.nbytes and self._update_takes_weights(u)
                and u.weights.state is ChunkState.STORED and self._room_to_keep()):
            return  # not STORED: a copy is there or on its way (keep_copy checks again, under the lock)
        if self.device.type == "cuda":
            self._sync_compute()
        with self.timeline.span("d2h", f"keep {u.name}", u.nbytes):
            kept = self.swap.keep_copy(u.weights, u.device_buf)
        if kept:
            self.swap.count("params", "d2h", u.nbytes)

    def _copy_to_device(self, u: Unit, src: torch.Tensor, ready=None):
        with self.timeline.span("h2d", f"fetch {u.name}", u.nbytes):
            if self._copy_stream is not None:
                with torch.cuda.stream(self._copy_stream):
                    if ready is not None:
                        self._copy_stream.wait_event(ready)
                    u.device_buf.copy_(src, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._copy_stream)
                # The host buffer is reused once the copy is done; wait for it on this (copy) thread.
                event.synchronize()
            else:
                u.device_buf.copy_(src)
                event = None
        self.swap.count("params", "h2d", u.nbytes)
        return event

    def _wait_resident(self, u: Unit) -> None:
        if u.state is ParamState.RELEASED:
            self._issue_fetch(u, required=True)
        if u.state is ParamState.FETCHING:
            t0 = time.perf_counter()
            event = u.fetch.result()
            self._counters["fetch_wait_s"] += time.perf_counter() - t0
            if event is not None:
                # Compute must not read the params before the copy stream wrote them.
                torch.cuda.current_stream(self.device).wait_event(event)
            for k, p in enumerate(u.params):
                p.data = u.view(u.device_buf, k)
            u.fetch = None
            u.state = ParamState.RESIDENT

    def _release(self, u: Unit) -> None:
        """Take ``u``'s params off the device after use, unless the plan keeps them there."""
        if u.param_tier is not Tier.DEVICE:
            self._evict(u)

    def _evict(self, u: Unit) -> None:
        """Take ``u``'s params off the device: the device copy is dropped (the weights are on their tier)."""
        if u.state is ParamState.FETCHING:
            u.fetch.result()
        if u.state is ParamState.RELEASED:
            return
        self._keep_device_copy(u)
        for p in u.params:
            p.data = self._empty_like(p)
        if u.nbytes:
            if self.device.type == "cuda":
                # The buffer may still be read by kernels queued on the compute stream; the caching allocator
                # keeps it from reuse by other streams until they finish when we record it on that stream.
                u.device_buf.record_stream(torch.cuda.current_stream(self.device))
            self.swap.device.release(u.nbytes)
            self.swap.device.empty(u.device_buf, u.nbytes)
        u.state = ParamState.RELEASED

    def _prefetch(self, seq: list[int], pos: int) -> None:
        for idx in seq[pos + 1:pos + 1 + self.config.prefetch]:
            if not self._issue_fetch(self.units[idx], required=False):
                break

    # -- hooks --------------------------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        self._handles = []
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre_forward))
        self._handles.append(self.model.register_forward_hook(self._root_post_forward))
        for u in self.units[1:]:
            for m in u.modules:
                self._handles.append(m.register_forward_pre_hook(lambda mod, args, u=u: self._pre_forward(u, args)))
                self._handles.append(m.register_forward_hook(lambda mod, args, out, u=u: self._post_forward(u, out)))
        for u in self.units:
            for p in u.params:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    @staticmethod
    def _backward_running() -> bool:
        return torch._C._current_graph_task_id() != -1

    def _root_pre_forward(self, module, args) -> None:
        if self._backward_running():
            return  # recomputation under activation checkpointing
        if self._step_pending and self._speculating and torch.is_grad_enabled() and self.config.loss_scale is None:
            # A training forward between a speculative backward and its step: the loop accumulates another
            # micro-batch, which must see the weights from before the step.
            self._undo_for_accumulation()
        self._fwd_seq = []
        for u in self.units:  # hooks of a forward that had no backward are dropped with its tensors
            u.inputs_pending = 0
        if self._new_iteration:  # the first forward after a step: a new iteration's timeline
            self._new_iteration = False
            if self.timeline.events:
                self.last_timeline, self.timeline = self.timeline, Timeline()
        if self._pending_plan is not None:  # an on_iteration callback chose it after the last step
            plan, after = self._pending_plan
            self._pending_plan = None
            try:
                self.apply_plan(plan)
            except ValueError as e:
                # A plan the budgets refuse (apply_plan checks before it moves anything) must not end the run
                # the callback was only trying to speed up: keep the current plan, say so, and record it.
                warnings.warn(f"offload: the plan chosen after iteration {after} was not applied, training goes "
                              f"on with the current one: {e}", RuntimeWarning, stacklevel=2)
                self._counters["replans_refused"] = self._counters.get("replans_refused", 0) + 1
                self.refused_plans.append({"requested_after": after, "plan": plan.compact(), "error": str(e)})
            else:
                self._replan_record["requested_after"] = after
        if torch.is_grad_enabled():
            self._at_boundary = False  # a training iteration starts: placement is fixed until its step
        self._fwd_t0 = self.timeline.now()
        self._wait_resident(self.units[0])
        self._prefetch(self._fwd_order, -1)

    def _root_post_forward(self, module, args, out) -> None:
        if self._backward_running():
            return
        self.timeline.add("compute", "forward", self._fwd_t0, self.timeline.now())
        self._fwd_order = list(self._fwd_seq) or self._fwd_order
        tail = set(self._fwd_order[len(self._fwd_order) - self.config.prefetch:]) if torch.is_grad_enabled() else set()
        for u in self.units[1:]:  # prefetched for this forward but not used: give the memory back
            if u.index not in tail:
                self._release(u)
        if torch.is_grad_enabled():
            self._register_pre_backward(self.units[0], out)
        else:
            self._release(self.units[0])

    def _pre_forward(self, u: Unit, args) -> None:
        if self._backward_running():
            self._wait_resident(u)  # recomputation: already fetched by the pre-backward hook
            return
        if u.frozen and torch.is_grad_enabled():
            self._register_inputs_done(u, args)
        self._fwd_seq.append(u.index)
        self._wait_resident(u)
        self._prefetch(self._fwd_order, len(self._fwd_seq) - 1)

    def _post_forward(self, u: Unit, out) -> None:
        if self._backward_running():
            return
        if torch.is_grad_enabled():
            self._register_pre_backward(u, out)
            # Backward starts with the last units: keep the last few resident instead of fetching them again,
            # as long as the units still to run in this forward keep room to be fetched.
            order = self._fwd_order
            if u.index in order[len(order) - self.config.prefetch:]:
                later = order[order.index(u.index) + 1:] if u.index in order else []
                need = max((self.units[i].nbytes for i in later
                            if self.units[i].state is ParamState.RELEASED), default=0)
                if self.device_budget.free_bytes >= need:
                    return
        self._release(u)

    def _register_inputs_done(self, u: Unit, args) -> None:
        """A unit with frozen params: their weights are read in backward to pass grads on (the grad of a frozen
        linear layer's input needs its weight), and no grad hook of theirs says when that is over. It is over
        once every trainable param of the unit has its grad and the grads of the unit's inputs are computed:
        every node of the unit's backward lies on a path to one or the other."""
        tensors = [t for t in _tensors(args) if t.requires_grad]
        if not tensors:
            return  # nothing upstream needs a grad: its trainable params' grads end its backward
        u.inputs_pending += 1
        torch.autograd.graph.register_multi_grad_hook(tensors, lambda grads, u=u: self._inputs_done(u), mode="all")

    def _inputs_done(self, u: Unit) -> None:
        u.inputs_pending -= 1
        if u.inputs_pending == 0 and u.pending == 0 and u.index != 0:
            self._release(u)

    def _register_pre_backward(self, u: Unit, out) -> None:
        tensors = [t for t in _tensors(out) if t.requires_grad]
        if tensors:
            torch.autograd.graph.register_multi_grad_hook(tensors, lambda grads, u=u: self._pre_backward(u),
                                                          mode="any")

    def _pre_backward(self, u: Unit) -> None:
        if not self._in_backward:
            self.grads_consumed = False
            if self._step_pending:
                if not (self._speculating and self.config.loss_scale is None):
                    raise RuntimeError(
                        f"backward called again after the last of {self._accumulation} accumulation steps, "
                        f"whose backward already ran the optimizer update (overlap_update): call optimizer.step() "
                        f"first, or set OffloadConfig(accumulation_steps=...) to the number of backward passes per "
                        f"step")
                self._undo_for_accumulation()
            self._in_backward = True
            self._overlapping = self.overlap and self._backwards + 1 == self._accumulation
            if self._overlapping:
                self._in_flight_bytes = self._in_flight_need()
                self._step_t0 = time.perf_counter()
                self._submitted = set()
                self._grad_units = set()
                self._update_futures = []
                if self.optimizer.step_needs_validation():
                    # The step needs every grad first (its norm, an inf/NaN check): speculate, or wait.
                    if self.config.speculate and self.optimizer.can_speculate():
                        self.optimizer.begin_speculation(self._pre_image_room())
                        self._speculating = True
                    else:
                        self._overlapping = False
                    if self.config.speculate:  # the policy times both kinds of step and keeps the faster
                        self.optimizer.speculation.step_started(speculative=self._speculating)
                elif not self.optimizer.begin_step():
                    self._overlapping = False
            self._keep_fetched = self._overlapping and any(x.param_tier is Tier.NVME for x in self.units)
            self._warm_ok = self._keep_fetched
            self._bwd_seq = list(reversed(self._fwd_order))
            self._bwd_pos = -1
            if self._overlapping:
                # Updates follow backward (the rest unit's grads complete last); start reading the first units'
                # state now, while backward computes.
                self._update_seq = self._bwd_seq + [0]
                self._update_futures.append(self._update_pool.submit(self._begin_read_ahead))
            self._bwd_t0 = self.timeline.now()
            for x in self.units:
                x.pending = x.trainable
            torch.autograd.Variable._execution_engine.queue_callback(self._post_backward)
        if u.index != 0:
            self._bwd_pos += 1
        self._wait_resident(u)
        if u.index != 0:
            self._prefetch(self._bwd_seq, self._bwd_pos)
        else:
            self._prefetch(self._bwd_seq, -1)

    def _on_grad(self, p: nn.Parameter) -> None:
        """A param's grad is complete: hand it to the grad thread (which moves it into the unit's fp32 host
        buffer while backward goes on) and free it on the device; a device update's stays there
        (:meth:`_keep_device_grad`)."""
        u, k = self._owner[p]
        g = p.grad
        p.grad = None
        if u.grad_tier is Tier.DEVICE:
            self._keep_device_grad(u, k, g)
        else:
            event = None
            if g.device.type == "cuda":
                # The grad is being written on the compute stream; the grad thread's copy must wait for that.
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(g.device))
            nbytes = g.numel() * g.element_size()
            self._await_grads_on_device(nbytes)
            future = self._grad_pool.submit(self._grad_work, u, k, g, event)
            del g  # the grad thread holds the only reference: the memory is freed once it is moved
            self._grad_futures.append(future)
            self._grads_on_device.append((future, nbytes))
        u.pending -= 1
        if u.pending == 0:
            # Before its update is submitted (below): a unit whose params are still on the device from its forward
            # gives the update a copy of them now (a unit with frozen params stays there until its input grads).
            self._keep_device_copy(u)
            if u.index != 0 and u.inputs_pending == 0:
                self._release(u)  # its backward is done: the params are no longer needed on the device
            # Queued behind the unit's copies on the same (FIFO, single) thread, so it runs once all are done.
            self._grad_futures.append(self._grad_pool.submit(self._unit_grads_done, u))

    def _keep_device_grad(self, u: Unit, k: int, g: torch.Tensor) -> None:
        """A grad of a unit updated on the device stays there, as autograd made it (plain PyTorch's ``p.grad``:
        the first micro-batch's tensor, the later ones added to it, in its dtype), until the update consumed it
        or ``zero_grad``."""
        if not u.got[k]:
            if self._overlapping and u.index != 0 and not u.has_grads:
                self._await_device_grad_room(u)
            u.dev_grads[k] = g
            u.got[k] = True
        else:
            u.dev_grads[k].add_(g)
        u.has_grads = True

    def _await_device_grad_room(self, u: Unit) -> None:
        """Before a block's first device grad of an overlapped backward: while the blocks whose device grads wait
        for their update hold ``grad_buffers`` largest blocks' worth, wait for the oldest update (it frees its
        unit's). The device then never holds more grads than the cost model counts, however
        far the update thread lags (as :meth:`_await_grads_on_device` bounds the grads on their way to the host);
        the update thread never waits for this one, so this always ends."""
        buffers = self.plan.grad_buffers if self.plan is not None else DEFAULT_GRAD_BUFFERS
        limit = buffers * max((x.dev_grad_nbytes for x in self.units[1:] if x.grad_tier is Tier.DEVICE),
                              default=0)
        need = u.dev_grad_nbytes
        while True:
            held = sum(x.dev_grad_nbytes for x in self.units[1:] if x.grad_tier is Tier.DEVICE and x.has_grads)
            if held + need <= limit:
                return
            for f in list(self._grad_futures):  # units whose updates the grad thread has yet to submit
                concurrent.futures.wait([f])
            pending = [f for f in self._update_futures[1:] if not f.done()]  # [0] reads state ahead
            if not pending:
                return
            concurrent.futures.wait(pending[:1])

    def _free_device_grads(self, u: Unit) -> None:
        """Let go of ``u``'s device grads."""
        u.dev_grads = [None] * len(u.params)

    def _await_grads_on_device(self, nbytes: int) -> None:
        """On the compute thread, before handing over ``nbytes`` more of device grads: wait until those not yet
        moved off leave room for them within ``grad_buffers`` times the largest unit's grads (one grad always
        goes). The grad thread never waits for the compute thread, so this always ends."""
        buffers = self.plan.grad_buffers if self.plan is not None else DEFAULT_GRAD_BUFFERS
        limit = buffers * max(u.grad_nbytes for u in self.units)
        queue = self._grads_on_device
        while queue and queue[0][0].done():
            queue.popleft()
        held = sum(n for _, n in queue)
        while queue and held + nbytes > limit:
            future, n = queue.popleft()
            concurrent.futures.wait([future])  # its failure is raised where every grad is collected (_drain_grads)
            held -= n

    def _grad_work(self, u: Unit, k: int, g: torch.Tensor, event) -> None:
        nbytes = u.numels[k] * 4
        if self._overlapping and u.index not in self._grad_units:
            self._grad_units.add(u.index)
            self._await_update_backlog()
        # Held for writing: an earlier micro-batch's grads spilled to the store are read back first, and nobody
        # else touches the buffer until the addition is done.
        with self.swap.use(u.grads, write=True) as flat, self.timeline.span("d2h", f"grad {u.name}", nbytes):
            if event is not None:
                with torch.cuda.stream(self._d2h_stream):
                    self._d2h_stream.wait_event(event)
                    g_host = g.to("cpu")  # synchronous on the copy stream: done when it returns
                g.record_stream(self._d2h_stream)  # do not reuse g's memory before the copy stream read it
                g = g_host
            dst = u.grad_view(flat, k)
            if not u.got[k]:
                dst.copy_(g)  # a plain optimizer's first micro-batch: p.grad = g
                u.got[k] = True
            else:
                dst.add_(g)  # later micro-batches: p.grad += g, the same fp32 addition
            u.has_grads = True
        self.swap.count("grads", "d2h", nbytes)

    def _await_update_backlog(self) -> None:
        """On the grad thread, before a unit's first grad of the overlapped backward takes a buffer: while as
        many units' grads wait for their update as the host budget has room for, wait for the oldest update
        (the update thread never waits for this one, so this always ends)."""
        while True:
            pending = [f for f in self._update_futures[1:] if not f.done()]  # [0] reads state ahead
            if len(pending) < self._grad_backlog:
                return
            concurrent.futures.wait(pending[:1])

    def _drain_grads(self) -> None:
        """Wait for every grad in flight (raising the first failure)."""
        futures, self._grad_futures = self._grad_futures, []
        for f in futures:
            f.result()

    def _unit_grads_done(self, u: Unit) -> None:
        """On the grad thread: all of ``u``'s grads of this backward are in its host buffer."""
        if self._overlapping:
            self._submit_update(u)
        elif u.grad_tier is Tier.NVME and u.grads is not None:
            # Grads of a micro-batch that is not the last: to the store, and the buffer back to the pool once
            # the write lands (the next micro-batch's first grad waits for that, then reads them back).
            self.swap.write_back(u.grads)

    def grads_of(self, u: Unit) -> torch.Tensor:
        """``u``'s accumulated fp32 grads in host memory (read back from the store when they were spilled)."""
        with self.swap.use(u.grads) as flat:
            return flat

    def _drop_grads(self, u: Unit) -> None:
        """After ``u``'s overlapped update with grads on NVMe or the device: the grads are consumed; free their
        memory (the device's, for the units backward has yet to reach)."""
        if u.grad_tier is Tier.DEVICE:
            self._free_device_grads(u)
            self._dropped_device_grads = True
        elif u.grad_tier is not Tier.NVME:
            return
        if u.grads is not None:
            self.swap.drop(u.grads)
        u.has_grads = False
        u.got = [False] * len(u.params)

    def _submit_update(self, u: Unit) -> None:
        """Update ``u`` on the update thread now, while backward goes on with earlier units (Fuyou)."""
        if u.index in self._submitted or not u.has_grads:
            return
        self._submitted.add(u.index)
        self._update_futures.append(self._update_pool.submit(self._update_unit, u))

    def _prefetch_state(self, after: int | None) -> None:
        """On the update thread: start reading the NVMe state of the units updated next (after unit ``after``;
        ``None``: from the first), as far as the optimizer's buffers allow. Units are updated in the order
        backward completes them: ``_update_seq``."""
        seq = self._update_seq
        start = 0 if after is None or after not in seq else seq.index(after) + 1
        units = seq[start:start + self.optimizer.config.buffers]
        if units:
            self.optimizer.prefetch_state(units)

    def _begin_read_ahead(self) -> None:
        """On the update thread, as the step's last backward starts: read the first units' state ahead."""
        self._last_update = None
        self._prefetch_state(None)

    def _state_landed(self) -> None:
        """On an I/O thread: a state write-back of the overlapped update landed and freed a buffer. The update
        thread, which owns the read-ahead, reads further ahead into it: at once when it waits for the next unit's
        grads, after the unit it updates now otherwise (whose start reads ahead too). The flags read here are a
        hint: a job queued just after the step reads nothing (no unit comes after the last one updated)."""
        if self._overlapping or self._step_pending:
            with contextlib.suppress(RuntimeError):  # the lane shut down (close): nothing more to read
                self._update_pool.submit(lambda: self._prefetch_state(self._last_update))

    def _update_unit(self, u: Unit) -> None:
        self._last_update = u.index
        self._prefetch_state(u.index)  # the next units' state reads run while this one updates
        # The unit's grads are held for the whole update: nothing spills or drops them under it.
        try:
            with self.timeline.span("cpu_update", f"update {u.name}"):
                if not self._speculating:
                    self.optimizer.update_unit(u.index)
                elif self.optimizer.speculate_unit(u.index):
                    try:
                        self._preserve_unit(u)
                    except TierFullError as e:  # a pre-image found no room: the rest waits for backward
                        self.optimizer.speculation_stopped(e)
                    else:
                        self.optimizer.update_unit(u.index)
        finally:
            self.finish_unit_update()
        if self._speculating:
            # A rollback redoes the step with these grads: grads on NVMe go to the store, not away.
            if u.grad_tier is Tier.NVME and u.grads is not None:
                self.swap.write_back(u.grads)
        else:
            self._drop_grads(u)

    def _in_flight_need(self) -> int:
        """Host bytes this step's transfers need in flight (host_minimum's in-flight terms): what memory held
        for later (pre-update copies, kept fetches) must leave free, so that no transfer ever waits for it."""
        need = self.host_minimum()
        return need["params_in_flight"] + need["grads_in_flight"] + need["state_in_flight"]

    def _pre_image_room(self) -> int:
        """Host bytes a speculative step's pre-update copies may take: what the pool has free beyond the buffers
        this step's transfers need in flight (they are freed only once every update is done)."""
        budget = self.swap.pool.budget
        return max(0, budget.capacity_bytes - self.swap.pool.in_use_bytes - self._in_flight_bytes)

    def _let_go_kept(self) -> None:
        """Give back the host copies kept for updates that did not take them (units without grads, a step that
        did not come); those kept for the next forward stay (its fetch takes them)."""
        for u in self.units:
            if u.weights is not None and u.weights.kept and not self._fetched_first(u):
                self.swap.evict(u.weights)

    def _fetched_first(self, u: Unit) -> bool:
        """Whether a forward fetches ``u`` before any compute: the rest unit, the first ``prefetch`` blocks."""
        return u.index == 0 or u.index in self._fwd_order[:self.config.prefetch]

    def store_room_to_speculate(self) -> bool:
        """Whether the store has room for a speculative step: each chunk it writes (params and state updated,
        grads kept for a redo) takes new extents while its previous version is held until validation."""
        if not self.swap.store_open:
            return True
        need = sum(u.nbytes for u in self.units if u.param_tier is Tier.NVME and u.trainable)
        need += sum(u.grad_nbytes for u in self.units if u.grad_tier is Tier.NVME)
        need += self.optimizer.state_bytes_on(Tier.NVME)
        return self.swap.store.free_bytes >= need * 1.1

    def _undo_for_accumulation(self) -> None:
        """Another forward (or backward) after the backward taken as a step's last: the loop accumulates more
        micro-batches than ``accumulation_steps`` says. The speculative updates of that backward are undone exactly (its grads stay,
        and the next micro-batch adds to them), and later steps overlap only their last backward. Not under loss
        scaling, whose speculation unscales the grads in place."""
        concurrent.futures.wait(self._update_futures)
        try:
            self._update_pool.submit(self._finish_step_io).result()
            for f in self._update_futures:
                f.result()
        finally:
            self._update_futures = []
            self.optimizer.abandon_speculation(accumulating=True)
            self._speculating = self._step_pending = False
        self._accumulation = self._backwards + 1
        warnings.warn(f"offload: a backward followed the one taken as the step's last: the loop accumulates "
                      f"{self._accumulation} or more micro-batches per step; the speculative update of that backward "
                      f"was undone exactly. Set OffloadConfig(accumulation_steps=...) to skip the undo", RuntimeWarning,
                      stacklevel=4)

    def _preserve_unit(self, u: Unit) -> None:
        """Before a speculative update of ``u``: keep everything it will overwrite (its weights where they live,
        its subgroups' state chunks) in the swap manager's transaction, all before any of it changes."""
        if u.param_tier is Tier.DEVICE:
            if u.device_buf is not None:
                self.swap.preserve_tensor(u.device_buf)
        elif u.weights is not None:
            self.swap.preserve(u.weights)
        self.optimizer.preserve_unit(u.index)

    def wait_updates(self) -> None:
        """Until the overlapped updates of this step are done (and their I/O settled); the step stays open."""
        concurrent.futures.wait(self._update_futures)
        self._update_pool.submit(self._finish_step_io).result()

    def overlap_started(self) -> bool:
        return self._overlapping or self._step_pending

    def overlapped_step_pending(self) -> bool:
        return self._step_pending

    def finish_overlapped_step(self) -> None:
        """``optimizer.step()`` after an overlapped backward: wait for the updates, then close the step (a
        speculative one is validated first: committed, or undone and redone with clipped grads, or skipped)."""
        concurrent.futures.wait(self._update_futures)
        self._step_pending = False
        speculating, self._speculating = self._speculating, False
        outcome = None
        try:
            try:
                try:
                    self.settle_step_io()  # the step before's writes (landed long ago: the update thread is FIFO)
                    for f in self._update_futures:
                        f.result()  # the first failure, if any
                finally:
                    # Write-backs the updates left in flight, read-ahead no update used: settled on the update
                    # thread, which owns them (the only one that touches them). A step that commits as it is
                    # returns without waiting for them: they land during the next forward, whose fetches go before
                    # them on the disk (storage/workers.py); a speculative one that is rolled back (or has
                    # subgroups left to update) waits, since validating it changes those chunks.
                    io = self._update_pool.submit(self._finish_step_io)
                    if speculating and not self.optimizer.speculation_commits():
                        io.result()
                    else:
                        self._step_io = io
            except BaseException:
                if speculating:  # a failed speculative step leaves the model as it was before the step
                    self.optimizer.abandon_speculation()
                raise
            if speculating:
                t0 = self.timeline.now()
                outcome = self.optimizer.end_speculation()
                if outcome != "commit":
                    self.timeline.add("cpu_update", f"speculation {outcome}", t0, self.timeline.now())
        finally:
            self._update_futures = []
            if outcome != "overflow":  # a skipped step was closed by the optimizer
                self.optimizer.end_step(self._step_t0)

    def _post_backward(self) -> None:
        self.timeline.add("compute", "backward", self._bwd_t0, self.timeline.now())
        self._drain_grads()  # the step (or the next micro-batch) reads the grads: they must all have landed
        self._in_backward = False
        self._backwards += 1
        for u in self.units:
            self._release(u)
        self._keep_fetched = False  # copies for this step's updates are kept by now
        if self._overlapping:
            for u in self.units:  # units some of whose params got no grad this time
                self._submit_update(u)
            self._overlapping = False
            self._step_pending = True

    def zero_grad(self) -> None:
        """Forget accumulated grads (what ``optimizer.zero_grad()`` and ``model.zero_grad()`` do)."""
        self.grads_consumed = False
        for u in self.units:
            u.has_grads = False
            u.got = [False] * len(u.params)
            self._free_device_grads(u)
            if u.grad_tier is Tier.NVME and u.grads is not None:
                self.swap.drop(u.grads)

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        """How many parameter elements the model has (``sum(p.numel() ...)`` counts the empty tensors released
        params hold between uses), or only those that require grad."""
        return sum(n for u in self.units for p, n in zip(u.params, u.numels) if p.requires_grad or not trainable_only)

    def param_shape(self, p: nn.Parameter) -> tuple[int, ...]:
        """``p``'s shape (a released param holds an empty tensor; its unit recorded the shape)."""
        unit, k = self._owner[p]
        return unit.shapes[k]

    def param_value(self, p: nn.Parameter) -> torch.Tensor:
        """The current weights of ``p`` wherever they are (a copy when they come from disk)."""
        u, k = self._owner[p]
        return p.data if self._in_params(u) else u.view(self.swap.copy(u.weights), k)

    def _in_params(self, u: Unit) -> bool:
        """Whether ``u``'s params hold its weights now (resident, or never released), not only its chunk."""
        return u.state is ParamState.RESIDENT or not self._released_once

    def check_between_steps(self, what: str) -> None:
        """Raise unless between steps (not in backward, no overlapped updates left to collect); then wait for the
        last step's writes (:meth:`settle_step_io`)."""
        if self._in_backward or self._step_pending or self._staging:
            raise RuntimeError(f"cannot {what} while a step is in progress (in backward, or updates of the last "
                               f"backward not collected): call optimizer.step() first")
        self.settle_step_io()

    @contextlib.contextmanager
    def _weights_of(self, u: Unit, *, load: bool, write: bool | None = None, wait: bool = True):
        """The unit's host copy of its weights, to read (``load``), to overwrite whole (not ``load``), or to change
        in part (``load`` and ``write``): the host chunk itself, the store chunk in a buffer (written back after a
        write; without ``wait`` the write is only issued: ``swap.settle(u.weights)`` waits for it), or for a unit
        kept on the device a pool buffer copied from or to the device."""
        write = not load if write is None else write
        if u.weights is not None:
            kept = u.weights.kept  # a copy kept for the next fetch stays kept after a read
            with self.swap.use(u.weights, write=write, load=load) as flat:
                yield flat
            if u.weights.home is Tier.NVME:
                if write:
                    self.swap.write_back(u.weights, wait=wait)
                elif not kept:
                    self.swap.evict(u.weights)
            return
        with self.swap.pool.acquire(u.nbytes) as buf:
            flat = buf.tensor[:u.nbytes]
            if load:
                self._read_weights(u, flat)
            yield flat
            if write:
                self._sync_compute()  # compute may still read the old weights
                u.device_buf.copy_(flat)
                self.swap.count("params", "h2d", u.nbytes)

    def _read_weights(self, u: Unit, out: torch.Tensor) -> None:
        """Copy ``u``'s weights into the host buffer ``out``: from the device (a unit kept there) or its chunk."""
        if u.weights is None:
            # The last writes to the device weights (the update's copies) were queued on the compute stream.
            self._sync_compute()
            out.copy_(u.device_buf)
            self.swap.count("params", "d2h", u.nbytes)
        else:
            self.swap.copy(u.weights, out=out)

    def _sync_compute(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def iter_params(self) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        """Every param's current weights, one unit at a time, without gathering the model: views into the unit's
        host buffer, or into one buffer the unit is read into from the store (valid until the next unit; copy
        what you keep). The host copy is the authority: device copies are only read by compute."""
        self.check_between_steps("read the weights")
        for u in self.units:
            if u.nbytes:
                with self._weights_of(u, load=True) as flat:
                    for k, p in enumerate(u.params):
                        yield p, u.view(flat, k)

    @torch.no_grad()
    def load_params(self, fill: Callable[[nn.Parameter, torch.Tensor], None]) -> None:
        """Set every param's weights, one unit at a time: ``fill(param, out)`` writes them into ``out`` (the
        param's place in the unit's host buffer, or in a buffer then written to the store). Units on the device
        are released first, so their next use fetches the new weights. The optimizer's masters are left as they
        are (a resume loads them with its state)."""
        self.write_params(fill, masters=False)

    @torch.no_grad()
    def write_params(self, fill: Callable[[nn.Parameter, torch.Tensor], None],
                     params: Collection[nn.Parameter] | None = None, *, masters: bool = True,
                     fill_unit: Callable[[Unit, dict[nn.Parameter, torch.Tensor]], None] | None = None) -> None:
        """Set the weights of ``params`` (default: all the runtime owns) unit by unit: ``fill(param, out)`` writes
        a param's weights into ``out``, its place in the unit's host copy; a unit's other params keep theirs.
        A unit on the device is released first (its next fetch reads the new weights); a unit on the store is
        written back while the next one is filled. ``masters``: the optimizer's fp32 masters follow the new
        weights (a plain optimizer steps the params themselves). ``fill_unit(u, views)``: after the unit's
        ``fill`` calls, with every param's place (``{param: out}``), for what needs the unit whole (an
        initializer that sets several params at once)."""
        self.check_between_steps("write weights")
        chosen = None if params is None else set(params)
        issued = []
        try:
            for u in self.units:
                mine = [k for k, p in enumerate(u.params) if chosen is None or p in chosen]
                if not (u.nbytes and mine):
                    continue
                self._release(u)
                partial = len(mine) < len(u.params)  # the others' weights are read in and kept
                with self._weights_of(u, load=partial, write=True, wait=False) as flat:
                    for k in mine:
                        fill(u.params[k], u.view(flat, k))
                    if fill_unit is not None:
                        fill_unit(u, {p: u.view(flat, k) for k, p in enumerate(u.params)})
                    if masters:
                        self.optimizer.reload_masters(u.index, lambda p, u=u, flat=flat: u.view(flat,
                                                                                              self._owner[p][1]))
                if u.weights is not None and u.weights.home is Tier.NVME:
                    issued.append(u.weights)
        finally:
            for c in issued:
                self.swap.settle(c)

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor], load_rest: Callable, *, strict: bool = True):
        """``model.load_state_dict`` of the wrapped model (``wrap`` routes it here): the offloaded params are
        written unit by unit into their tiers and their fp32 masters follow; ``load_rest(state_dict,
        strict=False)`` (the module's own method) loads the rest (buffers). Checks shapes before anything is
        written, and reports missing and unexpected keys as torch does (raising when ``strict``)."""
        self.check_between_steps("load a state dict")
        owned = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if p in self._owner:
                owned[name] = p
        errors = [f"size mismatch for {k}: copying a param with shape {tuple(v.shape)} from checkpoint, the shape "
                  f"in current model is {self.param_shape(owned[k])}."
                  for k, v in state_dict.items() if k in owned and tuple(v.shape) != self.param_shape(owned[k])]
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self.model).__name__}:\n\t"
                               + "\n\t".join(errors))
        result = load_rest({k: v for k, v in state_dict.items() if k not in owned}, strict=False)
        missing = [k for k in result.missing_keys if k not in state_dict]
        if strict and (missing or result.unexpected_keys):
            parts = []
            if missing:
                parts.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + ".")
            if result.unexpected_keys:
                parts.append("Unexpected key(s) in state_dict: "
                             + ", ".join(f'"{k}"' for k in result.unexpected_keys) + ".")
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self.model).__name__}:\n\t"
                               + "\n\t".join(parts))
        source = {p: v for k, v in state_dict.items() if (p := owned.get(k)) is not None}
        self.write_params(lambda p, out: out.copy_(source[p].reshape(out.shape)), source)
        return type(result)(missing, result.unexpected_keys)

    def _state_dict_hook(self, module, state_dict, prefix, local_metadata) -> None:
        """``model.state_dict()`` gives the real weights, not the empty tensors released params hold; a param under
        several names (tied embeddings) is one tensor under each, as plainly (savers such as HF's detect ties so)."""
        named = [(name, p) for name, p in self.model.named_parameters(prefix=prefix.rstrip("."),
                                                                       remove_duplicate=False)
                 if name in state_dict and p in self._owner]
        by_unit: dict[Unit, dict[nn.Parameter, None]] = {}  # params by identity, in order, each once
        for _, p in named:
            by_unit.setdefault(self._owner[p][0], {})[p] = None
        values: dict[nn.Parameter, torch.Tensor] = {}
        for u, ps in by_unit.items():  # each unit's weights copied once for all its params (a block has a dozen)
            flat = None if self._in_params(u) else self.swap.copy(u.weights)
            for p in ps:
                # A clone each, even of the unit's copy: savers refuse tensors that share one storage (safetensors).
                values[p] = (p.data if flat is None else u.view(flat, self._owner[p][1])).detach().clone()
        for name, p in named:
            state_dict[name] = values[p]

    # -- the optimizer's side -----------------------------------------------------------------------------------
    def _before_update(self, sub) -> None:
        """Called (by the optimizer) before each subgroup's update; subgroups come unit by unit. For the unit's
        whole update its grads are held (nothing spills or drops them), and for NVMe params its weights chunk is
        held for writing: the update changes the weights there in place (fp32 params: no master), or writes the
        new weights from its masters (then only frozen params' stored values need reading in first)."""
        u = self.units[sub.unit]
        if self._updating is u:
            return
        self.finish_unit_update()
        hold = contextlib.ExitStack()
        if u.grads is not None:
            hold.enter_context(self.swap.use(u.grads))
        if u.param_tier is Tier.NVME:
            frozen = not all(p.requires_grad for p in u.params)
            in_place = self.optimizer.weights_in_place(u.index)
            if frozen or in_place:  # the update needs the stored weights: a kept copy, or a read
                self._counters["update_weights_kept" if u.weights.kept else "update_weights_read"] += 1
            hold.enter_context(self.swap.use(u.weights, write=True, load=frozen or in_place))
            self._staging.append(u)
        self._updating, self._hold = u, hold

    def finish_unit_update(self) -> None:
        """The unit being updated is done: let go of its chunks, start writing its new weights to the store (NVMe
        params: once the unit before's have landed, one unit's write in flight at a time), and outside the
        overlapped update drop its consumed NVMe grads."""
        u, self._updating = self._updating, None
        if u is None:
            return
        self._hold.close()
        staged, self._staging = self._staging, []
        for x in staged:
            # The units the next forward fetches first (before any compute: the rest unit and the first
            # ``prefetch`` blocks) keep their new weights in host memory after the write, where the pool has room:
            # that fetch then reads nothing (not even waiting for the write: it shares the buffer being written),
            # and the forward does not start by waiting for the disk.
            warm = self._warm_ok and self._fetched_first(x) and self._room_to_keep()
            self._settle_params_writes()
            self.swap.write_back(x.weights, keep=warm)
            self._params_writing.append(x)
        if not (self._overlapping or self._step_pending):
            self._drop_grads(u)  # the overlapped update drops them in _update_unit

    def _settle_params_writes(self) -> None:
        """Wait for the new weights written by :meth:`finish_unit_update`; raise the first failed write (its chunk
        stays in memory, DIRTY, and is written again with the unit's next new weights)."""
        writing, self._params_writing = self._params_writing, []
        failed = []
        for x in writing:
            try:
                self.swap.settle(x.weights)
            except Exception as e:  # noqa: PERF203 - every write is settled before the first error is raised
                failed.append(e)
        if failed:
            raise failed[0]

    def _finish_step_io(self) -> None:
        """On the update thread: the writes a step's updates left in flight land (state and new weights), and
        read-ahead no update used goes back; the first failure is raised."""
        try:
            self.optimizer.finish_unit_io()
        finally:
            self._settle_params_writes()

    def settle_step_io(self) -> None:
        """Until the writes the last overlapped step left in flight have landed (it returned without waiting for
        them: they overlap the next forward); raises the first that failed. Whatever reads or moves the model's
        chunks between steps comes here first (state dicts, checkpoints, plan switches, a step that is not
        overlapped, close)."""
        f, self._step_io = self._step_io, None
        if f is not None:
            f.result()

    def _after_update(self, sub) -> None:
        """Count the new weights' trip from the fp32 master to where the params live, when it crosses the link:
        a CPU update of params kept on the device (h2d), a device update of params on the host or NVMe (d2h)."""
        if not sub.has_master:
            return
        u = self.units[sub.unit]
        on_device = u.param_tier is Tier.DEVICE
        if on_device == (sub.site == "device"):
            return
        nbytes = sum(u.padded_bytes(self._owner[pc.param][1]) if pc.whole else pc.numel * pc.param.dtype.itemsize
                     for pc in sub.pieces)
        self.swap.count("params", "h2d" if on_device else "d2h", nbytes)

    def after_step(self) -> None:
        self.finish_unit_update()
        if self._step_io is None:  # a step that waits for its writes (not overlapped, or speculative): they land now
            self._settle_params_writes()
        self._warm_ok = False
        self._let_go_kept()
        # A step consumes the grads kept on NVMe; a second step without a backward cannot apply them again.
        self.grads_consumed = self._dropped_device_grads or any(
            u.grad_tier is Tier.NVME and u.grads is not None for u in self.units)
        self._dropped_device_grads = False
        for u in self.units:  # grads on NVMe are consumed by the step
            if u.grad_tier is Tier.NVME and u.has_grads:
                self._drop_grads(u)
        self._accumulation = max(self._accumulation, self._backwards)
        self._backwards = 0
        self._new_iteration = True
        self._at_boundary = True
        self.iterations += 1
        # cpu_update_s: seconds the CPU updates themselves took, so far (the update spans also hold waits for
        # state reads and the previous unit's params written: scheduler/replan.py calibrates from this).
        record = {"iteration": self.iterations, "wall_s": self.timeline.now(), "timeline": self.timeline.summary(),
                  "stats": {**self.stats, "cpu_update_s": self.optimizer.stats["cpu_update_s"]}}
        if self._replan_record is not None:  # this iteration ran under a plan applied before its forward
            record["replan"], self._replan_record = self._replan_record, None
        self.history.append(record)
        for fn in list(self.on_iteration):
            plan = fn(record)
            if plan is not None:  # checked now, so that a bad plan fails where it was made; applied at the next forward
                self._check_plan(plan, "runtime.on_iteration")
                self._pending_plan = (plan, self.iterations)

    # -- placement per unit, and switching it between iterations ------------------------------------------------
    @property
    def param_tier(self) -> Tier | None:
        """Where every unit's params live, or ``None`` when units differ (see :meth:`placements`)."""
        tiers = {u.param_tier for u in self.units}
        return tiers.pop() if len(tiers) == 1 else None

    def placements(self) -> list[dict]:
        """Each unit's placement now: params, grads, optimizer state and update site (the state and site of the
        unit's subgroups; a unit without trainable params has none)."""
        out = []
        for u in self.units:
            subs = self.optimizer.unit_placements(u.index)
            out.append({"unit": u.name, "params": u.param_tier.value, "grads": u.grad_tier.value,
                        "state": subs[0][0].value if subs else None, "update": subs[0][1] if subs else None})
        return out

    def apply_plan(self, plan: Plan) -> None:
        """Run ``plan`` from now on. Call it between iterations (after ``optimizer.step()``, before the next
        forward), or return the plan from a :attr:`on_iteration` callback to have it applied before the next
        forward starts.

        For each unit whose placement changed, its params, grad buffer and optimizer state (fp32 masters and
        moments) go to their new tiers and the old copies are freed (store chunks deleted, pool buffers and device
        budget given back); the plan's ``prefetch_depth``, ``state_buffers`` and ``overlap_update`` take effect.
        Nothing changes value: every move is a copy. A unit whose update now needs an fp32 master (its params no
        longer in the memory its update runs in) gets one copied from its fp32 weights, which equal the master it
        would have had; one that no longer needs it drops it. What moved, per link, is added to ``stats`` (and to
        ``replan_*_bytes``) and drawn on the timeline; the next history record says so under ``"replan"``.
        """
        self._check_plan(plan, "apply_plan")
        backward = self._in_backward or self._backward_running()
        if backward or self._step_pending or not self._at_boundary:
            where = "during backward" if backward else (
                "after backward, before optimizer.step()" if self._step_pending or self._backwards
                else "after a training forward, before its backward and optimizer.step()")
            raise RuntimeError(f"apply_plan: expected a call between iterations (after optimizer.step(), before the "
                               f"next forward), got one {where}: call it after opt.step(), or return the plan from "
                               f"a runtime.on_iteration callback (applied before the next forward)")
        self._pending_plan = None  # a callback's earlier choice, superseded by this one
        self.settle_step_io()
        t0 = time.perf_counter()
        before = self._link_bytes()
        # State bound for the device, at the size it will have there (a master added or dropped: the cost model's
        # rule, as the move applies it).
        device_state = self.optimizer.device_state_bytes(lambda unit: plan.units[unit])
        self._check_device_budget([pl.params for pl in plan.units], "apply_plan", device_state)
        backlog = self._check_host_budget("apply_plan", plan)  # before anything moves
        self._bound_malloc(plan)
        def leaves_device(u: Unit) -> bool:
            pl = plan.units[u.index]
            return (u.param_tier is Tier.DEVICE and pl.params is not Tier.DEVICE) or any(
                tier is Tier.DEVICE and pl.state is not Tier.DEVICE
                for tier, _ in self.optimizer.unit_placements(u.index))

        # Units that leave the device go first, so that those joining it find the budget they free.
        order = sorted(self.units, key=lambda u: not leaves_device(u))
        self._io_label = "replan "
        try:
            moved = [u.name for u in order if self._move_unit(u, plan.units[u.index])]
        finally:
            self._io_label = ""
        self.config = self.optimizer.config = _with_plan(self.config, plan)
        self.overlap = self.config.overlap_update
        self.swap.device.keep = self.config.prefetch + 2
        self._grad_backlog = backlog
        self.plan = plan
        after = self._link_bytes()
        delta = {k: after[k] - before[k] for k in after}
        for k, v in delta.items():
            self._counters[f"replan_{k}_bytes"] += v
        self._counters["replans"] += 1
        self._replan_record = {"plan": plan.compact(), "units_moved": moved, "bytes": delta,
                               "s": time.perf_counter() - t0}

    def _link_bytes(self) -> dict[str, int]:
        """Bytes moved so far per link, by the runtime and its optimizer together."""
        return self.swap.moved()

    @torch.no_grad()
    def _move_unit(self, u: Unit, new: UnitPlacement) -> bool:
        """Give ``u`` the placement ``new`` (between iterations). Returns whether anything changed."""
        opt = self.optimizer
        old = u.param_tier
        if old is new.params and u.grad_tier is new.grads and all(
                pl == (new.state, new.update) for pl in opt.unit_placements(u.index)):
            return False
        copy: dict = {}  # a host copy of the weights, made at most once: for the move and for new fp32 masters

        def on_host() -> torch.Tensor:
            if u.weights is not None and u.weights.home is Tier.HOST:
                return self.swap.buffer(u.weights)
            if "flat" not in copy:
                buf = self.swap.pool.acquire(u.nbytes)
                copy["flat"], copy["release"] = buf.tensor[:u.nbytes], buf.release
                with contextlib.nullcontext() if u.weights is not None else \
                        self.timeline.span("d2h", f"replan params {u.name}", u.nbytes):
                    self._read_weights(u, copy["flat"])  # from where they were: that copy goes last
            return copy["flat"]

        try:
            new_weights = u.weights
            if u.nbytes and new.params is not old:  # the new copy first; the old one goes last
                flat = on_host()
                if new.params is Tier.DEVICE:
                    self._fetch_now(u, flat)
                    new_weights = None
                else:
                    new_weights = self.swap.chunk(u.key, u.nbytes, new.params)
                    with self.swap.use(new_weights, write=True, load=False) as buf:
                        buf.copy_(flat)
                    if new.params is Tier.NVME:
                        self.swap.write_back(new_weights, wait=True)
            old_weights = u.weights
            u.param_tier, u.weights = new.params, new_weights
            # where the weights are now decides which subgroups need masters
            opt.relocate_unit(u.index, new.state, new.update,
                              master_of=lambda pc: pc.of(u.view(on_host(), self._owner[pc.param][1])).float())
            if u.nbytes and new.params is not old:
                if old_weights is None:
                    self._evict(u)
                else:
                    self.swap.free(old_weights)
            self._move_grads(u, new.grads)
        finally:
            if "release" in copy:
                copy["release"]()
        return True

    def _move_grads(self, u: Unit, tier: Tier) -> None:
        """Between iterations: grads not zeroed yet (``zero_grad()`` not called after the step) go where the new
        placement keeps them, to be added to as a plain optimizer's would; a step consumes NVMe grads, so none
        wait in the store when they come to the host."""
        if tier is u.grad_tier:
            return
        if tier is Tier.DEVICE:  # from the host buffer (or the store) to tensors of their params' dtypes
            if u.grads is not None:
                if u.has_grads:
                    flat = self.grads_of(u)
                    for k, p in enumerate(u.params):
                        if u.got[k]:
                            u.dev_grads[k] = u.grad_view(flat, k).to(self.device, u.dtypes[k])
                self.swap.free(u.grads)
                u.grads = None
        elif u.grad_tier is Tier.DEVICE:  # to a new fp32 chunk on ``tier``
            if u.grad_nbytes:
                u.grads = self.swap.chunk(u.grad_key, u.grad_nbytes, tier, kind="grads")
                with self.swap.use(u.grads, write=True, load=False) as flat:
                    for k, g in enumerate(u.dev_grads):
                        if g is not None:
                            u.grad_view(flat, k).copy_(g)
                if tier is Tier.NVME:
                    self.swap.write_back(u.grads, wait=True)
            self._free_device_grads(u)
        elif u.grads is not None:
            self.swap.rehome(u.grads, tier, keep=u.has_grads)
        u.grad_tier = tier

    def report(self) -> dict:
        return {"units": [{"name": u.name, "params": sum(p.numel() for p in u.params), "bytes": u.nbytes,
                           "state": u.state.value} for u in self.units],
                "param_tier": self.param_tier.value if self.param_tier else "mixed",
                "placement": self.placements(), "plan": self.plan.compact() if self.plan else None,
                "device_budget_bytes": self.device_budget.capacity_bytes,
                "device_peak_bytes": self.device_budget.peak_bytes, **self.stats,
                "timeline": self.timeline.summary()}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        try:
            self.settle_step_io()  # a write that failed is raised, not dropped with the memory that holds it
        finally:
            self._close()

    def _close(self) -> None:
        self._copy_pool.shutdown(wait=True)
        self._update_pool.shutdown(wait=True)
        self._grad_pool.shutdown(wait=True)
        self.optimizer.close()
        self.swap.close()

    @property
    def device_budget(self) -> TierBudget:
        """The device's byte budget (what fetches and device state reserve from)."""
        return self.swap.device.budget

    @property
    def pool(self) -> HostPool:
        """The host pool every host buffer of the model and its optimizer comes from."""
        return self.swap.pool


def _tensors(obj) -> Iterable[torch.Tensor]:
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)
    elif hasattr(obj, "to_tuple"):  # transformers' ModelOutput
        yield from _tensors(obj.to_tuple())


def _check_plan_type(plan) -> None:
    if not isinstance(plan, Plan):
        raise ValueError(f"offload.wrap: expected plan to be a scheduler.Plan (one UnitPlacement per unit), got "
                         f"{type(plan).__name__}")


def _with_plan(config: OffloadConfig, plan: Plan) -> OffloadConfig:
    """The config with the plan's pipeline sizes; placement comes from the plan, the rest from the config."""
    return dataclasses.replace(config, prefetch=plan.prefetch_depth, buffers=plan.state_buffers,
                               overlap_update=plan.overlap_update)


def materialize_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Give the model's meta buffers memory on ``device`` and their values. No checkpoint holds a buffer computed
    in ``__init__`` (a rotary embedding's ``inv_freq``), so a model built under ``torch.device("meta")`` needs
    them recomputed: a transformers model's own ``_init_weights`` does it for a module without params (what
    ``from_pretrained`` does too). Anything else, and a buffer the initializer leaves unset, is refused, naming
    the buffers and the way to build the model."""
    init = getattr(model, "_init_weights", None)
    left = []
    for name, module in model.named_modules():
        mine = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not mine:
            continue
        if init is None or next(module.parameters(recurse=False), None) is not None:
            left += [f"{name}.{n}" if name else n for n in mine]
            continue
        if not all(module._buffers[n].is_floating_point() for n in mine):
            left += [f"{name}.{n}" if name else n for n in mine]
            continue
        for n in mine:  # NaN until computed: what the initializer leaves alone is found below
            b = module._buffers[n]
            module._buffers[n] = torch.full(b.shape, float("nan"), dtype=b.dtype, device=device)
        with torch.no_grad():
            init(module)
        left += [f"{name}.{n}" if name else n for n in mine if module._buffers[n].isnan().any()]
    if left:
        raise ValueError(f"offload.wrap: the model's buffers {', '.join(left[:3])}{', ...' if len(left) > 3 else ''} "
                         f"are on the meta device and nothing here can compute them (a buffer made in __init__ is in "
                         f"no checkpoint): build the model with only its params on meta "
                         f"(accelerate.init_empty_weights()), or materialize the buffers before offload.wrap")


def runtime_of(model: nn.Module) -> OffloadRuntime:
    """The :class:`OffloadRuntime` :func:`wrap` attached to ``model``: its ``timeline`` (and ``last_timeline``),
    ``placements()``, ``plan`` and ``apply_plan()``, ``history`` and ``on_iteration``, ``report()``, ``stats``,
    ``host_minimum()``, ``iter_params()`` / ``load_params()``, and ``close()``."""
    rt = getattr(model, "_offload_runtime", None)
    if rt is None:
        raise ValueError(f"runtime_of: expected a model returned by offload.wrap, got a {type(model).__name__} that "
                         f"was not wrapped: call offload.wrap(model, optimizer, config) first")
    return rt
