"""Workload: what one training iteration of a model asks of the hardware, per unit, without allocating the model.

A **unit** is a group of modules moved and updated together: each child of
the model's largest ``nn.ModuleList`` (its repeated blocks), plus one ``rest`` unit for everything else
(embeddings, final norm, output head). ``rest`` is used at both ends of the iteration (embedding first, head last
in forward; head first, embedding last in backward), which is why the cost model treats it specially.

Assumptions (each a field of :class:`Workload`, so a different recipe is a different workload):

- mixed precision: params and grads on the device in a 16-bit dtype (2 B/param each); the optimizer holds an
  fp32 master copy plus AdamW's two moments: ``state_bytes_per_param = 12`` (4 + 4 + 4), as in ZeRO
  (Rajbhandari et al. 2020, sec. 3.1, "K = 12"). Plain fp32 training (:func:`precision` ``"fp32"``): 4 / 4 / 8,
  the param is its own master, except where the update cannot change it in place (params on the device for a
  CPU update, or off the device for a device update): there the state carries an fp32 master too
  (``master_bytes_per_param = 4``), as offload/optimizer.py does. Params on NVMe updated on the CPU are staged
  in host memory and changed there: no master.
- FLOPs: a matmul with an ``n``-parameter weight costs ``2 n`` FLOPs per token forward and twice that backward
  (the ``6 N`` rule: Kaplan et al. 2020, sec. 2.1); attention adds ``4 * seq * d_model`` FLOPs per token per
  layer forward for ``QK^T`` and ``AV`` (PaLM, Chowdhery et al. 2022, app. B: ``6N + 12 L H Q T`` per token
  for training, non-causal count). Embedding lookups, norms and elementwise work are not counted.
- activation checkpointing per unit (the default): between a unit's forward and its backward only its input
  stays on the device (``2 * seq * batch * d_model`` bytes), and backward recomputes the forward (one more
  forward's FLOPs, which the cost model adds and MFU does not count). While a unit runs it needs its full
  activations: ``seq * batch * (18 d + 4 ff g)`` bytes (Korthikanti et al. 2022, eq. 1 with its MLP term scaled
  by ``ff / 4d`` and ``g = 1.5`` for gated MLPs, flash attention assumed so no ``5 a s^2 b`` term).

- frozen params (``requires_grad=False``, e.g. the base under LoRA adapters; :attr:`UnitWork.trainable`) are
  fetched like the others but have no grads, no optimizer state and no update; a frozen matmul's backward
  computes only its input's grad (``2 n`` FLOPs per token, not ``4 n``). Presets train every param.

Presets are computed from shapes (``TransformerShape``), never instantiated: a 70B model costs no time. A test
builds :class:`TransformerLM` from the same shape on the ``meta`` device and checks the two agree.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
from typing import Any

BLOCK, REST = "block", "rest"


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnitWork:
    """One unit's share of an iteration, for the workload's batch and sequence length."""

    name: str
    kind: str
    """``"block"`` (a child of the repeated ModuleList) or ``"rest"`` (everything else; at most one)."""
    params: int
    fwd_flops: float
    """Model FLOPs of the unit's forward for the whole batch."""
    bwd_flops: float
    """Model FLOPs of its backward (twice the forward; recomputation is not included here)."""
    act_bytes: int
    """Bytes kept on the device from the unit's forward until its backward (its checkpointed input)."""
    work_bytes: int
    """Transient device bytes while the unit computes (its full activations during recompute and backward)."""
    tensor_numels: tuple[int, ...] = ()
    """Elements of each of the unit's tensors, when the workload lays chunks out tensor by tensor
    (``Workload.chunk_align_bytes``); empty otherwise."""
    trainable: int | None = None
    """Params that train: they get grads, optimizer state and an update; the others are frozen (a LoRA base) and
    only fetched. ``None``: all of them."""
    trainable_numels: tuple[int, ...] = ()
    """Elements of each trainable tensor, when chunks are laid out tensor by tensor; may be left empty when every
    tensor trains (then it is ``tensor_numels``)."""

    def __post_init__(self):
        object.__setattr__(self, "tensor_numels", tuple(self.tensor_numels))
        object.__setattr__(self, "trainable", self.params if self.trainable is None else self.trainable)
        if self.tensor_numels and sum(self.tensor_numels) != self.params:
            raise ValueError(f"UnitWork.tensor_numels of {self.name!r}: expected them to sum to params "
                             f"({self.params}), got {sum(self.tensor_numels)}")
        if not 0 <= self.trainable <= self.params:
            raise ValueError(f"UnitWork.trainable of {self.name!r}: expected 0 to params ({self.params}), got "
                             f"{self.trainable}")
        numels = tuple(self.trainable_numels) or (self.tensor_numels if self.trainable == self.params else ())
        object.__setattr__(self, "trainable_numels", numels)
        if (numels or self.tensor_numels) and sum(numels) != self.trainable:
            raise ValueError(f"UnitWork.trainable_numels of {self.name!r}: expected the trainable tensors' elements, "
                             f"summing to trainable ({self.trainable}), got {list(numels)}")
        if self.kind not in (BLOCK, REST):
            raise ValueError(f"UnitWork.kind: expected 'block' or 'rest', got {self.kind!r}")
        for f in ("params", "fwd_flops", "bwd_flops", "act_bytes", "work_bytes"):
            if getattr(self, f) < 0:
                raise ValueError(f"UnitWork.{f} of {self.name!r}: expected >= 0, got {getattr(self, f)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    """Per-unit sizes and work of one iteration. ``units[0]`` is ``rest`` when the model has one."""

    name: str
    batch: int
    seq: int
    units: tuple[UnitWork, ...]
    compute_dtype: str = "bf16"
    param_bytes_per_param: int = 2
    """Bytes of a param on the device (the 16-bit copy the forward uses)."""
    grad_bytes_per_param: int = 2
    state_bytes_per_param: int = 12
    """Optimizer-side bytes: fp32 master + AdamW exp_avg + exp_avg_sq."""
    master_bytes_per_param: int = 0
    """Bytes of an fp32 master the state adds where the update cannot change the params in place (fp32 training
    with params on the device for a CPU update, or off it for a device update); 0 when ``state_bytes_per_param``
    already holds one."""
    checkpointing: bool = True
    """Backward recomputes each unit's forward (adds ``fwd_flops`` to backward time, not to model FLOPs)."""
    chunk_align_bytes: int = 0
    """Each tensor of a param or state chunk starts at a multiple of this (the runtime's ``PARAM_ALIGN`` and the
    optimizer's ``SLOT_ALIGN``), so a chunk is the sum of its tensors' padded bytes; needs units with
    ``tensor_numels``. 0: a chunk is params x bytes per param. Grads are not padded (one flat fp32 buffer)."""

    def __post_init__(self):
        object.__setattr__(self, "units", tuple(self.units))
        if self.batch < 1 or self.seq < 1:
            raise ValueError(f"Workload: expected batch >= 1 and seq >= 1, got batch={self.batch}, seq={self.seq}")
        if not self.units:
            raise ValueError(f"Workload {self.name!r}: expected at least one unit, got none; does the model have "
                             f"parameters?")
        rests = [i for i, u in enumerate(self.units) if u.kind == REST]
        if rests not in ([], [0]):
            raise ValueError(f"Workload.units: expected at most one 'rest' unit, first; got rest at {rests}")
        if self.chunk_align_bytes and any(u.params and not u.tensor_numels for u in self.units):
            raise ValueError(f"Workload.chunk_align_bytes={self.chunk_align_bytes}: expected every unit to list its "
                             f"tensor_numels (from_module records them when chunk_align_bytes is given)")

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def params(self) -> int:
        return sum(u.params for u in self.units)

    @property
    def trainable(self) -> int:
        return sum(u.trainable for u in self.units)

    def _chunk(self, i: int, bytes_per_elem: int, tensors: int = 1, *, trainable: bool = False) -> int:
        """``tensors`` tensors of ``bytes_per_elem`` per element for each of unit ``i``'s (its trainable ones
        only, with ``trainable``), padded per tensor."""
        u, a = self.units[i], self.chunk_align_bytes
        if not a:
            return (u.trainable if trainable else u.params) * bytes_per_elem * tensors
        return tensors * sum((n * bytes_per_elem + a - 1) // a * a
                             for n in (u.trainable_numels if trainable else u.tensor_numels))

    def param_bytes(self, i: int) -> int:
        return self._chunk(i, self.param_bytes_per_param)

    def trainable_param_bytes(self, i: int) -> int:
        """Bytes of the unit's trainable params in its param chunk: what an update's new weights are, when they
        travel to where the params live apart from the rest of the chunk (across the link)."""
        return self._chunk(i, self.param_bytes_per_param, trainable=True)

    def grad_bytes(self, i: int) -> int:
        """Grads of the trainable params only: frozen ones get none."""
        return self.units[i].trainable * self.grad_bytes_per_param

    def state_bytes(self, i: int, *, master: bool = False) -> int:
        """The unit's state chunk, for its trainable params only; ``master``: plus an fp32 master (see
        ``master_bytes_per_param``). State is fp32, one tensor per 4 bytes per param (AdamW: exp_avg,
        exp_avg_sq), each padded on its own."""
        sb = self._chunk(i, 4, self.state_bytes_per_param // 4, trainable=True) \
            if self.state_bytes_per_param % 4 == 0 else self.units[i].trainable * self.state_bytes_per_param
        return sb + (self._chunk(i, self.master_bytes_per_param, trainable=True)
                     if master and self.master_bytes_per_param else 0)

    @property
    def model_flops(self) -> float:
        """FLOPs of one iteration, forward plus backward, without recomputation (the MFU numerator)."""
        return sum(u.fwd_flops + u.bwd_flops for u in self.units)

    def to_dict(self) -> dict:
        return {"name": self.name, "batch": self.batch, "seq": self.seq, "params": self.params,
                "trainable": self.trainable,
                "compute_dtype": self.compute_dtype, "param_bytes_per_param": self.param_bytes_per_param,
                "grad_bytes_per_param": self.grad_bytes_per_param,
                "state_bytes_per_param": self.state_bytes_per_param,
                "master_bytes_per_param": self.master_bytes_per_param, "checkpointing": self.checkpointing,
                "chunk_align_bytes": self.chunk_align_bytes,
                "units": [dataclasses.asdict(u) for u in self.units]}


def precision(dtype: str) -> dict:
    """Workload fields for a training recipe: ``"bf16"``/``"fp16"`` (16-bit params and grads, fp32 master and
    moments in the state, the defaults) or ``"fp32"`` (4-byte params and grads, 8-byte AdamW state, a master
    only where the update cannot work in place)."""
    if dtype == "fp32":
        return {"compute_dtype": "fp32", "param_bytes_per_param": 4, "grad_bytes_per_param": 4,
                "state_bytes_per_param": 8, "master_bytes_per_param": 4}
    if dtype in ("bf16", "fp16"):
        return {"compute_dtype": dtype, "param_bytes_per_param": 2, "grad_bytes_per_param": 2,
                "state_bytes_per_param": 12, "master_bytes_per_param": 0}
    raise ValueError(f"dtype: expected 'fp32', 'bf16' or 'fp16', got {dtype!r}")


# -- shapes ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerShape:
    """A decoder-only transformer's shape: enough to count its params, FLOPs and activations."""

    n_layer: int
    d_model: int
    n_head: int
    d_ff: int
    vocab: int
    n_kv_head: int = 0
    """Key/value heads (grouped-query attention); 0 means ``n_head``."""
    n_pos: int = 0
    """Learned position embeddings (GPT-2, GPT-3); 0 for rotary (Llama)."""
    gated_mlp: bool = False
    """SwiGLU-style MLP with three matrices (Llama)."""
    bias: bool = False
    norm: str = "rmsnorm"
    tied: bool = False
    """Output head shares the token embedding matrix."""

    def __post_init__(self):
        for f in ("n_layer", "d_model", "n_head", "d_ff", "vocab"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TransformerShape.{f}: expected a positive integer, got {v!r}")
        for f in ("n_kv_head", "n_pos"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TransformerShape.{f}: expected an integer >= 0, got {v!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"TransformerShape.norm: expected 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"TransformerShape: expected d_model divisible by n_head, got {self.d_model} and "
                             f"{self.n_head}")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise ValueError(f"TransformerShape.n_kv_head: expected a divisor of n_head={self.n_head}, got "
                             f"{self.n_kv_head}")

    @property
    def kv_dim(self) -> int:
        return self.d_model * (self.n_kv_head or self.n_head) // self.n_head

    @property
    def norm_params(self) -> int:
        return 2 * self.d_model if self.norm == "layernorm" else self.d_model

    def block_matmul_params(self) -> int:
        d, kv = self.d_model, self.kv_dim
        return 2 * d * d + 2 * d * kv + (3 if self.gated_mlp else 2) * d * self.d_ff

    def block_params(self) -> int:
        d, kv, ff = self.d_model, self.kv_dim, self.d_ff
        biases = (2 * d + 2 * kv + (2 * ff if self.gated_mlp else ff) + d) if self.bias else 0
        return self.block_matmul_params() + biases + 2 * self.norm_params

    def rest_params(self) -> int:
        return (self.vocab * self.d_model * (1 if self.tied else 2) + self.n_pos * self.d_model + self.norm_params)


def block_act_bytes(seq: int, batch: int, d_model: int, d_ff: int, gated: bool) -> tuple[int, int]:
    """(kept, working) activation bytes of one transformer block, with checkpointing (see the module note)."""
    kept = 2 * seq * batch * d_model
    work = seq * batch * (18 * d_model + int(4 * d_ff * (1.5 if gated else 1.0)))
    return kept, work


def rest_act_bytes(seq: int, batch: int, d_model: int, vocab: int) -> tuple[int, int]:
    """(kept, working): the final hidden state; the logits in bf16 plus their fp32 softmax for the loss."""
    return 2 * seq * batch * d_model, 6 * seq * batch * vocab


def check_tokens(batch, seq) -> None:
    """``batch`` and ``seq`` are positive integers, checked before any size is computed from them (a negative batch
    would otherwise surface as a negative FLOP count deep in a unit)."""
    for name, v, what in (("batch", batch, "sequences per iteration"), ("seq", seq, "tokens per sequence")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer ({what}), got {v!r}")


def from_shape(shape: TransformerShape, *, batch: int, seq: int, name: str = "transformer", **kw) -> Workload:
    """Per-unit numbers from a shape alone (no torch): how presets of any size stay cheap."""
    check_tokens(batch, seq)
    tokens = batch * seq
    fwd = 2 * shape.block_matmul_params() * tokens + 4 * seq * shape.d_model * tokens
    kept, work = block_act_bytes(seq, batch, shape.d_model, shape.d_ff, shape.gated_mlp)
    block = UnitWork(name="", kind=BLOCK, params=shape.block_params(), fwd_flops=fwd, bwd_flops=2 * fwd,
                     act_bytes=kept, work_bytes=work)
    head_fwd = 2 * shape.vocab * shape.d_model * tokens
    rk, rw = rest_act_bytes(seq, batch, shape.d_model, shape.vocab)
    rest = UnitWork(name="rest", kind=REST, params=shape.rest_params(), fwd_flops=head_fwd, bwd_flops=2 * head_fwd,
                    act_bytes=rk, work_bytes=rw)
    units = [rest] + [dataclasses.replace(block, name=f"blocks.{i}") for i in range(shape.n_layer)]
    return Workload(name=name, batch=batch, seq=seq, units=tuple(units), **kw)


PRESETS: dict[str, tuple[TransformerShape, int, str]] = {
    # name: (shape, published parameter count, where that count is published)
    "gpt2": (TransformerShape(n_layer=12, d_model=768, n_head=12, d_ff=3072, vocab=50257, n_pos=1024, bias=True,
                              norm="layernorm", tied=True), 124_439_808, "HF gpt2 model card (124M)"),
    "gpt2-medium": (TransformerShape(n_layer=24, d_model=1024, n_head=16, d_ff=4096, vocab=50257, n_pos=1024,
                                     bias=True, norm="layernorm", tied=True), 354_823_168, "HF gpt2-medium (355M)"),
    "gpt2-large": (TransformerShape(n_layer=36, d_model=1280, n_head=20, d_ff=5120, vocab=50257, n_pos=1024,
                                    bias=True, norm="layernorm", tied=True), 774_030_080, "HF gpt2-large (774M)"),
    "gpt2-xl": (TransformerShape(n_layer=48, d_model=1600, n_head=25, d_ff=6400, vocab=50257, n_pos=1024, bias=True,
                                 norm="layernorm", tied=True), 1_557_611_200, "HF gpt2-xl (1.5B)"),
    "llama-7b": (TransformerShape(n_layer=32, d_model=4096, n_head=32, d_ff=11008, vocab=32000, gated_mlp=True),
                 6_738_415_616, "Llama 2 7B, HF meta-llama/Llama-2-7b-hf safetensors index"),
    "llama-13b": (TransformerShape(n_layer=40, d_model=5120, n_head=40, d_ff=13824, vocab=32000, gated_mlp=True),
                  13_015_864_320, "Llama 2 13B, HF meta-llama/Llama-2-13b-hf"),
    "llama-70b": (TransformerShape(n_layer=80, d_model=8192, n_head=64, n_kv_head=8, d_ff=28672, vocab=32000,
                                   gated_mlp=True), 68_976_648_192, "Llama 2 70B, HF meta-llama/Llama-2-70b-hf"),
    "gpt3-175b": (TransformerShape(n_layer=96, d_model=12288, n_head=96, d_ff=4 * 12288, vocab=50257, n_pos=2048,
                                   bias=True, norm="layernorm", tied=True), 175_000_000_000,
                  "Brown et al. 2020, table 2.1 (175.0B)"),
}


def preset(name: str, *, batch: int, seq: int, **kw) -> Workload:
    if name not in PRESETS:
        raise ValueError(f"model preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return from_shape(PRESETS[name][0], batch=batch, seq=seq, name=name, **kw)


# -- our own small GPT (meta-device builds, and the check that shape math is right) ------------------------------------
def _torch_model_classes():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, s: TransformerShape):
            super().__init__()
            norm = (lambda: nn.LayerNorm(s.d_model)) if s.norm == "layernorm" else (lambda: nn.RMSNorm(s.d_model))
            self.s = s
            self.ln1, self.ln2 = norm(), norm()
            self.q = nn.Linear(s.d_model, s.d_model, bias=s.bias)
            self.k = nn.Linear(s.d_model, s.kv_dim, bias=s.bias)
            self.v = nn.Linear(s.d_model, s.kv_dim, bias=s.bias)
            self.o = nn.Linear(s.d_model, s.d_model, bias=s.bias)
            self.up = nn.Linear(s.d_model, s.d_ff, bias=s.bias)
            self.gate = nn.Linear(s.d_model, s.d_ff, bias=s.bias) if s.gated_mlp else None
            self.down = nn.Linear(s.d_ff, s.d_model, bias=s.bias)

        def forward(self, x):
            b, t, d = x.shape
            h, kvh = self.s.n_head, self.s.n_kv_head or self.s.n_head
            y = self.ln1(x)
            q = self.q(y).view(b, t, h, -1).transpose(1, 2)
            k = self.k(y).view(b, t, kvh, -1).transpose(1, 2).repeat_interleave(h // kvh, dim=1)
            v = self.v(y).view(b, t, kvh, -1).transpose(1, 2).repeat_interleave(h // kvh, dim=1)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
            y = self.ln2(x)
            u = self.up(y)
            u = torch.nn.functional.silu(self.gate(y)) * u if self.gate is not None else torch.nn.functional.gelu(u)
            return x + self.down(u)

    class TransformerLM(nn.Module):
        """A decoder-only LM of any :class:`TransformerShape` (GPT-2 or Llama style), nanoGPT-sized code."""

        def __init__(self, s: TransformerShape):
            super().__init__()
            self.shape = s
            self.wte = nn.Embedding(s.vocab, s.d_model)
            self.wpe = nn.Embedding(s.n_pos, s.d_model) if s.n_pos else None
            self.blocks = nn.ModuleList(Block(s) for _ in range(s.n_layer))
            self.ln_f = nn.LayerNorm(s.d_model) if s.norm == "layernorm" else nn.RMSNorm(s.d_model)
            self.lm_head = nn.Linear(s.d_model, s.vocab, bias=False)
            if s.tied:
                self.lm_head.weight = self.wte.weight

        def forward(self, idx):
            x = self.wte(idx)
            if self.wpe is not None:
                x = x + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for blk in self.blocks:
                x = blk(x)
            return self.lm_head(self.ln_f(x))

    return TransformerLM


def build_transformer(shape: TransformerShape, device: Any = "meta"):
    """Our :class:`TransformerLM` for ``shape``; on ``meta`` by default (no memory)."""
    import torch

    with torch.device(device):
        return _torch_model_classes()(shape)


def from_module(model, *, batch: int, seq: int, name: str = "model", d_model: int | None = None, **kw) -> Workload:
    """Units and per-unit numbers from a module (built on ``meta``: only shapes are read).

    Units: each child of the largest ``nn.ModuleList``, plus ``rest``. FLOPs count every 2-D weight of a
    ``nn.Linear`` (or a HF ``Conv1D``) as a matmul; a shared (tied) weight counts where each module uses it, its
    bytes once. Params with ``requires_grad=False`` are frozen (a LoRA base, as peft leaves it): no grads, state
    or update for them (:attr:`UnitWork.trainable`), and no weight-grad FLOPs in backward. ``d_model`` (for the
    attention term and activations) is read from ``model.config`` or the first matmul of a block when not given.
    """
    from torch import nn

    check_tokens(batch, seq)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{name}: expected a model with an nn.ModuleList of repeated blocks, got none; wrap the "
                         f"blocks in one so each can be a unit")
    blocks = max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))
    if not len(blocks):
        raise ValueError(f"{name}: expected repeated blocks in its largest nn.ModuleList, got an empty one (a layer "
                         f"count of 0?)")
    tokens = batch * seq

    def matmuls(mod) -> list:
        return [m for m in mod.modules() if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
                and getattr(m, "weight", None) is not None and m.weight.dim() == 2]
    cfg = getattr(model, "config", None) or getattr(model, "shape", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        d_model = d_model or getattr(cfg, attr, None)
    first = matmuls(blocks[0])
    if d_model is None and first:
        w = first[0].weight
        d_model = w.shape[1] if isinstance(first[0], nn.Linear) else w.shape[0]
    d_model = int(d_model or 0)
    units, in_blocks = [], set()
    sizes = bool(kw.get("chunk_align_bytes"))  # chunks laid out tensor by tensor: record each tensor's size
    def frozen_mm(mods) -> int:  # backward computes no grad for these weights: 2 n FLOPs per token fewer
        return sum(m.weight.numel() for m in mods if not m.weight.requires_grad)

    def sizes_of(ps) -> dict:
        """The unit's trainable params (frozen ones get no grads, state or update: a LoRA base), and with
        ``chunk_align_bytes`` each tensor's size."""
        train = [p for p in ps if p.requires_grad]
        return {"trainable": sum(p.numel() for p in train),
                "tensor_numels": tuple(p.numel() for p in ps) if sizes else (),
                "trainable_numels": tuple(p.numel() for p in train) if sizes else ()}
    for i, blk in enumerate(blocks):
        ps = list(blk.parameters())
        in_blocks.update(id(p) for p in ps)
        mm = sum(m.weight.numel() for m in matmuls(blk))
        dims = [max(m.weight.shape) for m in matmuls(blk)]
        d_ff = max(dims) if dims else 4 * d_model
        gated = sum(1 for m in matmuls(blk) if max(m.weight.shape) == d_ff and min(m.weight.shape) == d_model) >= 3
        fwd = 2 * mm * tokens + 4 * seq * d_model * tokens
        kept, work = block_act_bytes(seq, batch, d_model, d_ff, gated)
        units.append(UnitWork(name=f"blocks.{i}", kind=BLOCK, params=sum(p.numel() for p in ps), fwd_flops=fwd,
                              bwd_flops=2 * fwd - 2 * frozen_mm(matmuls(blk)) * tokens, act_bytes=kept,
                              work_bytes=work, **sizes_of(ps)))
    rest_ps = [p for p in model.parameters() if id(p) not in in_blocks]
    rest_params = sum(p.numel() for p in rest_ps)
    block_mods = {id(m) for m in blocks.modules()}
    rest_mm = [m for m in matmuls(model) if id(m) not in block_mods]
    if rest_params:
        vocab = max((max(m.weight.shape) for m in rest_mm), default=0)
        head_fwd = 2 * sum(m.weight.numel() for m in rest_mm) * tokens
        rk, rw = rest_act_bytes(seq, batch, d_model, vocab)
        units.insert(0, UnitWork(name="rest", kind=REST, params=rest_params, fwd_flops=head_fwd,
                                 bwd_flops=2 * head_fwd - 2 * frozen_mm(rest_mm) * tokens, act_bytes=rk,
                                 work_bytes=rw, **sizes_of(rest_ps)))
    return Workload(name=name, batch=batch, seq=seq, units=tuple(units), **kw)


def from_factory(spec: str, *, batch: int, seq: int, **kw) -> Workload:
    """``package.module:function``: call it under ``torch.device('meta')`` and read the module it returns."""
    import torch

    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"model: expected 'package.module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model {spec!r}: cannot import it ({e}); is the module on PYTHONPATH?") from None
    with torch.device("meta"):
        model = fn()
    return from_module(model, batch=batch, seq=seq, name=spec, **kw)


HF_NEEDS = {"gpt2": ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions"),
            **{mt: ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
               for mt in ("llama", "mistral", "qwen2")}}
"""The sizes :func:`shape_from_hf_config` reads, per family it knows by heart."""


def shape_from_hf_config(cfg: dict) -> TransformerShape | None:
    """The shape of a HF ``config.json`` for the families we know by heart (no transformers needed); ``None`` for
    another family. Sizes the family needs and ``cfg`` lacks raise ``KeyError`` naming them all."""
    mt = cfg.get("model_type")
    missing = [k for k in HF_NEEDS.get(mt, ()) if cfg.get(k) is None]
    if missing:
        raise KeyError(", ".join(missing))
    if mt == "gpt2":
        d = cfg["n_embd"]
        return TransformerShape(n_layer=cfg["n_layer"], d_model=d, n_head=cfg["n_head"],
                                d_ff=cfg.get("n_inner") or 4 * d, vocab=cfg["vocab_size"], n_pos=cfg["n_positions"],
                                bias=True, norm="layernorm", tied=cfg.get("tie_word_embeddings", True))
    if mt in ("llama", "mistral", "qwen2"):
        return TransformerShape(n_layer=cfg["num_hidden_layers"], d_model=cfg["hidden_size"],
                                n_head=cfg["num_attention_heads"], n_kv_head=cfg.get("num_key_value_heads") or 0,
                                d_ff=cfg["intermediate_size"], vocab=cfg["vocab_size"], gated_mlp=True,
                                bias=bool(cfg.get("attention_bias", False)) and mt != "qwen2",
                                tied=bool(cfg.get("tie_word_embeddings", False)))
    return None


HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
"""A HF config's ``dtype`` (``torch_dtype`` before transformers 5) -> the recipe of :func:`precision`."""

HF_PRICED = frozenset({
    "gpt2", "gpt_neo", "gptj", "gpt_neox", "gpt_bigcode", "codegen", "opt", "bloom", "falcon", "llama", "mistral",
    "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "stablelm", "starcoder2", "olmo", "olmo2", "cohere",
    "granite", "persimmon", "smollm3"})
"""Model types whose blocks are dense attention + MLP, which the formulas of the module note price. Others (state
space models such as Mamba, mixtures of experts, whose FLOPs per token are not those of their params) are refused,
not guessed at."""

HF_SIZE_KEYS = ("hidden_size", "intermediate_size", "ffn_dim", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "head_dim", "n_embd", "n_layer", "n_head", "n_inner",
                "n_positions", "max_position_embeddings", "d_model", "num_layers", "num_heads")
"""Keys of a config.json that are sizes: when given (not null) each must be a positive integer."""

HF_SIZES = ("hidden_size", "intermediate_size", "ffn_dim", "num_hidden_layers", "num_attention_heads", "vocab_size")
"""The sizes a config.json must give when its config class takes them (under that class's own name, e.g. GPT-2's
``n_embd`` for ``hidden_size``): transformers fills in a missing one with the class's default, another model."""


def hf_config_path(model: str) -> str:
    """``model``, a HF checkpoint directory or its ``config.json``, -> the config file, which must exist."""
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        what = f"a HF checkpoint directory with a config.json, got none at {path}" if os.path.isdir(model) else \
            f"a HF config.json, got no file {path}"
        raise ValueError(f"model {model!r}: expected {what} (transformers' save_pretrained writes it)")
    return path


def read_hf_config(path: str) -> dict:
    """The dict of the config file ``path``, with the keys that size the model checked to be there."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: expected a readable HF config.json, got {e}") from None
    if not isinstance(cfg, dict) or not cfg.get("model_type"):
        raise ValueError(f"{path}: expected a HF config.json with a model_type (transformers' save_pretrained "
                         f"writes one), got {'no model_type' if isinstance(cfg, dict) else type(cfg).__name__}")
    return cfg


def hf_precision(cfg: dict, path: str) -> dict:
    """The :func:`precision` fields for the dtype the checkpoint stores (``dtype``, or ``torch_dtype``); the
    default mixed precision (bf16) when it names none."""
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    if dtype is None:
        return {}
    if dtype not in HF_DTYPES:
        raise ValueError(f"{path}: dtype {dtype!r}: expected one of {', '.join(HF_DTYPES)} (or none: bf16 mixed "
                         f"precision is planned)")
    return precision(HF_DTYPES[dtype])


def _hf_unsized(cfg: dict, config) -> list[str]:
    """The sizes (:data:`HF_SIZES`) ``config``'s class takes that ``cfg`` does not give."""
    taken = inspect.signature(type(config).__init__).parameters
    amap = getattr(config, "attribute_map", {}) or {}
    return [amap.get(k, k) for k in HF_SIZES if amap.get(k, k) in taken and amap.get(k, k) not in cfg]


def from_hf_config(model: str, *, batch: int, seq: int, **kw) -> Workload:
    """A HF checkpoint directory or its ``config.json``: the model built on ``meta`` by transformers when it is
    installed (nothing allocated), else from its shape (:func:`shape_from_hf_config`); planned in the dtype the
    config names (:func:`hf_precision`; ``kw`` overrides). A missing file, a size the config lacks, or a model
    transformers cannot build as a causal LM is a ``ValueError`` naming the file."""
    path = hf_config_path(model)
    cfg = read_hf_config(path)
    bad = [f"{k}={cfg[k]!r}" for k in HF_SIZE_KEYS if cfg.get(k) is not None and
           (isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < 1)]
    if bad:
        raise ValueError(f"{path}: expected sizes that are positive integers, got {', '.join(bad)}")
    kw = {**hf_precision(cfg, path), **kw}
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
    mt = cfg["model_type"]
    try:
        import transformers  # optional: only this path needs it
    except ImportError:
        transformers = None
    if transformers is not None:
        import torch

        try:
            config = transformers.AutoConfig.for_model(**cfg)
        except (ValueError, KeyError) as e:  # its message lists every model type: too long to pass on
            raise ValueError(f"{path}: model_type {mt!r} is not one transformers {transformers.__version__} knows "
                             f"({type(e).__name__}); upgrade transformers, or name a model of a known type") from None
        missing = _hf_unsized(cfg, config)
        if missing:
            raise ValueError(f"{path}: expected the sizes of the model, got no {', '.join(missing)} (transformers "
                             f"would use {type(config).__name__}'s defaults, a different model)")
        try:
            with torch.device("meta"):
                built = transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:
            raise ValueError(f"{path}: model_type {mt!r} ({type(config).__name__}) is not a causal language model "
                             f"transformers can build (AutoModelForCausalLM); offload plan sizes decoder-only "
                             f"language models") from None
        _check_priced(mt, path, f" ({type(config).__name__})")
        return from_module(built, batch=batch, seq=seq, name=name, **kw)
    _check_priced(mt, path, "")
    try:
        shape = shape_from_hf_config(cfg)
    except KeyError as e:
        raise ValueError(f"{path}: expected the sizes of a {mt} model, got no {e.args[0]}") from None
    if shape is None:
        raise ValueError(f"{path}: model_type {mt!r} needs transformers to be read (pip install transformers); "
                         f"without it we know gpt2, llama, mistral, qwen2")
    return from_shape(shape, batch=batch, seq=seq, name=name, **kw)


def _check_priced(mt: str, path: str, cls: str) -> None:
    if mt not in HF_PRICED:
        raise ValueError(f"{path}: model_type {mt!r}{cls} is not an architecture offload plan can price: its formulas "
                         f"are those of dense attention + MLP blocks ({', '.join(sorted(HF_PRICED))}); a "
                         f"module:function factory of such a model plans it")


def load(model: str, *, batch: int, seq: int, **kw) -> Workload:
    """A preset name, a ``module:function`` factory, or a HF checkpoint directory or config JSON path."""
    check_tokens(batch, seq)
    if model in PRESETS:
        return preset(model, batch=batch, seq=seq, **kw)
    if model.endswith(".json") or os.path.isfile(model) or os.path.isdir(model):
        return from_hf_config(model, batch=batch, seq=seq, **kw)
    if ":" in model:
        return from_factory(model, batch=batch, seq=seq, **kw)
    raise ValueError(f"model: expected a preset ({', '.join(sorted(PRESETS))}), 'module:function', or a HF "
                     f"checkpoint directory or config.json path, got {model!r}")
