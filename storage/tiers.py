"""Tiers and per-tier capacity accounting.

Every byte the runtime places on a tier is reserved against that tier's budget first. A reservation that does
not fit raises :class:`TierFullError` at once (naming the tier, what asked, and by how much it is short), or
waits for space when the caller asked to wait. The point is to fail at the request, with a sentence a person can
act on, instead of crashing later inside an allocator.
"""

from __future__ import annotations

import enum
import threading
import time

from storage.errors import TierFullError
from storage.units import format_bytes


class Tier(enum.Enum):
    """Where a chunk of bytes lives."""

    DEVICE = "device"
    """Memory of the compute device: a CUDA GPU, or on a CPU-only machine a budget of host memory that our own
    accounting enforces, so that eviction and prefetch run for real."""

    HOST = "host"
    """Host memory from the :class:`~storage.hostpool.HostPool`: pinned when CUDA is present, page-aligned."""

    NVME = "nvme"
    """Files on a local disk, through the :class:`~storage.nvme.NvmeStore`."""


class TierBudget:
    """A byte budget for one tier, shared by everything that places bytes there. Thread-safe.

    ``reserve`` and ``release`` must pair up; ``used_bytes`` never exceeds ``capacity_bytes`` and ``peak_bytes``
    records the high-water mark, so tests and reports can check memory against the plan.
    """

    def __init__(self, tier: Tier, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes of the {tier.value} tier: expected >= 0, got {capacity_bytes}")
        self.tier = tier
        self.capacity_bytes = int(capacity_bytes)
        self._used = 0
        self._peak = 0
        self._cond = threading.Condition()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def peak_bytes(self) -> int:
        return self._peak

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self._used

    def reserve(self, nbytes: int, *, what: str = "allocation", wait: bool = False, timeout: float | None = None) -> None:
        """Count ``nbytes`` against the budget.

        With ``wait=False`` a reservation that does not fit raises :class:`TierFullError` now. With ``wait=True``
        it blocks until other reservations are released (up to ``timeout`` seconds, then raises). A request
        larger than the whole capacity can never be satisfied and raises at once either way.
        """
        if nbytes < 0:
            raise ValueError(f"reserve: expected nbytes >= 0, got {nbytes}")
        if nbytes > self.capacity_bytes:
            raise TierFullError(self.tier.value, what, nbytes, self._used, self.capacity_bytes, never=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._used + nbytes > self.capacity_bytes:
                if not wait:
                    raise TierFullError(self.tier.value, what, nbytes, self._used, self.capacity_bytes)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TierFullError(self.tier.value, what, nbytes, self._used, self.capacity_bytes, waited=timeout)
                self._cond.wait(remaining)
            self._used += nbytes
            self._peak = max(self._peak, self._used)

    def release(self, nbytes: int) -> None:
        with self._cond:
            assert 0 <= nbytes <= self._used, f"release of {nbytes} B with only {self._used} B reserved"
            self._used -= nbytes
            self._cond.notify_all()

    def reset_peak(self) -> None:
        with self._cond:
            self._peak = self._used

    def __repr__(self) -> str:
        return (f"TierBudget({self.tier.value}: {format_bytes(self._used)} used of {format_bytes(self.capacity_bytes)},"
                f" peak {format_bytes(self._peak)})")
