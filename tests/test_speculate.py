"""The speculative update: with clipping or loss scaling, each unit is updated during backward with the grads as
they are, and the step is validated once backward ends: committed when nothing clips (or overflows), otherwise
undone exactly (the swap manager's transaction keeps every pre-update byte: host copies, the store's previous
versions) and redone with clipped grads, or skipped. Every outcome must be bit-identical to plain PyTorch
(``clip_grad_norm_`` then ``step``)."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch

from helpers import TINY_GPT, gpt, lm_loss, token_batches
from offload import OffloadConfig, wrap
from offload.optimizer import SpeculationPolicy, _unclipped
from offload.runtime import runtime_of
from storage import NvmeStore, Tier, TierFullError
from storage.faults import inject_delays

ALWAYS = dict(max_clipped=math.inf, timed=False)
"""A policy that speculates at every step, so that a short run goes through both commits and rollbacks."""
BY_CLIPPING = dict(timed=False)
"""The policy's clipping rule alone (its timing rule would wait on some steps to time them)."""


def llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).float()


def loss_of(kind, model, idx):
    return model(input_ids=idx, labels=idx).loss if kind == "llama" else lm_loss(model, idx)


def train_pair(kind, tier, accum, max_norm, tmp_path, steps=6, policy=ALWAYS):
    """Plain (clip_grad_norm_ then step) and wrapped (config clips, speculatively), step by step; returns the
    wrapped optimizer's stats, the plain norms, and the mismatches found."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    make = llama if kind == "llama" else gpt
    ref, m = make(), make()
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
                      OffloadConfig(param_tier=tier, grad_tier=tier, state_tier=tier, nvme_dirs=str(tmp_path),
                                    impl="as_given", max_grad_norm=max_norm, accumulation_steps=accum))
    policy = dict(policy)
    opt.speculation = policy.pop("policy_class", SpeculationPolicy)(**policy)
    data = token_batches(steps * accum, TINY_GPT.vocab)
    norms, bad = [], []
    for s in range(steps):
        for a in range(accum):
            idx = data[s * accum + a]
            loss_of(kind, ref, idx).backward()
            loss_of(kind, model, idx).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item())
        plain.step()
        opt.step()
        plain.zero_grad()
        opt.zero_grad()
        sd_ref, sd = ref.state_dict(), model.state_dict()
        bad += [f"step {s} weight {k}" for k in sd_ref if not torch.equal(sd_ref[k], sd[k])]
    osd_ref, osd = plain.state_dict()["state"], opt.state_dict()["state"]
    bad += [f"state {k}.{key}" for k, entry in osd_ref.items() for key, v in entry.items()
            if not torch.equal(v, osd[k][key])]
    stats = opt.stats
    runtime_of(model).close()
    return stats, norms, bad


@pytest.mark.parametrize("accum", [1, 3])
@pytest.mark.parametrize("tier", ["host", "nvme"])
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_commits_and_rollbacks_are_bit_identical(kind, tier, accum, tmp_path):
    # A max_norm between the run's first and last norms: some steps clip (undone, redone), some do not.
    _, norms, _ = train_pair(kind, "host", accum, 1e9, tmp_path / "probe", steps=6, policy={"enabled": False})
    k = len(norms) // 2
    max_norm = (sorted(norms)[k - 1] + sorted(norms)[k]) / 2
    stats, norms, bad = train_pair(kind, tier, accum, max_norm, tmp_path)
    assert bad == []
    clipped = sum(not _unclipped(torch.tensor(n), max_norm) for n in norms)  # as clip_grad_norm_ decides
    assert 0 < clipped < len(norms)
    assert stats["speculative_steps"] == len(norms)
    assert stats["spec_rollbacks"] == clipped and stats["spec_commits"] == len(norms) - clipped


def test_the_policy_stops_while_steps_clip_and_resumes_when_they_do_not(tmp_path):
    """Every step clips: one rollback (the first step's), then no more speculation. No step clips: every step
    after the first clipping-free one speculates and commits."""
    stats, norms, bad = train_pair("gpt", "host", 1, 1e-3, tmp_path / "a", steps=6, policy=BY_CLIPPING)
    assert bad == [] and all(n > 1e-3 for n in norms)
    assert stats["spec_rollbacks"] == 1 and stats["speculative_steps"] == 1 and stats["spec_declined"] == 5
    stats, norms, bad = train_pair("gpt", "nvme", 1, 1e9, tmp_path / "b", steps=6, policy=BY_CLIPPING)
    assert bad == [] and stats["spec_commits"] == 6 and stats["spec_rollbacks"] == 0


def test_the_policy_times_both_kinds_of_step_and_keeps_the_faster():
    """After its warm-up: ``samples`` speculative steps, then as many waiting ones, then the faster by median;
    the other kind timed again once every ``recheck`` steps; a rollback's time counts for neither; clipping
    still stops speculation whatever the times say."""
    now = [0.0]
    pol = SpeculationPolicy(samples=2, recheck=3, warmup=1, clock=lambda: now[0])

    def step(seconds, *, counts=True):
        speculative = pol.wants()
        pol.step_started(speculative=speculative)
        now[0] += seconds(speculative)
        pol.step_ended(counts=counts)
        return speculative

    slow_spec = lambda spec: 2.0 if spec else 1.0  # noqa: E731 - speculating costs more here
    kinds = [step(slow_spec) for _ in range(5)]
    assert kinds == [True, True, True, False, False]  # warm-up, 2 speculative, 2 waiting
    assert pol.medians() == {"speculative_s": 2.0, "waiting_s": 1.0}
    kinds = [step(slow_spec) for _ in range(8)]
    assert kinds == [False, False, False, True, False, False, False, True] and pol.why == ""
    assert step(slow_spec, counts=False) is False and pol.medians()["waiting_s"] == 1.0  # not counted
    # the machine changes: waiting gets slower, and the recheck finds speculation faster now
    fast_spec = lambda spec: 0.5 if spec else 3.0  # noqa: E731
    kinds = [step(fast_spec) for _ in range(12)]
    assert pol.medians() == {"speculative_s": 0.5, "waiting_s": 3.0}
    assert kinds[-4:].count(True) == 3  # speculating again, waiting timed once every recheck + 1 steps
    pol.observe(clipped=True)
    assert pol.wants() is False and pol.why == "clipped"
    untimed = SpeculationPolicy(timed=False)
    assert all(untimed.wants() for _ in range(10))


def test_a_run_waits_when_waiting_was_timed_faster_and_stays_exact(tmp_path):
    """The runtime times each step that needs validation from its last backward to the end of step(), as
    speculative or waiting; once waiting is the faster kind, steps wait (counted as waited_timing in the
    report), bit-identical either way."""
    class Recording(SpeculationPolicy):
        kinds: list = []

        def step_started(self, *, speculative):
            self.kinds.append(speculative)
            super().step_started(speculative=speculative)

    stats, norms, bad = train_pair("gpt", "host", 1, 1e9, tmp_path, steps=6,
                                   policy=dict(samples=2, warmup=1, policy_class=Recording))
    assert bad == []
    assert Recording.kinds[:3] == [True, True, True] and Recording.kinds[3:5] == [False, False]
    assert stats["spec_commits"] >= 3 and stats["spec_commits"] + stats["spec_waited_timing"] == 6


@pytest.mark.parametrize("seed", [None, 3])
def test_fp16_loss_scaling_with_an_overflow_matches_waiting_for_backward(seed, tmp_path):
    """fp16 params, dynamic loss scaling and clipping; one step's loss overflows the fp16 grads. Speculating (the
    overflow found during backward undoes the units already updated and skips the step) gives what waiting for
    backward gives, bit for bit, loss scale included; also with random delays at every I/O completion and thread
    hand-off (``seed``)."""
    def make(speculate, where):
        m = gpt().half()
        model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2),
                          OffloadConfig(param_tier="nvme", grad_tier="nvme", state_tier="nvme", nvme_dirs=str(where),
                                        impl="as_given", max_grad_norm=5.0, loss_scale="dynamic",
                                        speculate=speculate))
        opt.speculation = SpeculationPolicy(**ALWAYS)
        return model, opt

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (a, oa), (b, ob) = make(True, tmp_path / "a"), make(False, tmp_path / "b")
    delays = inject_delays(seed=seed, max_s=0.03, p=0.25) if seed is not None else contextlib.nullcontext()
    with delays:
        train_fp16(a, oa, b, ob)
    st = oa.stats
    assert st["spec_overflows"] >= 2 and st["spec_commits"] >= 1 and st["spec_rollbacks"] >= 1, st
    assert st["skipped_steps"] == ob.stats["skipped_steps"] >= 2  # the first step's and the injected one
    runtime_of(a).close()
    runtime_of(b).close()


def train_fp16(a, oa, b, ob):
    for s, idx in enumerate(token_batches(8, TINY_GPT.vocab)):
        for model, opt in ((a, oa), (b, ob)):
            loss = lm_loss(model, idx).float()
            if s == 4:
                loss = loss * 1e8  # inf in the fp16 grads
            opt.scale_loss(loss).backward()
            opt.step()
            opt.zero_grad()
        assert oa.loss_scale == ob.loss_scale
        sa, sb = a.state_dict(), b.state_dict()
        assert [k for k in sa if not torch.equal(sa[k], sb[k])] == [], s


def clipped_steps(ref, plain, model, opt, idx, max_norm: float = 5.0) -> None:
    """One step of plain torch clipping by hand, then one of the wrapped model clipping through its config."""
    lm_loss(ref, idx).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    plain.step()
    plain.zero_grad()
    lm_loss(model, idx).backward()
    opt.step()
    opt.zero_grad()


def test_pre_images_that_do_not_fit_stop_speculating_not_training(tmp_path):
    """A host budget with no room for the pre-update copies of host-resident state: the units whose copies do
    not fit wait for the end of backward, and the step stays exact whatever the validation decides."""
    m = gpt()
    ref = gpt()
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2),
                      OffloadConfig(param_tier="host", state_tier="host", impl="as_given", max_grad_norm=5.0))
    opt.speculation = SpeculationPolicy(**ALWAYS)
    rt = runtime_of(model)
    pool = rt.swap.pool
    taken = []
    for s, idx in enumerate(token_batches(4, TINY_GPT.vocab)):
        if s == 2:  # from now on the pool is full: no copy fits
            pool.budget.capacity_bytes = pool.budget.used_bytes
            while True:
                try:
                    taken.append(pool.acquire(4096, wait=False))
                except TierFullError:
                    break
        clipped_steps(ref, plain, model, opt, idx)
        sd_ref, sd = ref.state_dict(), model.state_dict()
        assert [k for k in sd_ref if not torch.equal(sd_ref[k], sd[k])] == []
    assert opt.stats["spec_stopped"] == 2 and opt.stats["speculative_steps"] == 4
    for buf in taken:
        buf.release()
    rt.close()


def test_store_holds_restores_and_releases_a_version(tmp_path):
    store = NvmeStore(str(tmp_path), 1 << 20, reset=True)
    old = torch.arange(4096, dtype=torch.float32)
    store.write("k", old).wait()
    held = store.hold("k")
    store.write("k", old + 1).wait()
    assert torch.equal(store.read("k").wait(), old + 1)
    store.restore(held)
    assert torch.equal(store.read("k").wait(), old)
    store.release(held)
    assert torch.equal(store.read("k").wait(), old)  # the restored version is committed: release keeps it
    free = store.free_bytes
    h2 = store.hold("k")
    store.write("k", old + 2).wait()
    assert store.free_bytes < free  # both versions on disk while held
    store.release(h2)
    assert store.free_bytes == free
    store.close()
    reopened = NvmeStore(str(tmp_path))
    assert torch.equal(reopened.read("k").wait(), old + 2)
    reopened.close()


def test_swap_transaction_undoes_host_device_and_store_chunks(tmp_path):
    m = gpt()
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2),
                      OffloadConfig(param_tier="nvme", state_tier="host", nvme_dirs=str(tmp_path)))
    swap = runtime_of(model).swap
    host = swap.chunk("h", 8192, Tier.HOST, kind="state")
    stored = swap.chunk("s", 8192, Tier.NVME, kind="state")
    with swap.use(host, write=True) as mem:
        mem.fill_(1)
    with swap.use(stored, write=True, load=False) as mem:
        mem.fill_(2)
    swap.write_back(stored, wait=True)
    used = swap.pool.in_use_bytes
    for end in ("abort", "commit"):
        swap.begin()
        swap.preserve(host)
        swap.preserve(stored)
        assert swap.pool.in_use_bytes == used + 8192 and swap.tx_bytes == 8192  # the host copy is counted
        with swap.use(host, write=True) as mem:
            mem.fill_(3)
        with swap.use(stored, write=True) as mem:
            mem.fill_(4)
        swap.write_back(stored, wait=True)
        getattr(swap, end)()
        assert swap.pool.in_use_bytes == used and swap.tx_bytes == 0
        want = (1, 2) if end == "abort" else (3, 4)
        with swap.use(host) as h, swap.use(stored) as s:
            assert bool((h == want[0]).all()) and bool((s == want[1]).all()), end
        swap.evict(stored)
    runtime_of(model).close()


def test_the_run_report_counts_speculation(tmp_path):
    from offload.report import RunReport

    m = gpt()
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2),
                      OffloadConfig(param_tier="host", state_tier="host", max_grad_norm=5.0))
    report = RunReport(model, opt, total_steps=8, name="spec")
    for idx in token_batches(8, TINY_GPT.vocab):
        loss = lm_loss(model, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
        report.step(loss.item(), tokens=idx.numel())
    sp = report.summary()["speculation"]
    st = opt.stats
    assert sp["speculative_steps"] == st["speculative_steps"] >= 1 and sp["rollbacks"] == st["spec_rollbacks"] >= 1
    assert sp["commits"] + sp["rollbacks"] == sp["speculative_steps"] and sp["declined"] == 8 - sp["speculative_steps"]
    assert "rolled back and redone" in report.text()
    runtime_of(model).close()


def test_the_cost_model_prices_speculation_against_waiting():
    """A plan with its state on NVMe: speculating and committing costs about the overlapped iteration, waiting
    for backward costs more, a rollback costs the most; the policy speculates at p=0 and waits at p=1; the
    pre-update copies are the host- and device-resident state and params only."""
    from scheduler import profile, workload as wl
    from scheduler.cost import CostModel
    from scheduler.plan import Plan, UnitPlacement
    from scheduler.speculation import NORM_PASS_FRACTION, pre_image_bytes, price

    w = wl.load("gpt2", batch=1, seq=64)
    cm = CostModel(w, profile.resolve("cpu-dev-2core"))
    n = len(w.units)
    nvme = Plan(strategy="t", units=(UnitPlacement(Tier.NVME, Tier.NVME, "cpu"),) * n)
    c0, c1 = price(cm, nvme, 0.0), price(cm, nvme, 1.0)
    over = cm.predict(nvme).iteration_s
    assert over <= c0.commit_s < c0.wait_s < c0.rollback_s
    assert c0.speculates and c0.expected_s == c0.commit_s
    assert not c1.speculates and c1.expected_s == c1.wait_s
    assert c0.pre_image_bytes == pre_image_bytes(cm, nvme) == 0  # NVMe keeps its previous versions instead
    host = Plan(strategy="t", units=(UnitPlacement(Tier.HOST, Tier.HOST, "cpu"),) * n)
    assert pre_image_bytes(cm, host) == sum(cm.pb[i] + cm.state_bytes(i, host.units[i]) for i in range(n))
    with pytest.raises(ValueError, match="clip_probability"):
        price(cm, nvme, 1.5)
    # Where the device is the CPU, the copies and the norm pass take from compute what the probe measured host
    # work takes (cpu_steal); on a GPU they do not.
    h = price(cm, host, 0.0)
    norm_s = sum(cm.params) / cm.hw.cpu_update_params_per_s * NORM_PASS_FRACTION
    copy_s = h.pre_image_bytes / (cm.hw.d2h_gbps * 1e9)  # copied out before the updates; back only on a rollback
    plain = cm.predict(host)
    spare = max(0.0, norm_s + copy_s + plain.busy_s["cpu_update"] - plain.iteration_s)
    assert h.commit_s == pytest.approx(plain.iteration_s + spare + cm.steal["cpu_update"] * norm_s
                                       + cm.steal["d2h"] * copy_s)
    gpu = CostModel(w, profile.resolve("h100-pcie5-gen4nvme"))
    g = price(gpu, host, 0.0)
    gp = gpu.predict(host)
    assert g.commit_s == pytest.approx(gp.iteration_s + max(0.0, sum(gpu.params) / gpu.hw.cpu_update_params_per_s
                                                            * NORM_PASS_FRACTION + g.pre_image_bytes /
                                                            (gpu.hw.d2h_gbps * 1e9) + gp.busy_s["cpu_update"]
                                                            - gp.iteration_s))
    waiting = gpu.predict(dataclasses.replace(host, overlap_update=False))
    g_norm_s = sum(gpu.params) / gpu.hw.cpu_update_params_per_s * NORM_PASS_FRACTION
    # undone (copied back), then the update phase redone with the grads scaled (a read and a write of each)
    assert g.rollback_s == pytest.approx(g.commit_s + g.pre_image_bytes / (gpu.hw.h2d_gbps * 1e9)
                                         + max(0.0, waiting.iteration_s - waiting.busy_s["compute"]) + 2 * g_norm_s)
    # waiting: the norm after backward, and the scaling on a step that clips
    assert g.wait_s == pytest.approx(waiting.iteration_s + g_norm_s)
    assert price(gpu, host, 1.0).wait_s == pytest.approx(waiting.iteration_s + 3 * g_norm_s)


def test_offload_plan_prices_clipping_both_ways(capsys):
    import json

    from offload.cli import main

    assert main(["plan", "gpt2", "--batch", "1", "--seq", "64", "--profile", "cpu-dev-2core", "--clip"]) == 0
    out = capsys.readouterr().out
    assert "steps that do not clip" in out and "steps that clip" in out and "pre-update copies" in out
    assert main(["plan", "gpt2", "--batch", "1", "--seq", "64", "--profile", "cpu-dev-2core", "--clip",
                 "--json"]) == 0
    clip = json.loads(capsys.readouterr().out)["clipping"]
    never = clip["never_clips"]
    assert never["clip_probability"] == 0.0 and never["speculates"] == (never["commit_s"] <= never["wait_s"])
    # the planner's in-memory plan on a CPU device: the copies cost more than the overlap saves, and it says so
    assert not never["speculates"] and "OffloadConfig(speculate=False)" in out
    assert clip["always_clips"]["expected_s"] == min(clip["always_clips"]["wait_s"],
                                                     clip["always_clips"]["rollback_s"])


def test_a_host_budget_at_its_minimum_speculates_without_starving_transfers(tmp_path):
    """Grads on NVMe (their buffers come from the pool during backward) and state on the host (whose pre-update
    copies would take the pool): at a budget just above the runtime's minimum the copies get no room that the
    grad buffers need, so backward never waits for memory only validation would free. Exact, and it ends."""
    cfg = dict(param_tier="host", grad_tier="nvme", state_tier="host", nvme_dirs=str(tmp_path), impl="as_given",
               max_grad_norm=5.0)
    pm = gpt()
    probe, _ = wrap(pm, torch.optim.AdamW(pm.parameters(), lr=1e-2), OffloadConfig(**cfg))
    lm_loss(probe, token_batches(1, TINY_GPT.vocab)[0]).backward()
    minimum = sum(runtime_of(probe).host_minimum().values())
    runtime_of(probe).close()
    m, ref = gpt(), gpt()
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2),
                      OffloadConfig(**cfg, host_budget_bytes=minimum + (64 << 10)))
    opt.speculation = SpeculationPolicy(**ALWAYS)
    for idx in token_batches(4, TINY_GPT.vocab):
        clipped_steps(ref, plain, model, opt, idx)
    sd_ref, sd = ref.state_dict(), model.state_dict()
    assert [k for k in sd_ref if not torch.equal(sd_ref[k], sd[k])] == []
    assert opt.stats["spec_stopped"] >= 1
    runtime_of(model).close()


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_a_loop_that_accumulates_more_than_configured_is_undone_not_refused(tier, tmp_path):
    """``accumulation_steps`` left at 1 while the loop accumulates 3 micro-batches: the first step speculates, so
    the backward that follows the one taken as last undoes its updates exactly (instead of raising), the runtime
    learns 3, and later steps overlap their last backward. Bit-identical to plain PyTorch."""
    ref, m = gpt(), gpt()
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2),
                      OffloadConfig(param_tier=tier, grad_tier=tier, state_tier=tier, nvme_dirs=str(tmp_path),
                                    impl="as_given"))
    data = token_batches(12, TINY_GPT.vocab)
    with pytest.warns(RuntimeWarning, match="accumulates") as caught:
        for s in range(4):
            for a in range(3):
                lm_loss(ref, data[3 * s + a]).backward()
                lm_loss(model, data[3 * s + a]).backward()
            plain.step()
            opt.step()
            plain.zero_grad()
            opt.zero_grad()
            sd_ref, sd = ref.state_dict(), model.state_dict()
            assert [k for k in sd_ref if not torch.equal(sd_ref[k], sd[k])] == [], s
    assert len([w for w in caught if "accumulates" in str(w.message)]) == 2
    assert opt.stats["spec_undone_for_accumulation"] == 2 and runtime_of(model)._accumulation == 3
    runtime_of(model).close()
