"""Shared fixtures of the storage tests: small stores, and small file systems for disk-full and read-only tests.

Everything runs on the CPU under ``tmp_path``. Tests that need ``mount`` (root, a kernel that allows it) skip
with the reason when it fails, so the suite passes on a CI machine without those rights.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from storage import NvmeStore, StoreConfig

SMALL = StoreConfig(block_bytes=16 << 10, workers=4)
"""16 KiB blocks: a chunk of a few hundred KiB has many blocks, so block-level bugs show on small tensors."""


@pytest.fixture
def store_dir(tmp_path):
    d = tmp_path / "store"
    d.mkdir()
    return d


@pytest.fixture
def store(store_dir):
    s = NvmeStore(store_dir, capacity_bytes=4 << 20, config=SMALL)
    yield s
    s.close()


@contextlib.contextmanager
def mounted(target, fstype: str, size_bytes: int, *, options: str = ""):
    """Mount a small ``tmpfs`` or loop ``ext4`` of ``size_bytes`` at ``target``; skip the test if we cannot."""
    target = str(target)
    os.makedirs(target, exist_ok=True)
    if fstype == "tmpfs":
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}" + (f",{options}" if options else ""), "tmpfs",
               target]
    elif fstype == "ext4":
        image = target + ".img"
        with open(image, "wb") as f:
            f.truncate(size_bytes)
        mkfs = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", image], capture_output=True, text=True, timeout=60)
        if mkfs.returncode != 0:
            pytest.skip(f"mkfs.ext4 failed ({mkfs.stderr.strip() or mkfs.returncode}); needs e2fsprogs")
        cmd = ["mount", "-o", "loop" + (f",{options}" if options else ""), image, target]
    else:
        raise ValueError(fstype)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("no mount command on this machine")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small {fstype} here ({r.stderr.strip() or r.returncode}); needs root")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", target], capture_output=True, timeout=60)
