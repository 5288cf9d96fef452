"""Per-unit plans and apply_plan on CUDA: units kept on the GPU, state on the GPU, device and CPU updates, and
switches between them (tests/test_runtime_plan.py runs the same on the CPU, bit for bit)."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadConfig, wrap
from offload.runtime import runtime_of
from scheduler.planner import Plan, UnitPlacement
from scheduler.workload import TransformerShape, build_transformer
from storage import Tier

D, H, N = Tier.DEVICE, Tier.HOST, Tier.NVME
SHAPE = TransformerShape(n_layer=5, d_model=128, n_head=4, d_ff=512, vocab=512, n_pos=64, bias=True,
                         norm="layernorm", tied=True)
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU; run scripts/gpu_check.sh on a GPU machine")

# Device updates only: the same fused CUDA kernel as plain AdamW on the GPU, so bit-identical.
DEVICE_UPDATES = (UnitPlacement(D, D, "device"), UnitPlacement(H, D, "device"), UnitPlacement(N, H, "device"),
                  UnitPlacement(D, N, "device"), UnitPlacement(H, H, "device"), UnitPlacement(N, D, "device"))
# With CPU updates (the CPU's fused kernel rounds differently from the GPU's: compared within fp32 rounding).
MIXED = (UnitPlacement(D, H, "cpu"), UnitPlacement(H, N, "cpu", grad_tier=N), UnitPlacement(N, H, "cpu"),
         UnitPlacement(H, D, "device"), UnitPlacement(N, N, "device"), UnitPlacement(D, D, "device"))


def gpt():
    torch.manual_seed(0)
    return build_transformer(SHAPE, device="cuda")


DEV = torch.device("cuda")


def loss_of(model, idx):
    logits = model(idx[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


@pytest.mark.parametrize("units,exact", [(DEVICE_UPDATES, True), (MIXED, False)], ids=["device", "mixed"])
def test_plan_and_switches_on_the_gpu(units, exact, tmp_path):
    torch.use_deterministic_algorithms(True)
    ref, m = gpt(), gpt()
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)
    first = Plan(strategy="gpu", units=units, prefetch_depth=1)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-3),
                      OffloadConfig(nvme_dirs=str(tmp_path), impl="fused"), plan=first)
    rt = runtime_of(model)
    g = torch.Generator().manual_seed(1)
    plans = [first, Plan(strategy="b", units=units[2:] + units[:2], overlap_update=False),
             Plan(strategy="c", units=units[1:] + units[:1], prefetch_depth=2), first]
    for k, pl in enumerate(plans):
        if k:
            rt.apply_plan(pl)
        kept = sum(u.nbytes for u in rt.units if u.param_tier is D)
        state = sum(s.chunk_bytes for s in opt._subgroups if s.tier is D)
        assert rt.device_budget.used_bytes == kept + state
        for _ in range(2):
            idx = torch.randint(0, SHAPE.vocab, (4, 33), generator=g).cuda()
            for mm, oo in ((ref, plain), (model, opt)):
                loss = loss_of(mm, idx)
                loss.backward()
                oo.step()
                oo.zero_grad()
        # An offloaded model's state_dict is on the host whatever tier holds the params (as FSDP's cpu_offload
        # state dicts and DeepSpeed's consolidated ones): compared on the reference's device.
        sd_ref, sd = ref.state_dict(), {k: v.to(DEV) for k, v in model.state_dict().items()}
        for name in sd_ref:
            if exact:
                assert torch.equal(sd_ref[name], sd[name]), (k, name)
            else:
                # CPU updates against the GPU's fused kernel: they differ in the last bit, and params whose grads
                # are rounding noise (the key bias: softmax ignores it) then move apart by a part of lr. A wrong
                # copy in a switch moves a param by its own size (~0.02), far more than one lr step.
                torch.testing.assert_close(sd[name], sd_ref[name], rtol=1e-4, atol=1e-3)
    print(rt.report()["placement"], {k: v for k, v in rt.stats.items() if k.startswith("replan")})
    rt.close()


@pytest.mark.parametrize("max_norm", [1e-3, 1e6], ids=["every-step-clips", "none-clips"])
def test_speculative_steps_on_the_gpu_are_exact(max_norm, tmp_path):
    """Clipping with the overlapped update, speculating at every step, on units whose params and state live on
    the GPU, the host and NVMe (updated on the device). Steps that do not clip are committed: bit-identical to
    plain clip_grad_norm_ + fused AdamW. Steps that clip are undone (device memory from its host pre-image) and
    redone: bit-identical to the same run waiting for backward (speculate=False); against plain PyTorch both
    differ in the last bits, since the runtime takes the grad norm from the host copies of the grads (the CPU's
    reduction) and plain PyTorch on the GPU."""
    import math

    from offload.optimizer import SpeculationPolicy

    torch.use_deterministic_algorithms(True)
    ref = gpt()
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)
    runs = []
    for speculate in (True, False):
        m = gpt()
        (tmp_path / str(speculate)).mkdir()
        model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-3),
                          OffloadConfig(nvme_dirs=str(tmp_path / str(speculate)), impl="fused", max_grad_norm=max_norm,
                                        speculate=speculate),
                          plan=Plan(strategy="gpu", units=DEVICE_UPDATES, prefetch_depth=1))
        opt.speculation = SpeculationPolicy(max_clipped=math.inf)
        runs.append((model, opt))
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        idx = torch.randint(0, SHAPE.vocab, (4, 33), generator=g).cuda()
        loss_of(ref, idx).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        plain.step()
        plain.zero_grad()
        for model, opt in runs:
            loss_of(model, idx).backward()
            opt.step()
            opt.zero_grad()
    sd_ref = ref.state_dict()
    (spec, spec_opt), (wait, _) = runs
    sd, sd_wait = ({k: v.to(DEV) for k, v in mm.state_dict().items()} for mm in (spec, wait))
    assert [k for k in sd_ref if not torch.equal(sd_wait[k], sd[k])] == []
    if max_norm > 1:
        assert [k for k in sd_ref if not torch.equal(sd_ref[k], sd[k])] == []
    else:
        for k in sd_ref:
            torch.testing.assert_close(sd[k], sd_ref[k], rtol=1e-5, atol=1e-6)
    st = spec_opt.stats
    assert st["speculative_steps"] == 4
    assert (st["spec_rollbacks"] if max_norm < 1 else st["spec_commits"]) == 4, st
    for model, _ in runs:
        runtime_of(model).close()
