"""Raw views of tensor memory, and aligned allocation.

The store moves bytes with ``os.preadv`` / ``os.pwritev`` straight into and out of tensor memory: the syscalls
take buffer objects, so we hand them a ``memoryview`` over the tensor's own bytes (no copy). O_DIRECT wants the
address, length and file offset 4 KiB-aligned; :func:`aligned_empty` gives memory that is.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import torch

from storage.alloc import ALIGN, round_up


def aligned_empty(nbytes: int, *, pin: bool = False, align: int = ALIGN) -> torch.Tensor:
    """A uint8 tensor of ``round_up(nbytes, align)`` bytes whose first byte is ``align``-aligned.

    ``pin=True`` allocates page-locked memory (needs CUDA). The result is a view into a slightly larger
    allocation, which it keeps alive.
    """
    padded = round_up(max(nbytes, 1), align)
    base = torch.empty(padded + align, dtype=torch.uint8, pin_memory=pin)
    skip = (-base.data_ptr()) % align
    return base[skip:skip + padded]


MMAP_THRESHOLD = 1 << 20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_mmap_threshold_set = False


def give_large_frees_back() -> bool:
    """Make glibc's malloc serve every allocation of ``MMAP_THRESHOLD`` (1 MiB) or more with a mapping of its own,
    unmapped when freed (``mallopt(M_MMAP_THRESHOLD)``), once per process; returns whether it is set.

    By default glibc raises that threshold to the size of each large block freed (up to 32 MiB), so the tensors
    of a training step that come and go at a few MiB to 32 MiB (a block's weights and grads, the optimizer's
    temporaries) are then carved from the heap, which fragments and is not given back: measured on a 0.52B Llama
    under offload.wrap (CPU, device 600 MiB + host 960 MiB budgets), RSS after two steps was 3851 MiB, against
    1680 MiB with the threshold fixed at 1 MiB (peak 4110 -> 2347 MiB; benchmarks/pretrained_check.py). A
    threshold the user set (``MALLOC_MMAP_THRESHOLD_``) is left alone; elsewhere than glibc nothing changes.
    The price: every such allocation page-faults fresh memory, each step (a 124M GPT's plain training step at
    1 x 64 on the 2-core VM: 0.85-0.93 s by default, 1.09-1.19 s with the threshold), so ``offload.wrap`` sets it
    only where memory is short (``OffloadRuntime._bound_malloc``)."""
    global _mmap_threshold_set
    if _mmap_threshold_set or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return _mmap_threshold_set
    try:
        libc = ctypes.CDLL("libc.so.6")
        _mmap_threshold_set = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc
        pass
    return _mmap_threshold_set


HUGE_PAGE = 2 << 20


def fresh_empty(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``round_up(nbytes)`` bytes in a new private anonymous mapping of its own, 2 MiB-aligned,
    with transparent huge pages requested before any page is touched (``madvise(MADV_HUGEPAGE)``).

    For buffers that disk transfers go through. A request carries a bounded number of memory segments (254 on our
    virtual disk), one per physically contiguous piece, so 4 KiB pages cap it at ~1 MiB and 2 MiB pages let it
    reach the device's maximum: a raw O_DIRECT loop here wrote 5.1 -> 6.6 GB/s and read 2.2 -> 2.9 GB/s. Asking
    malloc (``torch.empty``) is not enough: it may hand back memory freed earlier in the process, already
    touched as 4 KiB pages, which madvise no longer changes. Measured: after the optimizer benchmark's first
    phase freed ~2 GB, its NVMe pool's slabs came from the reused ``[heap]`` with 0% huge pages in 6 of 11
    processes, and the NVMe step ran ~10% slower in such a run. The mapping is unmapped when the tensor (and every view of it) is gone. Where THP is off,
    the pages are 4 KiB and nothing else changes. Not pinned: see HostPool for CUDA.
    """
    size = round_up(max(nbytes, 1))
    try:
        m = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, AttributeError, ValueError):  # no anonymous private mappings here: plain aligned memory
        return aligned_empty(size)
    base = torch.frombuffer(m, dtype=torch.uint8)  # holds a reference to the mapping
    skip = (-base.data_ptr()) % HUGE_PAGE
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and hasattr(m, "madvise"):
        try:
            m.madvise(advice, skip, size)
        except OSError:
            pass
    return base[skip:skip + size]


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous CPU tensor as a flat uint8 tensor sharing its memory (any dtype, bool too)."""
    assert t.is_contiguous(), "byte_view needs a contiguous tensor"
    if t.dtype == torch.uint8:
        return t.reshape(-1)
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    return flat.view(torch.uint8)


def memview(t: torch.Tensor, start: int = 0, length: int | None = None) -> memoryview:
    """A writable memoryview over ``length`` bytes of a contiguous CPU tensor's memory, from byte ``start``.

    Works for pinned memory and every dtype (numpy has no bfloat16). The caller keeps ``t`` alive while the view
    is in use: the view does not own the memory.
    """
    nbytes = t.numel() * t.element_size()
    if length is None:
        length = nbytes - start
    assert 0 <= start and start + length <= nbytes, (start, length, nbytes)
    if length == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_char * length).from_address(t.data_ptr() + start)).cast("B")


def is_aligned(t: torch.Tensor, align: int = ALIGN) -> bool:
    return t.data_ptr() % align == 0


CGROUP_ROOT = "/sys/fs/cgroup"
"""Where the cgroup file systems are mounted (v2 unified, or v1 with one directory per controller)."""
PROC_SELF_CGROUP = "/proc/self/cgroup"
"""This process's cgroups: ``0::/path`` for v2, ``N:memory:/path`` for v1's memory controller."""


def _cgroup_memory_limit() -> int | None:
    """The tightest memory limit of this process's cgroup and its ancestors, in bytes; ``None`` when there is none.

    A container's limit is its cgroup's ``memory.max`` (v2; ``max`` means none) or ``memory.limit_in_bytes`` (v1;
    a huge number means none). Where the cgroup is not mounted at its own path (a container without a cgroup
    namespace sees the host's tree) the walk up from that path reaches the mount's root, which is then the
    container's own cgroup. Unreadable files count as no limit: a process that cannot read them is not refused."""
    try:
        with open(PROC_SELF_CGROUP) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    candidates = []  # (directory of the hierarchy, cgroup path inside it, limit file)
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            for root in (CGROUP_ROOT, os.path.join(CGROUP_ROOT, "unified")):  # v2 alone, or beside v1 (hybrid)
                candidates.append((root, path, "memory.max"))
        elif "memory" in controllers.split(","):
            candidates.append((os.path.join(CGROUP_ROOT, "memory"), path, "memory.limit_in_bytes"))
    limits = []
    for root, path, name in candidates:
        parts = [p for p in path.strip("/").split("/") if p]
        for depth in range(len(parts), -1, -1):  # this cgroup, then each ancestor up to the mount's root
            try:
                with open(os.path.join(root, *parts[:depth], name)) as f:
                    text = f.read().strip()
            except OSError:
                continue
            if text.isdigit():
                limits.append(int(text))
    return min(limits) if limits else None


def available_host_bytes() -> int:
    """The host memory this process may use: the machine's RAM (psutil), or its cgroup's memory limit (a
    container's) when that is lower. Budgets computed from RAM alone would let a container be OOM-killed while
    the machine still has memory free. 0 when psutil cannot tell (callers treat 0 as unknown)."""
    try:
        import psutil

        total = int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - psutil missing or restricted: unknown, not an error
        return 0
    limit = _cgroup_memory_limit()
    return min(total, limit) if limit is not None else total
