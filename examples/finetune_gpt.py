"""Fine-tune a small GPT in a plain PyTorch loop, with params, grads and AdamW state offloaded by `offload.wrap`.

    .venv/bin/python examples/finetune_gpt.py --steps 100                  # run directly: the config below
    .venv/bin/offload run --config examples/offload.toml examples/finetune_gpt.py --steps 100   # the launcher's

The loop is the one you would write without offload; the additions are `offload.wrap`, the run report and a
checkpoint (`--checkpoint DIR`): saved every `--save-every` steps and when Ctrl-C stops the run after its
current step; `--resume` continues from it, with the same results as a run that was never stopped. Run
directly, it uses the config built in `main()`; under `offload run`, the launcher's (validated) config.
"""

import argparse
import shutil
import tempfile

import torch

import offload
from offload.demo import batch_at, build_model, corpus_tokens, demo_shape, lm_loss
from offload.report import RunReport
from offload.signals import StopOnSignal


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--nvme", help="store directory when run directly (default: a temporary one)")
    ap.add_argument("--checkpoint", help="checkpoint directory")
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model(demo_shape(), device)  # a byte-level GPT, 0.9M params
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    tmp = None
    config = offload.config_from_env()  # set by `offload run`, which also prints the report at the end
    launched = config is not None
    if not launched:
        tmp = args.nvme or tempfile.mkdtemp(prefix="finetune-gpt-")
        config = offload.OffloadConfig(param_tier="nvme", grad_tier="nvme", state_tier="nvme", nvme_dirs=tmp,
                                       prefetch=1)
    model, opt = offload.wrap(model, opt, config)

    start = 0
    if args.resume:  # weights, optimizer state (wherever it lives), RNG; the data position is the step
        start = offload.load_checkpoint(args.checkpoint, model, opt)["step"]
    tokens = corpus_tokens()
    report = RunReport(model, opt, total_steps=args.steps, start_step=start, name="finetune_gpt")
    with StopOnSignal() as stop:  # Ctrl-C: finish the step, save, stop
        for step in range(start, args.steps):
            idx = batch_at(tokens, step, args.batch, args.seq).to(device)
            loss = lm_loss(model, idx)
            loss.backward()
            opt.step()
            opt.zero_grad()
            report.step(loss.item(), tokens=idx[:, 1:].numel())
            if args.checkpoint and (stop.requested or (step + 1) % args.save_every == 0):
                offload.save_checkpoint(args.checkpoint, model, opt, step=step + 1)
            if stop.requested:
                break
    if not launched:
        print(report.text())
    offload.runtime_of(model).close()
    if tmp and not args.nvme:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
