"""The host pool: page-locked (when CUDA is present) or page-aligned host buffers, allocated in slabs and reused.
Unpinned slabs are fresh mappings backed by 2 MiB pages where the kernel allows (:func:`storage.memory.fresh_empty`).

Pinning is slow (it maps and locks every page) and pinned memory is scarce, so the pool pins whole slabs, once,
and hands out pieces of them; nothing pins on the hot path. A hard byte budget covers every slab; when it is
spent, ``acquire`` waits for a ``release`` (back-pressure) or raises :class:`~storage.errors.TierFullError`.
If pinning fails (locked-memory limit, driver error) the pool falls back to ordinary page-aligned memory with
one warning and reports ``pinned_bytes == 0``.
"""

from __future__ import annotations

import threading
import time
import warnings

import torch

from storage.alloc import ALIGN, ExtentAllocator, round_up
from storage.errors import TierFullError
from storage.memory import aligned_empty, fresh_empty
from storage.tiers import Tier, TierBudget
from storage.units import format_bytes


class HostBuffer:
    """A piece of a slab, ``nbytes`` long, 4 KiB-aligned. Release it (or use ``with``) to return it to the pool."""

    __slots__ = ("pool", "nbytes", "_slab", "_offset", "_tensor")

    def __init__(self, pool: "HostPool", slab: "_Slab", offset: int, nbytes: int):
        self.pool = pool
        self.nbytes = nbytes
        self._slab = slab
        self._offset = offset
        self._tensor = slab.memory[offset:offset + nbytes]

    @property
    def tensor(self) -> torch.Tensor:
        """The buffer as flat uint8."""
        if self._tensor is None:
            raise RuntimeError("this HostBuffer was released; acquire a new one")
        return self._tensor

    @property
    def pinned(self) -> bool:
        return self._slab.pinned

    def view(self, dtype: torch.dtype, shape=None) -> torch.Tensor:
        """The first bytes of the buffer as a tensor of ``dtype`` (and ``shape``; flat if omitted)."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if shape is None:
            shape = (self.nbytes // itemsize,)
        numel = 1
        for s in shape:
            numel *= s
        if numel * itemsize > self.nbytes:
            raise ValueError(f"view of {tuple(shape)} {dtype} needs {numel * itemsize} B, buffer has {self.nbytes} B")
        return self.tensor[:numel * itemsize].view(dtype).view(shape)

    def release(self) -> None:
        """Return the buffer to the pool; a second call is a no-op."""
        if self._tensor is not None:
            self._tensor = None
            self.pool._release(self._slab, self._offset, self.nbytes)

    def __enter__(self) -> "HostBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Slab:
    __slots__ = ("memory", "size", "pinned", "alloc", "in_use")

    def __init__(self, memory: torch.Tensor, pinned: bool):
        self.memory = memory
        self.size = memory.numel()
        self.pinned = pinned
        self.alloc = ExtentAllocator(self.size)
        self.in_use = 0


class HostPool:
    """Host buffers under a hard byte budget.

    Args:
        budget_bytes: bytes of host memory the pool may hold in slabs, pinned or not. Or pass ``budget``, a
            :class:`TierBudget` of the host tier shared with other users of host memory.
        pin: ``True`` to pin (CUDA needed), ``False`` not to, ``None`` to pin when CUDA is available.
        slab_bytes: size of each slab; a request larger than this gets a slab of its own size.
        preallocate: allocate (and pin) slabs for the whole budget now, so the first iteration pays nothing.
    """

    def __init__(self, budget_bytes: int | None = None, *, budget: TierBudget | None = None, pin: bool | None = None,
                 slab_bytes: int = 64 << 20, preallocate: bool = False):
        if (budget is None) == (budget_bytes is None):
            raise ValueError("HostPool: pass exactly one of budget_bytes (a number) or budget (a shared TierBudget)")
        if budget is not None and budget.tier is not Tier.HOST:
            raise ValueError(f"HostPool budget: expected a TierBudget of the host tier, got {budget.tier.value}")
        self.budget = budget if budget is not None else TierBudget(Tier.HOST, budget_bytes)
        if slab_bytes <= 0:
            raise ValueError(f"slab_bytes: expected > 0, got {slab_bytes}")
        self.slab_bytes = round_up(slab_bytes)
        cuda = torch.cuda.is_available()
        if pin and not cuda:
            raise ValueError("HostPool(pin=True) needs CUDA, and torch.cuda.is_available() is False: pass pin=None")
        self._pin = cuda if pin is None else pin
        self._pin_failed = False
        self._cond = threading.Condition()
        self._slabs: list[_Slab] = []
        self._in_use = 0
        self._peak_in_use = 0
        self._cached = 0  # bytes handed out that hold copies kept only to save a transfer (mark_cached)
        self._peak_needed = 0  # peak of in use minus cached
        self._peak_cached = 0
        self._waits = 0
        self._wait_s = 0.0
        if preallocate:
            with self._cond:
                while self.budget.free_bytes >= self.slab_bytes:
                    self._new_slab(self.slab_bytes)

    # -- public ---------------------------------------------------------------------------------------------------
    def acquire(self, nbytes: int, *, wait: bool = True, timeout: float | None = None) -> HostBuffer:
        """A buffer of ``nbytes`` (4 KiB-aligned start). Blocks while the budget is spent (``wait=True``, up to
        ``timeout`` s) or raises :class:`TierFullError` (``wait=False``)."""
        if nbytes <= 0:
            raise ValueError(f"acquire: expected nbytes > 0, got {nbytes}")
        need = round_up(nbytes)
        if need > self.budget.capacity_bytes:
            raise TierFullError("host", "host buffer", need, self.budget.used_bytes, self.budget.capacity_bytes,
                                never=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        waited_since = None
        with self._cond:
            while True:
                buf = self._try_acquire(nbytes, need)
                if buf is not None:
                    if waited_since is not None:
                        self._wait_s += time.monotonic() - waited_since
                    return buf
                if not wait:
                    raise TierFullError("host", "host buffer", need, self.budget.used_bytes,
                                        self.budget.capacity_bytes)
                if waited_since is None:
                    waited_since = time.monotonic()
                    self._waits += 1
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TierFullError("host", "host buffer", need, self.budget.used_bytes,
                                        self.budget.capacity_bytes, waited=timeout)
                # Woken by _release (a buffer came back) or by the timeout; on a shared budget another user may
                # free bytes without telling us, so poll as well.
                self._cond.wait(0.05 if remaining is None else min(remaining, 0.05))

    @property
    def pinned_bytes(self) -> int:
        return sum(s.size for s in self._slabs if s.pinned)

    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    def stats(self) -> dict:
        """Budget, slab bytes, bytes pinned, bytes handed out now and at peak, and back-pressure waits."""
        with self._cond:
            return {"budget_bytes": self.budget.capacity_bytes, "slab_bytes": sum(s.size for s in self._slabs),
                    "slabs": len(self._slabs), "pinned_bytes": self.pinned_bytes, "in_use_bytes": self._in_use,
                    "peak_in_use_bytes": self._peak_in_use, "peak_needed_bytes": self._peak_needed,
                    "cached_bytes": self._cached, "peak_cached_bytes": self._peak_cached,
                    "waits": self._waits, "wait_s": round(self._wait_s, 6),
                    "pin_failed": self._pin_failed}

    def reset_peak(self) -> None:
        """Start ``peak_in_use_bytes`` again from what is handed out now (to measure one phase of a run)."""
        with self._cond:
            self._peak_in_use = self._in_use
            self._peak_needed = self._in_use - self._cached
            self._peak_cached = self._cached

    def mark_cached(self, nbytes: int) -> None:
        """``nbytes`` (negative: no longer) of the buffers handed out hold copies kept only to save a transfer
        later, where the budget had room: counted apart from what a run needs (``peak_needed_bytes``)."""
        with self._cond:
            cached = self._cached + nbytes
            assert 0 <= cached <= self._in_use, f"cached {cached} B of {self._in_use} B in use"
            self._cached = cached
            self._peak_needed = max(self._peak_needed, self._in_use - self._cached)
            self._peak_cached = max(self._peak_cached, self._cached)

    def trim(self) -> int:
        """Free every slab with nothing handed out; returns the bytes given back to the budget."""
        with self._cond:
            freed = 0
            for slab in [s for s in self._slabs if s.in_use == 0]:
                freed += self._drop_slab(slab)
            return freed

    def __repr__(self) -> str:
        return (f"HostPool({format_bytes(self._in_use)} in use, {len(self._slabs)} slabs, "
                f"{format_bytes(self.pinned_bytes)} pinned, budget {format_bytes(self.budget.capacity_bytes)})")

    # -- internals (called with self._cond held) ----------------------------------------------------------------
    def _try_acquire(self, nbytes: int, need: int) -> HostBuffer | None:
        for slab in self._slabs:
            off = slab.alloc.alloc(need)
            if off is not None:
                return self._hand_out(slab, off, nbytes, need)
        size = max(self.slab_bytes, need)
        if self.budget.free_bytes < size:
            # Make room: empty slabs hold budget that this request could use.
            for slab in [s for s in self._slabs if s.in_use == 0]:
                self._drop_slab(slab)
                if self.budget.free_bytes >= size:
                    break
        if self.budget.free_bytes < size:
            if self.budget.free_bytes >= need and size > need:
                size = need  # a smaller slab that fits what is left of the budget
            else:
                return None
        slab = self._new_slab(size)
        if slab is None:
            return None
        return self._hand_out(slab, slab.alloc.alloc(need), nbytes, need)

    def _hand_out(self, slab: _Slab, off: int, nbytes: int, need: int) -> HostBuffer:
        slab.in_use += need
        self._in_use += need
        self._peak_in_use = max(self._peak_in_use, self._in_use)
        self._peak_needed = max(self._peak_needed, self._in_use - self._cached)
        return HostBuffer(self, slab, off, nbytes)

    def _new_slab(self, size: int) -> _Slab | None:
        try:
            self.budget.reserve(size, what="host pool slab")
        except TierFullError:
            return None
        try:
            memory = self._allocate(size)
        except BaseException:
            self.budget.release(size)
            raise
        slab = _Slab(memory, pinned=self._pin and not self._pin_failed)
        self._slabs.append(slab)
        return slab

    def _allocate(self, size: int) -> torch.Tensor:
        if self._pin and not self._pin_failed:
            try:
                return aligned_empty(size, pin=True)
            except RuntimeError as e:  # locked-memory limit (ulimit -l), driver error
                self._pin_failed = True
                warnings.warn(f"HostPool: pinning {format_bytes(size)} failed ({e}); using ordinary page-aligned "
                              f"memory instead, so host<->device copies will be slower and synchronous. Raise the "
                              f"locked-memory limit (ulimit -l) to pin.", RuntimeWarning, stacklevel=4)
        memory = fresh_empty(size)  # 2 MiB pages where THP allows: see fresh_empty
        # Touch every page now (pinning does this for pinned slabs): otherwise the first transfer into the
        # slab pays the page faults, and an O_DIRECT read into fresh memory runs at a quarter of its speed here.
        memory.zero_()
        return memory

    def _drop_slab(self, slab: _Slab) -> int:
        self._slabs.remove(slab)
        self.budget.release(slab.size)
        return slab.size

    def _release(self, slab: _Slab, offset: int, nbytes: int) -> None:
        need = round_up(nbytes)
        with self._cond:
            slab.alloc.free(offset, need)
            slab.in_use -= need
            self._in_use -= need
            self._cond.notify_all()


__all__ = ["HostPool", "HostBuffer", "ALIGN"]
