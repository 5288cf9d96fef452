"""Sharded checkpoints: save_checkpoint / load_checkpoint with a ShardedOffloadOptimizer on 2 gloo ranks, resumed
on 2 ranks, on 1 rank and from 1 process, against the run that never stopped; a missing or corrupt rank file and
a rank killed mid-save.

The ranks run as in tests/test_distributed.py (its helpers; the reasoning about reduction orders is there). A
1-rank resume is fed the global batch with the ranks' arithmetic, ``(g0 + g1) / 2`` (plain_dp), or as two
micro-batches of loss / 2 (``g0 / 2 + g1 / 2``: halving is exact, so the same sum): both are the 2-rank run's
reduction order, so every resume is compared **bit for bit**, no tolerance.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from offload import (CheckpointReader, OffloadConfig, OffloadOptimizer, ShardedOffloadOptimizer, load_checkpoint,
                     save_checkpoint)
from offload.checkpoint import CheckpointError, CheckpointWriter
from test_distributed import (BUCKET, SMALL, _rank_main, adamw, assert_equal_weights, assert_same_state, batches,
                              gpt, lm_loss, plain_dp, rows, run_ranks, train_sharded, weights)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # every test here starts other processes


def nvme(d) -> OffloadConfig:
    """State on NVMe in several subgroups per rank (entries cover ranges of params on both sides)."""
    os.makedirs(d, exist_ok=True)
    return OffloadConfig(state_tier="nvme", nvme_dirs=str(d), **SMALL)


def other_init(seed):
    """The GPT with other weights: a load must replace every one of them."""
    m = gpt()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def seed_rank(rank):
    """Each rank its own random streams, as a user seeding with the rank would have."""
    torch.manual_seed(100 + rank)
    np.random.seed(100 + rank)
    random.seed(100 + rank)


def draws():
    """The next numbers of the torch, numpy and python generators (consumes them)."""
    return torch.rand(4), np.random.rand(2).tolist(), random.random()


def same_draws(a, b):
    return torch.equal(a[0], b[0]) and a[1:] == b[1:]


def solo_resume(model, opt, data):
    """A 1-rank sharded run fed both ranks' rows as two micro-batches (the ranks' reduction order, see above)."""
    for x in data:
        with opt.no_sync():
            (lm_loss(model, rows(x, 0, 0)) / 2).backward()
        (lm_loss(model, rows(x, 1, 0)) / 2).backward()
        opt.step()
        opt.zero_grad()


# -- 1. 2 ranks -> 2 ranks and -> 1 rank ---------------------------------------------------------------------------
def _two_ranks(rank, tmp):
    data = batches(6)
    ckpt = tmp / "ckpt"
    model = gpt()
    opt = ShardedOffloadOptimizer(adamw(model.parameters()), config=nvme(tmp / "a"), bucket_bytes=BUCKET)
    sched = step_lr(opt)
    train_sharded(model, opt, data[:3], rank, sched=sched)
    seed_rank(rank)
    path = save_checkpoint(ckpt, model, opt, step=3, extra={"seen": 3}, scheduler=sched)
    out = {"path": str(path), "after_save": draws(), "ranges": opt.shard_ranges()}
    train_sharded(model, opt, data[3:], rank, sched=sched)
    out["continued"], out["state"] = weights(model), opt.state_dict()
    opt.close()

    # 2 ranks, other buckets (so other ranges per rank), another store, other weights and RNG before the load
    m2 = other_init(7)
    o2 = ShardedOffloadOptimizer(adamw(m2.parameters()), config=nvme(tmp / "b"), bucket_bytes=BUCKET // 2)
    s2 = step_lr(o2)
    torch.manual_seed(999)
    out["meta"] = load_checkpoint(ckpt, m2, o2, scheduler=s2)
    out["after_load"] = draws()
    train_sharded(m2, o2, data[3:], rank, sched=s2)
    out["two"], out["two_state"], out["two_lr"] = weights(m2), o2.state_dict(), s2.get_last_lr()
    o2.close()

    solo = dist.new_group([0])  # every rank creates it; only rank 0 uses it
    dist.barrier()
    if rank == 0:
        # 1 rank, sharded (world 1): rank 0 of the save's RNG comes back
        m1 = other_init(8)
        o1 = ShardedOffloadOptimizer(adamw(m1.parameters()), config=nvme(tmp / "c"), process_group=solo)
        s1 = step_lr(o1)
        torch.manual_seed(999)
        load_checkpoint(ckpt, m1, o1, scheduler=s1)
        out["one_after_load"] = draws()
        for x in data[3:]:
            solo_resume(m1, o1, [x])
            s1.step()
        out["one"], out["one_state"] = weights(m1), o1.state_dict()
        o1.close()
        # 1 process, OffloadOptimizer (state on NVMe, its own subgroup cuts) and plain fused AdamW
        for key, make in (("offload", lambda ps: OffloadOptimizer(adamw(ps), config=nvme(tmp / "d"))),
                          ("plain", lambda ps: adamw(ps, fused=True))):
            m = other_init(9)
            o = make(m.parameters())
            s = step_lr(o)
            meta = load_checkpoint(ckpt, m, o, scheduler=s)
            assert meta["world"] == 2 and meta["step"] == 3 and meta["extra"] == {"seen": 3}, meta
            plain_dp(m, o, data[3:], sched=s)
            out[key], out[key + "_state"] = weights(m), o.state_dict()
    return out


def test_two_ranks_resume_on_two_and_on_one_bit_identical(tmp_path):
    """2 ranks train 3 steps (AdamW state on NVMe, StepLR), save, train to 6: the reference. Resumed from the
    checkpoint on 2 ranks with other buckets, on 1 rank (sharded, world 1), and in 1 process with OffloadOptimizer
    and with plain fused AdamW: every weight and every state tensor bit-identical to the reference. Each rank's
    RNG streams come back as they were at the save (rank 0's in the 1-rank resumes)."""
    r0, r1 = run_ranks(_two_ranks, tmp_path)
    for key in ("two", "one", "offload", "plain"):
        assert_equal_weights(r0["continued"], r0[key], f"resumed ({key}) vs continued")
        assert_same_state(r0["state"], r0[f"{key}_state"])
    assert_equal_weights(r1["continued"], r1["two"], "rank 1 resumed vs continued")
    assert_same_state(r1["state"], r1["two_state"])
    assert r0["two_lr"] == r1["two_lr"] == [1e-2 * 0.5 ** 3]
    assert r0["meta"]["step"] == 3 and r0["meta"]["world"] == 2

    for r in (r0, r1):
        assert same_draws(r["after_save"], r["after_load"])
    assert not same_draws(r0["after_save"], r1["after_save"])
    assert same_draws(r0["after_save"], r0["one_after_load"])

    # The layout: one data file per rank, each rank's weights and state in its own, Adam's step written once per
    # parameter although both ranks hold it for the params they share (the reader refuses overlapping entries).
    ckpt = Path(r0["path"])
    assert sorted(os.listdir(ckpt)) == ["data-00000.bin", "data-00001.bin", "manifest.json"]
    with CheckpointReader(ckpt) as reader:
        man = reader.meta
        assert [(f["path"], f["rank"]) for f in man["files"]] == [("data-00000.bin", 0), ("data-00001.bin", 1)]
        for f in (0, 1):
            keys = {e["key"] for e in man["entries"] if e["file"] == f}
            assert {"param", "exp_avg", "exp_avg_sq", "state"} <= keys, (f, keys)
        cut = {s.index for s in r0["ranges"]} & {s.index for s in r1["ranges"]}
        assert cut, "some parameter is cut across the ranks"
        names = [p["name"] for p in sorted(man["params"], key=lambda p: p["index"])]
        for i in cut:
            files = {e["file"] for e in man["entries"] if e["name"] == names[i] and e["key"] == "exp_avg"}
            assert files == {0, 1}, names[i]
            assert sum(e["name"] == names[i] and e["key"] == "step" for e in man["entries"]) == 1
        reader.verify()


# -- 2. 1 process -> 2 ranks ---------------------------------------------------------------------------------------
def _one_to_two(rank, tmp):
    data = batches(6)
    ckpt = tmp / "ckpt"
    out = {}
    if rank == 0:  # a 1-process run, OffloadOptimizer on NVMe with subgroups cut unlike the shards
        m = gpt()
        off = OffloadOptimizer(adamw(m.parameters()), config=nvme(tmp / "single"))
        plain_dp(m, off, data[:3])
        seed_rank(0)
        save_checkpoint(ckpt, m, off, step=3)
        out["after_save"] = draws()
        plain_dp(m, off, data[3:])
        out["continued"], out["state"] = weights(m), off.state_dict()
        off.close()
    dist.barrier()
    model = other_init(7 + rank)
    opt = ShardedOffloadOptimizer(adamw(model.parameters()), config=nvme(tmp / "b"), bucket_bytes=BUCKET)
    torch.manual_seed(555)
    before = torch.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["meta"] = load_checkpoint(ckpt, model, opt)
    out["warnings"] = [str(w.message) for w in caught]
    out["kept_own_rng"] = torch.equal(torch.get_rng_state(), before)
    out["after_load"] = draws()
    train_sharded(model, opt, data[3:], rank)
    out["two"], out["two_state"] = weights(model), opt.state_dict()
    opt.close()
    return out


def test_one_process_checkpoint_resumes_on_two_ranks(tmp_path):
    """A 1-process checkpoint (OffloadOptimizer, state on NVMe in 4096-element subgroups, so its entries cut the
    params elsewhere than the shards do) resumed on 2 ranks: bit-identical to the 1-process run going on. Rank 0
    gets the saved RNG; rank 1, which the save did not have, keeps its own and says so."""
    r0, r1 = run_ranks(_one_to_two, tmp_path)
    assert r0["meta"]["world"] == 1
    for r in (r0, r1):
        assert_equal_weights(r0["continued"], r["two"], "resumed on 2 ranks vs continued")
        assert_same_state(r0["state"], r["two_state"])
    assert same_draws(r0["after_save"], r0["after_load"]) and not r0["kept_own_rng"] and not r0["warnings"]
    assert r1["kept_own_rng"]
    assert len(r1["warnings"]) == 1 and "this is rank 1 of 2, which keeps its own RNG state" in r1["warnings"][0]


# -- 3. bf16: fp32 masters by range ------------------------------------------------------------------------------
def _bf16(rank, tmp):
    data = batches(4)
    ckpt = tmp / "ckpt"
    model = gpt().to(torch.bfloat16)
    opt = ShardedOffloadOptimizer(adamw(model.parameters()), config=OffloadConfig(state_tier="host"),
                                  bucket_bytes=BUCKET)
    train_sharded(model, opt, data[:2], rank)
    save_checkpoint(ckpt, model, opt, step=2)
    out = {"masters": {s.index: v.clone() for s, k, v in opt.iter_state() if k == "master"},
           "ranges": {s.index: (s.start, s.stop) for s in opt.shard_ranges()}}
    train_sharded(model, opt, data[2:], rank)
    out["continued"], out["state"] = weights(model), opt.state_dict()
    opt.close()
    m2 = other_init(7).to(torch.bfloat16)
    o2 = ShardedOffloadOptimizer(adamw(m2.parameters()), config=OffloadConfig(state_tier="host"),
                                 bucket_bytes=BUCKET // 2)
    load_checkpoint(ckpt, m2, o2)
    train_sharded(m2, o2, data[2:], rank)
    out["two"], out["two_state"] = weights(m2), o2.state_dict()
    o2.close()
    if rank == 0:
        m1 = other_init(8).to(torch.bfloat16)
        o1 = OffloadOptimizer(adamw(m1.parameters()), config=OffloadConfig(state_tier="host"))
        load_checkpoint(ckpt, m1, o1)
        plain_dp(m1, o1, data[2:])
        out["one"], out["one_state"] = weights(m1), o1.state_dict()
    return out


def test_bf16_masters_are_saved_by_range_and_resume(tmp_path):
    """bf16 params: each rank's fp32 master ranges are saved (not re-derived from the bf16 weights, which would
    lose their low bits) and resume bit-identically on 2 ranks with other buckets and in 1 process."""
    r0, r1 = run_ranks(_bf16, tmp_path)
    with CheckpointReader(tmp_path / "ckpt") as reader:
        names = [p["name"] for p in sorted(reader.meta["params"], key=lambda p: p["index"])]
        lost_bits = 0
        for r in (r0, r1):
            for i, master in r["masters"].items():
                start, stop = r["ranges"][i]
                assert torch.equal(reader.read(names[i], "master", start, stop), master.reshape(-1)), names[i]
                lost_bits += not torch.equal(master.reshape(-1).bfloat16().float(), master.reshape(-1))
        assert lost_bits, "the masters hold bits the bf16 weights do not"
    for r in (r0, r1):
        assert_equal_weights(r["continued"], r["two"], "bf16 resumed on 2 ranks vs continued")
        assert_same_state(r["state"], r["two_state"])
    assert_equal_weights(r0["continued"], r0["one"], "bf16 resumed in 1 process vs continued")
    assert_same_state(r0["state"], r0["one_state"])


# -- 4. a missing or corrupt rank file, bad calls ------------------------------------------------------------------
def _flip_byte(path: Path, key: str, file: int) -> str:
    """Flip a bit in the first ``key`` entry of data file ``file``; returns the entry's description."""
    man = json.loads((path / "manifest.json").read_text())
    e = next(e for e in man["entries"] if e["key"] == key and e["file"] == file)
    with open(path / man["files"][file]["path"], "r+b") as f:
        f.seek(e["offset"] + 8)
        b = f.read(1)
        f.seek(e["offset"] + 8)
        f.write(bytes([b[0] ^ 0x01]))
    return f"entry {e['name']!r} {e['key']!r} [{e['start']}, {e['stop']})"


def _errors(rank, tmp):
    model = gpt()
    opt = ShardedOffloadOptimizer(adamw(model.parameters()), config=OffloadConfig(state_tier="host"),
                                  bucket_bytes=BUCKET)
    data = batches(2)
    train_sharded(model, opt, data[:1], rank)
    good = tmp / "ckpt"
    save_checkpoint(good, model, opt, step=1)
    if rank == 0:
        shutil.copytree(good, tmp / "missing")
        os.remove(tmp / "missing" / "data-00001.bin")
        shutil.copytree(good, tmp / "corrupt")
        (tmp / "flipped").write_text(_flip_byte(tmp / "corrupt", "exp_avg", 1))  # a range rank 1 owns
    dist.barrier()
    out = {"flipped": (tmp / "flipped").read_text()}

    def error(fn):
        try:
            fn()
        except (CheckpointError, ValueError, RuntimeError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    out["missing"] = error(lambda: load_checkpoint(tmp / "missing", model, opt))
    out["corrupt"] = error(lambda: load_checkpoint(tmp / "corrupt", model, opt))
    out["paths"] = error(lambda: save_checkpoint(tmp / f"other{rank}", model, opt))
    dist.barrier()  # rank 0 has cleaned up
    out["left"] = sorted(n for n in os.listdir(tmp) if n.startswith((".other", "other")))
    lm_loss(model, rows(data[1], rank, 0)).backward()
    out["mid_step"] = error(lambda: save_checkpoint(good, model, opt))
    opt.zero_grad()
    # After all that every rank is still in step: the intact checkpoint loads and training goes on.
    load_checkpoint(good, model, opt)
    train_sharded(model, opt, data[1:], rank)
    out["weights"] = weights(model)
    opt.close()
    return out


def test_missing_or_corrupt_rank_file_is_named_on_every_rank(tmp_path):
    """A checkpoint without rank 1's data file, or with a flipped byte in it: every rank raises, naming the file
    and the rank (rank 0 although its own reads were fine: it must not wait in a collective rank 1 never
    joins). Ranks passing different paths, or saving between backward and step(), are refused on every rank
    and write nothing. The ranks stay in step: the intact checkpoint then loads and training goes on."""
    r0, r1 = run_ranks(_errors, tmp_path)
    for r in (r0, r1):
        assert r["missing"] and "data file 'data-00001.bin' (rank 1's part of a 2-rank save) is missing" in \
            r["missing"]
        assert r["corrupt"] and r0["flipped"] in r["corrupt"], r["corrupt"]
        assert "'data-00001.bin' (rank 1's part of a 2-rank save)" in r["corrupt"] and "CRC-32C" in r["corrupt"]
        assert r["paths"] and "every rank must pass the same path" in r["paths"], r["paths"]
        assert r["left"] == [], "a refused save left files"
        assert r["mid_step"] and "after backward and before step()" in r["mid_step"], r["mid_step"]
    assert r0["corrupt"].startswith("CheckpointError: load_checkpoint: rank 1 of 2 failed, so every rank stops")
    assert r1["paths"].startswith("ValueError: save_checkpoint: every rank must pass the same path: rank 0 passed")
    assert_equal_weights(r0["weights"], r1["weights"], "rank 0 vs rank 1 after the refusals")
    # One process reading the 2-rank checkpoint names the missing file the same way.
    m = gpt()
    with pytest.raises(CheckpointError, match=r"'data-00001.bin' \(rank 1's part of a 2-rank save\) is missing"):
        load_checkpoint(tmp_path / "missing", m, adamw(m.parameters()))


# -- 5. a rank killed mid-save -------------------------------------------------------------------------------------
def _killed_mid_save(rank, tmp):
    data = batches(3)
    model = gpt()
    opt = ShardedOffloadOptimizer(adamw(model.parameters()), config=nvme(tmp / "nvme"), bucket_bytes=BUCKET)
    train_sharded(model, opt, data[:2], rank)
    save_checkpoint(tmp / "ckpt", model, opt, step=2)
    train_sharded(model, opt, data[2:], rank)
    if rank == 1:
        real, count = CheckpointWriter.add, [0]

        def add(self, *a, **kw):
            count[0] += 1
            if count[0] == 6:  # some of its entries written; rank 0 may be done and waiting for the parts
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *a, **kw)

        CheckpointWriter.add = add
    try:
        save_checkpoint(tmp / "ckpt", model, opt, step=3)
    except (RuntimeError, ValueError) as e:  # gloo's error, or ours (CheckpointError is a ValueError)
        return {"error": f"{type(e).__name__}: {e}", "left": [n for n in os.listdir(tmp) if ".tmp-" in n]}
    return {"error": None}


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    """Rank 1 is SIGKILLed while writing its part of the step-3 checkpoint. Rank 0's save raises (gloo reports
    the closed connection) instead of hanging, and removes the temporary directory; the step-2 checkpoint is
    intact and loads, in one process, to exactly 2 steps of plain training."""
    ctx = mp.get_context("spawn")  # not mp.spawn: it would kill rank 0 as soon as rank 1 dies
    procs = [ctx.Process(target=_rank_main, args=(r, _killed_mid_save, 2, str(tmp_path), {})) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, -signal.SIGKILL], "rank 0 hung or failed, or rank 1 was not killed"
    r0 = torch.load(tmp_path / "result0.pt", weights_only=False)
    assert r0["error"] and "rank 0 of 2 lost the other ranks" in r0["error"] and "by peer" in r0["error"], r0["error"]
    assert r0["left"] == [], "rank 0 left the temporary directory"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran: matmuls sum in another order with more threads
    try:
        ref = gpt()
        ref_opt = adamw(ref.parameters(), fused=True)
        plain_dp(ref, ref_opt, batches(3)[:2])
    finally:
        torch.set_num_threads(threads)
    m = other_init(3)
    opt = adamw(m.parameters(), fused=True)
    assert load_checkpoint(tmp_path / "ckpt", m, opt)["step"] == 2
    assert_equal_weights(weights(ref), weights(m), "the step-2 checkpoint vs 2 plain steps")
    assert_same_state(ref_opt.state_dict(), opt.state_dict())


# -- 6. the example: save, stop, resume under torchrun -------------------------------------------------------------
def test_ddp_example_resumes_where_it_saved(tmp_path):
    """examples/finetune_ddp.py on 2 ranks: 3 steps saving at step 2; a second launch resumes from it and prints
    the same step-2 loss (6 decimals) and learning rate as the first."""
    def launch(*args):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(ROOT / "examples" / "finetune_ddp.py"), "--steps", "3", "--checkpoint",
                              str(tmp_path / "ckpt"), *args], capture_output=True, text=True, timeout=180, cwd=ROOT,
                             env=env, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    def steps(out):  # (step, loss, lr); the ranks share stdout, so a line may run into another rank's
        return re.findall(r"step +(\d+)  loss (\d+\.\d{6})  lr (\S+e[+-]\d\d)", out.stdout)

    first = launch("--save-every", "2", "--nvme", str(tmp_path / "a"))
    resumed = launch("--resume", "--nvme", str(tmp_path / "b"))
    assert [s for s, _, _ in steps(first)] == ["0", "1", "2"], first.stdout
    assert steps(resumed) == steps(first)[2:], (first.stdout, resumed.stdout)
