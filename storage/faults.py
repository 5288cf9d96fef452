"""Seeded delay injection: the test harness that proves order comes from states and events, not from timing.

Every place where work crosses threads calls :func:`delay` with the name of the site: a store read or write
starting to move its bytes (``store.read``, ``store.write``, on the store's I/O threads: a slow disk) and
completing (``store.read_done``, ``store.write_done``, before the handle is marked done) and each hand-off between the compute thread and the runtime's copy, grad and update threads
(``handoff.fetch``, ``handoff.grad``, ``handoff.update``, at the start of the task on the receiving thread).
With no injector active, :func:`delay` is one global read.

An injector adds a random sleep of 0 to ``max_s`` seconds at each site, from one seeded generator, so a failing
seed can be named in a bug report. ``rule`` replaces the random choice for chosen sites, e.g. a slow disk for
one kind of chunk::

    with inject_delays(seed=3, max_s=0.05):
        train()                                   # every hand-off and I/O completion a little late

    with inject_delays(rule=lambda site, key: 0.3 if site == "store.read" and key.endswith(".grads") else 0):
        train()                                   # reads of grad chunks land 0.3 s late

``OFFLOAD_INJECT_DELAYS=SEED[:MAX_MS]`` in the environment turns one on for the whole process (any command or
test run under it), so a failure seen in a test can be replayed in a script.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from typing import Callable, Iterator

SITES = ("store.read", "store.read_done", "store.write", "store.write_done", "handoff.fetch", "handoff.grad",
         "handoff.update")


class DelayInjector:
    """Sleeps at each site: ``rule(site, key)`` seconds when given (``None``: fall back to random), else with
    probability ``p`` a uniform draw in ``[0, max_s]`` from ``random.Random(seed)``. Counts the sites passed
    (``counts``) and the seconds slept (``slept_s``)."""

    def __init__(self, seed: int | None = 0, max_s: float = 0.05,
                 rule: Callable[[str, str], float | None] | None = None, sites: tuple[str, ...] = SITES,
                 p: float = 1.0):
        if max_s < 0:
            raise ValueError(f"inject_delays: expected max_s >= 0, got {max_s}")
        if not 0 <= p <= 1:
            raise ValueError(f"inject_delays: expected a probability p in [0, 1], got {p}")
        unknown = set(sites) - set(SITES)
        if unknown:
            raise ValueError(f"inject_delays: unknown sites {sorted(unknown)}; the sites are {list(SITES)}")
        self.seed, self.max_s, self.rule, self.sites, self.p = seed, max_s, rule, frozenset(sites), p
        self.slept_s = 0.0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {s: 0 for s in SITES}

    def __call__(self, site: str, key: str = "") -> None:
        if site not in self.sites:
            return
        s = self.rule(site, key) if self.rule is not None else None
        with self._lock:  # one generator shared by threads: draws in a seeded, if interleaved, sequence
            if s is None:
                s = self._rng.uniform(0.0, self.max_s) if self.seed is not None and self._rng.random() < self.p \
                    else 0.0
            self.counts[site] += 1
            self.slept_s += s
        if s > 0:
            time.sleep(s)


_active: DelayInjector | None = None


def delay(site: str, key: str = "") -> None:
    """A hand-off or completion at ``site`` (for ``key``, a chunk's name where there is one): sleeps when an
    injector is active, else returns at once."""
    inj = _active
    if inj is not None:
        inj(site, key)


@contextlib.contextmanager
def inject_delays(seed: int | None = 0, max_s: float = 0.05, *, rule: Callable[[str, str], float | None] | None = None,
                  sites: tuple[str, ...] = SITES, p: float = 1.0) -> Iterator[DelayInjector]:
    """Inject delays at every site while the ``with`` block runs (see the module docstring): each site sleeps
    with probability ``p``. ``seed=None`` with a ``rule``: only the rule's delays."""
    global _active
    prev, _active = _active, DelayInjector(seed, max_s, rule, sites, p)
    try:
        yield _active
    finally:
        _active = prev


def _from_env() -> None:
    global _active
    spec = os.environ.get("OFFLOAD_INJECT_DELAYS")
    if not spec:
        return
    seed, _, ms = spec.partition(":")
    try:
        _active = DelayInjector(int(seed), float(ms or 50) / 1000)
    except ValueError:
        raise ValueError(f"OFFLOAD_INJECT_DELAYS: expected SEED or SEED:MAX_MS (integers), got {spec!r}") from None


_from_env()
