"""The parity matrix under injected delays: one cell trains a small model plainly and wrapped (with random delays
at every I/O completion and thread hand-off, storage/faults.py) and compares losses, weights and optimizer state
bit for bit.

The default suite (tests/test_delays.py) runs a covering subset of the cells with a few seeds. The slow job runs
every cell with many seeds and prints the mismatch count:

    .venv/bin/python tests/delay_matrix.py --seeds 20            # all 288 cells (hours on 2 cores: shard it)
    .venv/bin/python tests/delay_matrix.py --seeds 20 --model gpt --params nvme
    for k in 0 1 2 3 4 5; do .venv/bin/python tests/delay_matrix.py --seeds 20 --shard $k/6 & done; wait

A cell: model (our GPT, HF Llama), where params, grads and state live (host or nvme each, or "mixed": a plan
that gives each unit its own params, grads and state tiers, the device included, and updates some units on the
device: their scratch memory comes from the same device cache as the params'), the overlapped update on or off,
1 or 3 micro-batches per step, clipping on or off, and whether the placement switches (every tier flips; a mixed
plan rotates so that every unit moves) after the first step.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import math
import sys
import tempfile
import time

import torch

from helpers import TINY_GPT, gpt, lm_loss
from offload import OffloadConfig, wrap
from offload.optimizer import SpeculationPolicy
from offload.runtime import runtime_of
from scheduler.planner import Plan, UnitPlacement
from storage import Tier
from storage.faults import inject_delays

SHAPE = TINY_GPT
STEPS = 3
MAX_DELAY_S = 0.05
DELAY_P = 0.25
"""Each site sleeps with this probability (0-50 ms when it does): every kind of hand-off is late in every run,
and a cell takes seconds, not minutes."""


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str  # "gpt" or "llama"
    params: str
    grads: str
    state: str
    overlap: bool
    accum: int
    clip: float | None
    switch: bool

    @property
    def id(self) -> str:
        return (f"{self.model}-p{self.params[0]}g{self.grads[0]}s{self.state[0]}-"
                f"{'overlap' if self.overlap else 'step'}-acc{self.accum}-{'clip' if self.clip else 'noclip'}"
                f"{'-switch' if self.switch else ''}")


def all_cells() -> list[Cell]:
    tiers = ("host", "nvme")
    knobs = list(itertools.product((False, True), (1, 3), (None, 0.05), (False, True)))
    return [Cell(m, p, g, s, o, a, c, w) for m, p, g, s, (o, a, c, w) in itertools.product(
        ("gpt", "llama"), tiers, tiers, tiers, knobs)] + [
        Cell(m, "mixed", "mixed", "mixed", o, a, c, w) for m, (o, a, c, w) in itertools.product(("gpt", "llama"), knobs)]


def _up(params: Tier, state: Tier, update: str, grads: Tier = Tier.HOST) -> UnitPlacement:
    return UnitPlacement(params, state, update, grad_tier=grads)


_D, _H, _N = Tier.DEVICE, Tier.HOST, Tier.NVME
MIXED = (_up(_D, _H, "cpu"), _up(_H, _N, "cpu", _N), _up(_N, _H, "cpu"), _up(_H, _D, "device"),
         _up(_N, _N, "device"), _up(_D, _D, "device"))
"""The "mixed" cells' placements, unit by unit (cycled): params and state on every tier, grads on host and nvme,
updates on the CPU and on the device."""


def mixed_plan(n_units: int, shift: int, overlap: bool) -> Plan:
    return Plan(strategy="test", units=tuple(MIXED[(i + shift) % len(MIXED)] for i in range(n_units)),
                prefetch_depth=1, overlap_update=overlap)


def covering_cells() -> list[Cell]:
    """Every tier combination for each model once, with overlap, accumulation, clipping and the switch varied so
    that each pair of those choices appears (16 cells), two cells whose clipping never clips (their speculative
    steps commit), and two cells of the mixed plan with the overlapped update."""
    cells = []
    combos = list(itertools.product(("host", "nvme"), repeat=3))
    knobs = [(o, a, c, w) for o, a, c, w in itertools.product((True, False), (3, 1), (None, 0.05), (False, True))
             if (o + (a == 3) + (c is None) + w) % 2 == 0]  # a half fraction: every pair of knobs appears
    for mi, model in enumerate(("gpt", "llama")):
        for i, (p, g, s) in enumerate(combos):
            o, a, c, w = knobs[(i + mi * 3) % len(knobs)]
            cells.append(Cell(model, p, g, s, o, a, c, w))
    # Clipping that never clips: speculative steps that commit (0.05 above clips every step: they roll back).
    cells.append(Cell("gpt", "nvme", "host", "nvme", overlap=True, accum=3, clip=1e3, switch=True))
    cells.append(Cell("llama", "host", "nvme", "host", overlap=True, accum=1, clip=1e3, switch=False))
    cells.append(Cell("gpt", "mixed", "mixed", "mixed", overlap=True, accum=3, clip=None, switch=True))
    cells.append(Cell("llama", "mixed", "mixed", "mixed", overlap=True, accum=1, clip=None, switch=False))
    return cells


def _model(kind: str) -> torch.nn.Module:
    if kind == "gpt":
        return gpt(SHAPE)
    import transformers

    torch.manual_seed(0)

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).float()


def _loss(kind: str, model, idx):
    if kind == "llama":
        return model(input_ids=idx, labels=idx).loss
    return lm_loss(model, idx)


def _train(cell: Cell, model, opt, data, *, wrapped: bool, after_step=None) -> list[float]:
    losses, it = [], iter(data)
    for step in range(STEPS):
        for _ in range(cell.accum):
            loss = _loss(cell.model, model, next(it))
            loss.backward()
            losses.append(loss.item())
        if cell.clip is not None and not wrapped:  # wrapped: the config clips, as the runtime must
            torch.nn.utils.clip_grad_norm_(model.parameters(), cell.clip)
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step(step)
    return losses


def _flipped(tier: str) -> Tier:
    return Tier.HOST if tier == "nvme" else Tier.NVME


def run_cell(cell: Cell, seed: int | None, nvme_dir: str, *, rule=None) -> list[str]:
    """Train plainly and wrapped under random delays (``seed``), or only ``rule``'s (storage.faults); returns the
    mismatches found (empty: bit-identical)."""
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, SHAPE.vocab, (4, 12), generator=g) for _ in range(STEPS * cell.accum)]
    ref, m = _model(cell.model), _model(cell.model)
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    losses_ref = _train(cell, ref, plain, data, wrapped=False)

    mixed = cell.params == "mixed"
    model_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    budget = model_bytes * 4 if mixed else model_bytes // 2  # mixed: room for its units' params and state there
    tiers = ("nvme",) * 3 if mixed else (cell.params, cell.grads, cell.state)
    cfg = OffloadConfig(param_tier=tiers[0], grad_tier=tiers[1], state_tier=tiers[2], nvme_dirs=nvme_dir,
                        impl="as_given", device_budget_bytes=budget, prefetch=1, overlap_update=cell.overlap,
                        accumulation_steps=cell.accum, max_grad_norm=cell.clip)
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1), cfg)
    # Clipping with the overlapped update speculates: at every step here, so that cells that clip roll back every
    # step and cells that do not commit every step (the default policy would stop after the first clip).
    opt.speculation = SpeculationPolicy(max_clipped=math.inf, timed=False)
    rt = runtime_of(model)
    if mixed:
        rt.apply_plan(mixed_plan(len(rt.units), 0, cell.overlap))

    def switch(step: int) -> None:
        if not (cell.switch and step == 0):
            return
        if mixed:  # every unit takes the next unit's placement
            rt.apply_plan(mixed_plan(len(rt.units), 1, cell.overlap))
            return
        # every tier flips between the first and second step
        pl = UnitPlacement(_flipped(cell.params), _flipped(cell.state), "cpu", grad_tier=_flipped(cell.grads))
        rt.apply_plan(Plan(strategy="test", units=(pl,) * len(rt.units), prefetch_depth=1,
                           overlap_update=cell.overlap))

    try:
        with inject_delays(seed=seed, max_s=MAX_DELAY_S, p=DELAY_P, rule=rule):
            losses = _train(cell, model, opt, data, wrapped=True, after_step=switch)
        bad = []
        if losses != losses_ref:
            bad.append(f"losses {losses} != {losses_ref}")
        sd_ref, sd = ref.state_dict(), model.state_dict()
        bad += [f"weight {k}" for k in sd_ref if not torch.equal(sd_ref[k], sd[k])]
        osd_ref, osd = plain.state_dict()["state"], opt.state_dict()["state"]
        bad += [f"state {k}.{key}" for k, entry in osd_ref.items() for key, v in entry.items()
                if not torch.equal(v, osd[k][key])]
        return bad
    finally:
        rt.close()
        gc.collect()  # the wrapped model's hooks hold reference cycles: free its memory before the next cell


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20, help="seeds per cell (default 20)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--covering", action="store_true", help="only the default suite's covering cells")
    ap.add_argument("--shard", default="0/1", help="K/N: run every N-th cell from the K-th (several processes)")
    for f in ("model", "params", "grads", "state"):
        ap.add_argument(f"--{f}", help=f"only cells with this {f}")
    args = ap.parse_args(argv)
    cells = covering_cells() if args.covering else all_cells()
    for f in ("model", "params", "grads", "state"):
        if getattr(args, f):
            cells = [c for c in cells if getattr(c, f) == getattr(args, f)]
    k, _, n = args.shard.partition("/")
    cells = cells[int(k)::int(n)]
    runs = mismatches = 0
    t0 = time.perf_counter()
    for cell in cells:
        bad_seeds = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            with tempfile.TemporaryDirectory() as d:
                bad = run_cell(cell, seed, d)
            runs += 1
            if bad:
                mismatches += 1
                bad_seeds.append((seed, bad[:3]))
        print(f"{cell.id}: {args.seeds - len(bad_seeds)}/{args.seeds} bit-identical"
              + "".join(f"\n  seed {s}: {b}" for s, b in bad_seeds), flush=True)
    print(f"{len(cells)} cells x {args.seeds} seeds: {runs} runs, {mismatches} mismatches "
          f"({time.perf_counter() - t0:.0f} s)")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
