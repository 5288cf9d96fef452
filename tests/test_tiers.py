"""TierBudget: reserve / release, peak, back-pressure, timeouts, and the errors a person reads."""

from __future__ import annotations

import threading
import time

import pytest

from storage import Tier, TierBudget, TierFullError, format_bytes


def test_reserve_release_peak():
    b = TierBudget(Tier.DEVICE, 1000)
    b.reserve(300)
    b.reserve(700)
    assert (b.used_bytes, b.free_bytes, b.peak_bytes) == (1000, 0, 1000)
    b.release(700)
    assert (b.used_bytes, b.free_bytes, b.peak_bytes) == (300, 700, 1000)
    b.reset_peak()
    assert b.peak_bytes == 300
    b.reserve(0)
    assert b.used_bytes == 300
    assert "300 B used of 1000 B" in repr(b)


def test_full_raises_at_once_with_the_shortfall():
    b = TierBudget(Tier.HOST, 4096)
    b.reserve(3072)
    with pytest.raises(TierFullError) as e:
        b.reserve(2048, what="optimizer state")
    msg = str(e.value)
    assert "after waiting" not in msg  # at once: no wait ended in a timeout first
    assert "optimizer state needs 2.0 KiB on the host tier" in msg
    assert "only 1.0 KiB of 4.0 KiB is free (1.0 KiB short)" in msg
    assert "raise the host budget" in msg and "wait for space" in msg
    assert isinstance(e.value, MemoryError)
    assert (e.value.tier, e.value.requested, e.value.used, e.value.capacity) == ("host", 2048, 3072, 4096)
    assert b.used_bytes == 3072  # a failed reservation takes nothing


@pytest.mark.parametrize("wait", [False, True])
def test_never_fits_raises_at_once_even_when_waiting(wait):
    b = TierBudget(Tier.NVME, 1 << 20)
    b.reserve(512 << 10)  # held by someone else: a wait, were there one, would end in the timeout's error
    with pytest.raises(TierFullError) as e:
        b.reserve(2 << 20, what="layer", wait=wait, timeout=60)
    assert "after waiting" not in str(e.value)
    assert "more than its whole budget of 1.0 MiB" in str(e.value)
    assert "split the layer into smaller pieces" in str(e.value)


class _AnnouncingCondition(threading.Condition):
    """A Condition that sets ``waiting`` when someone waits on it: the test then knows a reservation is blocked,
    instead of hoping a sleep was long enough for its thread to get there."""

    def __init__(self):
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout=None):
        self.waiting.set()
        return super().wait(timeout)


def test_wait_is_woken_by_release():
    b = TierBudget(Tier.DEVICE, 100)
    b.reserve(80)
    got = threading.Event()

    def waiter():
        b.reserve(50, wait=True, timeout=10)
        got.set()

    b._cond = _AnnouncingCondition()
    t = threading.Thread(target=waiter)
    t.start()
    assert b._cond.waiting.wait(10), "the reservation never waited"
    assert not got.is_set() and b.used_bytes == 80  # blocked: 50 does not fit beside 80
    b.release(80)
    t.join(5)
    assert got.is_set() and b.used_bytes == 50
    assert b.peak_bytes == 80


def test_wait_times_out_with_the_time_waited():
    b = TierBudget(Tier.DEVICE, 100)
    b.reserve(60)
    t0 = time.monotonic()
    with pytest.raises(TierFullError, match=r"after waiting 0\.2 s"):
        b.reserve(50, wait=True, timeout=0.2)
    assert time.monotonic() - t0 >= 0.19  # it waited: a lower bound, which a loaded machine only makes longer
    assert b.used_bytes == 60


def test_used_never_exceeds_capacity_under_threads():
    b = TierBudget(Tier.HOST, 1000)
    over = []

    def worker(n):
        for _ in range(200):
            b.reserve(n, wait=True, timeout=10)
            if b.used_bytes > b.capacity_bytes:
                over.append(b.used_bytes)
            b.release(n)

    threads = [threading.Thread(target=worker, args=(n,)) for n in (300, 400, 500, 600)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a reserving thread is stuck"
    assert not over
    assert b.used_bytes == 0 and b.peak_bytes <= 1000


def test_bad_input():
    with pytest.raises(ValueError, match=r"capacity_bytes of the host tier: expected >= 0, got -1"):
        TierBudget(Tier.HOST, -1)
    b = TierBudget(Tier.HOST, 10)
    with pytest.raises(ValueError, match=r"expected nbytes >= 0, got -5"):
        b.reserve(-5)
    with pytest.raises(AssertionError):
        b.release(1)  # more than reserved: our own invariant


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 << 30) == "3.0 GiB"
    assert format_bytes(5 << 50) == "5120.0 TiB"
