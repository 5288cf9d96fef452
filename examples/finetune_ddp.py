"""Data-parallel training of a small GPT, each rank keeping its shard of the AdamW state on disk.

    .venv/bin/torchrun --standalone --nproc_per_node 2 examples/finetune_ddp.py --steps 30

Each rank trains on its own rows of every global batch. ShardedOffloadOptimizer reduce-scatters the grads
during backward, updates this rank's 1/N of the state in its own store (<nvme>/rank<r>) and all-gathers the new
weights. With GPUs the same command runs on NCCL, one GPU per rank; `offload run --nproc N` launches it too.

`--checkpoint DIR` saves every `--save-every` steps and when Ctrl-C (or SIGTERM) stops the run after its
current step: every rank writes its own shard into DIR, which must be on a file system all ranks share.
`--resume` continues from it on any number of ranks, with the same results as a run that was never stopped
when the number of ranks is the same.
"""

import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist

import offload
from offload import OffloadConfig, ShardedOffloadOptimizer
from offload.signals import StopOnSignal
from scheduler.workload import TransformerShape, build_transformer


def batch(step: int, rows: int, seq: int, vocab: int, device) -> torch.Tensor:
    """Sequences that follow a rule (t -> 3t + 1 mod vocab) from random starts: learnable in a few steps."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, vocab, (rows, 1), generator=g)
    seqs = [start]
    for _ in range(seq - 1):
        seqs.append((seqs[-1] * 3 + 1) % vocab)
    return torch.cat(seqs, dim=1).to(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvme", help="directory for the optimizer state (default: a temporary one per rank)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences), split over the ranks")
    ap.add_argument("--checkpoint", help="checkpoint directory, the same for every rank")
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # env:// from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    config = offload.config_from_env()  # `offload run --nproc N`: its config, this rank's store dir already in it
    nvme = None
    if config is None:
        nvme = args.nvme or tempfile.mkdtemp(prefix="offload-ddp-")
        config = OffloadConfig(state_tier="nvme", nvme_dirs=nvme, max_grad_norm=1.0)

    shape = TransformerShape(n_layer=4, d_model=128, n_head=4, d_ff=512, vocab=64, n_pos=32, norm="layernorm")
    torch.manual_seed(0)
    model = build_transformer(shape, device=device)
    optimizer = ShardedOffloadOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1),
                                        config=config)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    start = 0
    if args.resume:  # every rank: weights, its shard of the state, scheduler, RNG; the data position is the step
        start = offload.load_checkpoint(args.checkpoint, model, optimizer, scheduler=scheduler)["step"]
    with StopOnSignal() as stop:  # Ctrl-C: finish the step, save, stop
        for step in range(start, args.steps):
            rows = batch(step, args.batch, shape.n_pos, shape.vocab, device)[rank::world]  # this rank's rows
            logits = model(rows[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, shape.vocab), rows[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            # One all-reduce gives the mean loss and whether any rank was asked to stop: the signal reaches the
            # ranks at different moments, and saving is collective, so all must stop after the same step.
            flags = torch.stack([loss.detach(), torch.tensor(float(stop.requested is not None), device=device)])
            dist.all_reduce(flags)
            stopping = flags[1].item() > 0
            if rank == 0:
                print(f"step {step:4d}  loss {flags[0].item() / world:.6f}  lr {scheduler.get_last_lr()[0]:.2e}",
                      flush=True)
            if args.checkpoint and (stopping or (step + 1) % args.save_every == 0):
                offload.save_checkpoint(args.checkpoint, model, optimizer, step=step + 1, scheduler=scheduler)
            if stopping:
                break

    r = optimizer.report()
    state = r["inner"]["state_bytes_by_tier"] if r["inner"] else {}
    print(f"rank {rank}: owns {r['owned']} of {r['params']} params, state on nvme {state.get('nvme', 0)} bytes, "
          f"{r['buckets_in_backward']} of {r['buckets_in_backward'] + r['buckets_at_step']} bucket reductions "
          f"overlapped with backward", flush=True)
    optimizer.close()
    dist.destroy_process_group()
    if nvme and not args.nvme:
        shutil.rmtree(nvme, ignore_errors=True)


if __name__ == "__main__":
    main()
