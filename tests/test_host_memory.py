"""The host memory a process may use: the machine's RAM, or its container's cgroup limit when that is lower."""

from __future__ import annotations

import collections
import sys

import psutil
import pytest

import storage.memory
import torch

import offload
from offload.config import ConfigError, config_from_dict
from storage.memory import available_host_bytes

GiB = 1 << 30
V1_NO_LIMIT = "9223372036854771712"  # what cgroup v1 reports when no limit is set


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A machine with 64 GiB of RAM and a cgroup tree under ``tmp_path``; returns ``place(proc_cgroup, files)``."""
    vm = collections.namedtuple("vm", "total")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm(64 * GiB))
    monkeypatch.setattr(storage.memory, "CGROUP_ROOT", str(tmp_path / "cgroup"))
    monkeypatch.setattr(storage.memory, "PROC_SELF_CGROUP", str(tmp_path / "proc_self_cgroup"))

    def place(proc_cgroup: str, files: dict[str, str]) -> None:
        (tmp_path / "proc_self_cgroup").write_text(proc_cgroup)
        for rel, text in files.items():
            path = tmp_path / "cgroup" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
    return place


def test_v2_limit_below_ram_wins(machine):
    machine("0::/box\n", {"box/memory.max": str(8 * GiB)})
    assert available_host_bytes() == 8 * GiB


def test_v2_max_means_no_limit(machine):
    machine("0::/box\n", {"box/memory.max": "max"})
    assert available_host_bytes() == 64 * GiB


def test_a_tighter_ancestor_limits_too(machine):
    machine("0::/a/b\n", {"a/memory.max": str(2 * GiB), "a/b/memory.max": "max"})
    assert available_host_bytes() == 2 * GiB


def test_v1_memory_controller(machine):
    machine("5:cpu,cpuacct:/x\n4:memory:/x\n0::/\n",
            {"memory/x/memory.limit_in_bytes": str(3 * GiB), "memory/memory.limit_in_bytes": V1_NO_LIMIT})
    assert available_host_bytes() == 3 * GiB


def test_container_sees_its_own_cgroup_at_the_mount_root(machine):
    """Without a cgroup namespace the path names the host's tree, which the container does not have mounted."""
    machine("4:memory:/docker/abc\n", {"memory/memory.limit_in_bytes": str(4 * GiB)})
    assert available_host_bytes() == 4 * GiB


def test_no_cgroup_files_or_a_limit_above_ram_leave_ram(machine):
    machine("0::/box\n", {})
    assert available_host_bytes() == 64 * GiB
    machine("4:memory:/\n", {"memory/memory.limit_in_bytes": V1_NO_LIMIT})
    assert available_host_bytes() == 64 * GiB


def test_config_refuses_a_host_budget_above_the_cgroup_limit(machine):
    machine("0::/\n", {"memory.max": str(8 * GiB)})
    assert config_from_dict({"host_budget_bytes": 8 * GiB}).host_budget_bytes == 8 * GiB
    with pytest.raises(ConfigError, match=r"host_budget_bytes = \d+: more than the 8\.0 GiB of memory this process "
                                          r"may use .*cgroup limit.*lower it or leave it unset"):
        config_from_dict({"host_budget_bytes": 9 * GiB})


_FREED_PROBE = """
import sys, torch
from storage.memory import give_large_frees_back
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
if sys.argv[1] == "fixed":
    assert give_large_frees_back()
t = torch.ones(20 << 20, dtype=torch.uint8); del t   # a large free: glibc's dynamic threshold rises to 20 MiB
before = rss()
t = torch.ones(8 << 20, dtype=torch.uint8); del t    # 8 MiB then comes from the heap, unless the threshold is fixed
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_tensors_go_back_to_the_system_once_the_mmap_threshold_is_fixed():
    """What give_large_frees_back (called by offload.wrap) is for: by default, after a large tensor is freed glibc
    serves the next few-MiB tensors from the heap and keeps their memory when they are freed."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    kept = {mode: int(subprocess.run([sys.executable, "-c", _FREED_PROBE, mode], env=env, capture_output=True,
                                     text=True, check=True).stdout)
            for mode in ("default", "fixed")}
    if kept["default"] < 4 << 20:
        pytest.skip(f"this malloc gives freed memory back by itself ({kept})")
    assert kept["fixed"] < 1 << 20, kept


_POLICY_PROBE = """
import sys, tempfile, torch
import offload
from storage import memory
placement = sys.argv[1]
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
kw = dict(param_tier="host", state_tier="host")
if placement.startswith("nvme"):
    kw = dict(param_tier="nvme", state_tier="nvme", nvme_dirs=tempfile.mkdtemp())
if placement == "nvme-short":  # as if the model did not fit in the host's memory
    import offload.runtime
    offload.runtime.OffloadRuntime.host_short = lambda self: True
elif placement == "host-budget":
    kw["host_budget_bytes"] = 1 << 30
m, opt = offload.wrap(model, torch.optim.AdamW(model.parameters()), offload.OffloadConfig(**kw))
print(memory._mmap_threshold_set)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("placement, bounded", [("host", False), ("host-budget", True), ("nvme", False),
                                                ("nvme-short", True)])
def test_wrap_bounds_malloc_only_where_memory_is_short(placement, bounded):
    """The fixed threshold costs every large allocation a fresh mapping (page faults each step): wrap sets it
    when the host has a budget or the model needs NVMe for room, and leaves glibc's default otherwise (NVMe
    chosen for a model that fits in memory included)."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _POLICY_PROBE, placement], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(bounded)


def test_host_short_counts_params_grads_and_two_moments(tmp_path, monkeypatch):
    import offload.runtime as rt_mod
    from offload.runtime import runtime_of

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    model[1].requires_grad_(False)
    m, _ = offload.wrap(model, torch.optim.AdamW(model.parameters()),
                        offload.OffloadConfig(param_tier="nvme", state_tier="nvme", nvme_dirs=str(tmp_path)))
    rt = runtime_of(m)
    need = sum(u.nbytes + u.grad_nbytes for u in rt.units) + 8 * (64 * 64 + 64)  # moments of the trainable layer
    monkeypatch.setattr(rt_mod, "available_host_bytes", lambda: need)
    assert not rt.host_short()
    monkeypatch.setattr(rt_mod, "available_host_bytes", lambda: need - 1)
    assert rt.host_short()
    monkeypatch.setattr(rt_mod, "available_host_bytes", lambda: 0)  # unknown: short
    assert rt.host_short()
    rt.close()
