"""Units that mix frozen and trainable params (LoRA adapters on a frozen base): bit-identical to plain PyTorch, on
every tier, and the frozen weights kept on the device through backward only as long as backward reads them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import TINY_GPT, gpt, lm_loss, token_batches
from offload import OffloadConfig, wrap
from offload.runtime import runtime_of


class LoRALinear(nn.Module):
    """``base(x) + x A^T B^T``: a frozen linear layer and a trainable low-rank update (B starts at zero)."""

    def __init__(self, base: nn.Linear, rank: int = 4):
        super().__init__()
        self.base = base.requires_grad_(False)
        g = torch.Generator().manual_seed(base.in_features * 31 + base.out_features)
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=g) * 0.1)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t()


def lora_gpt() -> nn.Module:
    m = gpt().requires_grad_(False)
    for b in m.blocks:
        b.q, b.v = LoRALinear(b.q), LoRALinear(b.v)
    return m


def trainable(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m.parameters() if p.requires_grad]


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "step"])
@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_lora_trains_bit_identical(tier, overlap, accum, tmp_path):
    ref, m = lora_gpt(), lora_gpt()
    plain = torch.optim.AdamW(trainable(ref), lr=1e-2)
    frozen_before = {n: p.detach().clone() for n, p in ref.named_parameters() if not p.requires_grad}
    # The device holds the rest unit and two blocks: units must leave it during backward, frozen weights too.
    other = lora_gpt()
    probe, _ = wrap(other, torch.optim.AdamW(trainable(other), lr=1e-2), OffloadConfig(param_tier="host"))
    units = runtime_of(probe).units
    budget = units[0].nbytes + 2 * max(u.nbytes for u in units[1:])
    assert budget < sum(u.nbytes for u in units)
    runtime_of(probe).close()
    cfg = OffloadConfig(param_tier=tier, grad_tier=tier, state_tier=tier, nvme_dirs=str(tmp_path), impl="as_given",
                        overlap_update=overlap, accumulation_steps=accum, prefetch=1, device_budget_bytes=budget)
    model, opt = wrap(m, torch.optim.AdamW(trainable(m), lr=1e-2), cfg)
    rt = runtime_of(model)
    assert rt.num_parameters() == sum(p.numel() for p in ref.parameters())
    assert rt.num_parameters(trainable_only=True) == sum(p.numel() for p in trainable(ref))
    assert [u.grad_nbytes for u in rt.units[1:]] == [
        4 * sum(p.numel() for p in trainable(b)) for b in ref.blocks]  # grad buffers for the adapters only
    data = iter(token_batches(3 * accum, TINY_GPT.vocab))
    for _ in range(3):
        for _ in range(accum):
            idx = next(data)
            expected = lm_loss(ref, idx)
            expected.backward()
            loss = lm_loss(model, idx)
            loss.backward()
            assert loss.item() == expected.item()
        plain.step()
        opt.step()
        plain.zero_grad()
        opt.zero_grad()
    sd_ref, sd = ref.state_dict(), model.state_dict()
    assert [k for k in sd_ref if not torch.equal(sd_ref[k], sd[k])] == []
    assert all(torch.equal(sd[n], v) for n, v in frozen_before.items())  # the base did not move
    assert not torch.equal(sd["blocks.0.q.B"], torch.zeros_like(sd["blocks.0.q.B"]))  # the adapters did
    osd, osd_ref = opt.state_dict(), plain.state_dict()
    assert len(osd["state"]) == len(osd_ref["state"]) == 4 * len(ref.blocks)  # state for the adapters only
    for k, entry in osd_ref["state"].items():
        for key, v in entry.items():
            assert torch.equal(v, osd["state"][k][key]), (k, key)
    rt.close()


def test_frozen_weights_leave_the_device_once_backward_has_passed_through_them(tmp_path):
    """A block's adapters get their grads before backward has used the block's frozen weights to pass the grad on
    to the block before it. The block stays on the device until then (else backward reads freed memory: the
    parity test above), and leaves it once its input's grad is computed (else a LoRA model keeps every block
    on the device until backward ends)."""
    m = lora_gpt()
    model, opt = wrap(m, torch.optim.AdamW(trainable(m), lr=1e-2),
                      OffloadConfig(param_tier="host", state_tier="host", impl="as_given", prefetch=1))
    rt = runtime_of(model)
    unit_of = {id(u.modules[0]): u for u in rt.units[1:]}
    seen = []  # (block whose input grad was just computed, the state of every block unit then)

    def watch(block, args):
        if args[0].requires_grad:
            args[0].register_hook(lambda g: seen.append((unit_of[id(block)].index,
                                                         [u.state.value for u in rt.units[1:]])))
    for b in m.blocks:
        b.register_forward_pre_hook(watch)
    lm_loss(model, token_batches(1, TINY_GPT.vocab)[0]).backward()
    opt.step()
    # Block 0's input (the frozen embeddings' output) needs no grad; blocks 1 and 2 pass theirs on.
    assert [i for i, _ in seen] == [3, 2]
    for i, states in seen:
        later = states[i:]  # the units after unit i, whose backward is over: released
        assert later == ["released"] * len(later), seen
    rt.close()
