"""Configuration of the runtime: frozen, keyword-only dataclasses, validated where they are made.

Every error names the field, the value and a fix. Config files and the CLI are converted to these at the edge;
nothing inside the runtime reads a dict.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from storage import StoreConfig, Tier

IMPLS = ("auto", "fused", "foreach", "forloop", "as_given")
UPDATE_SITES = ("cpu", "device")


def _tier(value, field: str) -> Tier:
    if isinstance(value, Tier):
        return value
    try:
        return Tier(value)
    except ValueError:
        raise ValueError(f"OffloadConfig.{field}: expected one of {[t.value for t in Tier]}, got {value!r}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """Where optimizer state lives and how it is updated.

    Until the scheduler plans it, placement is uniform (``state_tier``, ``update_on``) or given per subgroup
    (``update_on`` as a sequence, one entry per subgroup in order).
    """

    state_tier: Tier | str = Tier.HOST
    """Where each subgroup's optimizer state (and fp32 master weights, for low-precision params) lives between
    steps: ``"device"``, ``"host"`` (pinned pool) or ``"nvme"`` (the store, streamed through host buffers)."""
    update_on: str | Sequence[str] = "cpu"
    """Where each subgroup's update runs: ``"cpu"`` (on host memory) or ``"device"`` (state copied to the device,
    updated there by the same optimizer class, copied back: Deep Optimizer States). A sequence gives one entry
    per subgroup. On a CPU-only machine both run on the CPU, through the same code and copies."""
    param_tier: Tier | str = Tier.HOST
    """With :func:`offload.wrap`: where each unit's parameters live between uses, ``"host"`` or ``"nvme"``; on the
    device they exist only while their unit computes (and the units prefetched for it)."""
    grad_tier: Tier | str = Tier.HOST
    """With :func:`offload.wrap`: where accumulated fp32 grads wait between backward and the update, ``"host"``
    (one buffer per unit, kept) or ``"nvme"`` (written after each micro-batch, read back for the next one or for
    the update; with the overlapped update the last micro-batch's grads go straight to the update)."""
    prefetch: int = 2
    """With :func:`offload.wrap`: units whose params are fetched ahead of use, within the device budget."""
    overlap_update: bool = True
    """With :func:`offload.wrap`: update each unit on the CPU as soon as its grads are off the device, while
    backward goes on with earlier units (Fuyou), instead of all at ``step()``. It needs no global information,
    so it is off (updates wait for backward) when ``max_grad_norm`` or ``loss_scale`` is set; results are the
    same either way."""
    accumulation_steps: int = 1
    """With the overlapped update: backward passes per ``step()``; the updates run during the last one."""
    max_grad_norm: float | None = None
    """Clip the global grad norm to this at each step (what ``torch.nn.utils.clip_grad_norm_`` does, over
    grads wherever they live)."""
    subgroup_numel: int = 16 << 20
    """Target parameters per subgroup: the unit of transfer and of update. Small tensors are packed together;
    a larger tensor is cut into pieces (on 1024-element boundaries, which keeps fused kernels bit-exact) when the
    optimizer is elementwise, or kept whole otherwise. Larger subgroups mean fewer, bigger transfers but bigger
    host buffers (``buffers x`` state bytes of one subgroup). Host-resident state updated on the CPU is not cut
    (one subgroup per param group): it moves nowhere, and each cut costs an optimizer call."""
    buffers: int = 4
    """Host buffers the NVMe pipeline cycles through (one updating, the rest reading ahead or writing back).
    Bounded further by the host budget."""
    host_budget_bytes: int | None = None
    """Hard cap on the host pool (pinned when CUDA is present). ``None``: what the placement needs, for host
    state the state itself plus ``buffers`` subgroups."""
    device_budget_bytes: int | None = None
    """Cap on device memory the optimizer may hold (state on the device tier, device-update buffers). ``None``:
    no cap of ours (CUDA's own limit applies)."""
    nvme_dirs: str | Sequence[str] | None = None
    """Directories for the NVMe store (several stripe over drives). Needed when ``state_tier="nvme"``."""
    nvme_capacity_bytes: int | None = None
    """Store size; ``None``: twice the state (a write needs room beside the committed copy) plus 10%."""
    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)
    impl: str = "auto"
    """Implementation of the inner update: ``"auto"`` picks ``fused`` where the optimizer class and device
    support it (5-8x faster than foreach on the CPU here), else what the optimizer was given. ``"fused"``,
    ``"foreach"``, ``"forloop"`` force one; ``"as_given"`` keeps the user's flags. Results are bit-identical to a
    plain optimizer using the same implementation."""
    loss_scale: str | float | None = None
    """fp16 loss scaling: ``"dynamic"`` (start 2**16, halve on inf/NaN and skip the step, double after 2000 good
    steps), a fixed float, or ``None`` (bf16 and fp32 need none)."""

    def __post_init__(self):
        object.__setattr__(self, "state_tier", _tier(self.state_tier, "state_tier"))
        object.__setattr__(self, "param_tier", _tier(self.param_tier, "param_tier"))
        object.__setattr__(self, "grad_tier", _tier(self.grad_tier, "grad_tier"))
        if self.grad_tier is Tier.DEVICE:
            raise ValueError("OffloadConfig.grad_tier: expected 'host' or 'nvme', got 'device' (grads leave the "
                             "device as they complete)")
        if self.prefetch < 0:
            raise ValueError(f"OffloadConfig.prefetch: expected >= 0 units, got {self.prefetch}")
        sites = [self.update_on] if isinstance(self.update_on, str) else list(self.update_on)
        for s in sites:
            if s not in UPDATE_SITES:
                raise ValueError(f"OffloadConfig.update_on: expected 'cpu', 'device' or a sequence of them, got {s!r}")
        if not isinstance(self.update_on, str):
            object.__setattr__(self, "update_on", tuple(sites))
        if self.subgroup_numel < 1024:
            raise ValueError(f"OffloadConfig.subgroup_numel: expected >= 1024, got {self.subgroup_numel}; "
                             f"try 16 << 20")
        if self.buffers < 1:
            raise ValueError(f"OffloadConfig.buffers: expected >= 1, got {self.buffers}; 3-4 keep the disk busy")
        for name in ("host_budget_bytes", "device_budget_bytes", "nvme_capacity_bytes"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"OffloadConfig.{name}: expected a positive number of bytes or None, got {v}")
        if self.accumulation_steps < 1:
            raise ValueError(f"OffloadConfig.accumulation_steps: expected >= 1, got {self.accumulation_steps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"OffloadConfig.max_grad_norm: expected a positive number or None, got "
                             f"{self.max_grad_norm}")
        if self.impl not in IMPLS:
            raise ValueError(f"OffloadConfig.impl: expected one of {IMPLS}, got {self.impl!r}")
        if self.loss_scale is not None and self.loss_scale != "dynamic" and not (
                isinstance(self.loss_scale, (int, float)) and self.loss_scale > 0):
            raise ValueError(f"OffloadConfig.loss_scale: expected 'dynamic', a positive number or None, got "
                             f"{self.loss_scale!r}")
        if Tier.NVME in (self.state_tier, self.param_tier, self.grad_tier) and not self.nvme_dirs:
            raise ValueError("OffloadConfig.nvme_dirs: state_tier='nvme' needs a directory on a local disk, e.g. "
                             "nvme_dirs='/mnt/nvme/offload'")
        if isinstance(self.nvme_dirs, (str, os.PathLike)):
            object.__setattr__(self, "nvme_dirs", (str(self.nvme_dirs),))
        elif self.nvme_dirs is not None:
            object.__setattr__(self, "nvme_dirs", tuple(str(d) for d in self.nvme_dirs))

    def update_site(self, index: int, count: int) -> str:
        if isinstance(self.update_on, str):
            return self.update_on
        if len(self.update_on) != count:
            raise ValueError(f"OffloadConfig.update_on: expected one entry per subgroup ({count}), got "
                             f"{len(self.update_on)}")
        return self.update_on[index]
