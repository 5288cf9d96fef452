"""Checkpoints against uninterrupted training: a run killed with SIGKILL and resumed from its checkpoint, on the
same or another placement, ends bit-identical to one that never stopped. Plus the format's defences."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from offload import CheckpointReader, OffloadConfig, OffloadOptimizer, load_checkpoint, save_checkpoint, wrap
from offload.runtime import runtime_of
from offload.checkpoint import CheckpointError, CheckpointWriter

HERE = os.path.dirname(os.path.abspath(__file__))


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln, self.fc, self.drop = nn.LayerNorm(d), nn.Linear(d, d), nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(torch.nn.functional.gelu(self.fc(self.ln(x))))


class Net(nn.Module):
    """Repeated blocks (offload.wrap's units), biases, norms and dropout (so the RNG matters)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(Block(32) for _ in range(2))
        self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, 4)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def mlp(dtype=torch.float32):
    """A 64x64 weight, cut into pieces when subgroups hold 1024 elements."""
    return nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.Dropout(0.1), nn.ReLU(), nn.Linear(64, 64),
                         nn.ReLU(), nn.Linear(64, 4)).to(dtype)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@contextlib.contextmanager
def rng_kept():
    """Leave the test process's global generators as they were."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def train(model, opt, steps, sched=None, dtype=torch.float32):
    """Data from all three global generators, and dropout: a resume that does not restore them diverges."""
    model.train()
    for _ in range(steps):
        x = (torch.randn(8, 16) * (1 + random.random()) + float(np.random.rand())).to(dtype)
        y = torch.randn(8, 4)
        ((model(x).float() - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def wrapped(seed, tier, store_dir):
    os.makedirs(store_dir, exist_ok=True)
    seed_all(seed)
    m = Net()
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
                      OffloadConfig(param_tier=tier, grad_tier=tier, state_tier=tier, nvme_dirs=str(store_dir)))
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)


def assert_same(model_sd, opt_sd, ref_model_sd, ref_opt_sd):
    """Every weight and buffer, every state tensor and hyperparameter equal. The fp32 masters that params on
    NVMe keep equal the weights, so a placement without them compares through the weights."""
    assert model_sd.keys() == ref_model_sd.keys()
    for k, v in ref_model_sd.items():
        assert torch.equal(v, model_sd[k]), k
    assert opt_sd["state"].keys() == ref_opt_sd["state"].keys()
    for i, entry in ref_opt_sd["state"].items():
        other = opt_sd["state"][i]
        assert entry.keys() - {"master"} == other.keys() - {"master"}, i
        for key, v in entry.items():
            if key in other:
                assert torch.equal(v, other[key]) if torch.is_tensor(v) else v == other[key], (i, key)
    assert opt_sd["param_groups"] == ref_opt_sd["param_groups"]


# -- 1. SIGKILL after a checkpoint, resume in a new process --------------------------------------------------------
def child_main(mode: str, ckpt: str, store: str, out: str) -> None:
    """Run by the child processes of the tests below (python -c ... MODE CKPT STORE OUT)."""
    if mode == "save-then-die":
        model, opt, sched = wrapped(0, "nvme", store)
        train(model, opt, 3, sched)
        save_checkpoint(ckpt, model, opt, step=3, extra={"batches": 3}, scheduler=sched)
        train(model, opt, 2, sched)
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "resume":
        model, opt, sched = wrapped(123, "nvme", store)  # another init: the checkpoint must replace it
        meta = load_checkpoint(ckpt, model, opt, scheduler=sched)
        assert meta["step"] == 3 and meta["extra"] == {"batches": 3}, meta
        train(model, opt, 6 - meta["step"], sched)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out)
    elif mode == "die-while-saving":
        os.makedirs(store, exist_ok=True)
        seed_all(0)
        m = mlp()
        opt = OffloadOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True),
                               config=OffloadConfig(state_tier="nvme", nvme_dirs=store, subgroup_numel=1024))
        train(m, opt, 2)
        save_checkpoint(ckpt, m, opt, step=2)
        train(m, opt, 1)
        real, count = CheckpointWriter.add, [0]

        def add(self, *a, **kw):
            count[0] += 1
            if count[0] == 6:  # some entries written, the manifest not yet
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *a, **kw)

        CheckpointWriter.add = add
        save_checkpoint(ckpt, m, opt, step=3)
    else:
        raise ValueError(mode)


def run_child(*args) -> subprocess.CompletedProcess:
    code = f"import sys; sys.path.insert(0, {HERE!r}); import test_checkpoint as t; t.child_main(*sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.slow
def test_sigkill_and_resume_in_a_new_process_is_bit_identical(tmp_path):
    """Params, grads and state on NVMe. A child trains 3 steps, checkpoints, trains on and is killed at step 5;
    a new process resumes from the checkpoint to step 6: every weight (biases, norms) and every state tensor
    equals an uninterrupted 6-step run, which needs the RNGs (dropout, data) and the LR scheduler restored."""
    with rng_kept():
        model, opt, sched = wrapped(0, "nvme", tmp_path / "ref")
        train(model, opt, 6, sched)
        ref = model.state_dict(), opt.state_dict()
        runtime_of(model).close()
    ckpt = tmp_path / "ckpt"
    r = run_child("save-then-die", ckpt, tmp_path / "store_a", "-")
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = run_child("resume", ckpt, tmp_path / "store_b", tmp_path / "final.pt")
    assert r.returncode == 0, r.stderr
    got = torch.load(tmp_path / "final.pt", weights_only=True)
    assert_same(got["model"], got["opt"], *ref)


# -- 2. across placements ------------------------------------------------------------------------------------------
def test_wrap_on_nvme_resumes_on_host_streaming(tmp_path):
    """Saved by a run with everything on NVMe, resumed by one with everything in host memory. The save holds at
    most one unit's weights or one subgroup's state in host buffers beyond what training holds anyway."""
    with rng_kept():
        model, opt, sched = wrapped(0, "nvme", tmp_path / "ref")
        train(model, opt, 6, sched)
        ref = model.state_dict(), opt.state_dict()
        runtime_of(model).close()

        model, opt, sched = wrapped(0, "nvme", tmp_path / "a")
        train(model, opt, 3, sched)
        rt = runtime_of(model)
        pool, peak, real = rt.pool, [0], rt.pool.acquire

        def acquire(*a, **kw):
            buf = real(*a, **kw)
            peak[0] = max(peak[0], pool.in_use_bytes)
            return buf

        pool.acquire = acquire
        rt.settle_step_io()  # the last step's writes land first (the save waits for them too): not the save's memory
        before = pool.in_use_bytes
        save_checkpoint(tmp_path / "ckpt", model, opt, step=3, scheduler=sched)
        pool.acquire = real
        largest = max([u.nbytes for u in rt.units] + [s.chunk_bytes for s in opt._subgroups])
        assert before < peak[0] <= before + (largest + 4095) // 4096 * 4096
        train(model, opt, 3, sched)  # saving changed nothing: the run goes on as if it had not saved
        assert_same(model.state_dict(), opt.state_dict(), *ref)
        rt.close()

        model, opt, sched = wrapped(7, "host", tmp_path / "b")
        meta = load_checkpoint(tmp_path / "ckpt", model, opt, scheduler=sched)
        assert meta["step"] == 3 and meta["config"]["state_tier"] == "nvme" and meta["optimizer"] == "AdamW"
        train(model, opt, 3, sched)
        assert_same(model.state_dict(), opt.state_dict(), *ref)
        runtime_of(model).close()


def test_offload_optimizer_to_plain_torch_and_back(tmp_path):
    """OffloadOptimizer with state on NVMe, params cut into pieces (the checkpoint holds entries covering ranges)
    -> plain torch AdamW; and plain AdamW -> OffloadOptimizer with state in host memory. Both equal plain."""
    def adamw(m):
        return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True)

    with rng_kept():
        seed_all(0)
        ref_m = mlp()
        ref_opt = adamw(ref_m)
        train(ref_m, ref_opt, 6)

        seed_all(0)
        m = mlp()
        os.makedirs(tmp_path / "s")
        off = OffloadOptimizer(adamw(m), config=OffloadConfig(state_tier="nvme", nvme_dirs=str(tmp_path / "s"),
                                                              subgroup_numel=1024))
        train(m, off, 3)
        save_checkpoint(tmp_path / "off", m, off, step=3)
        off.close()
        with CheckpointReader(tmp_path / "off") as r:
            starts = [e["start"] for e in r.meta["entries"] if e["name"] == "4.weight" and e["key"] == "exp_avg"]
            assert starts == [0, 1024, 2048, 3072]
            full = r.tensor("4.weight", "exp_avg")
            assert torch.equal(r.read("4.weight", "exp_avg", 1000, 2100), full.view(-1)[1000:2100])
        seed_all(1)
        m2 = mlp()
        plain = adamw(m2)
        load_checkpoint(tmp_path / "off", m2, plain)
        train(m2, plain, 3)
        assert_same(m2.state_dict(), plain.state_dict(), ref_m.state_dict(), ref_opt.state_dict())

        seed_all(0)
        m3 = mlp()
        plain3 = adamw(m3)
        train(m3, plain3, 3)
        save_checkpoint(tmp_path / "plain", m3, plain3, step=3)
        seed_all(2)
        m4 = mlp()
        off4 = OffloadOptimizer(adamw(m4), config=OffloadConfig(state_tier="host"))
        load_checkpoint(tmp_path / "plain", m4, off4)
        train(m4, off4, 3)
        assert_same(m4.state_dict(), off4.state_dict(), ref_m.state_dict(), ref_opt.state_dict())


def test_bf16_fp32_masters_round_trip(tmp_path):
    """bf16 params: the fp32 masters are saved (not re-derived from the bf16 weights, which would lose their low
    bits: DeepSpeed's failure) and resume bit-identically on another placement."""
    def make(seed, tier, d):
        os.makedirs(d, exist_ok=True)
        seed_all(seed)
        m = mlp(torch.bfloat16)
        return m, OffloadOptimizer(m.parameters(), torch.optim.AdamW, lr=1e-2, config=OffloadConfig(
            state_tier=tier, nvme_dirs=str(d), subgroup_numel=1024))

    with rng_kept():
        ref_m, ref_opt = make(0, "host", tmp_path)
        train(ref_m, ref_opt, 6, dtype=torch.bfloat16)
        m, opt = make(0, "nvme", tmp_path / "a")
        train(m, opt, 3, dtype=torch.bfloat16)
        save_checkpoint(tmp_path / "ckpt", m, opt)
        masters = opt.state_dict()["state"]
        with CheckpointReader(tmp_path / "ckpt") as r:
            for k, (name, p) in enumerate(m.named_parameters()):
                assert torch.equal(r.tensor(name, "master"), masters[k]["master"]), name
                assert r.info(name, "param")[1] == torch.bfloat16
            assert any(not torch.equal(r.tensor(n, "master"), p.float()) for n, p in m.named_parameters())
        opt.close()
        m2, opt2 = make(5, "host", tmp_path / "b")
        load_checkpoint(tmp_path / "ckpt", m2, opt2)
        train(m2, opt2, 3, dtype=torch.bfloat16)
        assert_same(m2.state_dict(), opt2.state_dict(), ref_m.state_dict(), ref_opt.state_dict())


def test_a_different_model_or_optimizer_is_refused_by_name(tmp_path):
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    train(m, opt, 1)
    save_checkpoint(tmp_path / "ckpt", m, opt)
    other = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.Dropout(0.1), nn.ReLU(), nn.Linear(64, 32),
                          nn.ReLU(), nn.Linear(32, 4))
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(CheckpointError, match=r"parameter '4.weight' was saved as float32 \[64, 64\], the model "
                                              r"has float32 \[32, 64\]"):
        load_checkpoint(tmp_path / "ckpt", other, torch.optim.AdamW(other.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters())), "nothing changes on a refusal"
    shorter = nn.Sequential(*list(mlp())[:5])
    with pytest.raises(CheckpointError, match=r"not in the model \['6.bias', '6.weight'\]"):
        load_checkpoint(tmp_path / "ckpt", shorter, torch.optim.AdamW(shorter.parameters()))
    with pytest.raises(CheckpointError, match="holds AdamW state; the optimizer is SGD"):
        load_checkpoint(tmp_path / "ckpt", m, torch.optim.SGD(m.parameters(), lr=0.1))


def test_loss_scaler_state_and_extra(tmp_path):
    """fp16's dynamic loss scale resumes where it was; ``extra`` must be JSON."""
    def make():
        m = mlp(torch.float16)
        return m, OffloadOptimizer(m.parameters(), torch.optim.AdamW, lr=1e-2,
                                   config=OffloadConfig(loss_scale="dynamic"))

    m, opt = make()
    opt.scale_loss(m(torch.randn(4, 16).half()).float().pow(2).mean()).backward()
    next(m.parameters()).grad[0, 0] = float("inf")
    opt.step()  # overflow: skipped, the scale halves
    opt.zero_grad()
    assert opt.loss_scale == 32768.0
    save_checkpoint(tmp_path / "ckpt", m, opt, extra={"epoch": 1, "offset": 123})
    m2, opt2 = make()
    assert load_checkpoint(tmp_path / "ckpt", m2, opt2)["extra"] == {"epoch": 1, "offset": 123}
    assert opt2.loss_scale == 32768.0
    m3 = mlp(torch.float16)
    with pytest.raises(CheckpointError, match="saved with fp16 loss scaling"):
        load_checkpoint(tmp_path / "ckpt", m3, OffloadOptimizer(m3.parameters(), torch.optim.AdamW, lr=1e-2))
    with pytest.raises(ValueError, match="extra must be JSON.*tensor"):
        save_checkpoint(tmp_path / "bad", m, opt, extra={"x": torch.ones(1)})
    assert not (tmp_path / "bad").exists()


# -- 3. the format's defences ---------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    train(m, opt, 2)
    path = save_checkpoint(tmp_path / "ckpt", m, opt, step=2)
    return path, m, opt


def edit_manifest(path, fn):
    man = json.loads((path / "manifest.json").read_text())
    fn(man)
    (path / "manifest.json").write_text(json.dumps(man))


def test_corrupt_byte_names_the_entry(saved):
    path, m, opt = saved
    man = json.loads((path / "manifest.json").read_text())
    e = next(e for e in man["entries"] if e["name"] == "4.weight" and e["key"] == "exp_avg_sq")
    with open(path / "data-00000.bin", "r+b") as f:
        f.seek(e["offset"] + 100)
        b = f.read(1)
        f.seek(e["offset"] + 100)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(CheckpointError, match=r"entry '4.weight' 'exp_avg_sq' \[0, 4096\).*CRC-32C.*corrupt"):
        load_checkpoint(path, m, opt)
    with CheckpointReader(path) as r, pytest.raises(CheckpointError, match="'4.weight' 'exp_avg_sq'"):
        r.verify()


def test_truncated_data_file_is_refused_before_loading(saved):
    path, m, opt = saved
    size = os.path.getsize(path / "data-00000.bin")
    os.truncate(path / "data-00000.bin", size - 10)
    before = [p.detach().clone() for p in m.parameters()]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1)
    with pytest.raises(CheckpointError, match="'data-00000.bin', which has .*: the file is truncated"):
        load_checkpoint(path, m, opt)
    assert all(torch.equal(a + 1, b) for a, b in zip(before, m.parameters())), "nothing loaded"


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "sub/../../x", "link"])
def test_paths_outside_the_checkpoint_are_refused(saved, tmp_path, bad):
    path, m, opt = saved
    (tmp_path / "outside").write_bytes(b"\0" * (1 << 20))
    os.symlink(tmp_path / "outside", path / "link")
    edit_manifest(path, lambda man: man["files"][0].update(path=bad))
    with pytest.raises(CheckpointError, match=r"refusing file path .*(plain relative name|outside the checkpoint)"):
        load_checkpoint(path, m, opt)


@pytest.mark.parametrize("change,match", [
    (lambda man: man.update(format="torch.save"), "expected format 'offload-checkpoint', got 'torch.save'"),
    (lambda man: man.update(version=2), "format version 2; this reader reads version 1"),
    (lambda man: man["files"][0].update(path="model.pt", encoding="pickle"), "encoding 'pickle'.*never holds pickles"),
    (lambda man: man["entries"][0].update(dtype="object"), "dtype 'object'"),
])
def test_foreign_or_pickle_manifests_are_refused(saved, change, match):
    path, m, opt = saved
    edit_manifest(path, change)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, m, opt)


def relabel(path, name, key, dtype):
    """Say in the manifest that ``name``/``key`` is ``dtype``: same width, so its size and CRC still match."""
    def fn(man):
        hits = [e for e in man["entries"] if e["name"] == name and e["key"] == key]
        assert hits, (name, key)
        for e in hits:
            e["dtype"] = dtype
    edit_manifest(path, fn)


@pytest.mark.parametrize("name,key,expected", [
    ("4.weight", "exp_avg", r"float32 \[64, 64\] \(what AdamW makes for a float32 \[64, 64\] parameter\)"),
    ("0.bias", "step", r"float32 \[\] \(what AdamW makes for a float32 \[64\] parameter\)"),
    ("4.weight", "param", r"float32 \[64, 64\] \(the manifest's record of parameter '4.weight'\)"),
], ids=["exp_avg", "step", "param"])
def test_an_entry_relabelled_to_another_dtype_of_the_same_width_is_refused(saved, name, key, expected):
    """float32 bytes read as int32 pass every size and CRC check; the resumed AdamW would train on them."""
    path, m, opt = saved
    relabel(path, name, key, "int32")
    m2 = mlp()
    before = [p.detach().clone() for p in m2.parameters()]
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, m2, opt2)
    msg = str(e.value)
    assert f"entry {name!r} {key!r} in 'data-00000.bin': expected" in msg and str(path) in msg
    assert re.search(expected + r", got int32 \[", msg), msg
    assert "the manifest was edited" in msg and "use another checkpoint" in msg
    assert all(torch.equal(a, b) for a, b in zip(before, m2.parameters())) and not opt2.state, "nothing loaded"


def test_relabelled_state_is_refused_by_offload_optimizer_and_wrap(saved, tmp_path):
    """The streamed loaders (OffloadOptimizer.load_state_stream, the runtime's load_params) are behind the same
    check: an int32 exp_avg would otherwise be kept as int32 in the chunk (it is not floating, so not cast)."""
    path, _, _ = saved
    relabel(path, "4.weight", "exp_avg_sq", "int32")
    m = mlp()
    with pytest.raises(CheckpointError, match=r"'4.weight' 'exp_avg_sq' .*expected float32 \[64, 64\].*got int32"):
        load_checkpoint(path, m, OffloadOptimizer(m.parameters(), torch.optim.AdamW, lr=1e-2,
                                                  config=OffloadConfig(subgroup_numel=1024)))
    m = mlp()
    os.makedirs(tmp_path / "store")
    model, opt = wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2),
                      OffloadConfig(param_tier="host", state_tier="nvme", nvme_dirs=str(tmp_path / "store")))
    with pytest.raises(CheckpointError, match=r"'4.weight' 'exp_avg_sq' .*expected float32 \[64, 64\]"):
        load_checkpoint(path, model, opt)


def test_state_of_a_low_precision_param_may_be_its_dtype_or_fp32_but_not_another(tmp_path):
    """bf16 params: AdamW makes bf16 state, offload keeps fp32 state beside fp32 masters; both load. fp16 (same
    width as bf16) is neither, and is refused; so is a master that is not fp32."""
    m = mlp(torch.bfloat16)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    train(m, opt, 1, dtype=torch.bfloat16)
    path = save_checkpoint(tmp_path / "ckpt", m, opt)
    relabel(path, "4.weight", "exp_avg", "float16")
    with pytest.raises(CheckpointError, match=r"expected bfloat16 or float32 \[64, 64\] .*got float16 \[64, 64\]"):
        load_checkpoint(path, m, torch.optim.AdamW(m.parameters(), lr=1e-2))
    off = OffloadOptimizer(m.parameters(), torch.optim.AdamW, lr=1e-2)
    train(m, off, 1, dtype=torch.bfloat16)
    path = save_checkpoint(tmp_path / "ckpt2", m, off)
    with CheckpointReader(path) as r:
        assert r.info("4.weight", "exp_avg")[1] == torch.float32  # fp32 state, saved as it is
    load_checkpoint(path, m, torch.optim.AdamW(m.parameters(), lr=1e-2))  # into plain bf16 AdamW: allowed
    relabel(path, "4.weight", "master", "int32")
    with pytest.raises(CheckpointError, match=r"'4.weight' 'master' .*expected float32 \[64, 64\].*got int32"):
        CheckpointReader(path)


def test_a_reshaped_state_entry_or_rng_entry_is_refused(saved):
    path, m, opt = saved
    edit_manifest(path, lambda man: [e.update(shape=[4096]) for e in man["entries"]
                                     if e["name"] == "4.weight" and e["key"] == "exp_avg"])
    with pytest.raises(CheckpointError, match=r"'4.weight' 'exp_avg' .*expected float32 \[64, 64\].*got float32 "
                                              r"\[4096\]"):
        load_checkpoint(path, m, opt)
    edit_manifest(path, lambda man: [e.update(shape=[64, 64]) for e in man["entries"] if e["key"] == "exp_avg"
                                     and e["name"] == "4.weight"])
    load_checkpoint(path, m, opt)  # restored: loads
    relabel(path, "rng.numpy", "state", "float64")
    with pytest.raises(CheckpointError, match=r"'rng.numpy' 'state' .*expected int64 \(a saved RNG state\), got "
                                              r"float64"):
        load_checkpoint(path, m, opt)


def test_a_torch_save_file_is_refused_unread(tmp_path):
    m = mlp()
    torch.save(m.state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="a file, not a checkpoint directory.*never unpickles"):
        load_checkpoint(tmp_path / "model.pt", m, torch.optim.AdamW(m.parameters()))


def test_owner_only_permissions_and_no_foreign_overwrite(saved, tmp_path):
    path, m, opt = saved
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    for f in os.listdir(path):
        assert stat.S_IMODE(os.stat(path / f).st_mode) == 0o600, f
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="exists and is not an offload checkpoint; refusing to replace it"):
        save_checkpoint(tmp_path / "mine", m, opt)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_disk_full_during_a_save_names_the_path_and_keeps_the_previous(saved, monkeypatch):
    path, m, opt = saved
    before = (path / "manifest.json").read_text()
    real, writes = os.write, [0]

    def write(fd, data):
        writes[0] += 1
        if writes[0] > 3:  # a few entries in: the disk fills up mid-save
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError) as e:
        save_checkpoint(path, m, opt, step=3)
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    msg = str(e.value)
    assert f"no space left on the file system of {path.parent}" in msg and f"while saving {path}" in msg
    assert f"free space there or save to another file system; the previous checkpoint at {path} is kept" in msg
    assert (path / "manifest.json").read_text() == before
    assert sorted(os.listdir(path.parent)) == ["ckpt"], "the temporary directory is gone"
    load_checkpoint(path, m, opt)


def test_real_small_fs_fills_up_during_a_save(tmp_path):
    from conftest import mounted

    with mounted(tmp_path / "mnt", "tmpfs", 32 << 10) as mnt:
        m = mlp()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        train(m, opt, 1)  # ~60 KB of weights and state: more than the file system holds
        with pytest.raises(OSError, match=rf"no space left on the file system of {mnt}/\.ckpt\.tmp-.*while saving "
                                          rf"{mnt}/ckpt: .*nothing was written at that path"):
            save_checkpoint(os.path.join(mnt, "ckpt"), m, opt)
        assert os.listdir(mnt) == []


def test_read_only_file_system_is_named_as_such(tmp_path, monkeypatch):
    def mkdir(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    m = mlp()
    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(OSError) as e:
        save_checkpoint(tmp_path / "ckpt", m, torch.optim.AdamW(m.parameters()))
    assert e.value.errno == errno.EROFS
    assert "is on a read-only file system: save ckpt to a directory on a writable one" in str(e.value)
    assert "permission" not in str(e.value).lower()


def test_reader_assembles_any_range_from_slices(tmp_path):
    """The layout a sharded run writes: each rank's slice of a parameter's state as its own entry. A reader
    with another rank count reads any range across them; a range nobody wrote is named."""
    full = torch.arange(20, dtype=torch.float32).view(4, 5)
    w = CheckpointWriter(tmp_path / "ckpt")
    for lo, hi in [(0, 7), (7, 12), (12, 20)]:
        w.add("w", "exp_avg", full.view(-1)[lo:hi], start=lo, shape=(4, 5))
    w.add("v", "exp_avg", full.view(-1)[:10], start=0, shape=(4, 5))
    w.commit({})
    with CheckpointReader(tmp_path / "ckpt") as r:
        assert torch.equal(r.tensor("w", "exp_avg"), full)
        for lo, hi in [(5, 15), (7, 12), (0, 1), (19, 20), (3, 3)]:
            assert torch.equal(r.read("w", "exp_avg", lo, hi), full.view(-1)[lo:hi]), (lo, hi)
        assert torch.equal(r.read("v", "exp_avg", 2, 9), full.view(-1)[2:9])
        with pytest.raises(CheckpointError, match=r"no data for 'v' 'exp_avg' elements \[10, 20\)"):
            r.read("v", "exp_avg")
        with pytest.raises(CheckpointError, match="no entry 'w' 'exp_avg_sq'"):
            r.read("w", "exp_avg_sq")


# -- 4. SIGKILL during a save -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    """A child saves at step 2, then is killed in the middle of saving step 3 to the same path: the step-2
    checkpoint is intact and loads to exactly the state of 2 plain steps; the next save clears the leftovers."""
    ckpt = tmp_path / "ckpt"
    r = run_child("die-while-saving", ckpt, tmp_path / "store", "-")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert list(tmp_path.glob(".ckpt.tmp-*")), "the killed save left its temporary directory"
    with rng_kept():
        seed_all(0)
        ref = mlp()
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
        train(ref, ref_opt, 2)
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    assert load_checkpoint(ckpt, m, opt)["step"] == 2
    assert_same(m.state_dict(), opt.state_dict(), ref.state_dict(), ref_opt.state_dict())
    save_checkpoint(ckpt, m, opt, step=2)
    assert not list(tmp_path.glob(".ckpt.tmp-*"))
