"""`offload plan`: the 70B dry run is fast and small, its memory totals match a hand count, it writes its files."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

import pytest

from offload.runtime import runtime_of
from offload.cli import main

GiB = 1 << 30
# 256 GiB of host: a CPU update keeps one host grad buffer per unit for the whole run (the runtime's rule), which for
# Llama-70B is 128.5 GiB on its own; with 128 GiB (96 GiB usable) no placement of the planner's fits.
ARGS_70B = ["plan", "llama-70b", "--batch", "4", "--seq", "2048", "--profile", "rtx4090-pcie4-gen4nvme",
            "--device-memory", "24GiB", "--host-memory", "256GiB", "--nvme", "2TB"]


def test_plan_70b_under_5s_and_1gib(tmp_path):
    # The child reports its own peak RSS (VmHWM, of its own address space) on exit. The rusage wait4 gives is no
    # good here: Linux carries the high-water mark of the address space exec replaced into it, and that is a copy
    # of this test process's (hundreds of MiB, more as the suite goes on).
    hwm = tmp_path / "vmhwm"
    cmd = [sys.executable, "-c",
           "import sys; from offload.cli import main; rc = main(sys.argv[2:]); "
           "open(sys.argv[1], 'w').write([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]); "
           "sys.exit(rc)", str(hwm), *ARGS_70B, "--json"]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        p = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True)
        try:
            p.wait(timeout=120)  # a planner that hangs fails here
        finally:
            p.kill()
        wall_s = time.perf_counter() - t0
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    assert p.returncode == 0, stderr
    rss_bytes = int(hwm.read_text().split()[1]) * 1024  # "VmHWM:  123456 kB"
    # The < 5 s half of the bar is a timing: printed here (pytest -s), never asserted (a loaded machine would fail
    # it). Measured: see the issue note.
    print(f"offload plan llama-70b: {wall_s:.2f} s wall, peak RSS {rss_bytes / GiB:.2f} GiB")
    assert rss_bytes < GiB, f"offload plan llama-70b peaked at {rss_bytes / GiB:.2f} GiB"
    out = json.loads(stdout)
    assert out["fits"] and out["params"] == 68_976_648_192

    # Memory totals by hand, from the placement it printed. Llama-2-70B: block = 2*8192^2 (q, o) + 2*8192*1024
    # (k, v: 8 kv heads) + 3*8192*28672 (SwiGLU) + 2*8192 (norms); rest = 2*32000*8192 (embed, head) + 8192.
    block, rest = 855_654_400, 524_296_192
    assert [u["kind"] for u in out["workload"]["units"]].count("block") == 80
    units = out["plan"]["units"]
    k = out["plan"]["prefetch_depth"]
    sizes = [rest] + [block] * 80
    pb = [2 * n for n in sizes]
    sb = [12 * n for n in sizes]
    # activations, batch 4 x seq 2048: kept inputs 2*2048*4*8192 for 80 blocks + rest; plus the largest working
    # set, a block's 2048*4*(18*8192 + 4*28672*1.5)
    acts = 81 * 2 * 2048 * 4 * 8192 + 2048 * 4 * (18 * 8192 + 6 * 28672)
    # By the runtime's rules (scheduler/buffers.py); every chunk here is a multiple of 4 KiB, so the pool's and the
    # store's rounding adds nothing.
    streamed = any(u["params"] != "device" for u in units[1:])
    trainable_off = [i for i, u in enumerate(units) if u["update"] == "device" and u["state"] != "device"]
    device = (sum(pb[i] for i, u in enumerate(units) if u["params"] == "device" or i == 0)
              + ((k + 1) * 2 * block if streamed else 0)
              + sum(sb[i] for i, u in enumerate(units) if u["state"] == "device")
              + 2 * rest + 2 * (2 * block)  # rest grads + 2 rotating block grad buffers (bf16)
              + 4 * max((sb[i] for i in trainable_off), default=0)
              + acts)
    host_grads = sum(2 * sizes[i] for i, u in enumerate(units) if u["update"] == "cpu")  # one buffer per unit
    resident = (sum(pb[i] for i, u in enumerate(units) if u["params"] == "host")
                + sum(sb[i] for i, u in enumerate(units) if u["state"] == "host") + host_grads)
    on_nvme_p = [pb[i] for i, u in enumerate(units) if u["params"] == "nvme"]
    on_nvme_s = sorted((sb[i] for i, u in enumerate(units) if u["state"] == "nvme"), reverse=True)
    # the fetches in flight, and the last step's last writes (its rest unit's state: the step returned before they
    # landed)
    assert out["plan"]["overlap_update"]
    forward = sum(sorted(on_nvme_p, reverse=True)[:k + 1]) + (sb[0] if units[0]["state"] == "nvme" else 0)
    step = max(on_nvme_p, default=0)  # one unit's new weights on their way to the store
    staging = sum(sorted(on_nvme_p, reverse=True)[:2])  # and the next unit's, updating meanwhile
    # the first step speculates (copies of the params not on NVMe) and makes the state one chunk at a time (the
    # one before on its way to the store); a later one reads state ahead: buffers - 1 = 3 chunks
    first = staging + sum(on_nvme_s[:2]) + sum(pb[i] for i, u in enumerate(units) if u["params"] != "nvme")
    later = staging + sum(on_nvme_s[:3])
    host = resident + max(forward, first, later)
    host_needed = resident + max(forward, staging + sum(on_nvme_s[:2]), later)  # no copies: they take free room
    # A state chunk and a param chunk written beside their committed versions; the first step, speculating,
    # holds the params' previous versions instead (a new one is written beside each: no more room than that).
    stored = sum(on_nvme_p) + sum(on_nvme_s)
    nvme = stored + sum(on_nvme_s[:1]) + max(sum(on_nvme_p), step)
    nvme_needed = stored + sum(on_nvme_s[:1]) + step  # no speculation: it takes only free room
    assert out["memory_bytes"] == {"device": device, "host": host, "nvme": nvme}
    assert out["memory_needed_bytes"] == {"device": device, "host": host_needed, "nvme": nvme_needed}
    assert device <= 24 * GiB and host_needed <= 256 * GiB and nvme <= 2 * 10**12
    assert out["iteration_s"] >= out["lower_bound_s"] > 0
    assert {r["strategy"] for r in out["strategies"]} >= {"no offload", "ZeRO-Offload", "ZeRO-Infinity", "Fuyou",
                                                          "ours"}


def test_plan_text_and_files(tmp_path, capsys):
    assert main(["plan", "gpt2", "--batch", "2", "--seq", "256", "--profile", "cpu-dev-2core", "--device-memory",
                 "700MiB", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for needle in ("FITS", "memory per tier", "placement", "bytes per iteration", "predicted iteration",
                   "tokens/s", "TFLOP/s", "bottleneck", "lower bound", "ZeRO-Infinity"):
        assert needle in text
    trace = json.loads((tmp_path / "trace.json").read_text())
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert xs and all(e["dur"] >= 0 and "tid" in e for e in xs)
    assert (tmp_path / "timeline.svg").read_text().startswith("<svg")
    assert json.loads((tmp_path / "plan.json").read_text())["plan"]["strategy"] == "ours"


def test_plan_that_cannot_fit_exits_1_and_says_what_to_change(capsys):
    assert main([*ARGS_70B[:-6], "--device-memory", "2GiB", "--host-memory", "128GiB", "--nvme", "2TB"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT: device memory is short by" in out and ("--batch" in out or "--device-memory" in out)


def test_plan_that_cannot_fit_lists_every_short_tier_and_fixes_that_fit(capsys):
    """Llama-70B with 256 GiB of host memory and no NVMe: no tier is short alone; each that could take the rest is
    named with the least capacity that fits, and each printed fix, run again, fits (exit 0). (With less host, NVMe
    cannot help: the CPU updates' host grads, one buffer per unit, do not fit whatever the store holds.)"""
    args = [*ARGS_70B[:-6], "--device-memory", "24GiB", "--host-memory", "256GiB", "--nvme", "1"]
    assert main([*args, "--json"]) == 1
    sf = json.loads(capsys.readouterr().out)["shortfall"]
    assert sf["joint"] and set(sf["short"]) == {"device", "host", "nvme"} and all(b > 0 for b in sf["short"].values())
    assert len(sf["fixes"]) == 3
    for fix in sf["fixes"]:
        (flag, value), = fix.items()
        fixed = list(args)
        fixed[fixed.index(flag) + 1] = value
        assert main([*fixed, "--json"]) == 0, fix
        assert json.loads(capsys.readouterr().out)["fits"]


@pytest.mark.parametrize("args, expected", [
    (["plan", "no-such-model"], "expected a preset"),
    (["plan", "gpt2", "--batch", "-3"], "offload plan: batch: expected a positive integer (sequences per iteration), "
                                        "got -3"),
    (["plan", "gpt2", "--seq", "0"], "offload plan: seq: expected a positive integer (tokens per sequence), got 0"),
], ids=["unknown-model", "negative-batch", "zero-seq"])
def test_bad_input_errors(args, expected, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


# -- `offload plan DIR`: a HF checkpoint directory, sized from its config.json ---------------------------------------
def _tiny_llama_config(**over):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(**{"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
                                       "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                                       "tie_word_embeddings": True, **over})


PLAN_TINY = ["--seq", "32", "--profile", "cpu-dev-2core", "--json"]


@pytest.mark.parametrize("dtype, recipe", [("float32", "fp32"), ("bfloat16", "bf16"), (None, "bf16")])
def test_plan_a_hf_checkpoint_directory(dtype, recipe, tmp_path, capsys):
    """Sized from config.json on the meta device, in the dtype it names (bf16 mixed precision when none): the
    params are the model's own (tied embeddings once), one unit per decoder layer; its config.json path plans the
    same."""
    import torch
    import transformers

    cfg = _tiny_llama_config(**({"dtype": dtype} if dtype else {}))
    cfg.save_pretrained(tmp_path / "tiny-llama")
    assert main(["plan", str(tmp_path / "tiny-llama"), *PLAN_TINY]) == 0
    out = json.loads(capsys.readouterr().out)
    with torch.device("meta"):
        numel = sum(p.numel() for p in transformers.LlamaForCausalLM(cfg).parameters())
    w = out["workload"]
    assert out["params"] == w["params"] == numel
    assert w["name"] == "tiny-llama" and w["compute_dtype"] == recipe
    assert [u["kind"] for u in w["units"]] == ["rest"] + ["block"] * 3
    assert main(["plan", str(tmp_path / "tiny-llama" / "config.json"), *PLAN_TINY]) == 0
    assert json.loads(capsys.readouterr().out)["workload"] == w


def _write_config(d, cfg) -> str:
    d.mkdir()
    (d / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return str(d / "config.json")


LLAMA_SIZES = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "vocab_size": 96}


@pytest.mark.parametrize("cfg, expected", [
    (None, "expected a HF checkpoint directory with a config.json, got none at {d}/config.json"),
    ("{not json", "{path}: expected a readable HF config.json"),
    ({k: v for k, v in LLAMA_SIZES.items() if k != "model_type"}, "{path}: expected a HF config.json with a "
                                                                    "model_type"),
    ({k: v for k, v in LLAMA_SIZES.items() if k not in ("hidden_size", "vocab_size")},
     "{path}: expected the sizes of the model, got no hidden_size, vocab_size (transformers would use LlamaConfig's "
     "defaults"),
    ({"model_type": "gpt2", "n_layer": 2, "n_head": 4, "vocab_size": 96}, "got no n_embd"),  # under GPT-2's names
    ({**LLAMA_SIZES, "model_type": "no-such-type"}, "{path}: model_type 'no-such-type' is not one transformers"),
    ({"model_type": "t5", "d_model": 32, "num_layers": 2, "num_heads": 4, "vocab_size": 96},
     "{path}: model_type 't5' (T5Config) is not a causal language model"),
    ({**LLAMA_SIZES, "dtype": "float64"}, "{path}: dtype 'float64': expected one of float32, bfloat16, float16"),
    ({**LLAMA_SIZES, "num_hidden_layers": -2}, "{path}: expected sizes that are positive integers, got "
                                               "num_hidden_layers=-2"),
    ({"model_type": "llama", "hidden_size": 4096}, "{path}: expected the sizes of the model, got no "
                                                   "intermediate_size, num_hidden_layers, num_attention_heads, "
                                                   "vocab_size"),
    ({"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 96, "state_size": 4,
      "intermediate_size": 64}, "{path}: model_type 'mamba' (MambaConfig) is not an architecture offload plan can "
                                "price"),
], ids=["no-config", "bad-json", "no-model-type", "no-sizes", "gpt2-names", "unknown-type", "not-causal",
        "bad-dtype", "negative-layers", "only-hidden-size", "mamba"])
def test_plan_a_hf_directory_it_cannot_size_says_why(cfg, expected, tmp_path, capsys):
    pytest.importorskip("transformers")
    d = tmp_path / "ckpt"
    path = _write_config(d, cfg) if cfg is not None else (d.mkdir() or str(d / "config.json"))
    assert main(["plan", str(d), *PLAN_TINY]) == 2
    assert expected.format(d=d, path=path) in capsys.readouterr().err


# -- `offload plan --measure` runs the planner's own plan; `offload plan --json` feeds offload.wrap -------------------
TINY = ("from scheduler.workload import TransformerShape, build_transformer\n"
        "SHAPE = TransformerShape(n_layer=3, d_model=36, n_head=4, d_ff=70, vocab=97, n_pos=16, bias=True, "
        "norm='layernorm', tied=True)\n"
        "def make():\n    return build_transformer(SHAPE)\n")


def _tiny(tmp_path, monkeypatch):
    (tmp_path / "tinyplanned.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return importlib.import_module("tinyplanned").SHAPE


def test_plan_measure_runs_the_planners_mixed_plan(tmp_path, monkeypatch, capsys):
    """A device of 260 KiB makes the planner mix placements (the rest unit updated on the device, the blocks on
    the CPU from the host): that plan is what runs, and its bytes per link are the cost model's (the device-updated
    unit's grads stay on the device)."""
    from offload.measure import workload_of
    from scheduler import planner, profile

    shape = _tiny(tmp_path, monkeypatch)
    args = ["--batch", "2", "--seq", "8", "--profile", "cpu-dev-2core", "--device-memory", "260KiB"]
    w = workload_of(shape, batch=2, seq=8)
    hw = profile.resolve("cpu-dev-2core").with_capacities(device_memory_bytes=260 << 10)
    chosen = planner.plan(w, hw).plan
    assert len(set(chosen.units)) > 1 and any(u.update == "device" for u in chosen.units), chosen.compact()
    assert main(["plan", "tinyplanned:make", *args, "--measure", "--iters", "1", "--dir", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert f"the fastest placement offload.wrap runs (the planner's plan), {chosen.compact()}, prefetch" in out
    assert f"tinyplanned:make: {chosen.compact()}, prefetch {chosen.prefetch_depth}" in out
    lines = out.splitlines()
    for r in ("iteration", "compute", "h2d", "d2h", "disk_read", "disk_write", "cpu_update"):
        assert any(ln.split()[:1] == [r] and ln.count("s ") >= 2 for ln in lines), r
    bytes_lines = {ln.split()[0]: ln.split()[-1] for ln in lines if ln.split()[-1:] in (["equal"], ["DIFFER"])}
    assert bytes_lines == {"h2d": "equal", "d2h": "equal", "disk_read": "equal", "disk_write": "equal"}


def test_plan_measure_falls_back_to_a_uniform_plan_when_the_planners_does_not_fit(tmp_path, monkeypatch, capsys):
    _tiny(tmp_path, monkeypatch)
    assert main(["plan", "tinyplanned:make", "--batch", "2", "--seq", "8", "--profile", "cpu-dev-2core",
                 "--device-memory", "100KiB", "--measure", "--iters", "1", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["measured_plan"] == "runnable" and "does not fit the profile (device memory is short" in out["note"]
    note = [ln for ln in captured.err.splitlines() if ln.startswith("note: ")]
    assert len(note) == 1 and note[0].endswith("measuring the fastest uniform placement instead")
    assert "the fastest uniform placement offload.wrap runs, HHc x4" in captured.err
    assert out["bytes_equal"]


def test_plan_json_runs_in_wrap(tmp_path, monkeypatch, capsys):
    """README: the plan `offload plan --json` prints is `Plan.from_dict`'s input and offload.wrap's `plan=`."""
    import torch

    from offload import OffloadConfig, wrap
    from scheduler.planner import Plan

    shape = _tiny(tmp_path, monkeypatch)
    assert main(["plan", "tinyplanned:make", "--batch", "2", "--seq", "8", "--profile", "cpu-dev-2core",
                 "--device-memory", "230KiB", "--host-memory", "800KiB", "--host-reserve", "0", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["plan"]
    plan = Plan.from_dict(d)
    assert plan.to_dict() == {**d, "units": [{**u, "unit": str(i)} for i, u in enumerate(d["units"])]}
    assert len(set(plan.units)) > 1, plan.compact()
    from scheduler.workload import build_transformer

    torch.manual_seed(0)
    model = build_transformer(shape, device="cpu")
    model, opt = wrap(model, torch.optim.AdamW(model.parameters()), OffloadConfig(nvme_dirs=str(tmp_path)), plan=plan)
    idx = torch.randint(0, 97, (2, 9))
    model(idx[:, :-1]).sum().backward()
    opt.step()
    assert runtime_of(model).plan is plan
    assert [r["params"] for r in runtime_of(model).placements()] == [u["params"] for u in d["units"]]
    runtime_of(model).close()
    with pytest.raises(ValueError, match=r"Plan.from_dict: expected Plan.to_dict\(\)'s form"):
        Plan.from_dict({"units": [{"params": "host"}]})


def test_plan_picture_has_a_legend_naming_every_symbol(capsys):
    """The placement picture (run-length codes) is followed by a legend; every symbol the picture uses is in it:
    each letter with its meaning (tiers in upper case, update sites in lower case), the run length and the
    separator. The 70B plan at batch 1 mixes every tier and both update sites, so every letter is used."""
    assert main([*ARGS_70B[:2], "--batch", "1", *ARGS_70B[4:]]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("placement, unit by unit"))
    picture, legend = lines[at + 1].strip(), "\n".join(lines[at + 2:at + 4])
    assert legend.lstrip().startswith("legend:")
    runs = picture.split(" | ")
    codes = [run.split(" x")[0] for run in runs]
    assert all(len(c) == 3 and run.split(" x")[1].isdigit() for c, run in zip(codes, runs)), picture
    used = {ch for c in codes for ch in c}
    assert used == {"D", "H", "N", "c", "d"}, used
    names = {"D": "device", "H": "host", "N": "nvme", "c": "cpu", "d": "device"}
    for ch in used:
        assert f"{ch} {names[ch]}" in legend, ch
    assert "xN = N units in a row" in legend and "| separates runs" in legend
    assert "params on X, optimizer state on Y, update on z" in legend
