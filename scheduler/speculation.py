"""What clipping (or fp16 loss scaling) costs a plan: the speculative update priced against waiting for backward.

A step that clips needs the global grad norm before it may update. The runtime (``OffloadConfig.speculate``)
updates during backward anyway and validates after; the step then costs one of:

- **commit** (nothing clipped): the overlapped iteration, plus a pass over the grads to take their norms (on the
  update thread, before each unit's update) and, for grads kept on NVMe, their write to the store (a redo would
  read them back; the overlapped update without clipping drops them instead);
- **rollback** (it clipped): the speculative iteration, then the pre-update bytes copied back and the update
  phase of a waiting step redone with clipped grads;
- **wait** (speculation off, or the policy stopped it): the iteration with ``overlap_update=False``, plus the
  norm pass after backward and, on a step that clips, the scaling of every grad (a redo scales them too).

With a probability ``p`` that a step clips, speculating costs ``(1 - p) commit + p rollback`` per step; the policy
(``offload.optimizer.SpeculationPolicy``) speculates while that beats waiting, which in practice means while
recent steps did not clip. The pre-update copies are memory: every host- or device-resident state chunk and param
updated before validation has a host copy until then (NVMe chunks keep their previous store version instead,
which the store's 2x room already holds).
"""

from __future__ import annotations

import dataclasses

from scheduler.cost import CostModel
from scheduler.plan import Plan
from storage import Tier

NORM_PASS_FRACTION = 1 / 7
"""A grad-norm pass over a unit's grads against the AdamW update of the same params: the update streams the
params, grads and two moments in and three of them out (7 arrays), the norm reads one."""


@dataclasses.dataclass(frozen=True)
class SpeculationCost:
    commit_s: float
    """A speculative step that commits."""
    rollback_s: float
    """A speculative step that clips: undone, then redone with clipped grads."""
    wait_s: float
    """A step that waits for backward before updating (its norm pass, and at ``clip_probability`` its scaling
    of the grads, included)."""
    clip_probability: float
    speculates: bool
    """Whether the policy's rule (speculate while it pays) speculates at this probability."""
    expected_s: float
    """The cost per step the policy gives at this probability."""
    pre_image_bytes: int
    """Host bytes the pre-update copies hold at their peak (end of backward), when speculating."""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def pre_image_bytes(cm: CostModel, plan: Plan) -> int:
    """Host bytes of the pre-update copies: state chunks and params of the units that update, where they live in
    memory (host or device); NVMe ones keep their previous store version instead."""
    total = 0
    for i, pl in enumerate(plan.units):
        if not cm.params[i]:
            continue  # frozen: never updated
        if pl.state is not Tier.NVME:
            total += cm.state_bytes(i, pl)
        if pl.params is not Tier.NVME:
            total += cm.pb[i]
    return total


def price(cm: CostModel, plan: Plan, clip_probability: float = 0.0) -> SpeculationCost:
    """The three step costs of ``plan`` under clipping, and what the policy does at ``clip_probability``."""
    if not 0.0 <= clip_probability <= 1.0:
        raise ValueError(f"clip_probability: expected a number in [0, 1], got {clip_probability}")
    overlapped = cm.predict(dataclasses.replace(plan, overlap_update=True))
    waiting = cm.predict(dataclasses.replace(plan, overlap_update=False))
    hw = cm.hw
    updated = sum(n for n in cm.params)
    norm_s = updated / hw.cpu_update_params_per_s * NORM_PASS_FRACTION
    kept_grads = sum(cm.gb[i] for i, pl in enumerate(plan.units) if cm.params[i] and pl.grads is Tier.NVME)
    grads_s = kept_grads / (hw.disk_write_gbps * 1e9)
    copies = pre_image_bytes(cm, plan)
    # Each pre-image is copied out into host memory before its update (the d2h direction: on a CPU device, a
    # memcpy at the probe's rate) and, on a rollback only, copied back (h2d).
    copy_s = copies / (hw.d2h_gbps * 1e9)
    undo = copies / (hw.h2d_gbps * 1e9)
    # The norm pass and the pre-update copies run on the update thread beside backward: they lengthen the
    # iteration where the update thread becomes the busiest, and by what they take from compute where the two
    # share cores (the device is the CPU: cost.py, "Shared cores"); the kept grads' writes are charged in full.
    steal_s = cm.steal.get("cpu_update", 0.0) * norm_s + cm.steal.get("d2h", 0.0) * copy_s
    commit = overlapped.iteration_s + max(0.0, norm_s + copy_s + overlapped.busy_s.get("cpu_update", 0.0)
                                          - overlapped.iteration_s) + grads_s + steal_s
    compute = waiting.busy_s.get("compute", 0.0)
    # A step that waits takes the norm after backward, before any update (the clip needs it), and one that clips
    # scales every grad (a read and a write of each: two norm passes' worth); so does a redo.
    scale_s = 2 * norm_s
    wait = waiting.iteration_s + norm_s + clip_probability * scale_s
    redo = max(0.0, waiting.iteration_s - compute) + scale_s  # the update phase that follows backward
    rollback = commit + undo + redo
    spec = (1 - clip_probability) * commit + clip_probability * rollback
    speculates = spec <= wait  # a tie speculates, as the runtime does by default
    return SpeculationCost(commit_s=commit, rollback_s=rollback, wait_s=wait,
                           clip_probability=clip_probability, speculates=speculates,
                           expected_s=spec if speculates else wait, pre_image_bytes=copies)
