"""Parameter and gradient offload through module hooks: ``offload.wrap(model, optimizer, config)``.

The model is cut into **units** (by default each child of the model's ModuleLists, i.e. each transformer block,
plus one unit for everything else). A unit's parameters are packed into one flat buffer per tier, so a move is
one transfer. Between uses they live on the host (a pool buffer) or on NVMe (a store chunk); on the device
they exist only while needed:

- forward: a unit's pre-forward hook makes its params resident (waiting for the prefetch issued earlier) and
  prefetches the next ``prefetch`` units in the order recorded on the previous pass; its post-forward hook
  releases them (``param.data`` becomes an empty tensor, as FSDP1 did) and registers a pre-backward hook on
  its outputs;
- backward: the pre-backward hook (the first gradient reaching the unit's outputs) fetches the params again
  and prefetches the units backward will need next; each parameter's post-accumulate-grad hook frees the device
  gradient and hands it to the grad thread, which adds it into the unit's fp32 host buffer (a copy stream under
  CUDA); when a unit's last gradient has been handed off, its params are released, and once its grads have
  landed the unit is updated (overlapped update) or its grads spilled to NVMe. A callback at the end of backward
  waits for the grads in flight and releases what is left (params that got no gradient, the rest unit).
- step: the user's ``optimizer.step()`` runs :class:`~offload.optimizer.OffloadOptimizer` over the units,
  reading weights and gradients from the units' host buffers (its ``ParamHome`` interface).

Device memory is a :class:`~storage.TierBudget` that every fetch reserves from, so on a CPU-only machine the
budget is enforced by our accounting exactly as it bounds a GPU. Activations are not counted.
"""

from __future__ import annotations

import collections
import contextlib
import concurrent.futures
import enum
import os
import sys
import time
import weakref
from typing import Callable, Iterable, Iterator

import psutil
import torch
from torch import nn

from offload.config import OffloadConfig, config_from_env
from offload.optimizer import OffloadOptimizer, ParamHome
from offload.report import placement_text, report_at_exit
from offload.timeline import Timeline
from storage import HostPool, NvmeStore, Tier, TierBudget, TierFullError, format_bytes
from storage.memory import aligned_empty

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
        self.host: torch.Tensor | None = None  # flat params on the host (host tier)
        self.device_buf: torch.Tensor | None = None
        self.fetch: concurrent.futures.Future | None = None
        self.grad_host: torch.Tensor | None = None  # flat fp32 grads, while on the host
        self.grad_release: Callable[[], None] | None = None
        self.has_grads = False  # some param of the unit has a grad in the current accumulation
        self.got = [False] * len(params)  # which params have one
        self.grads_on_nvme = False  # the accumulated grads are in the store (grad_key), not in grad_host
        self.grad_key = f"unit{index}.grads"
        self.pending = 0  # trainable params whose grad has not arrived in this backward
        self.key = f"unit{index}.params"

    def view(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        dtype = self.dtypes[k]
        n = self.numels[k] * dtype.itemsize
        return flat[self.offsets[k]:self.offsets[k] + n].view(dtype).view(self.shapes[k])

    def grad_view(self, k: int) -> torch.Tensor:
        n = self.numels[k] * 4
        return self.grad_host[self.grad_offsets[k]:self.grad_offsets[k] + n].view(torch.float32) \
            .view(self.shapes[k])

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


class _Home(ParamHome):
    """The optimizer's view of where each parameter's weights and gradient are (see OffloadOptimizer)."""

    def __init__(self, runtime: "OffloadRuntime"):
        self.rt = weakref.proxy(runtime)

    def weights(self, param):
        unit, k = self.rt._owner[param]
        if self.rt.param_tier is Tier.NVME:
            staging = self.rt._staging.get(unit.index)
            return None if staging is None else unit.view(staging, k)
        return unit.view(unit.host, k)

    def load_weights(self, param):
        return self.rt.param_value(param)

    def grad(self, param):
        unit, k = self.rt._owner[param]
        if not (unit.has_grads and unit.got[k]):
            return None
        self.rt._grad_buffer(unit, load=True)
        return unit.grad_view(k)

    def has_grad(self, param):
        unit, k = self.rt._owner[param]
        return unit.has_grads and unit.got[k]

    def before_update(self, sub):
        self.rt._before_update(sub)



class OffloadRuntime:
    """Owns the units, their memory on each tier, the hooks and the timeline of one wrapped model."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: OffloadConfig,
                 units: Callable[[nn.Module], list[tuple[str, list[nn.Module]]]] | None = None):
        self.model = model
        self.config = config
        self.param_tier = config.param_tier
        if self.param_tier is Tier.DEVICE:
            raise NotImplementedError("OffloadConfig(param_tier='device'): keeping every param on the device needs "
                                      "no wrap; use OffloadOptimizer alone")
        devices = {p.device for p in model.parameters()}
        if len(devices) != 1:
            raise ValueError(f"offload.wrap: expected the model on one device, got {sorted(map(str, devices))}")
        self.device = next(iter(devices))
        self.timeline = Timeline()
        self.stats = {"fetches": 0, "fetch_wait_s": 0.0, "h2d_bytes": 0, "d2h_bytes": 0, "disk_read_bytes": 0,
                      "disk_write_bytes": 0}
        self._build_units(units or default_units)
        self._owner: dict[nn.Parameter, tuple[Unit, int]] = {}
        for u in self.units:
            for k, p in enumerate(u.params):
                self._owner[p] = (u, k)
        self.device_budget = TierBudget(Tier.DEVICE, config.device_budget_bytes or (1 << 62))
        need = self.units[0].nbytes + max((u.nbytes for u in self.units[1:]), default=0)
        if need > self.device_budget.capacity_bytes:
            big = max(self.units[1:], key=lambda u: u.nbytes, default=self.units[0])
            raise ValueError(
                f"offload.wrap: the device budget of {format_bytes(self.device_budget.capacity_bytes)} cannot hold "
                f"unit {self.units[0].name!r} ({format_bytes(self.units[0].nbytes)}, resident through forward and "
                f"backward) plus the largest block {big.name!r} ({format_bytes(big.nbytes)}): raise "
                f"device_budget_bytes to at least {need} or cut the model into smaller units")
        # One pool, one budget for everything this runtime and its optimizer keep on the host. Without a budget
        # in the config, the machine's memory is the limit.
        self.pool = HostPool(budget_bytes=config.host_budget_bytes or psutil.virtual_memory().total)
        self._store: NvmeStore | None = None
        if Tier.NVME in (self.param_tier, config.state_tier, config.grad_tier):
            self._store = self._open_store()
        self._copy_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="offload-fetch")
        # One thread runs the overlapped updates, in the order units finish backward (the CPU-update resource).
        self._update_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="offload-update")
        # One thread moves grads off the device as they complete (the d2h resource), in order.
        self._grad_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="offload-grads")
        self._grad_futures: list[concurrent.futures.Future] = []
        self.overlap = config.overlap_update and config.max_grad_norm is None and config.loss_scale is None
        self._backwards = 0  # backward passes since the last step
        self._overlapping = False  # this backward runs the updates
        self._step_pending = False  # updates ran (or run) in backward; step() must collect them
        self._update_futures: list[concurrent.futures.Future] = []
        self._submitted: set[int] = set()
        self.last_timeline: Timeline | None = None
        # One record per iteration (the last 1000): its measured time, timeline summary and the byte counters
        # after it. Run reports (offload/report.py) and `offload run` read it; it costs a few µs per step.
        self.history: collections.deque[dict] = collections.deque(maxlen=1000)
        self.iterations = 0
        self._new_iteration = True
        # Separate streams for the two directions: a GPU has a copy engine for each.
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._d2h_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._staging: dict[int, torch.Tensor] = {}
        self._staging_release: dict[int, Callable] = {}
        self._fwd_order: list[int] = [u.index for u in self.units[1:]]
        self._fwd_seq: list[int] = []
        self._bwd_seq: list[int] = []
        self._in_backward = False
        self._empty = {}
        self._released_once = False  # until then, params still hold their weights in param.data
        self._init_tiers()
        self.optimizer = self._make_optimizer(optimizer)
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

    def _open_store(self) -> NvmeStore:
        cfg = self.config
        if not cfg.nvme_dirs:
            raise ValueError("offload.wrap: an NVMe tier needs OffloadConfig(nvme_dirs=...)")
        params = sum(u.nbytes for u in self.units)
        numel = sum(p.numel() for u in self.units for p in u.params if p.requires_grad)
        state = numel * 16  # AdamW-like state plus fp32 masters, an upper estimate
        cap = cfg.nvme_capacity_bytes or int((params + state) * 2.2) + (64 << 20)
        return NvmeStore(list(cfg.nvme_dirs), cap, config=cfg.store, reset=True)

    def _init_tiers(self) -> None:
        """Copy every unit's params to their tier, and give each unit its fp32 grad buffer."""
        for u in self.units:
            u.grad_key = f"unit{u.index}.grads"
            if u.grad_nbytes and self.config.grad_tier is Tier.HOST:
                buf = self.pool.acquire(u.grad_nbytes)
                u.grad_host, u.grad_release = buf.tensor[:u.grad_nbytes], buf.release
            if not u.nbytes:
                continue
            buf = self.pool.acquire(u.nbytes)
            flat = buf.tensor[:u.nbytes]
            with torch.no_grad():
                for k, p in enumerate(u.params):
                    u.view(flat, k).copy_(p.data)
            if self.param_tier is Tier.HOST:
                u.host, u._host_release = flat, buf.release
            else:
                self._store.write(u.key, flat).wait()
                self.stats["disk_write_bytes"] += u.nbytes
                buf.release()

    def _make_optimizer(self, optimizer) -> OffloadOptimizer:
        homes = {}
        home = _Home(self)
        for u in self.units:
            for p in u.params:
                homes[p] = (u.index, home)
        if isinstance(optimizer, OffloadOptimizer):
            raise ValueError("offload.wrap: pass the plain optimizer (e.g. torch.optim.AdamW(...)); wrap builds "
                             "the OffloadOptimizer itself")
        opt = OffloadOptimizer(optimizer, config=self.config, _homes=homes, _store=self._store, _pool=self.pool)
        opt._runtime = self
        return opt

    def _empty_like(self, p: torch.Tensor) -> torch.Tensor:
        key = (p.dtype, p.device)
        if key not in self._empty:
            self._empty[key] = torch.empty(0, dtype=p.dtype, device=p.device)
        return self._empty[key]

    def _release_all_initial(self) -> None:
        self._released_once = True
        for u in self.units:
            for p in u.params:
                p.data = self._empty_like(p)
            u.state = ParamState.RELEASED

    # -- fetch / release ----------------------------------------------------------------------------------------
    def _issue_fetch(self, u: Unit, *, required: bool) -> bool:
        """Start bringing ``u``'s params to the device. A prefetch that does not fit the budget is skipped."""
        if u.state is not ParamState.RELEASED or not u.nbytes:
            if not u.nbytes and u.state is ParamState.RELEASED:
                u.state = ParamState.RESIDENT
            return True
        try:
            self.device_budget.reserve(u.nbytes, what=f"unit {u.name!r}")
        except TierFullError:
            if not required:
                return False
            resident = ", ".join(x.name for x in self.units if x.state is not ParamState.RELEASED)
            raise TierFullError("device", f"unit {u.name!r} (resident now: {resident})", u.nbytes,
                                self.device_budget.used_bytes, self.device_budget.capacity_bytes) from None
        if self.device.type == "cuda":
            u.device_buf = torch.empty(u.nbytes, dtype=torch.uint8, device=self.device)
        else:
            u.device_buf = aligned_empty(u.nbytes)[:u.nbytes]
        u.state = ParamState.FETCHING
        self.stats["fetches"] += 1
        u.fetch = self._copy_pool.submit(self._fetch_work, u)
        return True

    def _fetch_work(self, u: Unit):
        """On the copy thread: (disk ->) host -> device. Returns a CUDA event when the copy is asynchronous."""
        tl = self.timeline
        src, release = u.host, None
        if src is None:
            buf = self.pool.acquire(u.nbytes)
            src, release = buf.tensor[:u.nbytes], buf.release
            with tl.span("disk_read", f"fetch {u.name}", u.nbytes):
                self._store.read(u.key, out=src).wait()
            self.stats["disk_read_bytes"] += u.nbytes
        try:
            with tl.span("h2d", f"fetch {u.name}", u.nbytes):
                if self._copy_stream is not None:
                    with torch.cuda.stream(self._copy_stream):
                        u.device_buf.copy_(src, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(self._copy_stream)
                    # The staging buffer is reused once the copy is done; wait for it on this (copy) thread.
                    event.synchronize()
                else:
                    u.device_buf.copy_(src)
                    event = None
            self.stats["h2d_bytes"] += u.nbytes
        finally:
            if release is not None:
                release()
        return event

    def _wait_resident(self, u: Unit) -> None:
        if u.state is ParamState.RELEASED:
            self._issue_fetch(u, required=True)
        if u.state is ParamState.FETCHING:
            t0 = time.perf_counter()
            event = u.fetch.result()
            self.stats["fetch_wait_s"] += time.perf_counter() - t0
            if event is not None:
                # Compute must not read the params before the copy stream wrote them.
                torch.cuda.current_stream(self.device).wait_event(event)
            for k, p in enumerate(u.params):
                p.data = u.view(u.device_buf, k)
            u.fetch = None
            u.state = ParamState.RESIDENT

    def _release(self, u: Unit) -> None:
        if u.state is ParamState.FETCHING:
            u.fetch.result()
        if u.state is ParamState.RELEASED:
            return
        for p in u.params:
            p.data = self._empty_like(p)
        if u.nbytes:
            if self.device.type == "cuda":
                # The buffer may still be read by kernels queued on the compute stream; the caching allocator
                # keeps it from reuse by other streams until they finish when we record it on that stream.
                u.device_buf.record_stream(torch.cuda.current_stream(self.device))
            u.device_buf = None
            self.device_budget.release(u.nbytes)
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
                self._handles.append(m.register_forward_pre_hook(lambda mod, args, u=u: self._pre_forward(u)))
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
        self._fwd_seq = []
        if self._new_iteration:  # the first forward after a step: a new iteration's timeline
            self._new_iteration = False
            if self.timeline.events:
                self.last_timeline, self.timeline = self.timeline, Timeline()
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

    def _pre_forward(self, u: Unit) -> None:
        if self._backward_running():
            self._wait_resident(u)  # recomputation: already fetched by the pre-backward hook
            return
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

    def _register_pre_backward(self, u: Unit, out) -> None:
        tensors = [t for t in _tensors(out) if t.requires_grad]
        if tensors:
            torch.autograd.graph.register_multi_grad_hook(tensors, lambda grads, u=u: self._pre_backward(u),
                                                          mode="any")

    def _pre_backward(self, u: Unit) -> None:
        if not self._in_backward:
            if self._step_pending:
                raise RuntimeError(
                    f"backward called again after the last of {self.config.accumulation_steps} accumulation steps, "
                    f"whose backward already ran the optimizer update (overlap_update): call optimizer.step() "
                    f"first, or set OffloadConfig(accumulation_steps=...) to the number of backward passes per step")
            self._in_backward = True
            self._overlapping = self.overlap and self._backwards + 1 == self.config.accumulation_steps
            if self._overlapping:
                self._step_t0 = time.perf_counter()
                self._submitted = set()
                self._update_futures = []
                if not self.optimizer._begin_step():
                    self._overlapping = False
            self._bwd_seq = list(reversed(self._fwd_order))
            self._bwd_pos = -1
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
        buffer while backward goes on) and free it on the device."""
        u, k = self._owner[p]
        g = p.grad
        p.grad = None
        event = None
        if g.device.type == "cuda":
            # The grad is being written on the compute stream; the grad thread's copy must wait for that.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(g.device))
        self._grad_futures.append(self._grad_pool.submit(self._grad_work, u, k, g, event))
        u.pending -= 1
        if u.pending == 0:
            if u.index != 0:
                self._release(u)  # its backward is done: the params are no longer needed on the device
            # Queued behind the unit's copies on the same (FIFO, single) thread, so it runs once all are done.
            self._grad_futures.append(self._grad_pool.submit(self._unit_grads_done, u))

    def _grad_work(self, u: Unit, k: int, g: torch.Tensor, event) -> None:
        self._grad_buffer(u, load=True)
        nbytes = u.numels[k] * 4
        with self.timeline.span("d2h", f"grad {u.name}", nbytes):
            if event is not None:
                with torch.cuda.stream(self._d2h_stream):
                    self._d2h_stream.wait_event(event)
                    g_host = g.to("cpu")  # synchronous on the copy stream: done when it returns
                g.record_stream(self._d2h_stream)  # do not reuse g's memory before the copy stream read it
                g = g_host
            dst = u.grad_view(k)
            if not u.got[k]:
                dst.copy_(g)  # a plain optimizer's first micro-batch: p.grad = g
                u.got[k] = True
            else:
                dst.add_(g)  # later micro-batches: p.grad += g, the same fp32 addition
            u.has_grads = True
        self.stats["d2h_bytes"] += nbytes

    def _drain_grads(self) -> None:
        """Wait for every grad in flight (raising the first failure)."""
        futures, self._grad_futures = self._grad_futures, []
        for f in futures:
            f.result()

    def _unit_grads_done(self, u: Unit) -> None:
        """On the grad thread: all of ``u``'s grads of this backward are in its host buffer."""
        if self._overlapping:
            self._submit_update(u)
        elif self.config.grad_tier is Tier.NVME:
            self._spill_grads(u)

    def _grad_buffer(self, u: Unit, *, load: bool) -> None:
        """Make ``u``'s fp32 grad buffer addressable on the host, reading the accumulated grads back from the
        store when they were spilled there."""
        if u.grad_host is not None:
            return
        buf = self.pool.acquire(u.grad_nbytes)
        u.grad_host, u.grad_release = buf.tensor[:u.grad_nbytes], buf.release
        if load and u.grads_on_nvme:
            with self.timeline.span("disk_read", f"grads {u.name}", u.grad_nbytes):
                self._store.read(u.grad_key, out=u.grad_host).wait()
            self.stats["disk_read_bytes"] += u.grad_nbytes

    def _spill_grads(self, u: Unit) -> None:
        """Grads of a micro-batch that is not the last: to the store, and the host buffer back to the pool."""
        if u.grad_host is None:
            return
        grads, release = u.grad_host, u.grad_release
        u.grad_host = u.grad_release = None
        handle = self._store.write(u.grad_key, grads)
        t0 = self.timeline.now()
        tl = self.timeline
        handle.future.add_done_callback(lambda f: (tl.add("disk_write", f"grads {u.name}", t0, tl.now(),
                                                          u.grad_nbytes), release()))
        u.grads_on_nvme = True
        self.stats["disk_write_bytes"] += u.grad_nbytes

    def _drop_grads(self, u: Unit) -> None:
        """After ``u``'s update with grads on NVMe: the grads are consumed; free their buffer."""
        if self.config.grad_tier is not Tier.NVME:
            return
        if u.grad_host is not None:
            release = u.grad_release
            u.grad_host = u.grad_release = None
            release()
        u.has_grads, u.grads_on_nvme = False, False
        u.got = [False] * len(u.params)

    def _submit_update(self, u: Unit) -> None:
        """Update ``u`` on the update thread now, while backward goes on with earlier units (Fuyou)."""
        if u.index in self._submitted or not u.has_grads:
            return
        self._submitted.add(u.index)
        self._update_futures.append(self._update_pool.submit(self._update_unit, u))

    def _update_unit(self, u: Unit) -> None:
        with self.timeline.span("cpu_update", f"update {u.name}"):
            self.optimizer._update_subgroups(self.optimizer._update_order(u.index))
        self._drop_grads(u)

    def overlap_started(self) -> bool:
        return self._overlapping or self._step_pending

    def overlapped_step_pending(self) -> bool:
        return self._step_pending

    def finish_overlapped_step(self) -> None:
        """``optimizer.step()`` after an overlapped backward: wait for the updates, then close the step."""
        concurrent.futures.wait(self._update_futures)
        self._step_pending = False
        try:
            for f in self._update_futures:
                f.result()  # the first failure, if any
        finally:
            self._update_futures = []
            self.optimizer._end_step(self._step_t0)

    def _post_backward(self) -> None:
        self.timeline.add("compute", "backward", self._bwd_t0, self.timeline.now())
        self._drain_grads()  # the step (or the next micro-batch) reads the grads: they must all have landed
        self._in_backward = False
        self._backwards += 1
        for u in self.units:
            self._release(u)
        if self._overlapping:
            for u in self.units:  # units some of whose params got no grad this time
                self._submit_update(u)
            self._overlapping = False
            self._step_pending = True

    def zero_grad(self) -> None:
        """Forget accumulated grads (what ``optimizer.zero_grad()`` and ``model.zero_grad()`` do)."""
        for u in self.units:
            u.has_grads, u.grads_on_nvme = False, False
            u.got = [False] * len(u.params)
            if self.config.grad_tier is Tier.NVME and u.grad_host is not None:
                release = u.grad_release
                u.grad_host = u.grad_release = None
                release()

    def param_value(self, p: nn.Parameter) -> torch.Tensor:
        """The current weights of ``p`` wherever they are (a copy when they come from disk)."""
        u, k = self._owner[p]
        if u.state is ParamState.RESIDENT or not self._released_once:
            return p.data
        if u.index in self._staging:
            return u.view(self._staging[u.index], k)
        if u.host is not None:
            return u.view(u.host, k)
        buf = aligned_empty(u.nbytes)[:u.nbytes]
        self._store.read(u.key, out=buf).wait()
        return u.view(buf, k)

    def _check_between_steps(self, what: str) -> None:
        if self._in_backward or self._step_pending or self._staging:
            raise RuntimeError(f"cannot {what} while a step is in progress (in backward, or updates of the last "
                               f"backward not collected): call optimizer.step() first")

    @contextlib.contextmanager
    def _weights_of(self, u: Unit, *, load: bool):
        """The unit's host copy of its weights; for a unit whose weights live in the store, a pool buffer read
        from it (``load``) or written to it after the caller filled it (not ``load``)."""
        if u.host is not None:
            yield u.host
            return
        buf = self.pool.acquire(u.nbytes)
        flat = buf.tensor[:u.nbytes]
        try:
            if load:
                self._store.read(u.key, out=flat).wait()
                self.stats["disk_read_bytes"] += u.nbytes
            yield flat
            if not load:
                self._store.write(u.key, flat).wait()
                self.stats["disk_write_bytes"] += u.nbytes
        finally:
            buf.release()

    def iter_params(self) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        """Every param's current weights, one unit at a time, without gathering the model: views into the unit's
        host buffer, or into one buffer the unit is read into from the store (valid until the next unit; copy
        what you keep). The host copy is the authority: device copies are only read by compute."""
        self._check_between_steps("read the weights")
        for u in self.units:
            if u.nbytes:
                with self._weights_of(u, load=True) as flat:
                    for k, p in enumerate(u.params):
                        yield p, u.view(flat, k)

    @torch.no_grad()
    def load_params(self, fill: Callable[[nn.Parameter, torch.Tensor], None]) -> None:
        """Set every param's weights, one unit at a time: ``fill(param, out)`` writes them into ``out`` (the
        param's place in the unit's host buffer, or in a buffer then written to the store). Units on the device
        are released first, so their next use fetches the new weights."""
        self._check_between_steps("load weights")
        for u in self.units:
            self._release(u)
            if u.nbytes:
                with self._weights_of(u, load=False) as flat:
                    for k, p in enumerate(u.params):
                        fill(p, u.view(flat, k))

    def _state_dict_hook(self, module, state_dict, prefix, local_metadata) -> None:
        """``model.state_dict()`` gives the real weights, not the empty tensors released params hold."""
        for name, p in self.model.named_parameters(prefix=prefix.rstrip("."), remove_duplicate=False):
            if name in state_dict and p in self._owner:
                state_dict[name] = self.param_value(p).detach().clone()

    # -- the optimizer's side -----------------------------------------------------------------------------------
    def _before_update(self, sub) -> None:
        """Called (by the optimizer) before each subgroup's update; subgroups come unit by unit. When the unit
        changes, the previous one is finished: its grads are dropped (NVMe grads) and its new weights written
        (NVMe params). For NVMe params, a host staging buffer receives the unit's new weights."""
        u = self.units[sub.unit]
        prev = getattr(self, "_updating", None)
        if prev is u:
            return
        self._updating = u
        if prev is not None and not (self._overlapping or self._step_pending):
            self._drop_grads(prev)  # with the overlapped update, _update_unit drops them
        if self.param_tier is not Tier.NVME:
            return
        self._flush_staging()
        buf = self.pool.acquire(u.nbytes)
        staging = buf.tensor[:u.nbytes]
        if not all(p.requires_grad for p in u.params):  # frozen params keep their stored values
            with self.timeline.span("disk_read", f"params {u.name}", u.nbytes):
                self._store.read(u.key, out=staging).wait()
            self.stats["disk_read_bytes"] += u.nbytes
        self._staging[u.index], self._staging_release[u.index] = staging, buf.release

    def _flush_staging(self) -> None:
        for idx in list(self._staging):
            u = self.units[idx]
            staging = self._staging.pop(idx)
            release = self._staging_release.pop(idx)
            with self.timeline.span("disk_write", f"params {u.name}", u.nbytes):
                self._store.write(u.key, staging).wait()
            self.stats["disk_write_bytes"] += u.nbytes
            release()

    def after_step(self) -> None:
        self._flush_staging()
        self._updating = None
        for u in self.units:  # grads on NVMe are consumed by the step
            if self.config.grad_tier is Tier.NVME and u.has_grads:
                self._drop_grads(u)
        self._backwards = 0
        self._new_iteration = True
        self.iterations += 1
        self.history.append({"iteration": self.iterations, "wall_s": self.timeline.now(),
                             "timeline": self.timeline.summary(), "stats": dict(self.stats)})

    def report(self) -> dict:
        return {"units": [{"name": u.name, "params": sum(p.numel() for p in u.params), "bytes": u.nbytes,
                           "state": u.state.value} for u in self.units],
                "param_tier": self.param_tier.value, "device_budget_bytes": self.device_budget.capacity_bytes,
                "device_peak_bytes": self.device_budget.peak_bytes, **self.stats,
                "timeline": self.timeline.summary()}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._copy_pool.shutdown(wait=True)
        self._update_pool.shutdown(wait=True)
        self._grad_pool.shutdown(wait=True)
        self.optimizer.close()
        if self._store is not None:
            self._store.close()


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


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, config: OffloadConfig | None = None, *,
         units: Callable[[nn.Module], list[tuple[str, list[nn.Module]]]] | None = None
         ) -> tuple[nn.Module, OffloadOptimizer]:
    """Offload ``model``'s params, grads and ``optimizer``'s state per ``config``; returns the same module
    (changed in place: hooks, params emptied between uses) and the :class:`OffloadOptimizer` to use instead of
    ``optimizer``. The training loop stays ``loss = model(x); loss.backward(); opt.step(); opt.zero_grad()``.

    Clip with ``opt.clip_grad_norm_(max_norm)``: the grads are no longer in ``param.grad``. Without ``config``,
    the one ``offload run`` was given (``OFFLOAD_CONFIG``) is used, else the defaults.
    """
    runtime = OffloadRuntime(model, optimizer, config or config_from_env() or OffloadConfig(), units=units)
    model._offload_runtime = runtime
    orig_zero_grad = model.zero_grad

    def zero_grad(set_to_none: bool = True):
        runtime.zero_grad()
        orig_zero_grad(set_to_none)

    model.zero_grad = zero_grad
    if os.environ.get("OFFLOAD_PRINT_PLAN") and int(os.environ.get("RANK", "0")) == 0:  # under `offload run`
        print(placement_text(runtime), file=sys.stderr, flush=True)
    report_at_exit(model, runtime.optimizer)
    return model, runtime.optimizer
