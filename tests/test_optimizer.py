"""OffloadOptimizer against plain PyTorch: train both side by side, compare bit for bit."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadConfig, OffloadOptimizer

OPTIMIZERS = [
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, fused=True)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (torch.optim.Adam, dict(lr=1e-2, fused=True)),
    (torch.optim.SGD, dict(lr=1e-2, momentum=0.9)),
    (torch.optim.Adagrad, dict(lr=1e-2)),
]
IDS = ["AdamW-fused", "AdamW", "Adam-fused", "SGD-momentum", "Adagrad"]


def make_model(dtype=torch.float32, freeze_first=False):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                            torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(dtype)
    if freeze_first:
        m[0].requires_grad_(False)
    return m


def train(model, opt, steps=5, accum=2, sched=None, clip=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        for _ in range(accum):
            x = torch.randn(16, 32, generator=g).to(dtype)
            y = torch.randn(16, 8, generator=g).to(dtype)
            loss = ((model(x).float() - y.float()) ** 2).mean()
            loss.backward()
            losses.append(loss.item())
        if clip is not None:
            if isinstance(opt, OffloadOptimizer):
                opt.clip_grad_norm_(clip)
            else:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    return losses


def assert_same_state(sd_plain, sd_off, frozen=()):
    """Equal state; ``frozen`` params may have state in the plain optimizer only (Adagrad makes state for every
    param in its constructor; we keep none for params that cannot get a grad)."""
    assert sd_plain["state"].keys() - set(frozen) == sd_off["state"].keys()
    for k, other in sd_off["state"].items():
        entry = sd_plain["state"][k]
        assert entry.keys() <= other.keys(), (k, entry.keys(), other.keys())
        for key, v in entry.items():
            if torch.is_tensor(v):
                assert torch.equal(v, other[key]), (k, key)
            else:
                assert v == other[key], (k, key)
    for g1, g2 in zip(sd_plain["param_groups"], sd_off["param_groups"]):
        assert g1 == g2


def config(tier, tmp_path, **kw):
    return OffloadConfig(state_tier=tier, nvme_dirs=str(tmp_path) if tier == "nvme" else None, impl="as_given",
                         subgroup_numel=kw.pop("subgroup_numel", 2048), buffers=kw.pop("buffers", 2), **kw)


@pytest.mark.parametrize("tier", ["host", "nvme"])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_parity_with_plain(cls, kw, tier, tmp_path):
    """LR scheduler, grad accumulation 2, a frozen layer and global-norm clipping: bit-identical params and
    state after 5 steps, with more subgroups than host buffers."""
    m1, m2 = make_model(freeze_first=True), make_model(freeze_first=True)
    plain = cls(m1.parameters(), **kw)
    off = OffloadOptimizer(cls(m2.parameters(), **kw), config=config(tier, tmp_path))
    if tier == "nvme":
        assert len(off._subgroups) > off.config.buffers
    else:  # host state updated on the CPU is one subgroup per group: it moves nowhere
        assert len(off._subgroups) == len(off.param_groups)
    s1 = torch.optim.lr_scheduler.StepLR(plain, 2, 0.5)
    s2 = torch.optim.lr_scheduler.StepLR(off, 2, 0.5)
    l1 = train(m1, plain, sched=s1, clip=0.5)
    l2 = train(m2, off, sched=s2, clip=0.5)
    assert l1 == l2
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert_same_state(plain.state_dict(), off.state_dict(), frozen=(0, 1))
    assert m2[0].weight.grad is None and all(p.index != 0 for s in off._subgroups for p in s.pieces)
    off.close()


@pytest.mark.parametrize("site", ["cpu", "device"])
def test_update_site_and_split_params(site, tmp_path):
    """Device-site updates (state copied in and out) and params sliced across subgroups stay bit-identical."""
    m1, m2 = make_model(), make_model()
    plain = torch.optim.AdamW(m1.parameters(), lr=1e-2, fused=True)
    off = OffloadOptimizer(m2.parameters(), torch.optim.AdamW, lr=1e-2, fused=True,
                           config=config("nvme", tmp_path, update_on=site, subgroup_numel=1024))
    assert any(not p.whole for s in off._subgroups for p in s.pieces), "expected a param cut into pieces"
    train(m1, plain)
    train(m2, off)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert_same_state(plain.state_dict(), off.state_dict())
    if site == "device":
        assert off.report()["h2d_bytes"] > 0 and off.report()["d2h_bytes"] > 0
    off.close()


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_state_dict_round_trips_with_plain(tier, tmp_path):
    """Save on offload -> load in plain, and the reverse; training goes on identically."""
    ref, m_a, m_b = make_model(), make_model(), make_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    train(ref, ref_opt, steps=6)

    # offload for 3 steps -> plain for 3 more
    off = OffloadOptimizer(torch.optim.AdamW(m_a.parameters(), lr=1e-2), config=config(tier, tmp_path / "a"))
    train(m_a, off, steps=3)
    plain = torch.optim.AdamW(m_a.parameters(), lr=1e-2)
    plain.load_state_dict(off.state_dict())
    g = torch.Generator().manual_seed(1)
    # replay the data stream: the first 3 steps consumed 3*2 batches
    _consume(g, 6)
    _train_from(m_a, plain, g, steps=3)

    # plain for 3 steps -> offload for 3 more
    plain_b = torch.optim.AdamW(m_b.parameters(), lr=1e-2)
    train(m_b, plain_b, steps=3)
    off_b = OffloadOptimizer(torch.optim.AdamW(m_b.parameters(), lr=1e-2), config=config(tier, tmp_path / "b"))
    off_b.load_state_dict(plain_b.state_dict())
    g = torch.Generator().manual_seed(1)
    _consume(g, 6)
    _train_from(m_b, off_b, g, steps=3)

    for a, b, c in zip(ref.parameters(), m_a.parameters(), m_b.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert_same_state(ref_opt.state_dict(), off_b.state_dict())
    off.close()
    off_b.close()


@pytest.fixture(autouse=True)
def _dirs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()


def _consume(g, batches):
    for _ in range(batches):
        torch.randn(16, 32, generator=g)
        torch.randn(16, 8, generator=g)


def _train_from(model, opt, g, steps, accum=2):
    for _ in range(steps):
        for _ in range(accum):
            x = torch.randn(16, 32, generator=g)
            y = torch.randn(16, 8, generator=g)
            ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_impl_auto_picks_fused_and_reports_it(tmp_path):
    m = make_model()
    off = OffloadOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-3), config=OffloadConfig())
    assert off.report()["impl"] == "fused"
    assert off.param_groups[0]["fused"] is None  # the user's own setting is what state_dict shows
    m2 = make_model()
    plain = torch.optim.AdamW(m2.parameters(), lr=1e-3, fused=True)
    train(m, off)
    train(m2, plain)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_bf16_params_fp32_masters(tier, tmp_path):
    """bf16 params, fp32 masters off the device: equals the textbook mixed-precision loop (fp32 master copy,
    grads cast up, update, cast down)."""
    m_ref, m = make_model(torch.bfloat16), make_model(torch.bfloat16)
    masters = [p.detach().float().clone().requires_grad_(True) for p in m_ref.parameters()]
    ref_opt = torch.optim.AdamW(masters, lr=1e-2, fused=True)
    off = OffloadOptimizer(m.parameters(), torch.optim.AdamW, lr=1e-2, fused=True, config=config(tier, tmp_path))
    assert all(s.has_master for s in off._subgroups)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(16, 32, generator=g1).bfloat16()
        m_ref(x).float().pow(2).mean().backward()
        for mp, p in zip(masters, m_ref.parameters()):
            mp.grad = p.grad.float()
            p.grad = None
        ref_opt.step()
        with torch.no_grad():
            for mp, p in zip(masters, m_ref.parameters()):
                p.copy_(mp)
        x = torch.randn(16, 32, generator=g2).bfloat16()
        m(x).float().pow(2).mean().backward()
        off.step()
        off.zero_grad()
    for a, b in zip(m_ref.parameters(), m.parameters()):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
    sd = off.state_dict()
    for k, mp in enumerate(masters):
        assert torch.equal(sd["state"][k]["master"], mp.detach())
    off.close()


def test_fp16_dynamic_loss_scale_skips_overflow(tmp_path):
    m = make_model(torch.float16)
    off = OffloadOptimizer(m.parameters(), torch.optim.AdamW, lr=1e-2, config=OffloadConfig(loss_scale="dynamic"))
    before = [p.detach().clone() for p in m.parameters()]
    x = torch.randn(4, 32).half()
    off.scale_loss(m(x).float().pow(2).mean()).backward()
    next(m.parameters()).grad[0, 0] = float("inf")
    scale = off.loss_scale
    off.step()
    assert off.loss_scale == scale / 2 and off.report()["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    off.zero_grad()
    off.scale_loss(m(x).float().pow(2).mean()).backward()
    grads = [p.grad.float() / off.loss_scale for p in m.parameters()]
    off.step()
    assert off.report()["skipped_steps"] == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_host_budget_respected_when_streaming(tmp_path):
    """More subgroups than the budget can hold at once: the pipeline waits instead of exceeding it."""
    m = make_model()
    chunk = 2 * 4 * 2048  # AdamW: two fp32 state tensors for ~2048 params per subgroup
    budget = 3 * (chunk + 8192)
    off = OffloadOptimizer(m.parameters(), torch.optim.AdamW, lr=1e-2,
                           config=config("nvme", tmp_path, buffers=8, host_budget_bytes=budget))
    m2 = make_model()
    plain = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    off.host_pool.budget.reset_peak()
    train(m, off)
    train(m2, plain)
    assert off.host_pool.budget.peak_bytes <= budget
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    off.close()


def test_add_param_group_and_hyperparameters_reach_inner(tmp_path):
    m1, m2 = make_model(), make_model()
    p1 = torch.optim.SGD(list(m1[0].parameters()), lr=0.1, momentum=0.9)
    p1.add_param_group({"params": list(m1[3].parameters()) + list(m1[5].parameters()), "lr": 0.01})
    o2 = OffloadOptimizer(list(m2[0].parameters()), torch.optim.SGD, lr=0.1, momentum=0.9,
                          config=config("nvme", tmp_path))
    o2.add_param_group({"params": list(m2[3].parameters()) + list(m2[5].parameters()), "lr": 0.01})
    for opt in (p1, o2):
        opt.param_groups[1]["momentum"] = 0.5
    train(m1, p1)
    train(m2, o2)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert_same_state(p1.state_dict(), o2.state_dict())
    o2.close()


def test_bad_inputs_have_clear_errors(tmp_path):
    m = make_model()
    with pytest.raises(NotImplementedError, match="LBFGS"):
        OffloadOptimizer(m.parameters(), torch.optim.LBFGS)
    with pytest.raises(ValueError, match="nvme_dirs"):
        OffloadConfig(state_tier="nvme")
    with pytest.raises(ValueError, match="state_tier"):
        OffloadConfig(state_tier="disk")
    off = OffloadOptimizer(m.parameters(), torch.optim.AdamW, lr=1e-3, config=OffloadConfig())
    other = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    o = torch.optim.AdamW(other.parameters(), lr=1e-3)
    other(torch.randn(2, 32)).sum().backward()
    o.step()
    with pytest.raises(ValueError, match=r"parameter 4 \(shape \[64, 64\]\).*different model"):
        off.load_state_dict(o.state_dict())
    same = torch.optim.AdamW(make_model().parameters(), lr=1e-3)  # the right model, one entry edited to int32
    for p in same.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    same.step()
    sd = same.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].view(torch.int32)
    with pytest.raises(ValueError, match=r"parameter 0 \(torch.float32\) has state 'exp_avg' of dtype torch.int32"):
        off.load_state_dict(sd)
    m[0].weight.requires_grad_(False)
    m2 = make_model()
    m2[0].weight.requires_grad_(False)
    off2 = OffloadOptimizer(m2.parameters(), torch.optim.AdamW, lr=1e-3, config=OffloadConfig())
    m2[0].weight.grad = torch.ones_like(m2[0].weight)
    with pytest.raises(NotImplementedError, match="did not require grad"):
        off2.step()


class RowScaled(torch.optim.Optimizer):
    """A non-elementwise optimizer: one second-moment value per row of a matrix (Adafactor-like), so its state
    does not have the parameter's shape. Offload keeps such params whole and carries any state shape."""

    def __init__(self, params, lr=1e-2, beta=0.9):
        super().__init__(params, dict(lr=lr, beta=beta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                g2 = p.grad.pow(2).reshape(p.shape[0], -1).mean(dim=1) if p.dim() > 1 else p.grad.pow(2)
                if not st:
                    st["row_sq"] = torch.zeros_like(g2)
                    st["n"] = 0
                st["n"] += 1
                st["row_sq"].mul_(group["beta"]).add_(g2, alpha=1 - group["beta"])
                denom = st["row_sq"].sqrt().add_(1e-8)
                p.add_(p.grad / (denom.view(-1, *([1] * (p.dim() - 1))) if p.dim() > 1 else denom), alpha=-group["lr"])


def test_non_elementwise_optimizer_works_whole(tmp_path):
    m1, m2 = make_model(), make_model()
    plain = RowScaled(m1.parameters())
    off = OffloadOptimizer(m2.parameters(), RowScaled, config=config("nvme", tmp_path, subgroup_numel=1024))
    assert all(p.whole for s in off._subgroups for p in s.pieces), "a non-elementwise optimizer must not be sliced"
    train(m1, plain)
    train(m2, off)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert_same_state(plain.state_dict(), off.state_dict())
    plain2 = RowScaled(make_model().parameters())
    plain2.load_state_dict(off.state_dict())
    off.load_state_dict(plain.state_dict())
    off.close()


def test_failed_write_back_keeps_state_in_memory(tmp_path, monkeypatch):
    """A write-back that fails (disk full) raises from step(), and the updated state is kept, not lost: the next
    steps continue exactly as the plain optimizer does."""
    import errno
    import os

    m1, m2 = make_model(), make_model()
    plain = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    off = OffloadOptimizer(torch.optim.AdamW(m2.parameters(), lr=1e-2), config=config("nvme", tmp_path))
    train(m1, plain, steps=1)
    train(m2, off, steps=1)
    real = os.pwritev
    calls = {"n": 0}

    def flaky(fd, bufs, offset):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "pwritev", flaky)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 32, generator=g)
    for m in (m1, m2):
        ((m(x) - 1) ** 2).mean().backward()
    plain.step()
    with pytest.raises(Exception, match="disk full"):
        off.step()
    monkeypatch.setattr(os, "pwritev", real)
    plain.zero_grad()
    off.zero_grad()
    assert any(s.chunk.state.value == "dirty" for s in off._subgroups)
    for m, o in ((m1, plain), (m2, off)):
        ((m(x) - 1) ** 2).mean().backward()
        o.step()
        o.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert_same_state(plain.state_dict(), off.state_dict())
    off.close()
