"""Hypothesis drives random sequences of write / read / delete / crash-and-reopen against an in-memory model.

The model keeps, per key, ``latest``: what a read on the live store must return (reads wait for the key's last
write: read your writes), and ``possible``: every version a crash could leave (a write not waited for may or may
not have committed). A read collapses ``possible`` to what it saw; waiting for everything collapses it to
``latest``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
from hypothesis import HealthCheck, event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from storage import ChunkKeyError, NvmeStore, StoreConfig, StoreFullError
from storage.alloc import round_up

KEYS = st.sampled_from(["a", "b", "c"])
DTYPES = st.sampled_from([torch.float32, torch.int16, torch.bool, torch.bfloat16, torch.uint8, torch.int64,
                          torch.complex64])
NUMEL = st.builds(lambda k, j: max(0, k * 1000 - j), st.integers(0, 6), st.integers(0, 999))
"""0 to 6000 elements, spread evenly (plain integers() favours tiny sizes): up to 48 KB, 12 blocks."""
CONFIG = StoreConfig(block_bytes=4096, workers=3)  # up to 12 blocks per chunk, striped over two files
CAPACITY = 40 << 10  # small: StoreFullError is common (a large chunk does not fit at all)
UNKNOWN = object()  # after a crash, until a read tells: one of ``possible``


def make(version: tuple) -> torch.Tensor | None:
    if version is None:
        return None
    seed, dtype, numel = version
    base = (torch.arange(numel, dtype=torch.int64) * 31 + seed * 7919) % 251
    if dtype == torch.bool:
        return (base % 2).bool()
    if dtype.is_complex:
        return torch.complex(base.float(), -base.float()).to(dtype)
    return base.to(dtype)


def same(t: torch.Tensor, version) -> bool:
    expect = make(version)
    return expect is not None and t.dtype == expect.dtype and t.shape == expect.shape and torch.equal(t, expect)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="nvme-prop-")
        self.dirs = [os.path.join(self.root, "d0"), os.path.join(self.root, "d1")]
        for d in self.dirs:
            os.mkdir(d)
        self.store = NvmeStore(self.dirs, capacity_bytes=CAPACITY, config=CONFIG)
        self.latest: dict[str, object] = {}  # key -> version tuple, None (absent) or UNKNOWN
        self.possible: dict[str, set] = {}
        self.seed = 0

    def _latest(self, key):
        return self.latest.get(key, None)

    def _possible(self, key) -> set:
        return self.possible.get(key, {None})

    def _settle(self) -> None:
        """Everything in flight is done: each key holds its latest version."""
        for key, v in self.latest.items():
            if v is not UNKNOWN:
                self.possible[key] = {v}

    def _check_space(self) -> None:
        """With nothing in flight, the used bytes are exactly the extents of the live chunks: no leak."""
        used = sum(round_up(b.length) for c in self.store._index.values() for b in c.blocks)
        assert self.store.free_bytes == self.store.capacity_bytes - used

    def _new_version(self, dtype, numel):
        self.seed += 1
        return (self.seed, dtype, numel)

    @rule(key=KEYS, dtype=DTYPES, numel=NUMEL)
    def write(self, key, dtype, numel):
        v = self._new_version(dtype, numel)
        try:
            h = self.store.write(key, make(v))
        except StoreFullError:  # raised before anything changed; and a failed allocation must leak nothing
            event("store full")
            self.flush()
            return
        info = h.wait()
        assert info.key == key and info.dtype == dtype and info.nbytes == make(v).numel() * make(v).element_size()
        self.latest[key], self.possible[key] = v, {v}

    @rule(key=KEYS, dtype=DTYPES, numel=NUMEL)
    def write_nowait(self, key, dtype, numel):
        v = self._new_version(dtype, numel)
        try:
            self.store.write(key, make(v))
        except StoreFullError:
            event("store full")
            self.flush()
            return
        self.latest[key] = v
        self.possible[key] = self._possible(key) | {v}

    @rule(key=KEYS, dtype=DTYPES, numels=st.lists(NUMEL, min_size=2, max_size=4))
    def burst(self, key, dtype, numels):
        """Several writes to one key in flight at once, big and small: later ones often finish first."""
        for numel in numels:
            self.write_nowait(key, dtype, numel)

    @rule(key=KEYS, strided_out=st.booleans())
    def read(self, key, strided_out):
        latest = self._latest(key)
        try:
            if strided_out and latest not in (None, UNKNOWN):
                expect = make(latest)
                out = torch.empty(expect.numel() * 2, dtype=expect.dtype)[::2]  # non-contiguous destination
                got = self.store.read(key, out=out).wait().view(expect.shape)
            else:
                got = self.store.read(key).wait()
        except ChunkKeyError:
            assert None in (self._possible(key) if latest is UNKNOWN else {latest})
            self.latest[key], self.possible[key] = None, {None}
            return
        if latest is UNKNOWN:
            seen = [v for v in self._possible(key) if v is not None and same(got, v)]
            assert seen, f"read {key!r} after a crash: no version in {self._possible(key)} matches"
            latest = seen[0]
        else:
            assert same(got, latest), f"read {key!r}: expected version {latest}"
        self.latest[key], self.possible[key] = latest, {latest}

    @rule(key=KEYS)
    def delete(self, key):
        latest = self._latest(key)
        try:
            self.store.delete(key)  # waits for a write in flight to the key: never ambiguous
        except ChunkKeyError:
            assert latest is None or (latest is UNKNOWN and None in self._possible(key))
        else:
            assert latest is not None and (latest is not UNKNOWN or self._possible(key) != {None})
        self.latest[key], self.possible[key] = None, {None}

    @rule()
    def flush(self):
        self.store.flush()
        self._settle()
        self._check_space()

    @rule()
    def crash_and_reopen(self):
        if any(len(self._possible(key)) > 1 for key in self.latest):
            event("crash with writes in flight")
        self.store._simulate_crash()
        self.store = NvmeStore(self.dirs, config=CONFIG)
        for key in list(self.latest):
            if len(self._possible(key)) > 1:
                self.latest[key] = UNKNOWN
        self._check_space()

    @rule(key=KEYS, dtype=DTYPES, numel=NUMEL)
    def write_then_crash(self, key, dtype, numel):
        """kill -9 a moment after a write was issued: its blocks are queued or half written."""
        self.write_nowait(key, dtype, numel)
        self.crash_and_reopen()

    @rule()
    def close_and_reopen(self):
        self.store.close()
        self._settle()
        self.store = NvmeStore(self.dirs, config=CONFIG)
        self._check_space()

    @invariant()
    def keys_match_the_model(self):
        for key in ("a", "b", "c"):
            possible = self._possible(key)
            if None not in possible:
                # Every version this key can hold is committed, or in flight over a committed one.
                assert key in self.store, key
            if possible == {None}:
                assert key not in self.store, key

    def teardown(self):
        try:
            self.store.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


StoreMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=25, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_store_against_model = StoreMachine.TestCase
