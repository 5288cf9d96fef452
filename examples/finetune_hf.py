"""Fine-tune a Hugging Face transformers model (built from a config: nothing is downloaded) with offload.wrap.

    .venv/bin/python examples/finetune_hf.py --steps 50                       # a small Llama, everything on NVMe
    .venv/bin/python examples/finetune_hf.py --layers 2 --hidden 64 --steps 3 # the size CI runs
    .venv/bin/offload run --config examples/offload.toml examples/finetune_hf.py --steps 50

transformers is an optional dependency (`pip install transformers`). Each decoder layer of
`model.model.layers` becomes a unit: fetched before its forward and backward, released after, its grads and its
AdamW update handled while backward goes on with the layers before it. To start from real weights, replace
`LlamaForCausalLM(config)` by `LlamaForCausalLM.from_pretrained(name)`.
"""

import argparse
import shutil
import tempfile

import torch

import offload
from offload.demo import batch_at, corpus_tokens
from offload.report import RunReport


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--nvme", help="store directory when run directly (default: a temporary one)")
    args = ap.parse_args()
    try:
        import transformers
    except ImportError:
        raise SystemExit("finetune_hf.py needs transformers: pip install transformers") from None

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32),
                                      max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).to(device)  # bytes as tokens: the corpus needs no tokenizer
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    tmp, cfg = None, offload.config_from_env()  # set by `offload run`
    launched = cfg is not None
    if not launched:
        tmp = args.nvme or tempfile.mkdtemp(prefix="finetune-hf-")
        cfg = offload.OffloadConfig(param_tier="nvme", grad_tier="nvme", state_tier="nvme", nvme_dirs=tmp,
                                    prefetch=1)
    model, opt = offload.wrap(model, opt, cfg)

    tokens = corpus_tokens()
    report = RunReport(model, opt, total_steps=args.steps, name="finetune_hf")
    for step in range(args.steps):
        idx = batch_at(tokens, step, args.batch, args.seq - 1).to(device)
        loss = model(input_ids=idx, labels=idx).loss  # HF shifts the labels itself
        loss.backward()
        opt.step()
        opt.zero_grad()
        report.step(loss.item(), tokens=idx.numel())
    if not launched:
        print(report.text())
    offload.runtime_of(model).close()
    if tmp and not args.nvme:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
