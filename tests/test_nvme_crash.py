"""Crash safety: after ``kill -9`` at any moment, a reopened store holds, for every key, one whole committed
version: the last one reported committed, or one whose commit was under way when the process died; never a
mix of two versions, never a checksum error."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import SMALL
from storage import NvmeStore

ROOT = Path(__file__).resolve().parent.parent
N = 40_000  # int64 elements: 320 KB, 20 blocks of 16 KiB per version
EXTENT_BYTES = 19 * (16 << 10) + 12288  # what one version holds on disk: 19 whole blocks and an 8704 B tail
KEYS = ["a", "b"]

CHILD = r"""
import os, sys, time
import torch
from storage import NvmeStore, StoreConfig

path, slow_s, compact_every, version = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if slow_s:  # slow each block down, so that a kill lands inside a write more often than between writes
    real = os.pwritev
    def pwritev(fd, views, offset):
        time.sleep(slow_s)
        return real(fd, views, offset)
    os.pwritev = pwritev
store = NvmeStore(path, config=StoreConfig(block_bytes=16 << 10, workers=4))
if compact_every:  # compact every few commits, so that kills land inside compactions too
    def maybe_compact():
        if store._journal.records_since_snapshot >= compact_every:
            store._compact()
    store._maybe_compact = maybe_compact
print("ready", flush=True)
while True:
    version += 1
    print(f"writing {version}", flush=True)
    handles = [store.write(key, torch.full((%d,), version, dtype=torch.int64)) for key in %r]
    for h in handles:
        h.wait()
    print(f"committed {version}", flush=True)
""" % (N, KEYS)


def _version_of(t: torch.Tensor) -> int:
    v = int(t[0])
    assert torch.equal(t, torch.full((N,), v, dtype=torch.int64)), f"a mix of versions: {t.unique().tolist()}"
    return v


def _run_and_kill(script: Path, store_dir: Path, version: int, rng: random.Random, *, slow_s: float,
                  compact_every: int, in_flight: bool) -> tuple[int, int]:
    """Run the writer, kill -9 it after a few commits; returns (last version printed committed, last started)."""
    proc = subprocess.Popen([sys.executable, str(script), str(store_dir), str(slow_s), str(compact_every),
                             str(version)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        committed, started = version, version
        want = rng.randint(2, 6)
        lines = iter(proc.stdout.readline, "")
        for line in lines:
            if line.startswith("committed"):
                committed = int(line.split()[1])
                want -= 1
            elif line.startswith("writing"):
                started = int(line.split()[1])
                if want <= 0 and (not in_flight or started > committed):
                    break
        else:
            pytest.fail(f"the writer died by itself: {proc.stderr.read()}")
        time.sleep(rng.random() * (0.01 if in_flight else 0.003))
        os.kill(proc.pid, signal.SIGKILL)
        for line in lines:  # what it printed before it died
            if line.startswith("committed"):
                committed = int(line.split()[1])
            elif line.startswith("writing"):
                started = int(line.split()[1])
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        watchdog.cancel()
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    return committed, started


@pytest.mark.slow
@pytest.mark.parametrize("slow_s,compact_every,in_flight", [(0.0, 0, False), (0.002, 0, True), (0.0, 3, False)],
                         ids=["between-writes", "mid-write", "with-compactions"])
def test_kill_9_leaves_the_last_committed_version(tmp_path, slow_s, compact_every, in_flight):
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    with NvmeStore(store_dir, capacity_bytes=4 << 20, config=SMALL) as s:
        for key in KEYS:
            s.write(key, torch.zeros(N, dtype=torch.int64)).wait()
    rng = random.Random(f"{slow_s}-{compact_every}")
    version = 0
    for _ in range(2):  # kill, reopen, and kill again on the reopened store
        committed, started = _run_and_kill(script, store_dir, version, rng, slow_s=slow_s,
                                           compact_every=compact_every, in_flight=in_flight)
        assert committed >= version + 1
        with NvmeStore(store_dir) as s:
            assert sorted(s.keys()) == KEYS
            versions = [_version_of(s.read(key).wait()) for key in KEYS]
            for v in versions:
                assert committed <= v <= started, (committed, versions, started)
            assert s.verify() == {}
            # Every extent is either free or holds a live chunk: nothing leaked by the crash.
            assert s.free_bytes == s.capacity_bytes - len(KEYS) * EXTENT_BYTES
        version = started


def _slow_writes(monkeypatch, seconds: float) -> None:
    real = os.pwritev

    def pwritev(fd, views, offset):
        time.sleep(seconds)
        return real(fd, views, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)


def test_simulated_crash_mid_write_keeps_the_previous_version(store_dir, monkeypatch):
    s = NvmeStore(store_dir, capacity_bytes=4 << 20, config=SMALL)
    s.write("a", torch.ones(N, dtype=torch.int64)).wait()
    _slow_writes(monkeypatch, 0.05)
    s.write("a", torch.full((N,), 2, dtype=torch.int64))  # 20 blocks at 50 ms each, 4 at a time: ~250 ms
    s.write("new", torch.full((N,), 3, dtype=torch.int64))
    time.sleep(0.06)  # some blocks on disk, the commit far off
    s._simulate_crash()
    monkeypatch.undo()
    with NvmeStore(store_dir) as s2:
        assert s2.keys() == ["a"]
        assert torch.equal(s2.read("a").wait(), torch.ones(N, dtype=torch.int64))
        assert s2.verify() == {}
        assert s2.free_bytes == s2.capacity_bytes - EXTENT_BYTES


def test_simulated_crash_before_any_commit_leaves_an_empty_store(store_dir, monkeypatch):
    s = NvmeStore(store_dir, capacity_bytes=4 << 20, config=SMALL)
    _slow_writes(monkeypatch, 0.05)
    s.write("a", torch.ones(N, dtype=torch.int64))
    time.sleep(0.06)
    s._simulate_crash()
    monkeypatch.undo()
    with NvmeStore(store_dir) as s2:
        assert len(s2) == 0 and s2.free_bytes == s2.capacity_bytes
