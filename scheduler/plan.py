"""A plan: where each unit's params, grads and optimizer state live and where its update runs, and the pipeline's
sizes. Data only, in a module of its own: the cost model prices plans and the planner makes them, and both import
this rather than each other.
"""

from __future__ import annotations

import dataclasses
import itertools

from scheduler.workload import Workload
from storage import Tier

D, H, N = Tier.DEVICE, Tier.HOST, Tier.NVME
SITES = ("cpu", "device")


@dataclasses.dataclass(frozen=True)
class UnitPlacement:
    """One unit: where its 16-bit params and its optimizer state (fp32 master + moments) live between uses,
    and where its update runs. Its grads follow the update: device for a device update, host for a CPU one
    (``grad_tier`` nvme: spilled to the store when the update waits for backward)."""

    params: Tier
    state: Tier
    update: str
    grad_tier: Tier = Tier.HOST
    """Where a CPU update's grads wait between backward and the update: host, or nvme (the runtime's
    ``OffloadConfig.grad_tier``; the planner's options keep them on the host)."""

    def __post_init__(self):
        for f in ("params", "state", "grad_tier"):
            v = getattr(self, f)
            if not isinstance(v, Tier):
                try:
                    object.__setattr__(self, f, Tier(v))
                except ValueError:
                    raise ValueError(f"UnitPlacement.{f}: expected one of {[t.value for t in Tier]}, got {v!r}") \
                        from None
        if self.update not in SITES:
            raise ValueError(f"UnitPlacement.update: expected 'cpu' or 'device', got {self.update!r}")
        if self.state is D and self.update == "cpu":
            raise ValueError("UnitPlacement: state on 'device' with update on 'cpu': expected update='device' "
                             "(a CPU update of device state would copy it out and back every step)")
        if self.grad_tier is D or (self.grad_tier is N and self.update == "device"):
            raise ValueError(f"UnitPlacement.grad_tier: expected 'host' (or 'nvme' with a CPU update), got "
                             f"{self.grad_tier.value!r} with update {self.update!r}")

    @property
    def grads(self) -> Tier:
        return D if self.update == "device" else self.grad_tier

    @property
    def code(self) -> str:
        """Three letters for compact reports: params, state, update site (``NHc`` = params nvme, state host, cpu);
        :func:`code_legend` says what each letter means."""
        return _tier_letter(self.params) + _tier_letter(self.state) + _site_letter(self.update)


def _tier_letter(tier: Tier) -> str:
    return tier.value[0].upper()


def _site_letter(site: str) -> str:
    return site[0]


def code_legend() -> dict[str, str]:
    """What the letters of :attr:`UnitPlacement.code` mean, ``{"D": "device", ..., "c": "cpu", ...}``: tiers in
    upper case (params, then state), update sites in lower case."""
    return {**{_tier_letter(t): t.value for t in Tier}, **{_site_letter(s): s for s in SITES}}


OPTIONS: tuple[UnitPlacement, ...] = tuple(
    UnitPlacement(p, s, u) for p in (D, H, N) for s in (D, H, N) for u in SITES if not (s is D and u == "cpu"))
"""Every valid placement of one unit (15)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """A placement for every unit (``units[i]`` for ``workload.units[i]``) and the pipeline's sizes."""

    strategy: str
    units: tuple[UnitPlacement, ...]
    prefetch_depth: int = 2
    """Param fetches in flight ahead of compute (device buffers = this + 1)."""
    grad_buffers: int = 2
    """Device grad buffers: a unit's backward waits until one is free (its previous grads left or were applied)."""
    state_buffers: int = 4
    """Staging buffers for offloaded state (host buffers for nvme state, device buffers for device updates)."""
    overlap_update: bool = True
    """Update each unit as soon as its grads are complete, during the backward of earlier units (Fuyou); False:
    after the whole backward (ZeRO-Offload, ZeRO-Infinity)."""
    speculate: bool = True
    """With the overlapped update, a step that needs every grad first is updated speculatively (the runtime's
    ``OffloadConfig.speculate``): its pre-update copies are memory (:mod:`scheduler.buffers`)."""
    clip: bool = False
    """Every step needs every grad first: clipping (``max_grad_norm``) or fp16 loss scaling. Without it only the
    first step does (the runtime speculates on it to find a loop that clips)."""

    def __post_init__(self):
        object.__setattr__(self, "units", tuple(self.units))
        for f, lo in (("prefetch_depth", 0), ("grad_buffers", 1), ("state_buffers", 1)):
            if getattr(self, f) < lo:
                raise ValueError(f"Plan.{f}: expected >= {lo}, got {getattr(self, f)}")

    def compact(self) -> str:
        """Run-length placement codes in unit order, e.g. ``DDd x1 | HNc x40 | HHd x40``."""
        out = []
        for code, grp in itertools.groupby(u.code for u in self.units):
            out.append(f"{code} x{len(list(grp))}")
        return " | ".join(out)

    def to_dict(self, workload: Workload | None = None) -> dict:
        names = [u.name for u in workload.units] if workload else [str(i) for i in range(len(self.units))]
        return {"strategy": self.strategy, "prefetch_depth": self.prefetch_depth, "grad_buffers": self.grad_buffers,
                "state_buffers": self.state_buffers, "overlap_update": self.overlap_update,
                "speculate": self.speculate, "clip": self.clip,
                "units": [{"unit": n, "params": u.params.value, "grads": u.grads.value, "state": u.state.value,
                           "update": u.update} for n, u in zip(names, self.units)]}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """The inverse of :meth:`to_dict`: a plan from ``offload plan --json`` (its ``"plan"``) or ``plan.json``."""
        try:
            units = tuple(UnitPlacement(u["params"], u["state"], u["update"],
                                        grad_tier=u["grads"] if u["update"] == "cpu" else H) for u in d["units"])
            return cls(strategy=d["strategy"], units=units, prefetch_depth=d["prefetch_depth"],
                       grad_buffers=d["grad_buffers"], state_buffers=d["state_buffers"],
                       overlap_update=d["overlap_update"], speculate=d.get("speculate", True),
                       clip=d.get("clip", False))
        except (KeyError, TypeError) as e:
            raise ValueError(f"Plan.from_dict: expected Plan.to_dict()'s form (the \"plan\" of offload plan --json), "
                             f"got {d!r:.200} (missing or wrong: {e})") from None
