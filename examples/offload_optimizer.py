"""Train a small MLP with AdamW whose state lives on disk, in a plain PyTorch loop.

    .venv/bin/python examples/offload_optimizer.py            # state in a temporary store
    .venv/bin/python examples/offload_optimizer.py --nvme /mnt/nvme/offload --steps 200

The only change from a plain loop is the line that builds the optimizer.
"""

import argparse
import shutil
import tempfile

import torch

from offload import OffloadConfig, OffloadOptimizer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvme", help="directory for the optimizer state (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    nvme = args.nvme or tempfile.mkdtemp(prefix="offload-example-")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.GELU(), torch.nn.Linear(512, 512),
                                torch.nn.GELU(), torch.nn.Linear(512, 1))
    optimizer = OffloadOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01),
                                 config=OffloadConfig(state_tier="nvme", nvme_dirs=nvme, subgroup_numel=65536))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    w = torch.randn(64, 1)
    for step in range(args.steps):
        x = torch.randn(128, 64)
        y = x @ w + 0.01 * torch.randn(128, 1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}")
    print(optimizer.summary())
    optimizer.close()
    if not args.nvme:
        shutil.rmtree(nvme)


if __name__ == "__main__":
    main()
