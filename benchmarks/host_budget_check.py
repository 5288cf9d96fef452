"""A 774M-param GPT (GPT-2 large shape), params, grads and state on NVMe, under a small host budget: refused at
wrap naming the minimum, or trained for two steps within it.

    ../shared/tools/memlimit.sh 12GiB -- .venv/bin/python benchmarks/host_budget_check.py --host 1GiB
    ../shared/tools/memlimit.sh 12GiB -- .venv/bin/python benchmarks/host_budget_check.py --host 2625650688 --buffers 1

Needs about 3.5 GiB of memory to build the model and 20 GiB free on the disk of ``--dir``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from offload import OffloadConfig, runtime_of, wrap  # noqa: E402
from offload.config import parse_bytes  # noqa: E402
from scheduler.workload import TransformerShape, build_transformer  # noqa: E402

GPT2_LARGE = TransformerShape(n_layer=36, d_model=1280, n_head=20, d_ff=5120, vocab=50257, n_pos=1024, tied=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="1GiB", help="host budget (default 1GiB)")
    ap.add_argument("--buffers", type=int, default=4, help="state buffers (default 4)")
    ap.add_argument("--dir", default=str(Path(__file__).parent / "results"), help="where the store goes")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_transformer(GPT2_LARGE, device="cpu")
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params built in {time.perf_counter() - t0:.0f} s")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    d = tempfile.mkdtemp(dir=args.dir, prefix="host-budget-")
    try:
        cfg = OffloadConfig(param_tier="nvme", grad_tier="nvme", state_tier="nvme", nvme_dirs=d, prefetch=1,
                            host_budget_bytes=parse_bytes(args.host), device_budget_bytes=2 << 30,
                            nvme_capacity_bytes=20 << 30, buffers=args.buffers)
        t0 = time.perf_counter()
        try:
            model, opt = wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True), cfg)
        except ValueError as e:
            print(f"refused at wrap after {time.perf_counter() - t0:.0f} s: {e}")
            return 0
        rt = runtime_of(model)
        print(f"wrapped in {time.perf_counter() - t0:.0f} s; host minimum {sum(rt.host_minimum().values())} B")
        x = torch.randint(0, GPT2_LARGE.vocab, (1, 65))
        for step in range(2):
            t0 = time.perf_counter()
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            print(f"step {step}: loss {loss.item():.4f}, {time.perf_counter() - t0:.1f} s, host pool peak "
                  f"{rt.pool.stats()['peak_in_use_bytes'] / 2**20:.0f} MiB")
        rt.close()
        return 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
