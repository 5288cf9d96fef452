"""``offload demo``: fine-tune a small built-in GPT on a shipped text with params, grads and optimizer state offloaded.

    offload demo                         # CPU (GPU when present), store in a temporary directory, ~1-2 minutes
    offload demo --nvme /mnt/nvme/tmp --steps 400 --out runs/demo

The model is a byte-level GPT (vocab 256, so no tokenizer and no download) built by
:func:`scheduler.workload.build_transformer`; the text is ``offload/data/corpus.txt`` (public-domain sonnets).
The device gets half the model's bytes as its budget, so params really move: each block is fetched from the
store before its forward and backward, grads leave the device as they complete and go to the store, and each
block's AdamW update runs on the CPU while backward goes on with earlier blocks. The run ends with the report of
:mod:`offload.report` (loss curve, busy time per resource against the plan's prediction, bytes per link, overlap
efficiency), also written as JSON with a Chrome trace of the last iteration.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

CORPUS = Path(__file__).parent / "data" / "corpus.txt"


def demo_shape(n_layer: int = 4, d_model: int = 128):
    from scheduler.workload import TransformerShape

    return TransformerShape(n_layer=n_layer, d_model=d_model, n_head=max(1, d_model // 32), d_ff=4 * d_model,
                            vocab=256, n_pos=256, bias=True, norm="layernorm", tied=True)


def build_model(shape, device="cpu") -> torch.nn.Module:
    """The demo GPT with GPT-2's init, N(0, 0.02) weights (torch's defaults make the tied logits huge)."""
    from scheduler.workload import build_transformer

    model = build_transformer(shape, device=device)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model


def device_budget(shape, model) -> int:
    """Room on the device for the embeddings and head (resident through forward and backward), the block that
    computes and the one prefetched: less than the model whenever it has more than two blocks."""
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in model.blocks)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    rest = total - block * shape.n_layer
    return rest + 2 * block


def corpus_tokens(path: Path = CORPUS) -> torch.Tensor:
    """The text as bytes: a byte-level model needs no tokenizer."""
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()


def batch_at(tokens: torch.Tensor, step: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """The ``step``-th batch: random windows of ``seq + 1`` bytes, a pure function of (seed, step) so that a
    resumed run sees the same data as an uninterrupted one."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=g)
    return torch.stack([tokens[s:s + seq + 1] for s in starts.tolist()])


def lm_loss(model, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), idx[:, 1:].reshape(-1))


def lr_schedule(opt, lr: float, steps: int):
    """One cycle: warm up over the first tenth (at least 2.5 steps: torch's OneCycleLR divides by zero when its
    warm-up is a single step), then anneal."""
    if steps < 4:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                               pct_start=min(0.5, max(0.1, 2.5 / steps)))


def predict(shape, cfg, batch: int, seq: int) -> dict | None:
    """The cost model's prediction for one iteration of this run, on this machine's profile (``offload probe``'s
    cached one, else the shipped profile of our 2-core development machine): the report shows it beside the
    measured figures. ``None`` where the cost model cannot price the placement."""
    from offload.measure import config_to_plan, predicted_dict, workload_of
    from scheduler import profile
    from scheduler.cost import CostModel

    try:
        w = workload_of(shape, batch=batch, seq=seq, name="demo")
        hw = profile.resolve(None)
        out = predicted_dict(CostModel(w, hw).predict(config_to_plan(cfg, w), events=True))
        return {**out, "profile": hw.name}
    except (NotImplementedError, ValueError) as e:
        print(f"offload demo: no prediction for this placement ({e})", file=sys.stderr)
        return None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="offload demo", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--seq", type=int, default=128, help="bytes per sequence (default 128)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    p.add_argument("--width", type=int, default=128, help="model width d_model (default 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3; 2e-3 spikes to "
                   "~9.8 at the end of warm-up and ends higher, 2.64 against 2.48)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--nvme", help="directory for the store (default: a temporary directory, removed after)")
    p.add_argument("--state", choices=["host", "nvme"], default="nvme", help="optimizer state tier (default nvme)")
    p.add_argument("--params", choices=["host", "nvme"], default="nvme", help="param and grad tier (default nvme)")
    p.add_argument("--out", default="offload-demo", help="directory for report.json, report.txt, trace.json and "
                                                         "metrics.jsonl (one line per step, written as it goes)")
    p.add_argument("--checkpoint", metavar="DIR", help="save a checkpoint here at the end, on Ctrl-C (then exit) "
                                                      "and every --save-every steps")
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="also save every N steps (default: no)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint (its step, data position, "
                                                         "optimizer and LR schedule, RNG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def run(args: argparse.Namespace) -> dict:
    """Train, print the report, return its summary."""
    from offload import OffloadConfig, load_checkpoint, runtime_of, save_checkpoint, wrap
    from offload.report import RunReport
    from offload.signals import StopOnSignal
    from storage import format_bytes

    if args.resume and not args.checkpoint:
        raise SystemExit("offload demo: --resume needs --checkpoint DIR (the checkpoint to continue from)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokens = corpus_tokens()
    shape = demo_shape(args.layers, args.width)
    if args.seq + 1 > min(len(tokens), shape.n_pos + 1):
        raise ValueError(f"--seq {args.seq}: expected at most {min(len(tokens) - 1, shape.n_pos)}")
    torch.manual_seed(args.seed)
    model = build_model(shape, device)
    nparams = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    store_dir = Path(args.nvme) if args.nvme else Path(tempfile.mkdtemp(prefix="offload-demo-"))
    cfg = OffloadConfig(param_tier=args.params, grad_tier=args.params, state_tier=args.state,
                        nvme_dirs=str(store_dir), device_budget_bytes=device_budget(shape, model), prefetch=1)
    # beta2 = 0.95 as GPT pre-training uses. Both 0.95 and 0.999 give a one-step loss spike near the end of the
    # warm-up (step 23: 3.2 -> 9.8 -> 3.3), identical in plain torch: a quirk of this small model, not of offload.
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    model, opt = wrap(model, opt, cfg)
    sched = lr_schedule(opt, args.lr, args.steps)
    print(f"offload demo: byte-level GPT, {shape.n_layer} blocks x {shape.d_model} wide, {nparams / 1e6:.2f}M params "
          f"({format_bytes(model_bytes)}) on {device}; params+grads on {args.params}, AdamW state on {args.state} "
          f"(store {store_dir}); device budget {format_bytes(cfg.device_budget_bytes)}; "
          f"{args.steps} steps of {args.batch} x {args.seq} bytes from {CORPUS.name}", flush=True)
    start = 0
    if args.resume:
        meta = load_checkpoint(args.checkpoint, model, opt, scheduler=sched)
        saved = meta["extra"] or {}
        for key in ("steps", "batch", "seq", "seed"):
            if key in saved and saved[key] != getattr(args, key):
                raise SystemExit(f"offload demo: --{key} {getattr(args, key)}: the checkpoint in {args.checkpoint} "
                                 f"was made with --{key} {saved[key]}; resume with the same value")
        start = meta["step"]
        print(f"resumed from {args.checkpoint} at step {start}", flush=True)

    def save(step: int) -> None:
        path = save_checkpoint(args.checkpoint, model, opt, step=step, scheduler=sched,
                               extra={"seed": args.seed, "batch": args.batch, "seq": args.seq, "steps": args.steps})
        print(f"checkpoint at step {step}: {path}", file=sys.stderr, flush=True)

    report = RunReport(model, opt, total_steps=args.steps, start_step=start, name="offload demo",
                       progress=not args.quiet, predicted=predict(shape, cfg, args.batch, args.seq),
                       metrics_dir=args.out)
    interrupted = False
    try:
        with StopOnSignal() as stop:
            for step in range(start, args.steps):
                idx = batch_at(tokens, step, args.batch, args.seq, args.seed).to(device)
                loss = lm_loss(model, idx)
                loss.backward()
                opt.step()
                opt.zero_grad()
                sched.step()
                report.step(loss.item(), tokens=idx[:, 1:].numel())
                done = step + 1
                if args.checkpoint and (stop.requested or done == args.steps or
                                        (args.save_every and done % args.save_every == 0)):
                    save(done)
                if stop.requested:
                    interrupted = True
                    break
        print(report.text())
        paths = report.save(args.out) + ([report.metrics_file] if report.metrics_file else [])
        print(f"report: {', '.join(str(p) for p in paths)} (open trace.json in https://ui.perfetto.dev)")
        return {**report.summary(), "interrupted": interrupted, "start_step": start}
    finally:
        runtime_of(model).close()
        if not args.nvme:
            shutil.rmtree(store_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    return 130 if run(build_parser().parse_args(argv))["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
