"""ShardedOffloadOptimizer: data-parallel training on torch.distributed, each rank owning a shard of the optimizer
state and fp32 master weights (ZeRO-1/2) on its own host memory or NVMe store.

Why one module: the grad buckets, the collectives and the sharded state all follow one rank's shard layout.

How it works (the one note the rest of the file refers to)
----------------------------------------------------------
**Buckets.** The trainable params of each param group are laid out flat, last param first (the order backward
finishes them), in **buckets** of about ``bucket_bytes`` (one dtype each). A bucket owns two flat buffers on the
params' device: the params' storage (each ``param.data`` becomes a view into it) and their grads (``param.grad``
becomes a view into it at its first backward). Each param starts on a multiple of 1024 elements and the bucket
is padded to a multiple of ``1024 * world``; rank *r* owns the *r*-th ``1/world`` of every bucket. So every cut
of a parameter falls 1024 elements apart from its start, where the fused update of a slice is bit-identical to
the update of the whole parameter (``offload.optimizer.SPLIT_ALIGN``). Sharding each bucket, rather than cutting
a whole group once into ``world`` pieces, makes a bucket one reduce-scatter and one all-gather with an equal
share per rank, so a bucket can be reduced as soon as backward has finished its grads.

**The inner optimizer.** The ranges this rank owns (views into its share of the param buffers) are the params
of one inner :class:`OffloadOptimizer` of the user's class and hyperparameters, whose config is the user's with
the store made per rank (``<dir>/rank<r>``, ZeRO-Infinity's per-rank I/O): its host/NVMe tiers, streamed
pipeline and fused update run unchanged, on ``1/world`` of the state.

**A step.**

1. During backward a post-accumulate-grad hook moves each grad into its bucket. Once every param of a bucket,
   and of every bucket before it, has its grad, the bucket's reduce-scatter starts (async), overlapping the rest
   of backward. Buckets always start in bucket order: every rank must issue the same collectives in the same
   order, whatever order its grads arrive in.
2. ``step()`` starts the buckets backward did not finish (a param without a grad zeroes its part), waits for
   all, and divides this rank's share by ``world``. One small all-reduce tells every rank which params got a
   grad anywhere: one with none is skipped, as plain PyTorch skips it. With ``max_grad_norm`` the squared norm
   of the shares is all-reduced and the shares scaled.
3. The inner optimizer updates this rank's share in place (or its masters, then copies them into it), then
   each bucket is all-gathered in place: every rank's params hold the new weights.

Where the backend has no reduce-scatter (gloo before recent torch) a bucket is all-reduced and sliced instead:
found at construction with one tiny call, which such a backend refuses before communicating, on every rank.

``param.grad`` keeps this rank's own gradient (what plain PyTorch has before any reduction): clip with
``OffloadConfig(max_grad_norm=...)`` or :meth:`ShardedOffloadOptimizer.clip_grad_norm_`, which see the global one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import gc
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from offload.config import OffloadConfig, config_from_env
from offload.optimizer import ELEMENTWISE, SPLIT_ALIGN, OffloadOptimizer, PieceSpan, fill_groups
from offload.report import report_at_exit
from storage import Tier

DEFAULT_BUCKET_BYTES = 25 << 20
"""DDP's default (``bucket_cap_mb=25``): large enough that a collective runs near link bandwidth, small enough
that the first bucket is ready early in backward."""

# Recent torch renamed the flat collectives (the old names warn); both take (output, input).
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor



@contextlib.contextmanager
def spawned_rank() -> Iterator[None]:
    """Around the body of a rank process that this package spawns, after ``init_process_group``: the body's results
    must be written inside it. Afterwards: what reference cycles hold (optimizers, their collectives' works) is
    collected while everything is alive, the process group destroyed, and the process leaves without the
    interpreter's teardown (``os._exit(0)``). Under load about 1 rank in 100 aborted in that teardown, after the
    process group was destroyed and with no Python frame left ("terminate called without an active exception",
    SIGABRT): a C++ object torn down at exit, after every result was written. A body that raises is destroyed the
    same way and its error propagates."""
    try:
        yield
    finally:
        gc.collect()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

class GradState(enum.Enum):
    """Where a bucket's gradients are in a step."""

    ACCUMULATING = "accumulating"
    """Backward adds into ``param.grad``; nothing in flight."""
    REDUCING = "reducing"
    """The reduce-scatter (or all-reduce) is in flight: the bucket's grads must not change."""
    REDUCED = "reduced"
    """``grad_share`` holds this rank's share of the grads averaged over ranks."""


class _Bucket:
    """One bucket (see the note above): its params, flat buffers, this rank's share and its reduction."""

    def __init__(self, group: int, entries: list[tuple[int, torch.Tensor, int]], numel: int, world: int, rank: int):
        first = entries[0][1]
        self.group = group
        self.entries = entries  # (param index, param, offset into the flat buffers)
        self.share = numel // world
        self.lo = rank * self.share  # this rank owns [lo, lo + share)
        self.flat = torch.zeros(numel, dtype=first.dtype, device=first.device)
        self.grad = torch.zeros_like(self.flat)
        self.grad_share = torch.zeros(self.share, dtype=first.dtype, device=first.device)
        self.state = GradState.ACCUMULATING
        self.ready = 0  # params whose grad the last (synced) backward finished
        self.work = None
        self.summed: torch.Tensor | None = None  # the all-reduce fallback's buffer while in flight
        for _, p, off in entries:  # the params live in the bucket: the all-gather writes them, with no copy
            view = self.flat[off:off + p.numel()]
            view.copy_(p.data.reshape(-1))
            p.data = view.view(p.shape)

    def grad_view(self, off: int, param: torch.Tensor) -> torch.Tensor:
        return self.grad[off:off + param.numel()]

    def reduce(self, group, present: torch.Tensor, reduce_scatter: bool) -> None:
        """ACCUMULATING -> REDUCING: gather the params' grads into the bucket and start the reduction."""
        if self.state is not GradState.ACCUMULATING:
            return
        for idx, p, off in self.entries:
            view = self.grad_view(off, p)
            if p.grad is None:
                view.zero_()  # no grad on this rank: it adds nothing to the sum
                continue
            present[idx] = 1
            if p.grad.data_ptr() != view.data_ptr():  # set by hand, or backward ran outside our hook's reach
                view.copy_(p.grad.reshape(-1))
                p.grad = view.view(p.shape)
        if reduce_scatter:
            self.work = _reduce_scatter(self.grad_share, self.grad, group=group, async_op=True)
        else:  # a copy, so that param.grad keeps this rank's own grad, as with reduce-scatter
            self.summed = self.grad.clone()
            self.work = dist.all_reduce(self.summed, group=group, async_op=True)
        self.state = GradState.REDUCING

    def reduced(self, world: int) -> None:
        """REDUCING -> REDUCED: wait for the reduction (NCCL: the current stream waits) and average."""
        if self.state is GradState.REDUCED:
            return
        assert self.state is GradState.REDUCING, self.state
        self.work.wait()
        if self.summed is not None:
            self.grad_share.copy_(self.summed[self.lo:self.lo + self.share])
            self.summed = None
        self.grad_share.div_(world)
        self.work = None
        self.state = GradState.REDUCED

    def reset(self) -> None:
        """-> ACCUMULATING, for the next step (any reduction was waited for by ``reduced``)."""
        assert self.work is None, "reset with a reduction in flight"
        self.ready = 0
        self.state = GradState.ACCUMULATING


@dataclasses.dataclass
class _Owned:
    """A range of a parameter this rank owns: the inner optimizer's param ``param`` is ``bucket.flat[lo:lo + n]``."""

    span: PieceSpan
    bucket: _Bucket
    lo: int
    param: torch.Tensor

    @property
    def numel(self) -> int:
        return self.span.stop - self.span.start

    def outer(self, inner: PieceSpan) -> PieceSpan:
        """A span of the inner optimizer's param (a piece of this range) as a span of the model's parameter."""
        return PieceSpan(self.span.index, self.span.start + inner.start, self.span.start + inner.stop,
                         self.span.shape)


class ShardedOffloadOptimizer(torch.optim.Optimizer):
    """Data-parallel ``torch.optim.Optimizer`` on torch.distributed: grads reduce-scattered, each rank updating
    its own shard of the state with an :class:`OffloadOptimizer` (host or NVMe, per rank), params all-gathered.

    Build it after ``dist.init_process_group`` (torchrun's env:// works) and after moving the model to its
    device, on every rank, like the plain optimizer::

        opt = ShardedOffloadOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4),
                                      config=OffloadConfig(state_tier="nvme", nvme_dirs="/mnt/nvme/offload"))
        for x, y in data:                    # each rank its own part of the global batch
            loss_fn(model(x), y).backward()  # grads are reduced during backward
            opt.step()                       # this rank's shard updated, params all-gathered
            opt.zero_grad()

    Use it *instead of* ``DistributedDataParallel`` (it does the reduction). Rank 0's params are broadcast at
    construction; ``param.data`` becomes a view into a flat buffer. Gradient accumulation: run every backward
    but the last under ``with opt.no_sync():``. ``state_dict()`` is the plain class's, gathered (loadable at any
    world size, or by the plain class); ``offload.save_checkpoint`` / ``load_checkpoint`` (called on every rank)
    save and load each rank's own part without ever holding the whole, resharding to any world size, through
    ``shard_ranges()``, ``iter_params()``, ``iter_state()`` and ``load_state_stream()``. The
    optimizer class must be elementwise (``offload.optimizer.ELEMENTWISE``: AdamW, SGD, Adagrad, ...), since
    params are cut into ranges.
    """

    def __init__(self, params_or_optimizer, optimizer_class: type[torch.optim.Optimizer] | None = None, *,
                 config: OffloadConfig | None = None, process_group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 **optimizer_kwargs):
        if isinstance(params_or_optimizer, torch.optim.Optimizer):
            if optimizer_class is not None or optimizer_kwargs:
                raise ValueError("ShardedOffloadOptimizer: given an optimizer instance, pass no optimizer_class or "
                                 "kwargs (its own are used)")
            base = params_or_optimizer
            if isinstance(base, (OffloadOptimizer, ShardedOffloadOptimizer)):
                raise ValueError(f"ShardedOffloadOptimizer: expected a plain torch optimizer, got "
                                 f"{type(base).__name__}; pass the optimizer it wraps")
            cls, defaults = type(base), dict(base.defaults)
            groups = [dict(g) for g in base.param_groups]
            adopted = base.state_dict() if base.state else None
            base.state.clear()  # the state moves into the shards
        else:
            if optimizer_class is None:
                raise ValueError("ShardedOffloadOptimizer: pass an optimizer instance, or params plus optimizer_class "
                                 "(e.g. ShardedOffloadOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-4))")
            cls = optimizer_class
            groups, defaults = fill_groups(cls, list(params_or_optimizer), optimizer_kwargs)
            adopted = None
        if not issubclass(cls, ELEMENTWISE):
            names = ", ".join(c.__name__ for c in ELEMENTWISE)
            raise NotImplementedError(f"ShardedOffloadOptimizer cannot shard {cls.__name__}: ranks own ranges of each "
                                      f"parameter, which only elementwise optimizers allow ({names})")
        if bucket_bytes <= 0:
            raise ValueError(f"ShardedOffloadOptimizer: bucket_bytes: expected a positive number of bytes, got "
                             f"{bucket_bytes}; DDP's 25 MiB is a good start")
        config = config or config_from_env() or OffloadConfig()
        if config.loss_scale is not None:
            raise NotImplementedError("ShardedOffloadOptimizer: OffloadConfig.loss_scale is not supported yet (an "
                                      "overflow must skip the step on every rank); train in bf16, or fp32")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("ShardedOffloadOptimizer: torch.distributed is not initialized; call "
                             "torch.distributed.init_process_group('nccl' or 'gloo') first (under torchrun, or "
                             "`offload run --nproc N`, its env:// variables are set)")
        self.optimizer_class = cls
        self.config = config
        super().__init__(groups, defaults)
        self._pg = process_group
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.device = self._device_of()
        if dist.get_backend(process_group) == "nccl" and self.device.type != "cuda":
            raise ValueError(f"ShardedOffloadOptimizer: the nccl backend needs CUDA params, got params on "
                             f"{self.device}; move the model to its GPU first, or use gloo on the CPU")
        self._buckets = self._build_buckets(bucket_bytes)
        src = 0 if process_group is None else dist.get_global_rank(process_group, 0)
        for b in self._buckets:  # every rank starts from rank 0's weights, as with DDP
            dist.broadcast(b.flat, src=src, group=process_group)
        self._reduce_scatter = self._has_reduce_scatter()
        self._n_params = sum(len(g["params"]) for g in self.param_groups)
        self._present = torch.zeros(self._n_params, dtype=torch.int32)  # params with a grad on this rank
        self._present_any: list[bool] | None = None  # ... on any rank, once reduced
        self._next = 0  # the first bucket whose reduction has not started
        self._sync = True
        self._stats = {"steps": 0, "buckets_in_backward": 0, "buckets_at_step": 0, "grad_norm": None}
        self._where = {p: (b, off) for b in self._buckets for _, p, off in b.entries}
        self._owned: list[_Owned] = []
        self._inner = self._build_inner()
        if self._inner is not None:  # under `offload run`: rank 0's report of its shard at exit
            report_at_exit(None, self._inner)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._where]
        if adopted is not None:
            self.load_state_dict(adopted)

    # -- construction -----------------------------------------------------------------------------------------------
    def _device_of(self) -> torch.device:
        devices = set()
        for g in self.param_groups:
            for p in g["params"]:
                if not p.requires_grad:
                    continue
                if p.is_sparse:
                    raise NotImplementedError("ShardedOffloadOptimizer: sparse parameters are not supported")
                if p.dim() == 0:
                    raise NotImplementedError("ShardedOffloadOptimizer: a 0-dimensional parameter cannot be told from "
                                              "its scalar state in a state dict; give it shape (1,)")
                devices.add(p.device)
        if len(devices) != 1:
            raise ValueError(f"ShardedOffloadOptimizer: expected trainable parameters on one device, got "
                             f"{sorted(map(str, devices)) or 'none'}")
        return devices.pop()

    def _build_buckets(self, bucket_bytes: int) -> list[_Bucket]:
        """Buckets over the trainable params, last first; each param 1024-aligned, each bucket padded so that
        every rank's share is a whole number of 1024-element blocks (see the note)."""
        trainable, k = [], 0
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                if p.requires_grad:
                    trainable.append((gi, k, p))
                k += 1

        def aligned(n: int, to: int) -> int:
            return (n + to - 1) // to * to

        buckets, group, cur, numel = [], None, [], 0

        def close():
            buckets.append(_Bucket(group, cur, aligned(numel, SPLIT_ALIGN * self.world), self.world, self.rank))

        for gi, idx, p in reversed(trainable):
            if cur and (gi != group or p.dtype != cur[0][1].dtype
                        or (numel + p.numel()) * p.element_size() > bucket_bytes):
                close()
                cur, numel = [], 0
            group = gi
            cur.append((idx, p, numel))
            numel = aligned(numel + p.numel(), SPLIT_ALIGN)
        if cur:
            close()
        return buckets

    def _has_reduce_scatter(self) -> bool:
        """Whether the backend has reduce-scatter: a backend without it refuses the call before communicating,
        on every rank alike, so probing cannot leave the ranks out of step."""
        probe = torch.zeros(self.world, device=self.device)
        try:
            _reduce_scatter(probe[:1].clone(), probe, group=self._pg)
        except (RuntimeError, NotImplementedError, ValueError):
            return False
        return True

    def _inner_config(self) -> OffloadConfig:
        """The user's config with a store directory per rank (``<dir>/rank<global rank>``, as `offload run` names
        them: left as is when it already ends so) and clipping left to us: it needs the global norm."""
        cfg = self.config
        dirs = cfg.nvme_dirs
        if dirs:
            name = f"rank{dist.get_rank()}"
            dirs = tuple(d if os.path.basename(os.path.normpath(d)) == name else os.path.join(d, name) for d in dirs)
            if cfg.state_tier is Tier.NVME:
                for d in dirs:
                    os.makedirs(d, exist_ok=True)
        return dataclasses.replace(cfg, nvme_dirs=dirs, max_grad_norm=None)

    def _build_inner(self) -> OffloadOptimizer | None:
        """One inner OffloadOptimizer over the ranges this rank owns, one inner group per outer group."""
        by_group: dict[int, list[_Owned]] = {}
        for b in self._buckets:
            for idx, p, off in b.entries:
                lo, hi = max(off, b.lo), min(off + p.numel(), b.lo + b.share)
                if lo < hi:
                    view = b.flat[lo:hi].detach().requires_grad_()  # shares the bucket's memory: updated in place
                    span = PieceSpan(idx, lo - off, hi - off, tuple(p.shape))
                    by_group.setdefault(b.group, []).append(_Owned(span, b, lo, view))
        self._inner_groups = {gi: j for j, gi in enumerate(sorted(by_group))}  # outer group -> inner group
        groups = []
        for gi in sorted(by_group):
            self._owned += by_group[gi]
            hp = {k: v for k, v in self.param_groups[gi].items() if k != "params"}
            groups.append({**hp, "params": [o.param for o in by_group[gi]]})
        if not groups:  # a tiny model on many ranks: this one owns only padding
            return None
        return OffloadOptimizer(groups, self.optimizer_class, config=self._inner_config())

    # -- gradients --------------------------------------------------------------------------------------------------
    def _on_grad(self, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: the grad into its bucket; start the reductions that are ready, in order."""
        bucket, off = self._where[param]
        view = bucket.grad_view(off, param)
        if param.grad.data_ptr() != view.data_ptr():  # a new grad (after zero_grad(set_to_none=True)): move it in
            view.copy_(param.grad.reshape(-1))
            param.grad = view.view(param.shape)
        if not self._sync:
            return
        if bucket.state is not GradState.ACCUMULATING:
            raise RuntimeError("ShardedOffloadOptimizer: a parameter got a gradient after its bucket's reduction "
                               "started: run every backward before step() but the last under `with opt.no_sync():` "
                               "(gradient accumulation); reentrant activation checkpointing does this too, use "
                               "torch.utils.checkpoint(..., use_reentrant=False)")
        bucket.ready += 1
        while self._next < len(self._buckets) and (
                (b := self._buckets[self._next]).ready == len(b.entries)):
            b.reduce(self._pg, self._present, self._reduce_scatter)
            self._next += 1
            self._stats["buckets_in_backward"] += 1

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate grads on this rank (as DDP's ``no_sync``); the reduction runs
        during the next backward outside it, or at ``step()``."""
        prev, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = prev

    def _reduce_grads(self) -> list[bool]:
        """Finish every bucket's reduction (starting those backward did not); which params got a grad anywhere.
        Idempotent within a step."""
        if self._present_any is None:
            for b in self._buckets[self._next:]:  # bucket order, as on every rank
                b.reduce(self._pg, self._present, self._reduce_scatter)
                self._stats["buckets_at_step"] += 1
            self._next = len(self._buckets)
            flags = self._present.to(self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._pg)
            for b in self._buckets:
                b.reduced(self.world)
            self._present_any = flags.bool().tolist()
        return self._present_any

    def _reset(self) -> None:
        for b in self._buckets:
            b.reset()
        self._next = 0
        self._present.zero_()
        self._present_any = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` (2-norm) of the grads averaged over ranks, on this rank's shares
        (the squared norm all-reduced): the same clipping, to fp32 rounding (the sum runs in another order).
        Returns the total norm. ``step()`` calls it when ``OffloadConfig.max_grad_norm`` is set."""
        if not max_norm > 0:
            raise ValueError(f"clip_grad_norm_: expected a positive max_norm, got {max_norm}")
        self._reduce_grads()
        shares = [b.grad_share for b in self._buckets]
        norms = [torch.linalg.vector_norm(s, dtype=torch.float32) for s in shares]
        total_sq = torch.stack(norms).square().sum() if norms else torch.zeros((), device=self.device)
        dist.all_reduce(total_sq, group=self._pg)
        total = total_sq.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's own formula
        for s in shares:
            s.mul_(coef.to(s.dtype))
        self._stats["grad_norm"] = total
        return total

    # -- the step ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        present = self._reduce_grads()
        if self.config.max_grad_norm is not None:
            self.clip_grad_norm_(self.config.max_grad_norm)
        if self._inner is not None:
            self._sync_hparams()
            for own in self._owned:  # a param with no grad on any rank keeps None: the inner step skips it
                b = own.bucket
                start = own.lo - b.lo
                own.param.grad = b.grad_share[start:start + own.numel] if present[own.span.index] else None
            try:
                self._inner.step()
            finally:
                for own in self._owned:
                    own.param.grad = None
        self.gather_params()
        self._reset()
        self._stats["steps"] += 1
        return loss

    def gather_params(self) -> None:
        """Collective: each rank's share of every bucket into every rank's params (the all-gather that ends a
        step; a checkpoint load runs it after writing this rank's ranges)."""
        # NCCL: wait() only makes the current stream wait, so the next forward queues behind the gathers without
        # blocking the CPU; gloo: the gathers overlap each other.
        works = [_all_gather(b.flat, b.flat[b.lo:b.lo + b.share], group=self._pg, async_op=True)
                 for b in self._buckets]
        for w in works:
            w.wait()

    def _sync_hparams(self) -> None:
        """LR schedulers (and users) change the outer groups; the inner groups follow before each update."""
        for gi, gj in self._inner_groups.items():
            inner = self._inner.param_groups[gj]
            for k, v in self.param_groups[gi].items():
                if k not in ("params", "fused", "foreach"):
                    inner[k] = v

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._next or any(b.ready for b in self._buckets):
            # A backward ran since the last step and started reductions: finish them (every rank did the same,
            # and collectives must match across ranks), then drop their result.
            self._reduce_grads()
            self._reset()
        super().zero_grad(set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "_buckets"):  # called by Optimizer.__init__
            return super().add_param_group(param_group)
        raise NotImplementedError("ShardedOffloadOptimizer: params are laid out in buckets once; build a new "
                                  "optimizer with every param group instead of add_param_group")

    # -- state: whole (plain format) and by range (for a sharded checkpoint) ------------------------------------------
    def shard_ranges(self) -> list[PieceSpan]:
        """For each parameter this rank owns any of (at most one range each), the elements of its flattened tensor
        it owns: a sharded checkpoint's entries for this rank."""
        return [o.span for o in self._owned]

    def iter_state(self) -> Iterator[tuple[PieceSpan, str, Any]]:
        """This rank's optimizer state as ``(span, key, value)``, one inner subgroup at a time (at most one NVMe
        chunk in memory), on :meth:`OffloadOptimizer.iter_state`'s contract with spans in the model's parameters:
        a tensor covers its span (in the parameter's shape when whole, else flat; a view valid until the next
        subgroup), and per-parameter values (``step``) come once, with the whole parameter's span."""
        if self._inner is None:
            return
        for span, key, value in self._inner.iter_state():
            own = self._owned[span.index]
            if torch.is_tensor(value) and value.dim() > 0 and value.numel() == span.stop - span.start:
                outer = own.outer(span)
                yield outer, key, value.view(outer.shape) if outer.whole else value.reshape(-1)
            else:
                yield PieceSpan(own.span.index, 0, math.prod(own.span.shape), own.span.shape), key, value

    def sharded(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s weights are cut across ranks (trainable, in a bucket): :meth:`iter_params` has this
        rank's range of it. Any other param (frozen) is whole on every rank, as the user's code left it."""
        return param in self._where

    def iter_params(self) -> Iterator[tuple[PieceSpan, torch.Tensor]]:
        """This rank's ranges of the weights, the ranges of :meth:`shard_ranges`: ``(span, view)``, a flat view
        into the params' bucket. Between steps every rank's params are equal, so a sharded checkpoint writes each
        range once, from its owner; a load writes into these views, then calls :meth:`gather_params`."""
        for o in self._owned:
            yield o.span, o.param.detach()

    def check_between_steps(self, what: str) -> None:
        """Refuse ``what`` (a checkpoint) while a step's gradients are being reduced: between ``step()`` (or
        ``zero_grad()``) and the next backward, every rank's params are whole and no collective is in flight."""
        if self._next or any(b.ready or b.state is not GradState.ACCUMULATING for b in self._buckets):
            raise RuntimeError(f"ShardedOffloadOptimizer: cannot {what} after backward and before step(): gradient "
                               f"reductions are in flight; call it after opt.step() (or opt.zero_grad())")

    def load_state_stream(self, fetch: Callable[[PieceSpan, bool], dict[str, Any]]) -> None:
        """Load this rank's optimizer state one inner subgroup at a time, on
        :meth:`OffloadOptimizer.load_state_stream`'s contract: ``fetch(span, master)`` returns the state of that
        span of a model parameter (any of this rank's ranges, or a piece of one). A checkpoint saved by any number
        of ranks can answer for any span: that is how N -> M resharding works. State only: hyperparameters are in
        ``param_groups``."""
        if self._inner is None:
            return
        owned = self._owned

        def inner_fetch(span: PieceSpan, master: bool) -> dict[str, Any]:
            outer = owned[span.index].outer(span)
            n = outer.stop - outer.start
            return {k: v.reshape(-1) if torch.is_tensor(v) and v.dim() > 0 and v.numel() == n else v
                    for k, v in fetch(outer, master).items()}

        self._inner.load_state_stream(inner_fetch)

    def state_dict(self) -> dict:
        """The state dict a plain optimizer of the same class would have (loadable by it, by OffloadOptimizer, or by
        this class at any world size), gathered from every rank, bucket by bucket; every rank gets all of it. It
        holds the whole state in memory: for large models save each rank's part with :meth:`iter_state`."""
        sd = super().state_dict()  # param_groups with indices; the outer self.state is empty
        local = self._inner.state_dict()["state"] if self._inner is not None else {}
        meta: dict[int, dict] = {}  # param index -> {key: ("flat", dtype) | ("value", v)}
        for j, entry in local.items():
            own = self._owned[j]
            for key, v in entry.items():
                flat = torch.is_tensor(v) and v.dim() == 1 and v.numel() == own.numel
                meta.setdefault(own.span.index, {})[key] = ("flat", v.dtype) if flat else ("value", v)
        metas: list = [None] * self.world
        dist.all_gather_object(metas, meta, group=self._pg)
        merged: dict[int, dict] = {}
        for m in metas:
            for idx, keys in m.items():
                for key, kind in keys.items():
                    merged.setdefault(idx, {}).setdefault(key, kind)
        state: dict[int, dict] = {idx: {} for idx in merged}
        for b in self._buckets:
            keys = {key: kind[1] for idx, _, _ in b.entries for key, kind in merged.get(idx, {}).items()
                    if kind[0] == "flat"}
            mine = [j for j, o in enumerate(self._owned) if o.bucket is b]
            for key, dtype in keys.items():
                share = torch.zeros(b.share, dtype=dtype, device=self.device)
                for j in mine:
                    v = local.get(j, {}).get(key)
                    if v is not None:
                        start = self._owned[j].lo - b.lo
                        share[start:start + v.numel()].copy_(v)
                full = torch.empty(b.share * self.world, dtype=dtype, device=self.device)
                _all_gather(full, share, group=self._pg)
                full = full.cpu()
                for idx, p, off in b.entries:
                    if merged.get(idx, {}).get(key, ("",))[0] == "flat":
                        state[idx][key] = full[off:off + p.numel()].view(p.shape).clone()
        for idx, keys in merged.items():
            for key, kind in keys.items():
                if kind[0] == "value":
                    state[idx][key] = kind[1]
        sd["state"] = {k: state[k] for k in sorted(state)}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a plain-format state dict (from this class at any world size, OffloadOptimizer or the plain
        class; same model, same param order): each rank keeps its ranges."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"load_state_dict: the state dict has {len(groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}: it was saved for a different model or optimizer setup")
        for gi, (g, mine) in enumerate(zip(groups, self.param_groups)):
            if len(g["params"]) != len(mine["params"]):
                raise ValueError(f"load_state_dict: param group {gi} has {len(g['params'])} params in the state dict "
                                 f"and {len(mine['params'])} here: it was saved for a different model")
        params = [p for g in self.param_groups for p in g["params"]]
        remap = {sid: k for k, sid in enumerate(i for g in groups for i in g["params"])}
        state = {}
        for sid, entry in state_dict["state"].items():
            if int(sid) not in remap:
                raise ValueError(f"load_state_dict: state for parameter id {sid}, which no param group lists")
            state[remap[int(sid)]] = entry
        for g, mine in zip(groups, self.param_groups):
            mine.update({k: v for k, v in g.items() if k != "params"})
        if self._inner is None:
            return
        for o in self._owned:
            p = params[o.span.index]
            for key, v in state.get(o.span.index, {}).items():
                if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"load_state_dict: parameter {o.span.index} (shape {list(p.shape)}) has state "
                                     f"{key!r} of shape {list(v.shape)}: the state dict belongs to a different model")
        self._sync_hparams()
        self.load_state_stream(lambda span, _master: {
            key: v.reshape(-1)[span.start:span.stop] if torch.is_tensor(v) and v.dim() > 0 else v
            for key, v in state.get(span.index, {}).items()})

    # -- reporting --------------------------------------------------------------------------------------------------
    @property
    def process_group(self):
        """The process group this optimizer shards over (``None``: the default group)."""
        return self._pg

    @property
    def stats(self) -> dict:
        """Counters since construction: steps, grad buckets reduced in backward and at the step, the last norm."""
        return self._stats

    def report(self) -> dict:
        """This rank's part: buckets, elements owned, the bytes the buckets hold (params, grads, this rank's grad
        shares), how grads are reduced, how many bucket reductions started during backward (overlapped) or only at
        ``step()``, the last global grad norm (when clipping), and the inner optimizer's report (``state_bytes_by_tier``, host pool, store, bytes moved)."""
        return {
            "rank": self.rank,
            "world": self.world,
            "reduce": "reduce_scatter" if self._reduce_scatter else "all_reduce",
            "buckets": len(self._buckets),
            "params": sum(p.numel() for b in self._buckets for _, p, _ in b.entries),
            "padded": sum(b.flat.numel() for b in self._buckets),
            "owned": sum(o.numel for o in self._owned),
            "bucket_bytes": {  # what the buckets hold on the params' device (the planner's per-rank memory)
                "params": sum(b.flat.untyped_storage().nbytes() for b in self._buckets),
                "grads": sum(b.grad.untyped_storage().nbytes() for b in self._buckets),
                "grad_shares": sum(b.grad_share.untyped_storage().nbytes() for b in self._buckets)},
            **{k: (float(v) if torch.is_tensor(v) else v) for k, v in self._stats.items()},
            "inner": self._inner.report() if self._inner is not None else None,
        }

    def close(self) -> None:
        """Remove the grad hooks and release the inner optimizer's memory and store."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._inner is not None:
            self._inner.close()

    def __repr__(self) -> str:
        return (f"ShardedOffload{self.optimizer_class.__name__}(rank {self.rank}/{self.world}, "
                f"{len(self._buckets)} buckets, {len(self._owned)} ranges)")
