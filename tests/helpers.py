"""Helpers the tests share, in a plain module: test files import it by name (``from helpers import gpt``).

Not in conftest.py: the ranks that tests/test_distributed.py spawns import functions of that test module in a fresh
interpreter, where pytest has loaded no conftest. This module imports neither pytest nor a test module, so a
spawned rank can import it (multiprocessing's spawn gives the child the parent's ``sys.path``, which pytest put
``tests/`` on).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from scheduler.workload import TransformerShape, build_transformer


def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll ``cond`` until it holds; fail naming ``what`` after ``timeout_s``. For states that no event announces
    (a thread parked inside a lock's wait)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s} s"
        time.sleep(0.001)


# -- a tiny GPT, its data and its loss ---------------------------------------------------------------------------------
TINY_GPT = TransformerShape(n_layer=3, d_model=32, n_head=4, d_ff=64, vocab=96, n_pos=16, bias=True,
                            norm="layernorm", tied=True)
"""Three blocks of width 32 with tied embeddings: a rest unit and three block units, in milliseconds per step."""


def gpt(shape: TransformerShape = TINY_GPT) -> torch.nn.Module:
    """Our transformer of ``shape`` on the CPU, with the same weights on every call (seed 0)."""
    torch.manual_seed(0)
    return build_transformer(shape, device="cpu")


def token_batches(n: int, vocab: int, *, rows: int = 4, seq: int = 12, seed: int = 1) -> list[torch.Tensor]:
    """``n`` batches of ``rows`` random token sequences of length ``seq`` (inputs and next-token targets)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (rows, seq), generator=g) for _ in range(n)]


def lm_loss(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on ``idx`` (each sequence predicts its own shift by one)."""
    logits = model(idx[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class TextbookMixedPrecision:
    """The textbook mixed-precision loop a bf16 model under offload must equal bit for bit: an fp32 master copy of
    each param updated by ``optimizer_class``, grads cast up to it, the new weights cast down into the model."""

    def __init__(self, model: torch.nn.Module, optimizer_class=torch.optim.AdamW, **hp):
        self.model = model
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
        self.opt = optimizer_class(self.masters, **hp)

    def step(self, loss: torch.Tensor) -> None:
        loss.backward()
        for mp, p in zip(self.masters, self.model.parameters()):
            mp.grad, p.grad = p.grad.float(), None
        self.opt.step()
        with torch.no_grad():
            for mp, p in zip(self.masters, self.model.parameters()):
                p.copy_(mp)
