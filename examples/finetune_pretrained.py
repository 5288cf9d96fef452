"""The whole path for a pretrained checkpoint larger than memory: plan it, build the model on meta, load the
checkpoint unit by unit, fine-tune (every param, or LoRA adapters), export in the format from_pretrained reads.

    offload plan CKPT_DIR --batch 8 --seq 128                                  # does it fit? where does it go?
    .venv/bin/python examples/finetune_pretrained.py --checkpoint CKPT_DIR --out finetuned --steps 50
    .venv/bin/python examples/finetune_pretrained.py --checkpoint CKPT_DIR --out adapter --lora --steps 50
    .venv/bin/offload run --config examples/offload.toml examples/finetune_pretrained.py --checkpoint CKPT_DIR --out o
    .venv/bin/python examples/finetune_pretrained.py --make-tiny CKPT_DIR      # a small Llama checkpoint to try it on

CKPT_DIR is what transformers' ``save_pretrained`` writes (``config.json`` and ``model.safetensors`` or its
shards). The text is the demo's corpus, bytes as tokens, so the checkpoint's vocabulary must have 256 entries or
more (``--make-tiny`` makes one that has). ``--out`` gets a full model (``from_pretrained(out)``) or, with
``--lora``, a peft adapter (``PeftModel.from_pretrained(base, out)``).
"""

import argparse
import shutil
import tempfile

import torch

import offload
from offload.demo import batch_at, corpus_tokens
from offload.report import RunReport


def make_tiny(path: str) -> None:
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(path, max_shard_size="100KB")
    print(f"a 2-layer Llama checkpoint in {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a transformers checkpoint directory (safetensors)")
    ap.add_argument("--out", help="where the fine-tuned model (or adapter, with --lora) goes")
    ap.add_argument("--make-tiny", metavar="DIR", help="write a small Llama checkpoint to DIR and stop")
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters on q/k/v/o only (needs peft)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--nvme", help="store directory when run directly (default: a temporary one)")
    args = ap.parse_args()
    try:
        import transformers
    except ImportError:
        raise SystemExit("finetune_pretrained.py needs transformers: pip install transformers") from None
    if args.make_tiny:
        return make_tiny(args.make_tiny)
    if not (args.checkpoint and args.out):
        ap.error("--checkpoint and --out are needed (or --make-tiny DIR to make a checkpoint to try)")

    config = transformers.AutoConfig.from_pretrained(args.checkpoint)
    with torch.device("meta"):  # no weights anywhere yet: each unit gets its memory on its tier at wrap
        model = transformers.AutoModelForCausalLM.from_config(config)
    if args.lora:
        import peft
        torch.manual_seed(0)
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    tmp, cfg = None, offload.config_from_env()  # set by `offload run`
    launched = cfg is not None
    if not launched:
        tmp = args.nvme or tempfile.mkdtemp(prefix="finetune-pretrained-")
        cfg = offload.OffloadConfig(param_tier="nvme", grad_tier="nvme", state_tier="nvme", nvme_dirs=tmp,
                                    prefetch=1)
    model, opt = offload.wrap(model, opt, cfg)
    loaded = offload.load_pretrained(model, args.checkpoint)  # unit by unit; the fp32 masters follow
    print(f"loaded {len(loaded.loaded)} tensors ({loaded.nbytes / 2**20:.1f} MiB, "
          f"{loaded.bytes_per_s / 2**20:.0f} MiB/s)" + (f"; {len(loaded.initialized)} adapter tensors set by peft"
                                                         if loaded.initialized else ""))

    device = offload.runtime_of(model).device  # compute runs where the runtime put it (CUDA when there is one)
    tokens = corpus_tokens()
    report = RunReport(model, opt, total_steps=args.steps, name="finetune_pretrained")
    for step in range(args.steps):
        idx = batch_at(tokens, step, args.batch, args.seq - 1).to(device)
        loss = model(input_ids=idx, labels=idx).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        report.step(loss.item(), tokens=idx.numel())
    if not launched:
        print(report.text())
    written = offload.save_pretrained(model, args.out)
    print(f"wrote {', '.join(sorted(p.name for p in written))} to {args.out}")
    offload.runtime_of(model).close()
    if tmp and not args.nvme:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
