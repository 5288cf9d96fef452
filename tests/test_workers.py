"""The store's worker pool serves reads before writes (storage/workers.py), and the store uses it that way."""

import os
import re
import threading

import torch

from helpers import wait_until
from storage import NvmeStore, StoreConfig
from storage.workers import BACKGROUND, READAHEAD, URGENT, PriorityWorkers

GATE_S = 30
"""How long a held I/O thread waits for its gate: only a store that never gets there comes near this."""


def _gated(pool: PriorityWorkers) -> threading.Event:
    """Occupy the pool's only thread until the returned event is set."""
    gate, started = threading.Event(), threading.Event()
    # Bounded: a test that fails before setting the gate must not leave a thread that the exit-time drain
    # (storage/workers.py) would then join for ever.
    pool.submit(lambda: (started.set(), gate.wait(30)))
    assert started.wait(5)
    return gate


def test_urgent_then_readahead_then_background_fifo_within_each():
    pool = PriorityWorkers(1, "t")
    order, done = [], threading.Event()
    gate = _gated(pool)
    for name in ("w1", "w2"):
        pool.submit(order.append, name, priority=BACKGROUND)
    pool.submit(order.append, "a1", priority=READAHEAD)
    for name in ("r1", "r2"):
        pool.submit(order.append, name, priority=URGENT)
    pool.submit(order.append, "a2", priority=READAHEAD)
    pool.submit(done.set, priority=BACKGROUND)
    assert pool.pending() == 7
    gate.set()
    assert done.wait(5)
    # weights compute waits for, then state read ahead, then write-back
    assert order == ["r1", "r2", "a1", "a2", "w1", "w2"]
    pool.shutdown()


def test_shutdown_runs_queued_tasks_unless_cancelled():
    for cancel, expect in ((False, ["a", "b"]), (True, [])):
        pool = PriorityWorkers(1, "t")
        order = []
        gate = _gated(pool)
        pool.submit(order.append, "a")
        pool.submit(order.append, "b", priority=URGENT)
        threading.Timer(0.05, gate.set).start()
        pool.shutdown(wait=True, cancel_futures=cancel)
        assert sorted(order) == expect
        try:
            pool.submit(order.append, "c")
        except RuntimeError as e:
            assert "after shutdown" in str(e)
        else:
            raise AssertionError("submit after shutdown was accepted")


def test_a_failing_task_does_not_kill_its_thread():
    pool = PriorityWorkers(1, "t")
    done = threading.Event()
    pool.submit(lambda: 1 / 0)
    pool.submit(done.set)
    assert done.wait(5)
    pool.shutdown()


def test_store_read_overtakes_writes_queued_before_it(tmp_path, monkeypatch):
    """One I/O thread, held inside its first write: a read issued after three more chunk writes goes to the disk
    before any of their blocks (and before the rest of the first write), and every byte still lands where it
    should. Order from the system calls the I/O thread makes: the read's completion also waits for its checksum
    on another thread, which a busy machine may run after the writes."""
    cfg = StoreConfig(block_bytes=64 << 10, workers=1)
    with NvmeStore(tmp_path, capacity_bytes=8 << 20, config=cfg) as s:
        s.write("r", torch.arange(50_000, dtype=torch.float32)).wait()
        real_write, real_read = os.pwritev, os.preadv
        gate, inside = threading.Event(), threading.Event()
        calls = []

        def held_pwritev(*a):
            calls.append("w")
            inside.set()
            assert gate.wait(GATE_S)
            return real_write(*a)

        def preadv(*a):
            calls.append("r")
            return real_read(*a)

        monkeypatch.setattr(os, "pwritev", held_pwritev)
        monkeypatch.setattr(os, "preadv", preadv)
        handles = []
        for i in range(4):
            handles.append(s.write(f"w{i}", torch.full((50_000,), float(i))))
            if i == 0:
                assert inside.wait(GATE_S)  # the thread is now stuck in w0's first block
        rh = s.read("r")
        gate.set()
        out = rh.wait()
        for h in handles:
            h.wait()
        order = "".join(calls)
        assert re.fullmatch(r"wr+w+", order), order  # w0's first block, then every block of r, then the rest
        assert torch.equal(out, torch.arange(50_000, dtype=torch.float32))
        for i in range(4):
            assert torch.equal(s.read(f"w{i}").wait(), torch.full((50_000,), float(i)))


def test_a_store_left_open_finishes_its_writes_and_the_process_exits(tmp_path):
    """Queued writes of a store nobody closed still commit at exit, and the worker threads do not keep the
    process alive (they are drained before the interpreter joins its threads)."""
    import subprocess
    import sys

    code = ("import torch; from storage import NvmeStore, StoreConfig\n"
            f"s = NvmeStore({str(tmp_path)!r}, capacity_bytes=16 << 20, config=StoreConfig(block_bytes=64 << 10))\n"
            "for i in range(8): s.write(f'k{i}', torch.full((100_000,), float(i)))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    with NvmeStore(tmp_path) as s:
        for i in range(8):
            assert torch.equal(s.read(f"k{i}").wait(), torch.full((100_000,), float(i)))


def test_a_burst_of_tasks_gets_new_threads_while_idle_ones_are_still_waking():
    """Threads that were notified but have not woken yet take one task each, no more: tasks beyond them start new
    threads (up to the limit). The pool once counted such threads as free for every later task, so a task queued
    behind blocked ones waited for them although the pool could run it. In the store, a read held by a slow disk
    kept a write queued until the read finished."""
    pool = PriorityWorkers(4, "t")
    gate, quick = threading.Event(), threading.Event()
    try:
        # Two threads: each warm-up task waits at the barrier until the other runs too, so one thread cannot
        # serve both. Then both go idle.
        barrier = threading.Barrier(2, timeout=10)
        done = [threading.Event() for _ in range(2)]
        for e in done:
            pool.submit(lambda e=e: (barrier.wait(), e.set()))
        assert all(e.wait(10) for e in done)
        wait_until(lambda: pool._idle == 2, "both warm-up threads idle")
        # Holding the pool's lock (re-entrant: submit takes it too) while submitting keeps the two notified threads
        # from waking until all three tasks are queued: the state the bug mishandled, made certain.
        with pool._cv:
            pool.submit(gate.wait, 10, priority=URGENT)
            pool.submit(gate.wait, 10, priority=URGENT)
            pool.submit(quick.set, priority=BACKGROUND)  # the two idle threads are taken by the blocked tasks
            assert pool._idle == 2, "the notified threads woke while the pool's lock was held"
        assert quick.wait(10), "a task waited behind blocked ones with threads to spare"
    finally:
        gate.set()
        pool.shutdown()
