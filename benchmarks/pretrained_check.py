"""A Llama-architecture model whose params + grads + AdamW state are over 3x the memory the kernel lets the
training process have: built on meta, loaded from a checkpoint transformers wrote, fine-tuned (full, or LoRA),
exported, and read back by from_pretrained with equal weights.

    P=.venv/bin/python; D=benchmarks/results/pretrained
    $P benchmarks/pretrained_check.py make --dir $D                  # the checkpoint (transformers' save_pretrained)
    ../shared/tools/memlimit.sh 2.5GiB -- $P benchmarks/pretrained_check.py train --dir $D --mode full
    ../shared/tools/memlimit.sh 2.5GiB -- $P benchmarks/pretrained_check.py train --dir $D --mode lora
    $P benchmarks/pretrained_check.py verify --dir $D                # from_pretrained of both exports

``make`` needs about 4 GiB of memory (transformers builds the model whole) and the disk about 4x the
checkpoint. ``train`` runs under the limit (``memlimit.sh``: a memory cgroup, page cache included); it prints the
load rate beside a raw read of the same files before and after it (each from a cold page cache:
``posix_fadvise(DONTNEED)``; the ratio is to the faster), each
step's loss and time beside the cost model's prediction, and the process's peak RSS, and leaves
``<dir>/<mode>.json``: those figures and a SHA-256 of every weight as the runtime holds it after training.
``verify`` loads the export with transformers (and peft for LoRA) and compares those hashes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Llama's architecture at 0.52B params: blocks of Llama-7B's proportions at a smaller width, and a small vocabulary
# (the embedding is one unit: its buffers in flight are the host's largest, so a 32000-word vocabulary would take
# more of a 2.5 GiB limit than the blocks do).
SHAPE = dict(vocab_size=8192, hidden_size=2048, intermediate_size=5504, num_hidden_layers=10, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=512, tie_word_embeddings=True)
STATE_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 param, fp32 grad, AdamW's two moments (no master: the params are fp32)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def make(args) -> None:
    import transformers
    d = Path(args.dir)
    cfg = transformers.LlamaConfig(**{**SHAPE, "num_hidden_layers": args.layers})
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = transformers.LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(d / "ckpt", max_shard_size="500MB")
    print(f"{n / 1e6:.0f}M params ({n * STATE_BYTES_PER_PARAM / 2**30:.2f} GiB of params + grads + AdamW state) "
          f"written to {d / 'ckpt'} in {time.perf_counter() - t0:.0f} s")


def _drop_cache(files) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _raw_read(files) -> tuple[int, float]:
    """Every byte of ``files``, read into one 64 MiB buffer: what the disk gives a plain reader."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    n, t0 = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while (k := fh.readinto(view)) > 0:
                n += k
    return n, time.perf_counter() - t0


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _limit_bytes() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1; memlimit.sh makes one), or ``None``."""
    try:
        lines = Path("/proc/self/cgroup").read_text().split()
    except OSError:
        return None
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        candidates = [f"/sys/fs/cgroup{rel}/memory.max"] if controllers == "" else \
            [f"/sys/fs/cgroup/memory{rel}/memory.limit_in_bytes"] if "memory" in controllers.split(",") else []
        for f in candidates:
            try:
                text = Path(f).read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < physical:
                return int(text)
    return None


def train(args) -> None:
    import transformers

    import offload
    from offload import OffloadConfig, load_pretrained, runtime_of, save_pretrained, wrap
    from offload.autoplan import workload_of_runtime
    from offload.measure import config_to_plan, predicted_dict
    from scheduler import profile
    from scheduler.cost import CostModel

    d = Path(args.dir)
    ckpt = d / "ckpt"
    out = d / f"export-{args.mode}"
    store = d / f"store-{args.mode}"
    store.mkdir(parents=True, exist_ok=True)
    limit = _limit_bytes()
    torch.manual_seed(0)  # peft draws the adapters' A at random
    config = transformers.AutoConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    if args.mode == "lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    cfg = OffloadConfig(param_tier="nvme", grad_tier="nvme", state_tier="nvme", nvme_dirs=str(store), prefetch=1,
                        buffers=2, subgroup_numel=4 << 20, device_budget_bytes=args.device_budget,
                        host_budget_bytes=args.host_budget,
                        nvme_capacity_bytes=12 << 30)
    t0 = time.perf_counter()
    model, opt = wrap(model, torch.optim.AdamW(trainable, lr=args.lr), cfg)
    rt = runtime_of(model)
    print(f"{n_params / 1e6:.0f}M params, {rt.num_parameters(trainable_only=True) / 1e6:.1f}M trainable; full state "
          f"{n_params * STATE_BYTES_PER_PARAM / 2**30:.2f} GiB"
          + (f" = {n_params * STATE_BYTES_PER_PARAM / limit:.2f}x the {limit / 2**30:.2f} GiB memory limit"
             if limit else " (no memory limit found: run under memlimit.sh)")
          + f"; wrapped on meta in {time.perf_counter() - t0:.1f} s (peak RSS {_peak_mib():.0f} MiB)", flush=True)
    files = sorted(ckpt.glob("*.safetensors"))
    _drop_cache(files)
    raw = [_raw_read(files)]
    _drop_cache(files)
    result = load_pretrained(model, ckpt)
    _drop_cache(files)  # read again after: a virtual disk's own cache may favour whichever read comes second
    raw.append(_raw_read(files))
    raw_bytes, raw_s = max(raw, key=lambda r: r[0] / r[1])
    load_ratio = (result.nbytes / result.seconds) / (raw_bytes / raw_s)
    print(f"load: {result.nbytes / 2**20:.0f} MiB in {result.seconds:.1f} s = {result.nbytes / result.seconds / 2**20:.0f} "
          f"MiB/s; raw read of the same files before and after it "
          f"{', '.join(f'{b / s / 2**20:.0f}' for b, s in raw)} MiB/s; ratio to the faster {load_ratio:.2f}; "
          f"peak RSS so far {_peak_mib():.0f} MiB", flush=True)
    try:
        w = workload_of_runtime(rt, batch=1, seq=args.seq)
        predicted = predicted_dict(CostModel(w, profile.resolve(None)).predict(config_to_plan(cfg, w)))["iteration_s"]
    except (NotImplementedError, ValueError) as e:
        print(f"no prediction: {e}")
        predicted = None
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, config.vocab_size, (1, args.seq), generator=g)  # one batch, again: the loss must fall
    steps = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps.append({"loss": loss.item(), "s": time.perf_counter() - t0})
        print(f"step {step + 1}: loss {steps[-1]['loss']:.4f}, {steps[-1]['s']:.1f} s"
              + (f" (plan predicts {predicted:.1f} s)" if predicted else "") + f"; peak RSS {_peak_mib():.0f} MiB",
              flush=True)
    t0 = time.perf_counter()
    save_pretrained(model, out, max_shard_size="300MB")
    export_s = time.perf_counter() - t0
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(p, name)
    digests = {names[p]: _digest(v) for p, v in rt.iter_params()
               if args.mode == "full" or p.requires_grad}
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {"mode": args.mode, "params": n_params, "trainable": rt.num_parameters(trainable_only=True),
              "state_bytes": n_params * STATE_BYTES_PER_PARAM, "limit_bytes": limit,
              "state_over_limit": n_params * STATE_BYTES_PER_PARAM / limit if limit else None,
              "peak_rss_bytes": peak_rss, "load": {"bytes": result.nbytes, "s": result.seconds, "raw_bytes": raw_bytes,
                                                  "raw_s": raw_s, "raw_reads": raw, "ratio": load_ratio},
              "steps": steps, "predicted_step_s": predicted, "export_s": export_s, "digests": digests,
              "offload": offload.__version__}
    (d / f"{args.mode}.json").write_text(json.dumps(record, indent=1))
    print(f"export: {out} in {export_s:.1f} s; peak RSS {peak_rss / 2**20:.0f} MiB"
          + (f" of a {limit / 2**20:.0f} MiB limit" if limit else ""))
    falling = steps[-1]["loss"] < steps[0]["loss"]
    print(f"loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f} ({'falling' if falling else 'NOT FALLING'}); "
          f"median step {sorted(s['s'] for s in steps)[len(steps) // 2]:.1f} s"
          + (f", predicted {predicted:.1f} s" if predicted else ""))
    rt.close()
    shutil.rmtree(store, ignore_errors=True)  # preallocated at nvme_capacity_bytes: 12 GiB per mode


def verify(args) -> int:
    import transformers
    d = Path(args.dir)
    bad = 0
    for mode in ("full", "lora"):
        rec_path = d / f"{mode}.json"
        if not rec_path.exists():
            print(f"{mode}: no {rec_path} (run train --mode {mode} first)")
            continue
        want = json.loads(rec_path.read_text())["digests"]
        if mode == "full":
            model = transformers.AutoModelForCausalLM.from_pretrained(d / "export-full", dtype=torch.float32)
        else:
            import peft
            base = transformers.AutoModelForCausalLM.from_pretrained(d / "ckpt", dtype=torch.float32)
            model = peft.PeftModel.from_pretrained(base, d / "export-lora")
        have = {n: _digest(p) for n, p in model.named_parameters() if n in want}
        missing = sorted(set(want) - set(have))
        differ = sorted(n for n in have if have[n] != want[n])
        ok = not missing and not differ
        bad += not ok
        print(f"{mode}: {len(have)} tensors read back by from_pretrained, {len(differ)} differ, {len(missing)} missing"
              f" -> {'EQUAL' if ok else 'MISMATCH ' + str((differ + missing)[:3])}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["make", "train", "verify"])
    ap.add_argument("--dir", default=str(Path(__file__).parent / "results" / "pretrained"))
    ap.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"], help="make: transformer blocks")
    ap.add_argument("--mode", choices=["full", "lora"], default="full")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--device-budget", type=int, default=600 << 20, help="bytes (default 600 MiB)")
    ap.add_argument("--host-budget", type=int, default=960 << 20, help="bytes (default 960 MiB)")
    args = ap.parse_args()
    if args.what == "make":
        make(args)
    elif args.what == "train":
        train(args)
    else:
        return verify(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
