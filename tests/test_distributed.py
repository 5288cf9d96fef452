"""ShardedOffloadOptimizer on 2 gloo processes against single-process plain PyTorch.

Each test spawns its ranks (torch.multiprocessing; a FileStore rendezvous, so no port to race for), trains,
and sends back what it measured through a file; the assertions run here. Rank 0 also trains the plain
references, in the same process settings (one thread) as the ranks.

Two references, and why:

* ``plain_dp``: plain ``torch.optim.AdamW(fused=True)`` on the same global batch, each rank's part
  backpropagated alone and the grads combined as the ranks combine them, ``(g0 + g1) / 2`` (two terms commute,
  halving is exact). This is the sharded run's arithmetic with no sharding, so the sharded run must match it
  **bit for bit**: any error of sharding, offloading, bucketing or resharding shows as a difference.
* ``plain_full``: plain AdamW on one backward over the whole global batch. Its grads differ from the above in
  rounding only (the batch sum inside each matmul runs in another order; ~1e-7 relative), so we compare within
  ``FULL_BATCH_ATOL`` = 1e-5 after 5 steps at lr 1e-2. Adam's update lr * m / (sqrt(v) + eps) is insensitive to
  the grads' scale, so rounding noise moves weights by ~lr * 1e-5 per step; we measure at most 4e-7 here, and a
  real bug (grads not averaged, a shard updated twice or not at all, a stale LR) moves them by ~lr = 1e-2.
  The model has no biases: a key projection's bias has an exactly zero true gradient (softmax ignores a shift),
  so its computed grad is pure rounding noise that Adam blows up to +-lr steps, and no two reduction orders
  could agree on it.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import helpers
import offload.distributed
from helpers import lm_loss, token_batches
from offload import OffloadConfig, OffloadOptimizer, ShardedOffloadOptimizer
from scheduler.workload import TransformerShape

SHAPE = TransformerShape(n_layer=2, d_model=64, n_head=4, d_ff=128, vocab=128, n_pos=16, bias=False,
                         norm="layernorm", tied=True)
WORLD = 2
LR = 1e-2
ROWS = 4  # sequences per rank per micro-batch
FULL_BATCH_ATOL = 1e-5
SMALL = dict(subgroup_numel=4096, buffers=2)  # several NVMe subgroups per rank, more than the buffers
BUCKET = 64 << 10  # several buckets: reductions start during backward, params cut across ranks


def gpt():
    return helpers.gpt(SHAPE)


def batches(steps, micro=1, seed=1):
    """Per step, the global batch: WORLD * micro * ROWS sequences; rank r's micro-batch m is rows(x, r, m)."""
    return token_batches(steps, SHAPE.vocab, rows=WORLD * micro * ROWS, seed=seed)


def rows(x, rank, m, micro=1):
    i = (rank * micro + m) * ROWS
    return x[i:i + ROWS]


def same_loss(model, idx, rank):
    """The loss every rank computes (the loss functions below take the rank: one test gives rank 0 more)."""
    return lm_loss(model, idx)


def adamw(params, fused=None):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1, fused=fused)


def train_sharded(model, opt, data, rank, micro=1, sched=None, loss_fn=same_loss, zero_to_none=True):
    """The user's loop on one rank: its micro-batches, all but the last under no_sync()."""
    losses = []
    for x in data:
        for m in range(micro):
            ctx = opt.no_sync() if m < micro - 1 else contextlib.nullcontext()
            with ctx:
                loss = loss_fn(model, rows(x, rank, m, micro), rank) / micro
                loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=zero_to_none)
        if sched is not None:
            sched.step()
    return losses


def plain_dp(model, opt, data, micro=1, sched=None, clip=None, loss_fn=same_loss):
    """Plain PyTorch with the ranks' arithmetic: each rank's grad alone, then (g0 + g1) / WORLD."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for x in data:
        per_rank = []
        for r in range(WORLD):
            for m in range(micro):
                loss = loss_fn(model, rows(x, r, m, micro), r) / micro
                loss.backward()
                losses.append(loss.item())
            per_rank.append([p.grad for p in params])
            for p in params:
                p.grad = None
        for p, grads in zip(params, zip(*per_rank)):
            present = [g for g in grads if g is not None]
            if present:  # a rank without a grad adds zeros
                p.grad = (grads[0] + grads[1] if len(present) == 2 else present[0] + 0.0) / WORLD
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip is not None else None
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    return losses, norm


def plain_full(model, opt, data, sched=None, clip=None):
    for x in data:
        lm_loss(model, x).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_equal_weights(a, b, what):
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"{what}: param {i} differs by {(x - y).abs().max().item():.3g}"


def assert_close_weights(a, b, atol, what):
    worst = max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
    print(f"{what}: max |diff| {worst:.3g} (allowed {atol:g})")
    assert worst <= atol, f"{what}: max |diff| {worst:.3g} > {atol:g}"


def assert_same_state(sd_ref, sd):
    assert sd_ref["state"].keys() == sd["state"].keys()
    for k, entry in sd_ref["state"].items():
        assert entry.keys() == sd["state"][k].keys(), (k, entry.keys(), sd["state"][k].keys())
        for key, v in entry.items():
            assert torch.equal(v, sd["state"][k][key]), (k, key)
    for g1, g2 in zip(sd_ref["param_groups"], sd["param_groups"], strict=True):
        assert {k: v for k, v in g1.items() if k != "fused"} == {k: v for k, v in g2.items() if k != "fused"}


# -- running ranks -------------------------------------------------------------------------------------------------
def _rank_main(rank, worker, world, tmp, kwargs):
    faulthandler.enable(all_threads=True)  # a rank that aborts prints every thread's stack
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    with offload.distributed.spawned_rank():  # results saved inside; then out without the interpreter's teardown
        out = worker(rank, Path(tmp), **kwargs)
        torch.save(out, Path(tmp) / f"result{rank}.pt")


def run_ranks(worker, tmp_path, world=WORLD, timeout_s=120, **kwargs) -> list:
    """``worker(rank, tmp_path, **kwargs)`` on ``world`` gloo ranks; returns what each returned."""
    ctx = torch.multiprocessing.spawn(_rank_main, args=(worker, world, str(tmp_path), kwargs), nprocs=world,
                                      join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):  # raises, with the rank's traceback, when a rank raised
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks did not finish in {timeout_s} s (collectives out of step hang)")
    return [torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in range(world)]


# -- 1. parity: state sharded on NVMe ------------------------------------------------------------------------------
def _parity(rank, tmp):
    data = batches(5)
    model = gpt()
    cfg = OffloadConfig(state_tier="nvme", nvme_dirs=str(tmp / "nvme"), **SMALL)
    opt = ShardedOffloadOptimizer(adamw(model.parameters()), config=cfg, bucket_bytes=BUCKET)
    losses = train_sharded(model, opt, data, rank)
    out = {"weights": weights(model), "losses": losses, "report": opt.report(), "state": opt.state_dict(),
           "store": sorted(os.listdir(tmp / "nvme" / f"rank{rank}"))}
    opt.close()
    if rank == 0:
        ref = gpt()
        ref_opt = adamw(ref.parameters(), fused=True)
        out["ref_losses"], _ = plain_dp(ref, ref_opt, data)
        out["ref"], out["ref_state"] = weights(ref), ref_opt.state_dict()
        full = gpt()
        plain_full(full, adamw(full.parameters(), fused=True), data)
        out["full"] = weights(full)
    return out


@pytest.mark.slow
def test_two_ranks_match_plain_training(tmp_path):
    """2 ranks, AdamW state sharded on NVMe (per-rank stores, several subgroups streamed), several buckets
    reduce-scattered during backward: bit-identical to plain AdamW with the ranks' reduction order, and within
    the stated tolerance of one backward over the whole batch."""
    r0, r1 = run_ranks(_parity, tmp_path)
    assert_equal_weights(r0["weights"], r1["weights"], "rank 0 vs rank 1")
    assert_equal_weights(r0["ref"], r0["weights"], "sharded vs plain (ranks' reduction order)")
    assert_same_state(r0["ref_state"], r0["state"])
    assert_same_state(r0["ref_state"], r1["state"])
    assert r0["losses"] + r1["losses"] == [r0["ref_losses"][2 * s + r] for r in range(WORLD) for s in range(5)]
    assert_close_weights(r0["full"], r0["weights"], FULL_BATCH_ATOL, "sharded vs plain (one full-batch backward)")
    for rank, r in enumerate((r0, r1)):
        rep = r["report"]
        assert rep["reduce"] == "reduce_scatter" and rep["buckets"] >= 3
        assert rep["buckets_in_backward"] == 5 * rep["buckets"] and rep["buckets_at_step"] == 0  # all overlapped
        inner = rep["inner"]
        assert len(inner["subgroups"]) > 2 and all(s["tier"] == "nvme" for s in inner["subgroups"])
        assert inner["read_bytes"] > 0 and inner["write_bytes"] > 0
        assert r["store"], f"rank {rank} wrote nothing to its own store directory"
    assert r0["report"]["owned"] + r1["report"]["owned"] == r0["report"]["params"]


# -- 2. the all-reduce fallback, accumulation, params without grads ------------------------------------------------
class _Extras(torch.nn.Module):
    """The GPT, plus a head only rank 0 uses, a layer nobody uses and a frozen embedding."""

    def __init__(self):
        super().__init__()
        self.gpt = gpt()
        self.aux = torch.nn.Linear(SHAPE.d_model, 1)
        self.unused = torch.nn.Linear(4, 4)
        self.gpt.wpe.requires_grad_(False)


def _extras_loss(model, x, rank):
    loss = lm_loss(model.gpt, x)
    if rank == 0:
        loss = loss + model.aux(model.gpt.wte(x)).square().mean()
    return loss


def _no_reduce_scatter(*args, **kwargs):
    raise RuntimeError("ProcessGroupGloo does not support reduce_scatter")  # as gloo in torch < 2.6 says


def _fallback(rank, tmp):
    offload.distributed._reduce_scatter = _no_reduce_scatter  # this process only: a backend without it
    data = batches(4, micro=2)
    torch.manual_seed(0)
    model = _Extras()
    opt = ShardedOffloadOptimizer(model.parameters(), torch.optim.AdamW, lr=LR, weight_decay=0.1,
                                  config=OffloadConfig(state_tier="host"), bucket_bytes=BUCKET)
    train_sharded(model, opt, data, rank, micro=2, loss_fn=_extras_loss, zero_to_none=False)
    out = {"weights": weights(model), "report": opt.report(), "state": opt.state_dict()}
    if rank == 0:
        torch.manual_seed(0)
        ref = _Extras()
        ref_opt = adamw([p for p in ref.parameters() if p.requires_grad], fused=True)
        plain_dp(ref, ref_opt, data, micro=2, loss_fn=_extras_loss)
        out["ref"], out["ref_state"] = weights(ref), ref_opt.state_dict()
    return out


@pytest.mark.slow
def test_all_reduce_fallback_accumulation_and_params_without_grads(tmp_path):
    """A backend without reduce-scatter (found at run time: all-reduce and slice), 2 micro-batches per rank with
    no_sync(), zero_grad(set_to_none=False), a param only rank 0 gives a grad, one no rank does (never updated,
    as plain AdamW skips it) and a frozen one: bit-identical to plain."""
    r0, r1 = run_ranks(_fallback, tmp_path)
    assert r0["report"]["reduce"] == "all_reduce"
    assert_equal_weights(r0["weights"], r1["weights"], "rank 0 vs rank 1")
    assert_equal_weights(r0["ref"], r0["weights"], "sharded vs plain")
    torch.manual_seed(0)
    init = weights(_Extras())
    names = [n for n, _ in _Extras().named_parameters()]
    for n, a, b in zip(names, init, r0["weights"]):
        assert torch.equal(a, b) == (n.startswith("unused") or n == "gpt.wpe.weight"), n
    # the frozen param is not in the plain optimizer: compare the others' state by position
    sd = r0["state"]
    assert set(sd["state"]) == {k for k, n in enumerate(names) if not n.startswith("unused") and n != "gpt.wpe.weight"}
    ref_entries = list(r0["ref_state"]["state"].values())
    assert all(torch.equal(ref_entries[i][key], v) for i, entry in enumerate(sd["state"].values())
               for key, v in entry.items())


# -- 3. memory per rank --------------------------------------------------------------------------------------------
def _memory(rank, tmp):
    data = batches(1)
    model = gpt()
    opt = ShardedOffloadOptimizer(adamw(model.parameters()), config=OffloadConfig(state_tier="host"))
    train_sharded(model, opt, data, rank)  # state exists after a step
    out = {"report": opt.report()}
    if rank == 0:
        single_model = gpt()
        single = OffloadOptimizer(adamw(single_model.parameters()), config=OffloadConfig(state_tier="host"))
        lm_loss(single_model, data[0]).backward()
        single.step()
        out["single"] = single.report()
    return out


@pytest.mark.slow
def test_state_per_rank_is_half_of_single_process(tmp_path):
    """Each rank's optimizer state (AdamW moments, host tier) is about half of a single process's."""
    r0, r1 = run_ranks(_memory, tmp_path)
    single = r0["single"]["state_bytes_by_tier"]["host"]
    per_rank = [r["report"]["inner"]["state_bytes_by_tier"]["host"] for r in (r0, r1)]
    pool = [r["report"]["inner"]["host_pool"]["peak_in_use_bytes"] for r in (r0, r1)]
    print(f"optimizer state on the host: single process {single} B; per rank {per_rank} B "
          f"({', '.join(f'{b / single:.3f}' for b in per_rank)} of it); host pool peak per rank {pool} B, single "
          f"process {r0['single']['host_pool']['peak_in_use_bytes']} B")
    # Ranks own equal shares of the (padded) bucket; each param starts on a 1024-element boundary, so the real
    # elements split unevenly by at most the padding: here 5 LayerNorm params of 64 elements, 960 padding each.
    for b in per_rank:
        assert abs(b / single - 1 / WORLD) < 0.05, (b, single)
    assert single <= sum(per_rank) <= single * 1.01  # nothing held twice (64-byte slot alignment aside)


# -- 4. clipping and an LR scheduler -------------------------------------------------------------------------------
def _clip_sched(rank, tmp):
    data = batches(5)
    model = gpt()
    cfg = OffloadConfig(state_tier="nvme", nvme_dirs=str(tmp / "nvme"), max_grad_norm=0.5, **SMALL)
    opt = ShardedOffloadOptimizer(adamw(model.parameters()), config=cfg, bucket_bytes=BUCKET)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train_sharded(model, opt, data, rank, sched=sched)
    out = {"weights": weights(model), "report": opt.report(), "lr": opt.param_groups[0]["lr"],
           "inner_lr": [g["lr"] for g in opt._inner.param_groups]}
    opt.close()
    if rank == 0:
        ref = gpt()
        ref_opt = adamw(ref.parameters(), fused=True)
        ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
        _, out["ref_norm"] = plain_dp(ref, ref_opt, data, sched=ref_sched, clip=0.5)
        out["ref"], out["ref_lr"] = weights(ref), ref_opt.param_groups[0]["lr"]
        full = gpt()
        full_opt = adamw(full.parameters(), fused=True)
        plain_full(full, full_opt, data, sched=torch.optim.lr_scheduler.StepLR(full_opt, 2, 0.5), clip=0.5)
        out["full"] = weights(full)
    return out


@pytest.mark.slow
def test_clipping_and_lr_scheduler(tmp_path):
    """max_grad_norm clips with the global norm (all ranks' shares), StepLR's rate reaches every rank's inner
    optimizer. The norm sums squares in another order than torch's clip_grad_norm_, so the clip factor differs
    in the last bits: against the ranks' reduction order we allow 1e-6 (observed 1.2e-7), against the full batch
    FULL_BATCH_ATOL."""
    r0, r1 = run_ranks(_clip_sched, tmp_path)
    assert r0["lr"] == r0["ref_lr"] == LR * 0.5 ** 2
    assert r0["inner_lr"] == r1["inner_lr"] == [r0["ref_lr"]] * len(r0["inner_lr"])
    norm, ref_norm = r0["report"]["grad_norm"], r0["ref_norm"].item()
    assert norm > 0.5 and math.isclose(norm, ref_norm, rel_tol=1e-6), (norm, ref_norm)  # it did clip
    assert_equal_weights(r0["weights"], r1["weights"], "rank 0 vs rank 1")
    assert_close_weights(r0["ref"], r0["weights"], 1e-6, "sharded vs plain (ranks' reduction order)")
    assert_close_weights(r0["full"], r0["weights"], FULL_BATCH_ATOL, "sharded vs plain (one full-batch backward)")


# -- 5. checkpoints: 2 ranks -> 2 ranks (other buckets) and -> 1 rank ----------------------------------------------
def _assemble(saved: list[list]) -> dict:
    """What a sharded checkpoint reader does: every rank's (span, key, value) into whole tensors per param."""
    out: dict[int, dict] = {}
    for pieces in saved:
        for span, key, v in pieces:
            entry = out.setdefault(span.index, {})
            n = span.stop - span.start
            if torch.is_tensor(v) and v.dim() > 0 and v.numel() == n:
                full = entry.setdefault(key, torch.full((math.prod(span.shape),), float("nan"), dtype=v.dtype))
                assert full[span.start:span.stop].isnan().all(), f"two ranks saved param {span.index} {key}"
                full[span.start:span.stop] = v.reshape(-1)
            else:
                entry[key] = v
    for idx, entry in out.items():
        for key, v in entry.items():
            assert not (torch.is_tensor(v) and v.isnan().any()), f"param {idx} {key}: elements no rank saved"
    return out


def _fetch_from(ckpt):
    """load_state_stream's fetch over an assembled checkpoint: any span of any param, from whichever ranks saved it."""
    def fetch(span, master):
        return {k: v[span.start:span.stop] if torch.is_tensor(v) and v.dim() > 0 else v
                for k, v in ckpt.get(span.index, {}).items()}
    return fetch


def _reshard(rank, tmp):
    data = batches(5)

    def cfg(name):
        return OffloadConfig(state_tier="nvme", nvme_dirs=str(tmp / name), **SMALL)

    model = gpt()
    opt = ShardedOffloadOptimizer(adamw(model.parameters()), config=cfg("a"), bucket_bytes=BUCKET)
    train_sharded(model, opt, data[:3], rank)
    # The checkpoint: each rank's own spans (a sharded saver's entries), the gathered state dict, the weights.
    torch.save([(s, k, v.clone() if torch.is_tensor(v) else v) for s, k, v in opt.iter_state()], tmp / f"ckpt{rank}.pt")
    out = {"ranges": opt.shard_ranges(), "state_dict": opt.state_dict()}
    saved_weights = weights(model)
    train_sharded(model, opt, data[3:], rank)
    out["continued"] = weights(model)
    dist.barrier()
    ckpt = _assemble([torch.load(tmp / f"ckpt{r}.pt", weights_only=False) for r in range(WORLD)])

    def restored():
        m = gpt()
        with torch.no_grad():
            for p, w in zip(m.parameters(), saved_weights):
                p.copy_(w)
        return m

    # 2 -> 2, with other buckets (so other ranges per rank), loaded span by span
    m2 = restored()
    o2 = ShardedOffloadOptimizer(adamw(m2.parameters()), config=cfg("b"), bucket_bytes=BUCKET // 2)
    o2.load_state_stream(_fetch_from(ckpt))
    train_sharded(m2, o2, data[3:], rank)
    out["two"] = weights(m2)
    # 2 -> 1: a group of rank 0 alone; both halves of each batch as two micro-batches
    solo = dist.new_group([0])
    if rank == 0:
        m1 = restored()
        o1 = ShardedOffloadOptimizer(adamw(m1.parameters()), config=cfg("c"), process_group=solo)
        o1.load_state_stream(_fetch_from(ckpt))
        for x in data[3:]:
            with o1.no_sync():
                (lm_loss(m1, rows(x, 0, 0)) / 2).backward()
            (lm_loss(m1, rows(x, 1, 0)) / 2).backward()
            o1.step()
            o1.zero_grad()
        out["one"] = weights(m1)
        # ... and plain AdamW in one process, from the gathered state dict
        mp = restored()
        plain = adamw(mp.parameters(), fused=True)
        plain.load_state_dict(copy.deepcopy(out["state_dict"]))  # plain AdamW adopts (and updates) its tensors
        plain.param_groups[0]["fused"] = True  # the saved group says the user's None; keep the same implementation
        plain_dp(mp, plain, data[3:])
        out["plain"] = weights(mp)
    return out


@pytest.mark.slow
def test_checkpoint_reshards_2_ranks_to_2_and_1(tmp_path):
    """After 3 steps on 2 ranks, each rank's spans (iter_state) resume 2 more steps on 2 ranks with other shard
    ranges and on 1 rank (load_state_stream), and the gathered state_dict resumes plain AdamW: all bit-identical
    to the run that went on."""
    r0, r1 = run_ranks(_reshard, tmp_path)
    numels = [p.numel() for p in gpt().parameters()]
    for idx, n in enumerate(numels):  # the ranks' ranges partition every parameter
        spans = sorted((s.start, s.stop) for r in (r0, r1) for s in r["ranges"] if s.index == idx)
        assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert_same_state(r0["state_dict"], r1["state_dict"])
    for key in ("two", "one", "plain"):
        assert_equal_weights(r0["continued"], r0[key], f"resumed ({key}) vs continued")
    assert_equal_weights(r1["continued"], r1["two"], "rank 1 resumed vs continued")


# -- 6. bad input --------------------------------------------------------------------------------------------------
def test_bad_input_is_named(tmp_path):
    model = gpt()
    with pytest.raises(NotImplementedError, match="elementwise"):
        ShardedOffloadOptimizer(model.parameters(), torch.optim.LBFGS)
    with pytest.raises(ValueError, match="bucket_bytes: expected a positive number of bytes, got 0"):
        ShardedOffloadOptimizer(adamw(model.parameters()), bucket_bytes=0)
    with pytest.raises(NotImplementedError, match="loss_scale"):
        ShardedOffloadOptimizer(adamw(model.parameters()), config=OffloadConfig(loss_scale="dynamic"))
    with pytest.raises(ValueError, match="init_process_group"):
        ShardedOffloadOptimizer(adamw(model.parameters()))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        opt = ShardedOffloadOptimizer(adamw(model.parameters()), bucket_bytes=BUCKET)
        x = batches(1)[0]
        lm_loss(model, x).backward()
        with pytest.raises(RuntimeError, match="no_sync"):  # accumulation without no_sync()
            lm_loss(model, x).backward()
        opt.zero_grad()  # finishes what started, so the ranks stay in step
        with pytest.raises(NotImplementedError, match="add_param_group"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
        opt.close()
    finally:
        dist.destroy_process_group()


# -- 7. the example, under torchrun --------------------------------------------------------------------------------
@pytest.mark.slow
def test_example_runs_under_torchrun(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(root / "examples" / "finetune_ddp.py"), "--steps", "3", "--nvme", str(tmp_path)],
                         capture_output=True, text=True, timeout=180, cwd=root, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step    2" in out.stdout
    for rank in range(2):
        assert f"rank {rank}: owns" in out.stdout and os.listdir(tmp_path / f"rank{rank}")


def test_config_dirs_are_per_rank(tmp_path):
    """A config that `offload run` already made per rank keeps its directory; any other gets <dir>/rank<r>."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        for given, expected in ((tmp_path / "s", tmp_path / "s" / "rank0"), (tmp_path / "rank0", tmp_path / "rank0")):
            opt = ShardedOffloadOptimizer(adamw(gpt().parameters()),
                                          config=OffloadConfig(state_tier="nvme", nvme_dirs=str(given)))
            assert opt._inner.config.nvme_dirs == (str(expected),) and expected.is_dir()
            opt.close()
    finally:
        dist.destroy_process_group()


# -- 8. CUDA: device buffers, NCCL, hooks on the autograd thread (one GPU, so one rank) ----------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for NCCL; run it on a GPU machine")
@pytest.mark.parametrize("tier", ["device", "nvme"])
def test_cuda_nccl_one_rank(tier, tmp_path):
    """The CUDA path on one GPU (NCCL refuses two ranks on one device): flat buffers and collectives on the
    device, state on the device (updated there) or on NVMe (fp32 masters updated on the CPU, weights copied
    back). Against plain fused AdamW on the GPU within fp32 rounding: the CPU kernel rounds differently, and
    embedding backward accumulates with atomics unless deterministic algorithms are on."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        ref, m = gpt().cuda(), gpt().cuda()
        plain = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.1, fused=True)
        cfg = OffloadConfig(state_tier=tier, nvme_dirs=str(tmp_path / "nvme") if tier == "nvme" else None, **SMALL)
        opt = ShardedOffloadOptimizer(adamw(m.parameters()), config=cfg, bucket_bytes=BUCKET)
        for x in batches(3):
            for model, o in ((ref, plain), (m, opt)):
                lm_loss(model, x.cuda()).backward()
                o.step()
                o.zero_grad()
        for a, b in zip(ref.parameters(), m.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        rep = opt.report()
        assert rep["buckets_in_backward"] == 3 * rep["buckets"] and rep["reduce"] == "reduce_scatter"
        assert all(s["master"] == (tier == "nvme") for s in rep["inner"]["subgroups"])
        sd = opt.state_dict()  # gathered over NCCL; per-element state to the CPU
        for k, entry in plain.state_dict()["state"].items():
            for key, v in entry.items():
                torch.testing.assert_close(sd["state"][k][key].cpu(), v.cpu(), rtol=1e-4, atol=1e-6)
        opt.close()
    finally:
        dist.destroy_process_group()
