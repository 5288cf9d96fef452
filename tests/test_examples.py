"""Every example runs, at a tiny size, as a user would run it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # every test here starts other processes


def test_offload_optimizer_example(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "offload_optimizer.py"), "--steps", "3",
                          "--nvme", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "step    2" in out.stdout and "state on nvme" in out.stdout


def run_example(name, *args, timeout=180):
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_finetune_gpt_example(tmp_path):
    out = run_example("finetune_gpt.py", "--steps", "30", "--batch", "4", "--seq", "32", "--nvme", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "== finetune_gpt: 30 steps" in out.stdout
    first, last = (float(x) for x in out.stdout.split("\nloss ")[1].split()[:3:2])
    assert last < first, out.stdout


def test_finetune_hf_example(tmp_path):
    pytest.importorskip("transformers")
    out = run_example("finetune_hf.py", "--layers", "2", "--hidden", "64", "--steps", "3", "--batch", "2", "--seq",
                      "32", "--nvme", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "== finetune_hf: 3 steps" in out.stdout and "placement: params on nvme" in out.stdout


def test_plan_llama70b_example(tmp_path):
    out = run_example("plan_llama70b.py", "--out", str(tmp_path), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "model llama-70b" in out.stdout and "FITS" in out.stdout
    assert (tmp_path / "plan.json").is_file()


def test_finetune_hf_trainer_example(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = run_example("finetune_hf_trainer.py", "--layers", "2", "--hidden", "64", "--steps", "3", "--batch", "2",
                      "--seq", "32", "--accumulation", "2", "--nvme", str(tmp_path), "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert "== finetune_hf_trainer: 3 steps" in out.stdout and "placement: params on nvme" in out.stdout
    first = float(out.stdout.split("grad norm (the Trainer's log, before clipping at 1.0): first ")[1].split(",")[0])
    assert first > 0  # the true norm reached the Trainer (accelerate's own clip would have logged 0)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_finetune_pretrained_example(lora, tmp_path):
    """The whole path: a checkpoint transformers wrote, built on meta, loaded unit by unit, fine-tuned, exported
    in the form from_pretrained (or peft's) reads back."""
    transformers = pytest.importorskip("transformers")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    made = run_example("finetune_pretrained.py", "--make-tiny", str(ckpt))
    assert made.returncode == 0, made.stderr
    args = ["--checkpoint", str(ckpt), "--out", str(out), "--steps", "3", "--batch", "2", "--seq", "32",
            "--lr", "1e-3", "--nvme", str(tmp_path)] + (["--lora"] if lora else [])
    ran = run_example("finetune_pretrained.py", *args)
    assert ran.returncode == 0, ran.stderr
    assert "== finetune_pretrained: 3 steps" in ran.stdout and "placement: params on nvme" in ran.stdout
    base = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    if lora:
        peft = pytest.importorskip("peft")
        assert "adapter tensors set by peft" in ran.stdout
        tuned = peft.PeftModel.from_pretrained(base, out)
        assert any("lora_B" in n and p.abs().sum() > 0 for n, p in tuned.named_parameters())  # B moved off zero
    else:
        tuned = transformers.AutoModelForCausalLM.from_pretrained(out)
        changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, base.get_parameter(n))]
        assert changed, "the export holds the pretrained weights, not the fine-tuned ones"
