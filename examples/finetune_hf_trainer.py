"""Fine-tune a Hugging Face transformers model with the HF Trainer, its params, grads and AdamW state offloaded.

    .venv/bin/python examples/finetune_hf_trainer.py --steps 50                        # a small Llama, all on NVMe
    .venv/bin/python examples/finetune_hf_trainer.py --layers 2 --hidden 64 --steps 3  # the size CI runs
    .venv/bin/offload run --config examples/offload.toml examples/finetune_hf_trainer.py --steps 50

Needs transformers and accelerate (`pip install transformers accelerate`). The Trainer is used as without offload,
with two changes: the model and the optimizer go through `offload.wrap` first, and the optimizer it returns is
given to the Trainer (`optimizers=(opt, None)`: the Trainer adds its LR schedule). The Trainer reads the grad norm
after backward at every step, to clip (`max_grad_norm`, 1.0 by default) or to log it: the overlapped update answers
it speculatively (validated after backward, undone and redone exactly when the step clips), so the runtime is told
how many backward passes make a step (`accumulation_steps`). Everything else (clipping, gradient accumulation,
evaluation, checkpoints, `resume_from_checkpoint`) is the Trainer's own. The model is built from a config (nothing
is downloaded); to start from real weights, build it under `accelerate.init_empty_weights()` and load them after
`wrap` with `offload.load_pretrained(model, checkpoint_dir)`.
"""

import argparse
import dataclasses
import shutil
import tempfile

import torch

import offload
from offload.demo import corpus_tokens
from offload.report import RunReport


class Windows(torch.utils.data.Dataset):
    """The corpus cut into windows of ``seq`` bytes, each its own labels (the model shifts them)."""

    def __init__(self, tokens: torch.Tensor, seq: int):
        self.tokens, self.seq = tokens, seq

    def __len__(self) -> int:
        return len(self.tokens) // self.seq

    def __getitem__(self, i: int) -> dict:
        window = self.tokens[i * self.seq:(i + 1) * self.seq]
        return {"input_ids": window, "labels": window}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="the Trainer's clip (0: none; still logged)")
    ap.add_argument("--nvme", help="store directory when run directly (default: a temporary one)")
    ap.add_argument("--out", help="the Trainer's output directory (default: a temporary one)")
    args = ap.parse_args()
    try:
        import accelerate  # noqa: F401 - the Trainer needs it
        import transformers
    except ImportError:
        raise SystemExit("finetune_hf_trainer.py needs transformers and accelerate: "
                         "pip install transformers accelerate") from None

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32),
                                      max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)  # bytes as tokens: the corpus needs no tokenizer
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    tmp, cfg = [], offload.config_from_env()  # set by `offload run`
    launched = cfg is not None
    if not launched:
        nvme = args.nvme or tmp.append(tempfile.mkdtemp(prefix="finetune-hf-trainer-")) or tmp[-1]
        cfg = offload.OffloadConfig(param_tier="nvme", grad_tier="nvme", state_tier="nvme", nvme_dirs=nvme,
                                    prefetch=1)
    # The update overlaps backward speculatively; the runtime must know which backward ends a step.
    model, opt = offload.wrap(model, opt, dataclasses.replace(cfg, accumulation_steps=args.accumulation))

    out = args.out or tmp.append(tempfile.mkdtemp(prefix="finetune-hf-trainer-out-")) or tmp[-1]
    training_args = transformers.TrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accumulation, learning_rate=args.lr, warmup_steps=max(1, args.steps // 10),
        max_grad_norm=args.max_grad_norm, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), seed=0)
    report = RunReport(model, opt, total_steps=args.steps, name="finetune_hf_trainer")

    class Report(transformers.TrainerCallback):
        """Feeds the run report each step's loss (logged every step)."""

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                report.step(logs["loss"], tokens=args.batch * args.accumulation * args.seq)

    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=Windows(corpus_tokens(), args.seq),
                                   optimizers=(opt, None), callbacks=[Report()])
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    if not launched:  # `offload run` prints the report itself
        print(report.text())
    print(f"grad norm (the Trainer's log, before clipping at {args.max_grad_norm}): first {norms[0]:.3f}, "
          f"max {max(norms):.3f}, last {norms[-1]:.3f}")
    offload.runtime_of(model).close()
    for d in tmp:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
