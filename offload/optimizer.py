"""OffloadOptimizer: any torch optimizer, its state in subgroups on the device, in host memory or on NVMe.

Why one module: the subgroup layout, the packing of chunks and the streamed step all act on the same
``_Subgroup`` fields; the sections below divide it.

How it works (the one note the rest of the code refers to)
----------------------------------------------------------
The trainable parameters of each param group are cut into **subgroups** of about ``subgroup_numel`` elements.
A subgroup is a list of **pieces**: whole parameters, or 1024-element-aligned slices of a parameter larger than
a subgroup (only for optimizers known to be elementwise). Each subgroup owns one *inner* optimizer, an instance
of the user's own class with the same hyperparameters, whose params are *proxies*: tensors whose ``.data`` we
point, for each update, at wherever that piece's fp32 weights are (the model parameter itself when it is fp32
and in the memory the update runs in, else an fp32 *master* copy), and whose ``.grad`` we point at the piece's
gradient (cast to fp32 when needed). The inner optimizer therefore runs the exact code a plain optimizer runs,
on tensors of the same shapes, which is why results are bit-identical (fused CPU kernels round their tails
differently, so the shapes must match: hence proxies per piece, never one flat tensor).

All of a subgroup's state tensors and masters are packed into one contiguous **chunk** (one transfer per
direction); the few per-piece scalars (Adam's ``step``) stay in memory. The chunk is a
:class:`~offload.swap.Chunk` of the swap manager (offload.wrap's, shared with the model's params and grads, or
this optimizer's own), on the tier the placement gives: device memory, a host-pool buffer, or the NVMe store.
For NVMe the step is a pipeline over a bounded number of host buffers: while subgroup *i* is updated,
*i+1..i+k* are being read and *i-1* written.

State is created by the inner optimizer itself on its first step (so any optimizer's initial values are
right), then moved into the chunk; a later step that adds state (a param that got its first grad) re-packs.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import math
import statistics
import time
import warnings
import weakref
from typing import Any, Callable, Iterator, NamedTuple

import torch

from offload import clipping
from offload.config import OffloadConfig, config_from_env
from offload.swap import Chunk, ChunkState, DeviceCache, SwapManager
from storage import HostPool, NvmeStore, Tier, format_bytes
from storage.memory import available_host_bytes

# Optimizers whose every state tensor is elementwise per parameter element: their params may be sliced.
ELEMENTWISE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad, torch.optim.RMSprop,
               torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adadelta, torch.optim.ASGD)
SPLIT_ALIGN = 1024
"""Slices of a large parameter start on multiples of this many elements. CPU kernels process a tensor in
vectors and round its last few elements in a scalar tail; slicing on such a boundary leaves every element in
the same position relative to the vector width, so a sliced update is bit-identical to an unsliced one."""
SLOT_ALIGN = 64  # byte alignment of each tensor inside a chunk: a cache line, what vector loads like


class ParamHome:
    """Where a parameter's weights and gradient are, when not in ``param.data`` / ``param.grad``.

    The parameter-offload runtime (:mod:`offload.runtime`) moves both off the device between uses and gives
    the optimizer a home per parameter: its weights in a host buffer (or ``None`` while they are only on NVMe:
    the home stages them in host memory around each update) and its accumulated fp32 gradient in a host buffer.
    """

    def weights(self, param: torch.Tensor) -> torch.Tensor | None:
        """The weights where they are addressable now; ``None`` while they are only on NVMe (between
        ``before_update`` and ``after_update`` of a CPU update the home stages them in host memory)."""
        raise NotImplementedError

    def shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """The parameter's shape (a released param, or one built on meta, holds an empty tensor)."""
        return tuple(param.shape)

    def grad(self, param: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def has_grad(self, param: torch.Tensor) -> bool:
        """Whether the parameter has a gradient now, without loading it."""
        return self.grad(param) is not None

    def grad_meta(self, param: torch.Tensor) -> tuple[torch.dtype, torch.device] | None:
        """The dtype and device of the parameter's gradient (``None``: it has none), without loading it."""
        g = self.grad(param)
        return None if g is None else (g.dtype, g.device)

    def load_weights(self, param: torch.Tensor) -> torch.Tensor:
        """The weights of a parameter whose ``weights()`` is ``None``, read into a new tensor."""
        raise NotImplementedError

    def loading(self) -> contextlib.AbstractContextManager:
        """Around many :meth:`load_weights` calls in a row (params in the home's order): the home may keep what
        it read for the next call (a whole unit read once, not once per param)."""
        return contextlib.nullcontext()

    def on_device(self, param: torch.Tensor) -> bool:
        """Whether ``weights()`` is device memory (by tier: on a CPU-only machine device memory is CPU memory)."""
        return False

    def before_update(self, sub: "_Subgroup") -> None:
        """Called before a subgroup's update (e.g. to make its weights addressable)."""

    def after_update(self, sub: "_Subgroup") -> None:
        """Called after a subgroup's update, once its new weights are in ``weights()``."""


class PieceSpan(NamedTuple):
    """The elements ``[start, stop)`` of one parameter's flattened tensor that a piece covers: what the streaming
    state API (:meth:`OffloadOptimizer.iter_state`, :meth:`~OffloadOptimizer.load_state_stream`) names."""

    index: int
    """The parameter's position across all param groups (its key in ``state_dict()["state"]``)."""
    start: int
    stop: int
    shape: tuple[int, ...]
    """The parameter's shape."""

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == math.prod(self.shape)


def _cut(params: list[tuple[int, torch.Tensor, int, ParamHome]], target: int | None,
         can_split: bool) -> list[list[_Piece]]:
    """Pack ``params`` ((index, param, numel, home), in order) into pieces of subgroups of at most ``target``
    elements (``None``: one subgroup); a larger param is cut on SPLIT_ALIGN boundaries when ``can_split``."""
    if target is None:
        return [[_Piece(p, idx, 0, n, home) for idx, p, n, home in params]]
    packs, cur, cur_n = [], [], 0
    for idx, p, n, home in params:
        if n > target and can_split:
            step = max(SPLIT_ALIGN, target // SPLIT_ALIGN * SPLIT_ALIGN)
            for s in range(0, n, step):
                if cur:
                    packs.append(cur)
                    cur, cur_n = [], 0
                packs.append([_Piece(p, idx, s, min(step, n - s), home)])
            continue
        if cur and cur_n + n > target:
            packs.append(cur)
            cur, cur_n = [], 0
        cur.append(_Piece(p, idx, 0, n, home))
        cur_n += n
    if cur:
        packs.append(cur)
    return packs


class _Piece:
    """A whole parameter or a slice ``[start, start + numel)`` of its flattened elements."""

    __slots__ = ("param", "index", "start", "numel", "whole", "proxy", "home", "param_shape")

    def __init__(self, param: torch.Tensor, index: int, start: int, numel: int, home: ParamHome | None = None):
        self.param = param
        self.index = index  # the parameter's position across all param groups (the state_dict key)
        self.start = start
        self.numel = numel
        self.param_shape = tuple(param.shape) if home is None else home.shape(param)  # released params are empty
        self.whole = start == 0 and numel == math.prod(self.param_shape)
        self.proxy = torch.empty(0)  # the inner optimizer's param; .data / .grad rebound for each update
        self.home = home

    def weights(self) -> torch.Tensor | None:
        """This piece of the parameter's weights, wherever they are addressable now."""
        if self.home is None:
            return self.param_view()
        w = self.home.weights(self.param)
        return None if w is None else self.of(w)

    def grad(self) -> torch.Tensor | None:
        g = self.param.grad if self.home is None else self.home.grad(self.param)
        return None if g is None else self.of(g)

    def grad_meta(self) -> tuple[torch.dtype, torch.device] | None:
        if self.home is None:
            g = self.param.grad
            return None if g is None else (g.dtype, g.device)
        return self.home.grad_meta(self.param)

    def has_grad(self) -> bool:
        return self.param.grad is not None if self.home is None else self.home.has_grad(self.param)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.param_shape if self.whole else (self.numel,)

    @property
    def span(self) -> PieceSpan:
        return PieceSpan(self.index, self.start, self.start + self.numel, self.param_shape)

    def of(self, full: torch.Tensor) -> torch.Tensor:
        """This piece of a tensor shaped like the parameter (the parameter, its grad, a state tensor)."""
        return full if self.whole else full.reshape(-1)[self.start:self.start + self.numel]

    def param_view(self) -> torch.Tensor:
        return self.of(self.param.data)


class _Slot:
    __slots__ = ("piece", "key", "dtype", "shape", "offset", "nbytes")

    def __init__(self, piece: int, key: str, dtype: torch.dtype, shape: tuple, offset: int, nbytes: int):
        self.piece, self.key, self.dtype, self.shape, self.offset, self.nbytes = piece, key, dtype, shape, offset, nbytes

    def view(self, mem: torch.Tensor) -> torch.Tensor:
        return mem[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)


class _Subgroup:
    """One unit of update and transfer: its pieces, inner optimizer, and its chunk's layout (the chunk itself,
    its memory and where it is, belong to the swap manager)."""

    def __init__(self, index: int, group: int, pieces: list[_Piece], tier: Tier, site: str, has_master: bool):
        self.index = index
        self.group = group
        self.pieces = pieces
        self.tier = tier
        self.site = site
        self.has_master = has_master
        self.numel = sum(p.numel for p in pieces)
        self.inner: torch.optim.Optimizer | None = None
        self.slots: list[_Slot] = []
        self.small: list[dict[str, Any]] = [{} for _ in pieces]  # per piece: scalars and non-tensor state
        self.key = f"subgroup{index}"
        self.chunk: Chunk | None = None  # made by the optimizer once the subgroup is placed
        self.home: ParamHome | None = None  # the runtime's hooks around this subgroup's update
        self.unit: int | None = None
        self.views: dict = {}  # (piece, key) -> view into the bound chunk
        self.bound_mem: torch.Tensor | None = None  # a resident chunk the inner optimizer stays bound to

    @property
    def chunk_bytes(self) -> int:
        return self.chunk.nbytes

    def has_grads(self) -> bool:
        return any(p.has_grad() for p in self.pieces)


def fill_groups(cls: type[torch.optim.Optimizer], params: list, kwargs: dict) -> tuple[list[dict], dict]:
    """Param groups of ``cls`` over ``params`` (tensors or group dicts) with every hyperparameter filled in by the
    class itself (validating them), and its defaults, without creating state for the real params (Adagrad, for
    one, allocates state in its constructor)."""
    if not params:
        raise ValueError("OffloadOptimizer got an empty parameter list")
    group_dicts = params if isinstance(params[0], dict) else [{"params": params}]
    dummies = [{**{k: v for k, v in g.items() if k != "params"}, "params": [torch.zeros(1)]} for g in group_dicts]
    probe = cls(dummies, **kwargs)
    groups = []
    for g, filled in zip(group_dicts, probe.param_groups):
        groups.append({**{k: v for k, v in filled.items() if k != "params"}, "params": list(g["params"])})
    return groups, dict(probe.defaults)


class OffloadOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that keeps another optimizer's state off the device, in subgroups.

    Build it from an optimizer instance (its class, hyperparameters, param groups and any state are taken over;
    do not step the original afterwards)::

        opt = OffloadOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4),
                               config=OffloadConfig(state_tier="nvme", nvme_dirs="/mnt/nvme/offload"))

    or from parameters, a class and its keyword arguments::

        opt = OffloadOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-4, config=OffloadConfig())

    Then use it like any optimizer: ``step()``, ``zero_grad()``, LR schedulers, ``state_dict()`` (loadable by the
    plain class, and the reverse), ``add_param_group``. ``report()`` says what ran where.
    """

    def __init__(self, params_or_optimizer, optimizer_class: type[torch.optim.Optimizer] | None = None, *,
                 config: OffloadConfig | None = None, runtime=None, **optimizer_kwargs):
        # No config: the one `offload run` passed through the environment, else the defaults.
        self.config = config or config_from_env() or OffloadConfig()
        # ``runtime``: offload.wrap's (offload.runtime.OffloadRuntime). It gives each param's unit and home
        # (``home_of``; subgroups are then its units), each unit's (state tier, update site) under a plan
        # (``state_placement``), and its swap manager's pool, device budget and store: one of each per model.
        self._runtime = runtime
        if isinstance(params_or_optimizer, torch.optim.Optimizer):
            if optimizer_class is not None or optimizer_kwargs:
                raise ValueError("OffloadOptimizer: given an optimizer instance, pass no optimizer_class or kwargs "
                                 "(its own are used)")
            base = params_or_optimizer
            if isinstance(base, OffloadOptimizer):
                raise ValueError("OffloadOptimizer: this optimizer is already an OffloadOptimizer")
            cls, defaults = type(base), dict(base.defaults)
            groups = [dict(g) for g in base.param_groups]
            adopted = base.state_dict()
            base.state.clear()  # the state moves into our subgroups; holding it twice would defeat the purpose
        else:
            if optimizer_class is None:
                raise ValueError("OffloadOptimizer: pass an optimizer instance, or params plus optimizer_class "
                                 "(e.g. OffloadOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-4))")
            cls = optimizer_class
            params = list(params_or_optimizer)
            groups, defaults = fill_groups(cls, params, optimizer_kwargs)
            adopted = None
        if cls is torch.optim.LBFGS or not issubclass(cls, torch.optim.Optimizer):
            raise NotImplementedError(f"OffloadOptimizer cannot wrap {cls.__name__}: it keeps state across all "
                                      f"parameters at once (and needs a closure), so it cannot be updated one "
                                      f"subgroup at a time. Use an optimizer with per-parameter state (AdamW, SGD, "
                                      f"Adagrad, ...)")
        self.optimizer_class = cls
        super().__init__(groups, defaults)
        self._per_param_state: int | None = None
        self._clipped = False  # clip_grad_norm_ ran since the last step: the step does not clip again
        self._stats = {"steps": 0, "skipped_steps": 0, "update_s": 0.0, "cpu_update_s": 0.0, "wait_read_s": 0.0,
                       "step_s": 0.0, "speculative_steps": 0, "spec_commits": 0, "spec_rollbacks": 0,
                       "spec_overflows": 0, "spec_declined": 0, "spec_waited_timing": 0, "spec_stopped": 0,
                       "spec_undone_for_accumulation": 0,
                       "rollback_s": 0.0}
        self._spec: _Speculation | None = None  # the speculative step under way (offload.wrap's runtime)
        self.speculation = SpeculationPolicy()
        self._loop_reads_norm = False  # the loop called clip_grad_norm_ (its steps need the norm)
        self._scale = None
        if self.config.loss_scale is not None:
            self._scale = 65536.0 if self.config.loss_scale == "dynamic" else float(self.config.loss_scale)
        self._good_steps = 0
        self._unscaled = False
        # The NVMe chunks whose host buffers the streamed step holds, in the order it took them: read ahead of
        # their update, being written back, or kept in memory for the next step (at most ``config.buffers``;
        # a chunk leaves once the swap manager has given its buffer back). Under the overlapped update (one
        # unit per call) reads ahead and write-backs outlive a call: finish_unit_io settles them at the step's end.
        self._held: dict[int, _Subgroup] = {}
        self.state_written: Callable[[], None] | None = None
        """Called on an I/O thread when a state write-back of the overlapped update (``update_unit``) lands: the
        runtime then reads further ahead into the buffer it freed."""
        self._param_shapes = {p: self._shape_of(p) for g in self.param_groups for p in g["params"]}
        self._subgroups: list[_Subgroup] = []
        self._setup_memory()
        self._frozen: list[torch.Tensor] = []
        for gi in range(len(self.param_groups)):
            self._build_subgroups(gi)
        if any(s.tier is Tier.NVME for s in self._subgroups):
            self._swap.store  # opened now: a store that cannot be made fails here, not in the first step
        if adopted is not None and adopted["state"]:
            self._load_state(adopted["state"])

    # -- construction -----------------------------------------------------------------------------------------------
    def _setup_memory(self) -> None:
        cfg = self.config
        if self._runtime is not None:  # one swap manager (pool, device budget, store) for the model and its optimizer
            self._swap = self._runtime.swap
        else:
            me = weakref.ref(self)  # no reference cycle: an optimizer dropped without close() frees its buffers
            self._swap = SwapManager(HostPool(budget_bytes=cfg.host_budget_bytes or available_host_bytes()),
                                     DeviceCache(self._device_of(), cfg.device_budget_bytes or (1 << 62), keep=2),
                                     lambda: me()._open_store())

    def _device_of(self) -> torch.device:
        devices = {p.device for g in self.param_groups for p in g["params"] if p.requires_grad}
        if len(devices) > 1:
            raise ValueError(f"OffloadOptimizer: trainable parameters are on several devices {sorted(map(str, devices))};"
                             f" expected one (one OffloadOptimizer per device)")
        return next(iter(devices), torch.device("cpu"))

    def _inner_flags(self, group: dict) -> dict:
        """Implementation flags for the inner optimizer, per ``config.impl``."""
        impl = self.config.impl
        has = {k for k in ("fused", "foreach") if k in group}
        if impl == "as_given":
            return {}
        if impl in ("auto", "fused"):
            if "fused" in has and self._fused_ok(group):
                return {"fused": True, **({"foreach": None} if "foreach" in has else {})}
            if impl == "fused":
                raise ValueError(f"OffloadConfig.impl='fused': {self.optimizer_class.__name__} has no fused "
                                 f"implementation for these params on {self.device.type}; use impl='auto'")
            return {}
        out = {"foreach": impl == "foreach"} if "foreach" in has else {}
        if "fused" in has:
            out["fused"] = None if impl == "foreach" else False
        return out

    @staticmethod
    def _impl_name(group: dict, flags: dict) -> str:
        fused = flags.get("fused", group.get("fused"))
        foreach = flags.get("foreach", group.get("foreach"))
        return "fused" if fused else "foreach" if foreach else "forloop" if foreach is False else "default"

    @staticmethod
    def _needs_master(pc: _Piece, site: str) -> bool:
        """fp32 master weights are kept in the chunk unless the piece's weights are fp32 and in the memory the
        update runs in (then the update works on them in place). With a home, "in the memory" is by tier, so that
        a CPU-only machine takes a GPU's path (copies and all: on a CPU-only machine "device" memory is a budget
        our accounting enforces), and weights that live only on NVMe count as host memory: the home stages them
        in a host buffer for the update (``before_update``) and writes them back after it, so a master would only
        duplicate them (4 more bytes per param read and written each step)."""
        if pc.home is not None:
            return pc.param.dtype != torch.float32 or pc.home.on_device(pc.param) != (site == "device")
        w = pc.weights()
        return w.dtype != torch.float32 or (w.device.type != "cpu" and site == "cpu")

    @staticmethod
    def _initial_weights(pc: _Piece) -> torch.Tensor:
        """The piece's current weights in fp32 (to seed a master copy)."""
        if pc.home is None:
            return pc.param_view().detach().float()
        w = pc.home.weights(pc.param)
        if w is None:
            w = pc.home.load_weights(pc.param)
        return pc.of(w).detach().float()

    def _make_inner(self, params: list, hparams: dict) -> torch.optim.Optimizer:
        """The user's class on ``params``, with every hyperparameter of the group. A group may hold keys its
        constructor does not take (AdamW's ``decoupled_weight_decay``): those are set on the group afterwards."""
        accepted = inspect.signature(self.optimizer_class.__init__).parameters
        inner = self.optimizer_class(params, **{k: v for k, v in hparams.items() if k in accepted})
        inner.param_groups[0].update(hparams)
        return inner

    def _fused_ok(self, group: dict) -> bool:
        try:
            p = torch.zeros(4, device=self.device)
            hp = {k: v for k, v in group.items() if k != "params"}
            hp.update(fused=True)
            if "foreach" in hp:
                hp["foreach"] = None
            self._make_inner([p], hp)
            return True
        except (RuntimeError, ValueError, TypeError):
            return False

    def _build_subgroups(self, gi: int) -> None:
        cfg = self.config
        group = self.param_groups[gi]
        self.device = self._device_of()
        trainable = []
        base = sum(len(g["params"]) for g in self.param_groups[:gi])
        for k, p in enumerate(group["params"]):
            if p.is_sparse:
                raise NotImplementedError("OffloadOptimizer: sparse parameters are not supported")
            if p.requires_grad:
                trainable.append((base + k, p))
            else:
                self._frozen.append(p)
        can_split = issubclass(self.optimizer_class, ELEMENTWISE)
        packs: list[list[_Piece]] = []
        if self._runtime is not None:  # subgroups never span units (within this group), in unit order
            by_unit: dict[int, list[tuple[int, torch.Tensor, int, ParamHome]]] = {}
            for idx, p in trainable:
                owner = self._runtime.home_of(p)
                if owner is None:
                    raise ValueError(f"offload.wrap: the optimizer's param group {gi} holds a parameter of shape "
                                     f"{tuple(p.shape)} that is not a parameter of the wrapped model: build the "
                                     f"optimizer over model.parameters() of the model you pass to wrap")
                unit, home = owner
                by_unit.setdefault(unit, []).append((idx, p, math.prod(home.shape(p)), home))
            trainable = []
            self._unit_of_pack = []
            for unit in sorted(by_unit):
                placed = self._runtime.state_placement(unit)
                # State streamed from the store is cut to subgroup_numel: the host holds `buffers` chunks of it
                # at once. Elsewhere a unit's state is one subgroup (each cut would cost an optimizer call).
                streamed = (placed[0] if placed is not None else cfg.state_tier) is Tier.NVME
                cut = _cut(by_unit[unit], cfg.subgroup_numel if streamed else None, can_split)
                packs += cut
                self._unit_of_pack += [unit] * len(cut)
        target = cfg.subgroup_numel
        if cfg.state_tier is Tier.HOST and cfg.update_on == "cpu":
            # State that stays in host memory and is updated there moves nowhere: cutting it would only add inner
            # optimizer calls (~0.5 ms each here). One subgroup per group updates like the plain optimizer.
            target = max(target, sum(p.numel() for _, p in trainable))
        packs += _cut([(idx, p, p.numel(), None) for idx, p in trainable], target, can_split)
        flags = self._inner_flags(group)
        self._impl = self._impl_name(group, flags)
        start = len(self._subgroups)
        with contextlib.ExitStack() as reading:  # seeding masters reads weights in order: each unit once
            for home in {pc.home for pieces in packs for pc in pieces if pc.home is not None}:
                reading.enter_context(home.loading())
            self._make_subgroups(gi, group, packs, start, flags, cfg)

    def _make_subgroups(self, gi: int, group: dict, packs: list[list[_Piece]], start: int, flags: dict,
                        cfg) -> None:
        total = start + len(packs)
        for j, pieces in enumerate(packs):
            i = start + j
            placed = self._runtime.state_placement(self._unit_of_pack[j]) if self._runtime is not None else None
            if placed is not None:
                tier, site = placed
            else:
                tier = cfg.state_tier
                site = "device" if tier is Tier.DEVICE else cfg.update_site(i, total) if not isinstance(
                    cfg.update_on, str) else cfg.update_on
            has_master = any(self._needs_master(pc, site) for pc in pieces)
            sub = _Subgroup(i, gi, pieces, tier, site, has_master)
            sub.chunk = self._swap.chunk(sub.key, 0, tier, kind="state")
            sub.home = pieces[0].home
            sub.unit = self._unit_of_pack[j] if self._runtime is not None else None
            hp = {k: v for k, v in group.items() if k != "params"}
            hp.update(flags)
            for pc in pieces:  # some classes (Adagrad) make state in their constructor: give them real shapes
                w = pc.weights() if pc.home is None or pc.home.weights(pc.param) is not None else None
                if w is None and not has_master:  # weights staged only for updates: the shape is what counts
                    w = torch.empty(pc.shape, dtype=pc.param.dtype)
                pc.proxy.data = (self._initial_weights(pc) if has_master else w)
            sub.inner = self._make_inner([pc.proxy for pc in pieces], hp)
            self._subgroups.append(sub)
            if has_master or sub.inner.state:  # masters from the params; state some classes make up front
                self._init_chunk(sub)
            for pc in pieces:
                pc.proxy.data = torch.empty(0)

    # -- memory for chunks ------------------------------------------------------------------------------------------
    def _scratch(self, nbytes: int, on_device: bool) -> tuple[torch.Tensor, Callable[[], None]]:
        """Working memory for one update, from the swap manager: on the device or in the host pool."""
        return self._swap.scratch(nbytes, Tier.DEVICE if on_device else Tier.HOST)

    @property
    def store(self) -> NvmeStore | None:
        """The NVMe store when one is open (offload.wrap's, or this optimizer's own), else ``None``."""
        return self._swap.store if self._swap.store_open else None

    def _open_store(self) -> NvmeStore:
        """The store of an optimizer without offload.wrap, sized for its state when the config does not say."""
        cfg = self.config
        cap = cfg.nvme_capacity_bytes
        if cap is None:
            per_param = self._probe_state_bytes()
            need = sum(s.numel * (per_param + (4 if s.has_master else 0)) + len(s.pieces) * SLOT_ALIGN * 8
                       for s in self._subgroups)
            cap = int(need * 2.2) + (64 << 20)
        return NvmeStore(list(cfg.nvme_dirs), cap, config=cfg.store, reset=True)

    def _shape_of(self, p: torch.Tensor) -> tuple[int, ...]:
        """``p``'s shape; a param the runtime owns may be empty (released, or built on meta): its recorded one."""
        owner = self._runtime.home_of(p) if self._runtime is not None else None
        return tuple(p.shape) if owner is None else owner[1].shape(p)

    def _probe_state_bytes(self) -> int:
        """Bytes of per-element state the optimizer class creates, from one step on a 64x64 parameter."""
        p = torch.zeros(64, 64, requires_grad=True)
        hp = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        if "fused" in hp:
            hp["fused"] = None  # the probe only counts state; any implementation makes the same
        opt = self._make_inner([p], hp)
        p.grad = torch.ones_like(p)
        opt.step()
        total = sum(v.numel() * v.element_size() for v in opt.state[p].values()
                    if torch.is_tensor(v) and v.numel() > 1)
        return max(1, math.ceil(total / p.numel()))

    # -- chunks: pack, bind, store ----------------------------------------------------------------------------------
    def _layout(self, sub: _Subgroup, tensors: list[tuple[int, str, torch.Tensor]]) -> tuple[list[_Slot], int]:
        slots, off = [], 0
        for pi, key, t in tensors:
            nbytes = t.numel() * t.element_size()
            slots.append(_Slot(pi, key, t.dtype, tuple(t.shape), off, nbytes))
            off += (nbytes + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN
        return slots, off

    def _chunk_tensors(self, sub: _Subgroup) -> list[tuple[int, str, torch.Tensor]]:
        """The tensors that belong in the chunk now (proxies bound): masters, then each piece's large state."""
        out = []
        for pi, pc in enumerate(sub.pieces):
            if sub.has_master:
                out.append((pi, "master", pc.proxy.data))
            for key, v in sub.inner.state.get(pc.proxy, {}).items():
                if torch.is_tensor(v) and v.numel() > 1:
                    out.append((pi, key, v))
        return out

    def _init_chunk(self, sub: _Subgroup) -> None:
        """First chunk of a subgroup: masters from the params (and state some classes create up front)."""
        tensors = self._chunk_tensors(sub)
        for pi, pc in enumerate(sub.pieces):  # small state made by the constructor
            for key, v in sub.inner.state.get(pc.proxy, {}).items():
                if not (torch.is_tensor(v) and v.numel() > 1):
                    sub.small[pi][key] = v
        self._repack(sub, tensors)
        sub.inner.state.clear()
        if sub.tier is Tier.NVME:
            self._swap.write_back(sub.chunk, wait=True)

    def _repack(self, sub: _Subgroup, tensors: list[tuple[int, str, torch.Tensor]], home: Tier | None = None) -> None:
        """Give ``sub``'s chunk new bytes holding ``tensors`` (which may live in its old buffer), on its tier or
        ``home``; an NVMe chunk is DIRTY afterwards (the caller writes it back)."""
        slots, nbytes = self._layout(sub, tensors)

        def fill(mem: torch.Tensor) -> None:
            for slot, (_, _, t) in zip(slots, tensors):
                slot.view(mem).copy_(t)
        self._swap.resize(sub.chunk, nbytes, fill, home=home)
        sub.slots = slots

    def _bind(self, sub: _Subgroup, mem: torch.Tensor | None, device: torch.device) -> None:
        """Point the inner optimizer at this update's memory: proxies, grads, state."""
        by_piece: list[dict[str, Any]] = [dict() for _ in sub.pieces]
        sub.views = {}
        for slot in sub.slots:
            by_piece[slot.piece][slot.key] = sub.views[(slot.piece, slot.key)] = slot.view(mem)
        state = sub.inner.state
        state.clear()
        for pi, pc in enumerate(sub.pieces):
            entry = by_piece[pi]
            if sub.has_master:
                pc.proxy.data = entry.pop("master")
            else:
                pc.proxy.data = pc.weights()
            for key, v in sub.small[pi].items():
                entry[key] = v.to(device) if torch.is_tensor(v) and v.device != device else v
            if entry:
                state[pc.proxy] = entry

    @staticmethod
    def _scratch_bytes(sub: _Subgroup, device: torch.device) -> int:
        """fp32 grad scratch an update needs: for each piece whose grad is not already fp32 on ``device`` (asked
        without loading the grad: it may be on its way to the host)."""
        return sum(pc.numel * 4 for pc in sub.pieces if (m := pc.grad_meta()) is not None
                   and (m[0] != torch.float32 or m[1] != device))

    def _bind_grads(self, sub: _Subgroup, device: torch.device, region: torch.Tensor | None) -> Callable[[], None]:
        """Set each proxy's ``.grad``: the param's grad itself when it is fp32 on ``device`` (no copy), else an fp32
        copy in scratch memory (``region`` when the caller has one). Returns the scratch's release."""
        nbytes = self._scratch_bytes(sub, device)
        release = None
        if nbytes and (region is None or region.numel() < nbytes):
            region, release = self._scratch(nbytes, on_device=sub.site == "device")
        off = 0
        for pc in sub.pieces:
            g = pc.grad()
            if g is None:
                pc.proxy.grad = None
                continue
            if g.is_sparse:
                raise NotImplementedError("OffloadOptimizer: sparse gradients are not supported")
            if g.dtype == torch.float32 and g.device == device:
                pc.proxy.grad = g
            else:
                view = region[off:off + pc.numel * 4].view(torch.float32).view(pc.shape)
                view.copy_(g, non_blocking=True)
                pc.proxy.grad = view
                off += pc.numel * 4
        return release or (lambda: None)

    def _unbind(self, sub: _Subgroup, mem: torch.Tensor | None) -> bool:
        """After an update: new weights to the params, scalars back to ``small``. Returns True when the inner
        optimizer made state that is not in the chunk yet (its first step), so the chunk must be re-packed."""
        repack = False
        views = sub.views
        for pi, pc in enumerate(sub.pieces):
            if sub.has_master:
                pc.weights().copy_(pc.proxy.data, non_blocking=True)
            for key, v in sub.inner.state.get(pc.proxy, {}).items():
                view = views.get((pi, key))
                if view is not None:
                    if v is not view and v.data_ptr() != view.data_ptr():  # replaced, not updated in place
                        view.copy_(v)
                elif torch.is_tensor(v) and v.numel() > 1:
                    repack = True
                else:
                    sub.small[pi][key] = v
            pc.proxy.grad = None
        return repack

    def _chunk_bytes_as(self, sub: _Subgroup, params_on_device: bool, site: str) -> int:
        """The bytes ``sub``'s chunk will take once its params are on the device or not and it is updated on
        ``site``: its state as now, plus an fp32 master where the cost model's rule then needs one (low-precision
        params, or params not in the memory the update runs in), minus the one it has where not (apply_plan's
        budget check: a unit moving params and state to the device drops its master)."""
        align = lambda n: (n + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN  # noqa: E731
        state = sum(align(sl.nbytes) for sl in sub.slots if sl.key != "master")
        if not state:  # before its first step: the state that step will make
            state = sum(pc.numel * self._state_per_element() + SLOT_ALIGN * 4 for pc in sub.pieces)
        need = any(pc.param.dtype != torch.float32 or params_on_device != (site == "device") for pc in sub.pieces)
        return state + (sum(align(4 * pc.numel) for pc in sub.pieces) if need else 0)

    def _relocate(self, sub: _Subgroup, tier: Tier, site: str,
                  master_of: Callable[[_Piece], torch.Tensor]) -> None:
        """Between steps: put ``sub``'s chunk on ``tier`` and run its updates on ``site`` (the runtime's
        ``apply_plan``, once the unit's params are in their new place: that decides whether a master is needed).

        A master that becomes needed is ``master_of(piece)``, the fp32 weights, which is what the master would hold
        (fp32 params are copies of it; low-precision params always keep theirs), so dropping or adding one changes
        no value. The old copy is freed: its memory released, its store chunk deleted."""
        has_master = any(self._needs_master(pc, site) for pc in sub.pieces)
        if (sub.tier, sub.site, sub.has_master) == (tier, site, has_master):
            return
        # The inner optimizer of a resident chunk stays bound to it from step to step (see _update): unbind.
        sub.bound_mem = None
        sub.inner.state.clear()
        for pc in sub.pieces:
            pc.proxy.data = torch.empty(0)
        src_dev, dst_dev = sub.tier is Tier.DEVICE, tier is Tier.DEVICE
        c = sub.chunk
        # The old bytes in memory (read from the store first, drawn as a re-plan read) while the new chunk is made.
        with self._swap.use(c, write=True) if c.nbytes else contextlib.nullcontext(None) as mem:
            tensors, crossing = [], 0  # crossing: bytes copied between host and device memory
            for pi, pc in enumerate(sub.pieces):
                have = {s.key: s.view(mem) for s in sub.slots if s.piece == pi}
                old_master = have.pop("master", None)
                if has_master:
                    m = old_master if old_master is not None else master_of(pc)  # master_of: host memory
                    tensors.append((pi, "master", m))
                    crossing += m.numel() * m.element_size() if (src_dev and old_master is not None) != dst_dev else 0
                tensors += [(pi, k, v) for k, v in have.items()]
                crossing += sum(v.numel() * v.element_size() for v in have.values()) if src_dev != dst_dev else 0
            sub.tier, sub.site, sub.has_master = tier, site, has_master
            link = ("h2d" if dst_dev else "d2h") if crossing else None
            with self._span(link, f"replan state {sub.key}", crossing):
                self._repack(sub, tensors, home=tier)  # copies, then gives the old memory back
            if link:
                self._swap.count("state", link, crossing)
        if tier is Tier.NVME and c.nbytes:
            self._swap.write_back(c, wait=True)

    def _span(self, resource: str | None, name: str, nbytes: int):
        """A span on the runtime's timeline (none without a runtime or a resource)."""
        if resource is None or self._runtime is None:
            return contextlib.nullcontext()
        return self._runtime.timeline.span(resource, name, nbytes)

    # -- the step ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._runtime is not None and self._runtime.overlapped_step_pending():
            # The updates already ran during backward (offload.wrap's overlapped update): wait for them.
            self._runtime.finish_overlapped_step()
            return loss
        if self._runtime is not None and self._runtime.grads_consumed:
            raise RuntimeError("optimizer.step() again without a backward: the last step consumed the gradients kept "
                               "on NVMe (or on the device, by its overlapped device update), so this one cannot "
                               "apply them a second time as plain PyTorch would. Run loss.backward() before each "
                               "step (or zero_grad() for a step without gradients)")
        t0 = time.perf_counter()
        self._settle_last_step()  # the last step's writes, still landing, touch the chunks this one uses
        if not self.begin_step():
            self._clipped = False
            if self._runtime is not None:
                self._runtime.after_step()  # a skipped step still ends the iteration (its grads are consumed)
            return loss
        try:
            subs = self._update_order()
            if not subs:
                warnings.warn("optimizer.step(): no parameter has a gradient (no backward since the last "
                              "zero_grad()), so nothing was updated", RuntimeWarning, stacklevel=2)
            self._update_subgroups(subs)
        finally:
            self.end_step(t0)
        return loss

    def begin_step(self) -> bool:
        """Checks and hyperparameters before any update; False when the step is skipped (fp16 overflow)."""
        for p in self._frozen:
            if p.grad is not None:
                raise NotImplementedError("OffloadOptimizer: a parameter that did not require grad when the optimizer "
                                          "was built now has a gradient; rebuild the optimizer (or add_param_group) "
                                          "after unfreezing")
        if self._scale is not None and self.unscale_():  # inf/NaN in a grad: skip, lower the scale
            self._unscaled = False
            self._on_overflow()
            return False
        if self.config.max_grad_norm is not None and not self._clipped:
            self.clip_grad_norm_(self.config.max_grad_norm)  # the policy sees whether it clipped
        self._sync_hparams()
        return True

    def _update_order(self, unit: int | None = None) -> list[_Subgroup]:
        """Subgroups to update (those with grads); with the runtime, unit by unit, so that each unit's weights
        are staged once; ``unit`` restricts to one unit."""
        subs = self._subgroups
        if self._runtime is not None:
            subs = sorted(subs, key=lambda s: (s.unit, s.group))
            if unit is not None:
                subs = [s for s in subs if s.unit == unit]
        return [s for s in subs if s.has_grads()]

    def _update_subgroups(self, subs: list[_Subgroup], *, late_writes: bool = False) -> None:
        """Update ``subs``. ``late_writes`` (the overlapped update, one unit per call): return once the NVMe
        chunks' write-backs are issued; :meth:`finish_unit_io` waits for them at the end of the step."""
        for sub in subs:
            if sub.tier is not Tier.NVME:
                with self._swap.use(sub.chunk, write=True) as mem:
                    self._update(sub, mem)
        stored = [s for s in subs if s.tier is Tier.NVME]
        if stored:
            self._step_streamed(stored, late_writes=late_writes)

    def weights_in_place(self, unit: int) -> bool:
        """Whether an update of the runtime's ``unit`` changes its params' weights in place (a subgroup without an
        fp32 master): the weights must then be in memory before the update, not only written after it."""
        return not all(s.has_master for s in self._subgroups_of(unit))

    def _subgroups_of(self, unit: int) -> list[_Subgroup]:
        """The subgroups of one of the runtime's units, grads or not."""
        return [s for s in self._subgroups if s.unit == unit]

    def _extra_bytes(self, sub: _Subgroup) -> int:
        """Working memory a streamed chunk's host buffer brings along: the fp32 grad scratch of a CPU update."""
        return self._scratch_bytes(sub, torch.device("cpu")) if sub.site == "cpu" else 0

    def _buffers_held(self) -> int:
        """How many NVMe chunks hold a host buffer for the streamed step now (forgetting those given back)."""
        for i in [i for i, sub in self._held.items() if sub.chunk.state in (ChunkState.STORED, ChunkState.EMPTY)]:
            del self._held[i]
        return len(self._held)

    def _prefetch(self, sub: _Subgroup) -> bool:
        """Start reading ``sub``'s stored chunk into a host buffer; False when the host budget has no room now
        (True when the chunk needs no read: it has no bytes yet, or its buffer already)."""
        c = sub.chunk
        if not c.nbytes:
            return True
        if not self._swap.prefetch(c, extra=self._extra_bytes(sub)):
            return False
        self._held[sub.index] = sub
        return True

    def _give_back_read_ahead(self, keep: _Subgroup | None = None) -> None:
        """Give back the buffers of chunks read ahead and not updated yet (the store has their bytes)."""
        for sub in list(self._held.values()):
            if sub is not keep and sub.chunk.state in (ChunkState.LOADING, ChunkState.READY):
                self._swap.evict(sub.chunk)

    def update_unit(self, unit: int) -> None:
        """The overlapped update of one of the runtime's units (its grads are complete): returns once the NVMe
        chunks' write-backs are issued; :meth:`finish_unit_io` waits for them at the end of the step."""
        self._update_subgroups(self._update_order(unit), late_writes=True)

    def reload_masters(self, unit: int, weights_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Set the fp32 masters of ``unit``'s subgroups to its params' weights, ``weights_of(param)`` (after they
        were loaded from elsewhere: a pretrained checkpoint, ``model.load_state_dict``): a plain optimizer steps
        the params themselves, so its next step starts from those. The rest of the state is kept, as a plain
        optimizer keeps its moments when the model's weights are loaded."""
        for sub in self._subgroups_of(unit):
            masters = {s.piece: s for s in sub.slots if s.key == "master"}
            if not (sub.has_master and masters):
                continue
            # Before the first step the chunk holds masters only: every byte is rewritten, none need reading.
            only_masters = len(masters) == len(sub.slots) == len(sub.pieces)
            with self._swap.use(sub.chunk, write=True, load=not only_masters) as mem:
                for pi, pc in enumerate(sub.pieces):
                    m = masters[pi].view(mem)
                    m.copy_(pc.of(weights_of(pc.param)).reshape(m.shape))
            if sub.tier is Tier.NVME:
                self._swap.write_back(sub.chunk, wait=True)

    def unit_placements(self, unit: int) -> list[tuple[Tier, str]]:
        """(state tier, update site) of each subgroup of one of the runtime's units."""
        return [(s.tier, s.site) for s in self._subgroups_of(unit)]

    def device_state_bytes(self, placement: Callable[[int], Any]) -> int:
        """The bytes of optimizer state on the device under ``placement(unit)`` (a ``UnitPlacement``: params,
        state, update), at the size each chunk will have there (a master added or dropped by the cost model's
        rule, as :meth:`relocate_unit` applies it)."""
        return sum(self._chunk_bytes_as(s, placement(s.unit).params is Tier.DEVICE, placement(s.unit).update)
                   for s in self._subgroups if placement(s.unit).state is Tier.DEVICE)

    def relocate_unit(self, unit: int, tier: Tier, site: str,
                      master_of: Callable[[_Piece], torch.Tensor]) -> None:
        """Between steps: every subgroup of ``unit`` to ``tier``, updated on ``site`` (see :meth:`_relocate`)."""
        for sub in self._subgroups_of(unit):
            self._relocate(sub, tier, site, master_of)

    def state_bytes_estimate(self, unit: int) -> tuple[list[int], Tier]:
        """Bytes the state chunk of each of ``unit``'s subgroups will take once every piece has state (per-element
        state the class creates, measured on a small parameter, plus fp32 masters), and their tier; what the
        runtime counts before the first step has made any."""
        per = self._state_per_element()
        subs = self._subgroups_of(unit)
        return ([s.numel * (per + (4 if s.has_master else 0)) + len(s.pieces) * SLOT_ALIGN * 4 for s in subs],
                subs[0].tier if subs else Tier.HOST)

    def _state_per_element(self) -> int:
        """Bytes of state per parameter element (:meth:`_probe_state_bytes`, measured once)."""
        if self._per_param_state is None:
            self._per_param_state = self._probe_state_bytes()
        return self._per_param_state

    @property
    def runtime(self):
        """The :class:`~offload.runtime.OffloadRuntime` of offload.wrap this optimizer belongs to, or ``None``."""
        return self._runtime

    @property
    def host_pool(self) -> HostPool:
        """The pool this optimizer's host buffers come from (shared with the runtime under offload.wrap)."""
        return self._swap.pool

    @property
    def stats(self) -> dict:
        """Counters since construction: steps, seconds updating and waiting, and the state's bytes moved per link
        (``read_bytes`` and ``write_bytes`` from and to the store, ``h2d_bytes``, ``d2h_bytes``)."""
        moved = self._swap.moved("state")
        return {**self._stats, "read_bytes": moved["disk_read"], "write_bytes": moved["disk_write"],
                "h2d_bytes": moved["h2d"], "d2h_bytes": moved["d2h"]}

    def prefetch_state(self, units: list[int]) -> int:
        """Start reading the stored NVMe chunks of ``units``' subgroups, in the order their updates will come,
        into host buffers, as far as ``config.buffers`` allows (keeping one for the update itself; chunks read
        ahead and write-backs in flight count) and as far as the host budget gives buffers without waiting. The
        overlapped update calls it so that a unit's state is on its way before its grads land, instead of being
        read after them (Fuyou's and ZeRO-Infinity's read-ahead). Returns how many reads it started."""
        started = 0
        for sub in (s for u in units for s in self._subgroups_of(u)):
            if sub.tier is not Tier.NVME or sub.chunk.state is not ChunkState.STORED:
                continue
            if self._buffers_held() + 1 >= self.config.buffers or not self._prefetch(sub):
                break
            started += 1
        return started

    def finish_unit_io(self) -> None:
        """End of an overlapped step: wait for the write-backs still in flight and give back unused read-ahead;
        raise the first write failure (its chunk stays in memory, DIRTY, and is written at its next update)."""
        self._give_back_read_ahead()
        failed = []
        for sub in list(self._held.values()):
            try:
                self._swap.settle(sub.chunk)
            except Exception as e:  # noqa: PERF203 - every chunk is settled before the first error is raised
                failed.append(e)
        self._buffers_held()
        if failed:
            raise failed[0]

    def end_step(self, t0: float) -> None:
        self.speculation.step_ended()
        self._unscaled = False
        self._clipped = False
        if self._runtime is not None:
            self._runtime.after_step()
        if self._scale is not None:
            self._on_good_step()
        self._stats["steps"] += 1
        self._stats["step_s"] += time.perf_counter() - t0

    def _sync_hparams(self) -> None:
        """LR schedulers (and users) change the outer groups; carry every hyperparameter to the inner ones."""
        for sub in self._subgroups:
            outer = self.param_groups[sub.group]
            inner = sub.inner.param_groups[0]
            for k, v in outer.items():
                if k not in ("params", "fused", "foreach"):
                    inner[k] = v

    def _update(self, sub: _Subgroup, host_mem: torch.Tensor | None, region: torch.Tensor | None = None) -> None:
        """Run the inner optimizer on one subgroup whose chunk is in memory: ``host_mem`` (host-resident or just
        read from the store) or the device chunk of a device-tier subgroup. ``region``: grad scratch to use."""
        t0 = time.perf_counter()
        if self._spec is not None:
            self._spec.save(sub, self._swap)  # before anything of the subgroup changes (once: preserve_unit)
            self._spec.updated.add(sub.index)
        device = self.device if sub.site == "device" else torch.device("cpu")
        mem, release_dev = host_mem, None
        if sub.site == "device" and sub.tier is not Tier.DEVICE and sub.chunk_bytes:
            # Deep Optimizer States: the state goes to the device, is updated there, and comes back.
            mem, release_dev = self._scratch(sub.chunk_bytes, on_device=True)
            mem.copy_(host_mem, non_blocking=True)
            self._swap.count("state", "h2d", sub.chunk_bytes)
        if sub.home is not None:
            sub.home.before_update(sub)
        # A chunk that stays in memory and is updated where it lives keeps its binding from step to step:
        # rebuilding the state dicts each step cost more than the update of small subgroups.
        resident = sub.tier is not Tier.NVME and release_dev is None and mem is not None and sub.slots
        if resident and sub.bound_mem is mem:
            for pc in sub.pieces:
                if not sub.has_master:
                    pc.proxy.data = pc.weights()
        else:
            self._bind(sub, mem, device)
            sub.bound_mem = mem if resident else None
        release_grads = self._bind_grads(sub, device, region)
        cuda = self.device.type == "cuda"
        repack = False
        try:
            if cuda and device.type == "cpu":
                # Grads of CUDA params were copied into host scratch with non_blocking copies: a CPU update must
                # not read them before they have landed.
                torch.cuda.current_stream(self.device).synchronize()
            t_inner = time.perf_counter()
            sub.inner.step()
            if sub.site == "cpu":  # the CPU update proper, without the waits and copies around it (re-planning)
                self._stats["cpu_update_s"] += time.perf_counter() - t_inner
            repack = self._unbind(sub, mem)
            if sub.home is not None:
                sub.home.after_update(sub)
            if repack:
                # First update of these pieces: pack the state the optimizer just made into a new chunk.
                self._repack(sub, self._chunk_tensors(sub))
            elif release_dev is not None:
                host_mem.copy_(mem, non_blocking=True)
                self._swap.count("state", "d2h", sub.chunk_bytes)
            if cuda and (sub.tier is not Tier.DEVICE or sub.home is not None):
                # Copies queued on the current stream read or write host memory that is handed on next (the
                # state chunk back from the device; new weights from the host masters to the params; with the
                # runtime, its host grads and the new weights of host params): the store's threads, the runtime's
                # copy threads or the next read reuse that memory, so the copies must have finished first.
                torch.cuda.current_stream(self.device).synchronize()
        finally:
            release_grads()
            if release_dev is not None:
                release_dev()
            if sub.bound_mem is None or repack:  # not resident, or re-packed into a new buffer
                sub.bound_mem = None
                sub.inner.state.clear()
                for pc in sub.pieces:
                    pc.proxy.data = torch.empty(0)
        self._stats["update_s"] += time.perf_counter() - t0

    def _step_streamed(self, subs: list[_Subgroup], *, late_writes: bool = False) -> None:
        """Update NVMe-tier subgroups as a pipeline: read ahead while one updates and earlier ones write back.

        At most ``config.buffers`` chunks hold host buffers at once (reads ahead + the one updating + writes in
        flight), all from the host pool, whose budget caps them again: a read ahead that does not fit waits.

        Steps alternate direction, and the last ``buffers // 2`` chunks of a step stay in memory instead of being
        written back: the next step starts with them, so it neither writes nor reads them, and begins updating
        at once instead of waiting for its first read. (With offload.wrap the order is the units' and every
        chunk is written back.) Chunks :meth:`prefetch_state` read ahead are taken as they are. ``late_writes``:
        return once the write-backs are issued (they count against the buffers until done).
        """
        swap, limit = self._swap, self.config.buffers
        keep = 0 if self._runtime else limit // 2  # the rest of the buffers read ahead meanwhile
        if not self._runtime and self._stats["steps"] % 2:
            subs = subs[::-1]
        nxt = 0  # the next subgroup whose read this call has not started

        def read_ahead(spare: int) -> None:
            """Start reads while the buffer count (leaving ``spare`` free) and the pool's budget allow."""
            nonlocal nxt
            while nxt < len(subs) and self._buffers_held() + spare < limit and self._prefetch(subs[nxt]):
                nxt += 1

        def writing(other_than: int | None = None) -> list[Chunk]:
            """Chunks being written; ``other_than``: only those of other units than this one."""
            return [s.chunk for s in self._held.values() if s.chunk.state is ChunkState.WRITING
                    and (other_than is None or s.unit != other_than)]

        written: list[_Subgroup] = []
        try:
            for pos, sub in enumerate(subs):
                c = sub.chunk
                if nxt <= pos:  # its read has not started: start it, making room first if need be
                    nxt = pos
                    read_ahead(0)
                    while nxt == pos and self._buffers_held() >= limit and writing():
                        swap.wait_any(writing())
                        read_ahead(0)
                    if nxt == pos:
                        # No budget now: chunks read ahead for later units may hold what this one needs, and only
                        # this thread frees them, so give them back; use() below then waits for the pool.
                        self._give_back_read_ahead(keep=sub)
                        nxt = pos + 1
                mine = 0 if sub.index in self._held else 1  # its buffer, when it has none yet
                read_ahead(mine)
                t0 = time.perf_counter()
                # While its read lands, a write-back that finishes frees a buffer: read further ahead at once, or
                # the disk idles through the update that follows.
                while c.state is ChunkState.LOADING and nxt < len(subs) and (w := writing()):
                    swap.wait_any([c, w[0]])
                    read_ahead(mine)
                with swap.use(c, write=True, extra=self._extra_bytes(sub)) if c.nbytes or c.state is not \
                        ChunkState.EMPTY else contextlib.nullcontext(None) as mem:
                    self._stats["wait_read_s"] += time.perf_counter() - t0
                    if mem is not None:
                        self._held[sub.index] = sub
                    self._update(sub, mem, region=swap.extra(c))
                if not c.nbytes:
                    swap.drop(c)  # no state, nothing to store
                    continue
                self._held[sub.index] = sub
                if pos >= len(subs) - keep:
                    continue  # stays in memory: the next step, going the other way, starts with it
                # One unit's state writes in flight at a time (with offload.wrap; else one chunk's): the disk
                # serves them one after another anyway (each is already split into blocks across the store's
                # threads), and the store's room for versions in flight is then one unit's state, whatever the
                # disk's speed (scheduler/buffers.py, write_room). A unit's own subgroups do not wait for each
                # other: the update thread goes on to the unit's next one.
                while w := writing(other_than=sub.unit):
                    swap.wait_any(w)
                swap.write_back(c, on_landed=self.state_written if late_writes else None)
                written.append(sub)
        except BaseException:
            # A read that failed (a checksum mismatch, a full disk): give the read-ahead buffers back before
            # raising; the subgroups not yet updated keep their stored state.
            self._give_back_read_ahead()
            raise
        if late_writes:
            return
        # A failed write-back keeps its chunk in memory: every subgroup was updated before the first error is
        # raised, so that no subgroup is left a step behind the others.
        failed = []
        for sub in written:
            try:
                swap.settle(sub.chunk)
            except Exception as e:  # noqa: PERF203
                failed.append(e)
        self._buffers_held()
        if failed:
            raise failed[0]

    # -- the speculative step ---------------------------------------------------------------------------------------
    def step_needs_validation(self) -> bool:
        """Whether the next step needs every grad before it may update: it clips (the config, or a loop that
        called ``clip_grad_norm_`` before), or scales the loss; or it is the first, and speculating on it is how
        a loop that clips itself is found out without refusing its call."""
        return (self.config.max_grad_norm is not None or self._scale is not None or self._loop_reads_norm
                or (self.config.speculate and self._stats["steps"] == 0 and self._stats["skipped_steps"] == 0))

    def can_speculate(self) -> bool:
        """Whether the next step may update during backward although it needs every grad first: the policy
        wants it, and every trainable param's grad is kept by the runtime (so its norm is seen unit by unit)."""
        if self._runtime is None or not self.step_needs_validation():
            return False
        if not self.speculation.wants():
            self._stats["spec_waited_timing" if self.speculation.why == "timing" else "spec_declined"] += 1
            return False
        if not all(self._runtime.home_of(p) is not None for g in self.param_groups for p in g["params"]
                   if p.requires_grad):
            return False
        if not self._runtime.store_room_to_speculate():
            self._stats["spec_declined"] += 1
            return False
        return True

    def begin_speculation(self, host_limit_bytes: int | None = None) -> None:
        """Start a speculative step (the runtime, at the last backward of a step): each unit is updated with its
        unclipped (unscaled, under loss scaling) grads as backward completes it, inside a swap transaction that
        keeps what each update overwrites; :meth:`end_speculation` commits it or undoes it exactly."""
        for p in self._frozen:
            if p.grad is not None:
                raise NotImplementedError("OffloadOptimizer: a parameter that did not require grad when the optimizer "
                                          "was built now has a gradient; rebuild the optimizer (or add_param_group) "
                                          "after unfreezing")
        self._sync_hparams()
        self._swap.begin(host_limit_bytes)
        self._spec = _Speculation()
        self._stats["speculative_steps"] += 1

    @torch.no_grad()
    def speculate_unit(self, unit: int) -> bool:
        """Before a unit's speculative update, on the update thread: check its grads for inf/NaN (loss scaling;
        an overflow stops the speculative updates: the step will be skipped), unscale them in place, and record
        each grad's norm as ``clip_grad_norm_`` computes it. False: do not update the unit now."""
        spec = self._spec
        if spec.overflow:
            return False
        params = list(dict.fromkeys(pc.param for s in self._subgroups_of(unit) for pc in s.pieces))
        have, grads = self._grad_pairs(params)
        if self._scale is not None and not self._unscaled:
            if not all(bool(torch.isfinite(g).all()) for g in grads):
                spec.overflow = True
                return False
            inv = 1.0 / self._scale
            for g in grads:
                g.mul_(inv)
        if grads:
            spec.norms.update(zip(have, torch._foreach_norm(grads, 2.0)))
        return not spec.stopped

    def preserve_unit(self, unit: int) -> None:
        """Keep the pre-update bytes of every subgroup of ``unit`` with grads, before any of them changes (raises
        :class:`~storage.TierFullError` when the host has no room for a copy: then nothing changed). A stored
        chunk whose bytes the store has is kept as the store's version, which takes no memory: held when its
        update takes the chunk (``_update``), so that the unit's first subgroup need not wait for the others'
        reads."""
        for sub in self._update_order(unit):
            if sub.tier is Tier.NVME and sub.chunk.state is not ChunkState.DIRTY:
                continue
            self._spec.save(sub, self._swap)

    def abandon_speculation(self, *, accumulating: bool = False) -> None:
        """Put back what the speculative step changed (an update failed, or the loop accumulates one more
        micro-batch before the step): the step did not happen."""
        if self._spec is not None:
            self._undo(self._spec)
            if accumulating:
                self._stats["speculative_steps"] -= 1
                self._stats["spec_undone_for_accumulation"] += 1

    def speculation_stopped(self, error: BaseException) -> None:
        """A pre-image did not fit in memory: the units not updated yet wait for the end of backward."""
        self._spec.stopped = True
        self._spec.why_stopped = str(error)
        self._stats["spec_stopped"] += 1

    def speculation_commits(self) -> bool:
        """Whether the speculative step, its updates done, commits as it is: no inf/NaN, no grad clipped, every
        subgroup with grads updated. Validating it then changes no chunk, so its writes need not have landed."""
        spec = self._spec
        if spec is None or spec.overflow or not self._spec_stands(spec)[0]:
            return False
        return all(s.index in spec.updated for s in self._update_order())

    def _spec_stands(self, spec: "_Speculation") -> tuple[bool, torch.Tensor | None, float | None]:
        """(whether the clip leaves every grad as it is, the grads' total norm, the step's max_norm); the norm is
        ``None`` for a step that does not clip."""
        max_norm = spec.max_norm if spec.max_norm is not None else self.config.max_grad_norm
        total = None if max_norm is None else self._spec_total_norm(spec)
        return total is None or _unclipped(total, max_norm), total, max_norm

    def end_speculation(self) -> str:
        """Validate the speculative step once backward ended and its updates finished: ``"commit"`` (no grad
        clipped, none inf/NaN: the updates stand, as plain ``clip_grad_norm_`` then ``step`` would have made
        them, and the subgroups not updated yet are updated now), ``"rollback"`` (the clip scales the grads:
        everything the updates changed is put back exactly and the step is redone with clipped grads) or
        ``"overflow"`` (put back, and the step is skipped as dynamic loss scaling does)."""
        spec, t0 = self._spec, time.perf_counter()
        if spec.overflow:
            self._undo(spec)
            self._stats["spec_overflows"] += 1
            self.speculation.observe(clipped=True)
            self._stats["rollback_s"] += time.perf_counter() - t0
            self._skip_step()
            return "overflow"
        if self._scale is not None:
            self._unscaled = True
        stands, total, max_norm = self._spec_stands(spec)
        if stands:
            self._spec = None
            self._swap.commit()
            self._stats["spec_commits"] += 1
            self.speculation.observe(clipped=False)
            rest = [s for s in self._update_order() if s.index not in spec.updated]
            if rest:
                self._update_subgroups(rest)
            return "commit"
        self._undo(spec)
        self._stats["spec_rollbacks"] += 1
        self.speculation.observe(clipped=True)
        self.speculation.step_ended(counts=False)  # a redo: neither kind's time
        self._clip_with(total, max_norm)
        self._update_subgroups(self._update_order())
        self._stats["rollback_s"] += time.perf_counter() - t0
        return "rollback"

    def _clip_speculative(self, max_norm: float, norm_type: float, params: list[torch.Tensor] | None,
                          error_if_nonfinite: bool) -> torch.Tensor:
        """The loop's ``clip_grad_norm_`` during a speculative step."""
        every = {id(p) for g in self.param_groups for p in g["params"]}
        if float(norm_type) != 2.0 or (params is not None and not {id(p) for p in params} >= every):
            raise RuntimeError("clip_grad_norm_ during a speculative step: only the 2-norm over every parameter of the "
                               "optimizer is known from the update (what clip_grad_norm_(model.parameters(), x) asks). "
                               "Set OffloadConfig(speculate=False) to clip otherwise")
        self._runtime.wait_updates()
        spec = self._spec
        if spec.overflow:
            return torch.tensor(float("inf"))  # as unscale_ answers an overflow: the step will be skipped
        total = self._spec_total_norm(spec)
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise RuntimeError("The total norm of order 2.0 for gradients from `parameters` is non-finite, so it "
                               "cannot be clipped. To disable this error and scale the gradients by the non-finite "
                               "norm anyway, set `error_if_nonfinite=False`")
        if not math.isinf(max_norm):
            spec.max_norm = float(max_norm)  # the step's one clip: the loop's replaces the config's
        return total

    def _spec_total_norm(self, spec: "_Speculation") -> torch.Tensor:
        """The global 2-norm of the grads from the norms recorded unit by unit, computed as clip_grad_norm_ does
        (each grad's norm, then the norm of those in parameter order)."""
        grads_of = {p for g in self.param_groups for p in g["params"] if self._has_grad(p)}
        missing, grads = self._grad_pairs([p for p in grads_of if p not in spec.norms])  # not seen by a unit
        if missing:
            spec.norms.update(zip(missing, torch._foreach_norm(grads, 2.0)))
        norms = [spec.norms[p] for g in self.param_groups for p in g["params"] if p in grads_of]
        # Grads kept on the device and on the host: their norms meet on the first grad's device, as in torch's.
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0) if norms \
            else torch.tensor(0.0)
        self.last_grad_norm = total
        return total

    def _undo(self, spec: "_Speculation") -> None:
        """Put back every byte the speculative updates changed, and the subgroups' bookkeeping."""
        self._spec = None
        self._swap.abort()
        for sub, (slots, small) in ((self._subgroups[i], v) for i, v in spec.saved.items()):
            sub.slots, sub.small = slots, small
            sub.bound_mem, sub.views = None, {}
            sub.inner.state.clear()
            for pc in sub.pieces:
                pc.proxy.data = torch.empty(0)

    def _grad_pairs(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The params of ``params`` that have a grad, and their grads (wherever they live), in that order."""
        have, grads = [], []
        for p in params:
            owner = self._runtime.home_of(p) if self._runtime is not None else None
            g = p.grad if owner is None else owner[1].grad(p)
            if g is not None:
                have.append(p)
                grads.append(g)
        return have, grads

    def state_bytes_on(self, tier: Tier) -> int:
        """Bytes of the state chunks placed on ``tier``."""
        return sum(s.chunk_bytes for s in self._subgroups if s.tier is tier)

    def _has_grad(self, p: torch.Tensor) -> bool:
        owner = self._runtime.home_of(p) if self._runtime is not None else None
        return p.grad is not None if owner is None else owner[1].has_grad(p)

    @torch.no_grad()
    def _clip_with(self, total: torch.Tensor, max_norm: float) -> None:
        """Scale every grad as ``clip_grad_norm_`` does, given the total norm it would compute."""
        holders = []
        for grad in self._grads():
            h = torch.empty(0, dtype=grad.dtype, device=grad.device)
            h.data = grad
            h.grad = grad
            holders.append(h)
        torch.nn.utils.clip_grads_with_norm_(holders, max_norm, total)

    def _skip_step(self) -> None:
        """A step that does not update (an inf/NaN grad under loss scaling): lower the scale; the grads are
        consumed as by a step."""
        self._unscaled = False
        self._clipped = False
        self._on_overflow()
        if self._runtime is not None:
            self._runtime.after_step()

    # -- loss scaling -----------------------------------------------------------------------------------------------
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale`` for fp16 training with ``OffloadConfig(loss_scale=...)``; call ``.backward()`` on it.
        The step unscales the grads, and skips itself (lowering the scale) when any grad is inf or NaN."""
        if self._scale is None:
            raise ValueError("scale_loss: loss scaling is off; set OffloadConfig(loss_scale='dynamic') for fp16")
        return loss * self._scale

    @property
    def loss_scale(self) -> float | None:
        return self._scale

    def _grads(self, params: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Every parameter's full gradient (of ``params`` only, when given), in param-group order, wherever it
        lives."""
        only = None if params is None else {id(p) for p in params}
        out = []
        for g in self.param_groups:
            for p in g["params"]:
                if only is not None and id(p) not in only:
                    continue
                owner = self._runtime.home_of(p) if self._runtime is not None else None
                home = None if owner is None else owner[1]
                grad = p.grad if home is None else home.grad(p)
                if grad is not None:
                    out.append(grad)
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._clipped = False
        if self._runtime is not None:
            self._runtime.zero_grad()
        super().zero_grad(set_to_none)

    def _found_inf(self) -> bool:
        grads = self._grads()
        if not grads:
            return False
        flags = [torch.isfinite(g).all() for g in grads]
        return not bool(torch.stack([f.to("cpu") for f in flags]).all())

    def _on_overflow(self) -> None:
        self._stats["skipped_steps"] += 1
        self._good_steps = 0
        if self.config.loss_scale == "dynamic":
            self._scale = max(self._scale / 2.0, 1.0)

    def _on_good_step(self) -> None:
        self._good_steps += 1
        if self.config.loss_scale == "dynamic" and self._good_steps % 2000 == 0:
            self._scale *= 2.0

    @torch.no_grad()
    def unscale_(self) -> bool:
        """Divide the grads by the loss scale now (before clipping, say). Returns True when a grad is inf/NaN, in
        which case the next ``step()`` is skipped."""
        if self._scale is None or self._unscaled:
            return False
        if self._found_inf():
            return True
        inv = 1.0 / self._scale
        for g in self._grads():
            g.mul_(inv)
        self._unscaled = True
        return False

    def owns_grad_of(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s grad is kept by offload.wrap's runtime for this optimizer (not in ``param.grad``)."""
        return self._runtime is not None and self._runtime.home_of(param) is not None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, *, params: list[torch.Tensor] | None = None,
                        error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over every trainable parameter's grad (``params``' only, when given),
        wherever it lives: the same global norm and the same arithmetic, so results are bit-identical. Unscales
        first under loss scaling. Under offload.wrap, ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)``
        comes here (:mod:`offload.clipping`). A step clips once: with ``OffloadConfig(max_grad_norm=...)`` the
        step does not clip again after this.

        During a speculative step (the updates ran during backward) it waits for them, returns the norm they
        recorded, and the step then validates against this ``max_norm``: committed when it does not clip,
        otherwise undone and redone with the grads clipped."""
        self._loop_reads_norm = True  # later steps speculate, so that the loop's call can be answered
        if self._spec is not None:
            return self._clip_speculative(max_norm, norm_type, params, error_if_nonfinite)
        if self._runtime is not None and self._runtime.overlap_started():
            if math.isinf(max_norm):  # a norm-only call (the HF Trainer's, to log it, when max_grad_norm=0)
                raise RuntimeError("clip_grad_norm_(max_norm=inf), the grad norm alone: the overlapped update "
                                   "already consumed the grads during backward, so their norm is not known. Set "
                                   "OffloadConfig(overlap_update=False) (the HF Trainer asks for the norm at every "
                                   "step, to log it)")
            raise RuntimeError("clip_grad_norm_: the overlapped update already started during backward, so clipping "
                               "now would come too late. Set OffloadConfig(max_grad_norm=...) instead: the runtime "
                               "then clips before updating (and updates after backward); or, when the loop clips "
                               "itself (the HF Trainer's max_grad_norm, 1.0 by default), "
                               "OffloadConfig(overlap_update=False)")
        if self._scale is not None and self.unscale_():
            return torch.tensor(float("inf"))
        holders = []
        for grad in self._grads(params):  # stand-ins holding each grad, so torch's own function does the arithmetic
            h = torch.empty(0, dtype=grad.dtype, device=grad.device)
            h.data = grad
            h.grad = grad
            holders.append(h)
        # The step's own clip is replaced only by a clip over every param: clipping a few leaves it to the step. A
        # norm-only call (max_norm=inf; the HF Trainer's with max_grad_norm=0) clips nothing, so it replaces nothing.
        every = params is None or {id(p) for p in params} >= {id(p) for g in self.param_groups for p in g["params"]}
        if not math.isinf(max_norm):
            self._clipped = self._clipped or every
        total = clipping.torch_clip_grad_norm_(holders, max_norm, norm_type, error_if_nonfinite, foreach)
        if every and not math.isinf(max_norm) and float(norm_type) == 2.0:
            self.speculation.observe(clipped=not _unclipped(total, max_norm))  # what speculating would have met
        return total

    # -- optimizer protocol -----------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "_subgroups"):  # called by Optimizer.__init__
            return super().add_param_group(param_group)
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if torch.is_tensor(params) else list(params)
        filled, _ = fill_groups(self.optimizer_class, [group], {k: v for k, v in self.defaults.items()
                                                                      if k not in group})
        super().add_param_group(filled[0])
        self._param_shapes.update({p: self._shape_of(p) for p in filled[0]["params"]})
        self._build_subgroups(len(self.param_groups) - 1)

    def state_dict(self) -> dict:
        """The state dict a plain optimizer of the same class would have (loadable by it), built one subgroup at
        a time. For low-precision params each entry also carries ``master``, the fp32 weights."""
        self._settle_last_step()
        sd = super().state_dict()  # param_groups with indices; our own self.state is empty
        state: dict[int, dict] = {}
        for sub in self._subgroups:
            with self._resident(sub) as mem:
                for slot in sub.slots:
                    self._merge(state, sub.pieces[slot.piece], slot.key, slot.view(mem))
                for pi, small in enumerate(sub.small):
                    pc = sub.pieces[pi]
                    for key, v in small.items():
                        entry = state.setdefault(pc.index, {})
                        if key not in entry:
                            entry[key] = v.detach().to("cpu").clone() if torch.is_tensor(v) else v
        sd["state"] = {k: state[k] for k in sorted(state)}
        return sd

    @staticmethod
    def _merge(state: dict, pc: _Piece, key: str, value: torch.Tensor) -> None:
        entry = state.setdefault(pc.index, {})
        if pc.whole:
            entry[key] = value.detach().to("cpu").clone()
            return
        full = entry.get(key)
        if full is None:
            full = entry[key] = torch.empty(pc.param_shape, dtype=value.dtype)
        full.view(-1)[pc.start:pc.start + pc.numel].copy_(value.reshape(-1))

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from this class or from the plain optimizer class (same model, same param order)."""
        self._settle_last_step()
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"load_state_dict: the state dict has {len(groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}: it was saved for a different model or optimizer setup")
        for gi, (g, mine) in enumerate(zip(groups, self.param_groups)):
            if len(g["params"]) != len(mine["params"]):
                raise ValueError(f"load_state_dict: param group {gi} has {len(g['params'])} params in the state dict "
                                 f"and {len(mine['params'])} here: it was saved for a different model")
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in groups for i in g["params"]]
        remap = {sid: k for k, sid in enumerate(saved_ids)}
        state = {}
        for sid, entry in state_dict["state"].items():
            k = remap.get(int(sid))
            if k is None:
                raise ValueError(f"load_state_dict: state for parameter id {sid}, which no param group lists")
            p = params[k]
            for key, v in entry.items():
                shape = self._param_shapes.get(p, tuple(p.shape))
                if (issubclass(self.optimizer_class, ELEMENTWISE) and torch.is_tensor(v) and v.numel() > 1
                        and tuple(v.shape) != shape):
                    raise ValueError(f"load_state_dict: parameter {k} (shape {list(shape)}) has state {key!r} of "
                                     f"shape {list(v.shape)}: the state dict belongs to a different model")
                if (torch.is_tensor(v) and v.numel() > 1 and key != "step" and p.is_floating_point()
                        and not v.is_floating_point()):
                    raise ValueError(f"load_state_dict: parameter {k} ({p.dtype}) has state {key!r} of dtype "
                                     f"{v.dtype}: expected a floating dtype; the state dict was edited or belongs to "
                                     f"another optimizer")
            state[k] = entry
        for g, mine in zip(groups, self.param_groups):
            for key, v in g.items():
                if key != "params":
                    mine[key] = v
        self._load_state(state)

    def _load_state(self, state: dict[int, dict]) -> None:
        """Put per-parameter state (keys: global param index) into the subgroups, one subgroup at a time."""
        def fetch(span: PieceSpan, master: bool) -> dict:
            entry = state.get(span.index, {})
            if span.whole:
                return entry
            return {k: v.reshape(-1)[span.start:span.stop] if torch.is_tensor(v) and v.numel() > 1 else v
                    for k, v in entry.items()}
        self.load_state_stream(fetch)

    def load_state_stream(self, fetch: Callable[[PieceSpan, bool], dict[str, Any]]) -> None:
        """Load the state one subgroup at a time (a checkpoint reads only what that subgroup needs).

        ``fetch(span, master)`` returns the state of one piece as ``{key: value}``: tensors covering the span (in
        their own shape when the span is the whole parameter, else flat), scalars and non-tensors as they are.
        ``master`` says the subgroup keeps fp32 master weights: include ``"master"`` when known, else they are
        taken from the current weights (load those first). A piece with no state returns ``{}``."""
        self._settle_last_step()
        for sub in self._subgroups:
            tensors, small = [], [dict() for _ in sub.pieces]
            for pi, pc in enumerate(sub.pieces):
                entry = fetch(pc.span, sub.has_master)
                if sub.has_master:
                    m = entry.get("master")
                    tensors.append((pi, "master", m.reshape(pc.shape).float() if m is not None
                                    else self._initial_weights(pc)))
                for key, v in entry.items():
                    if key == "master":
                        continue
                    if torch.is_tensor(v) and v.numel() > 1:
                        if not torch.is_floating_point(v) or key == "step":
                            val = v
                        else:  # as torch's load_state_dict does: floating state follows the param's dtype
                            val = v.to(torch.float32 if sub.has_master else pc.param.dtype)
                        tensors.append((pi, key, val if pc.whole else val.reshape(pc.shape)))
                    else:
                        small[pi][key] = v.clone() if torch.is_tensor(v) else v
            sub.small = small
            sub.bound_mem = None  # the inner optimizer is bound again at the next update
            self._repack(sub, tensors)
            if sub.tier is Tier.NVME and sub.chunk_bytes:
                self._swap.write_back(sub.chunk, wait=True)

    def iter_state(self) -> Iterator[tuple[PieceSpan, str, Any]]:
        """The state as ``(span, key, value)``, one subgroup at a time: at most one chunk read from the store is
        in memory (beyond what is resident anyway), so a checkpoint can stream it.

        ``value`` is a tensor covering the span (in its own shape when the span is the whole parameter, else
        flat; a view into the chunk, valid until the next subgroup: copy what you keep) or a non-tensor value.
        ``"master"`` is the fp32 master weights. Per-parameter scalars (Adam's ``step``) come once per parameter,
        with the whole parameter's span."""
        self._settle_last_step()
        seen: set[tuple[int, str]] = set()
        for sub in self._subgroups:
            with self._resident(sub) as mem:
                for slot in sub.slots:
                    yield sub.pieces[slot.piece].span, slot.key, slot.view(mem)
                for pc, small in zip(sub.pieces, sub.small):
                    for key, v in small.items():
                        if (pc.index, key) not in seen:
                            seen.add((pc.index, key))
                            yield PieceSpan(pc.index, 0, math.prod(pc.param_shape), pc.param_shape), key, v

    def loss_scaler_state(self) -> dict | None:
        """The dynamic loss scale and its count of good steps (``None`` without loss scaling)."""
        return None if self._scale is None else {"scale": self._scale, "good_steps": self._good_steps}

    def load_loss_scaler_state(self, state: dict | None) -> None:
        """Restore what :meth:`loss_scaler_state` returned; ``None`` (saved without loss scaling) keeps ours."""
        if state is None:
            return
        if self._scale is None:
            raise ValueError(f"load_loss_scaler_state: got loss scaler state {state!r}, but this optimizer has no "
                             f"loss scaling: resume fp16 training with OffloadConfig(loss_scale=...) as it was saved")
        self._scale, self._good_steps = float(state["scale"]), int(state["good_steps"])

    def _settle_last_step(self) -> None:
        """Under offload.wrap: the writes the last step left in flight land first (and a failed one is raised)."""
        if self._runtime is not None:
            self._runtime.settle_step_io()

    @contextlib.contextmanager
    def _resident(self, sub: _Subgroup):
        """The subgroup's chunk in memory for reading; a chunk read from the store for this is given back after."""
        c = sub.chunk
        if not c.nbytes:
            yield None
            return
        stored = c.state is ChunkState.STORED
        with self._swap.use(c) as mem:
            yield mem
        if stored:
            self._swap.evict(c)

    # -- reporting --------------------------------------------------------------------------------------------------
    def report(self) -> dict:
        """What the optimizer did and where: implementation, subgroups and their placement, bytes moved, time."""
        tiers: dict[str, int] = {}
        for s in self._subgroups:
            tiers[s.tier.value] = tiers.get(s.tier.value, 0) + s.chunk_bytes
        return {
            "optimizer": self.optimizer_class.__name__,
            "impl": self._impl,
            "device": str(self.device),
            "subgroups": [{"index": s.index, "params": s.numel, "pieces": len(s.pieces), "tier": s.tier.value,
                           "update_on": s.site, "chunk_bytes": s.chunk_bytes, "master": s.has_master}
                          for s in self._subgroups],
            "state_bytes_by_tier": tiers,
            "host_pool": self.host_pool.stats(),
            "store": self.store.stats.snapshot() if self.store is not None else None,
            **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.stats.items()},
        }

    def summary(self) -> str:
        r = self.report()
        lines = [f"OffloadOptimizer({r['optimizer']}, impl={r['impl']}, {len(r['subgroups'])} subgroups on {r['device']})"]
        for tier, nbytes in r["state_bytes_by_tier"].items():
            lines.append(f"  state on {tier}: {format_bytes(nbytes)}")
        lines.append(f"  steps {r['steps']} (skipped {r['skipped_steps']}), update {r['update_s']:.3f} s, waited "
                     f"for reads {r['wait_read_s']:.3f} s, read {format_bytes(r['read_bytes'])}, wrote "
                     f"{format_bytes(r['write_bytes'])}")
        return "\n".join(lines)

    def close(self) -> None:
        """Release host/device memory and close the NVMe store (its files stay until the directory is removed);
        under offload.wrap the runtime's close does this for the model and its optimizer together."""
        self._held.clear()
        if self._runtime is None:
            self._swap.close()

    def __repr__(self) -> str:
        return f"Offload{self.optimizer_class.__name__}({len(self._subgroups)} subgroups, impl={self._impl})"


def _unclipped(total: torch.Tensor, max_norm: float) -> bool:
    """Whether ``clip_grad_norm_(max_norm)`` with this total norm leaves every grad as it is: its coefficient,
    computed as torch computes it, is clamped to exactly 1 (the grads are multiplied by 1.0, which changes no
    bit). A NaN or inf norm clips."""
    coef = max_norm / (total + 1e-6)
    return bool(torch.clamp(coef, max=1.0) == 1.0)


class _Speculation:
    """One speculative step: each grad's norm as units complete, and the pre-update bookkeeping of each subgroup
    updated (its chunk's bytes are kept by the swap manager's transaction)."""

    def __init__(self):
        self.norms: dict[torch.Tensor, torch.Tensor] = {}
        self.saved: dict[int, tuple[list, list[dict]]] = {}  # subgroup index -> (slots, small state)
        self.updated: set[int] = set()  # subgroups updated speculatively
        self.max_norm: float | None = None  # the loop's clip_grad_norm_ during the step
        self.overflow = False
        self.stopped = False
        self.why_stopped = ""

    def save(self, sub: _Subgroup, swap: SwapManager) -> None:
        if sub.index in self.saved:
            return
        swap.preserve(sub.chunk)  # may raise TierFullError: then nothing of this subgroup changed
        small = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in d.items()} for d in sub.small]
        self.saved[sub.index] = (list(sub.slots), small)


class SpeculationPolicy:
    """Whether to update during backward on a step that clips (or scales the loss). Two rules, in order:

    1. **Clipping**: stop while the recent steps clipped, speculate again once they do not. Every step's
       outcome is seen, speculative or not (a step that waited for backward still computes its norm), so a run
       that clips every step stops after its first rollback and never pays another, and one whose clipping
       stops speculates again at the next step. ``window``: how many recent steps are weighed; speculation goes
       on while fewer than ``max_clipped`` of them clipped (the default stops at the first clip of the last two:
       with a redo costing about one waiting step, speculating pays while p < 1/2 roughly).
    2. **Time** (``timed``): a step that commits is not always faster than one that waits. Its pre-update copies
       of memory-resident state and params cost a copy of each per step (over PCIe for device-resident ones, the
       cores' time where the device is the CPU), which can exceed what the overlap saves: the planner's
       in-memory 124M plan on the 2-core development VM committed in 1.4 s and waited in 0.68 s. So the runtime
       times each such step from the start of its last backward to the end of ``step()``; after ``samples``
       steps of each kind (speculative first, then waiting), the faster kind by median is taken, and the other
       is timed once more every ``recheck`` steps (the machine's load changes). Both kinds give the same bits:
       this only chooses the faster.

    The first ``warmup`` steps are not timed: the first creates the optimizer state, the second is the first
    whose pre-update copies' host buffers are touched."""

    def __init__(self, window: int = 2, max_clipped: int = 1, enabled: bool = True, *, timed: bool = True,
                 samples: int = 3, recheck: int = 50, warmup: int = 2,
                 clock: Callable[[], float] = time.perf_counter):
        if samples < 1 or recheck < 1 or warmup < 0:
            raise ValueError(f"SpeculationPolicy: expected samples >= 1, recheck >= 1, warmup >= 0, got "
                             f"samples={samples}, recheck={recheck}, warmup={warmup}")
        self.window, self.max_clipped, self.enabled = window, max_clipped, enabled
        self.timed, self.samples, self.recheck, self.warmup = timed, samples, recheck, warmup
        self._clock = clock
        self.recent: list[bool] = []
        self.times: dict[bool, collections.deque] = {True: collections.deque(maxlen=samples),
                                                     False: collections.deque(maxlen=samples)}
        """Speculative (True) and waiting (False) steps' seconds, backward start to step end: the latest ones."""
        self.why = ""
        """Why the last :meth:`wants` said no: ``"clipped"`` (recent steps clipped) or ``"timing"`` (the timing
        rule: a waiting step to time, or waiting was the faster)."""
        self._since_other = 0
        self._timing: tuple[float, bool] | None = None
        self._seen = 0

    def observe(self, *, clipped: bool) -> None:
        self.recent = (self.recent + [clipped])[-self.window:]

    def wants(self) -> bool:
        """Asked once per step that needs validation, before its last backward."""
        self.why = ""
        if not self.enabled:
            return False
        if sum(self.recent) >= self.max_clipped:
            self.why = "clipped"
            return False
        if not self.timed:
            return True
        spec, wait = self.times[True], self.times[False]
        if len(spec) < self.samples:  # learn what a committed speculative step costs, then a waiting one
            return True
        if len(wait) < self.samples:
            self.why = "timing"  # not known yet: measured
            return False
        choice = statistics.median(spec) <= statistics.median(wait)
        self._since_other += 1
        if self._since_other > self.recheck:  # time the other kind again: the load may have changed
            self._since_other = 0
            choice = not choice
        if not choice:
            self.why = "timing"
        return choice

    def step_started(self, *, speculative: bool) -> None:
        """The last backward of a step that needs validation starts (speculating or not)."""
        self._timing = (self._clock(), speculative)

    def step_ended(self, *, counts: bool = True) -> None:
        """That step ended (``step()`` returned its updates done). ``counts``: False for a step whose time is not
        its kind's (a rollback redoes the update; an overflow skips it)."""
        timing, self._timing = self._timing, None
        if timing is None:
            return
        self._seen += 1
        if counts and self._seen > self.warmup:
            t0, speculative = timing
            self.times[speculative].append(self._clock() - t0)

    def medians(self) -> dict[str, float | None]:
        """Median seconds of the timed speculative and waiting steps (None: not timed yet)."""
        return {k: (statistics.median(v) if v else None) for k, v in (("speculative_s", self.times[True]),
                                                                         ("waiting_s", self.times[False]))}

    def clip_probability(self) -> float:
        """The recent fraction of steps that clipped (0 before any step): what the cost model prices."""
        return sum(self.recent) / len(self.recent) if self.recent else 0.0
