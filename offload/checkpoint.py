"""Checkpoints: save and resume a run whose weights and optimizer state live on the device, host memory and NVMe,
streaming them one unit / subgroup / parameter at a time instead of gathering them into memory first.

Why one module: the writer, the reader and the streamed loaders share one on-disk format, defined here once.

API
---
``save_checkpoint(path, model, optimizer, *, step=None, extra=None, scheduler=None) -> Path``
    Call between steps (after ``optimizer.step()``, before the next backward). ``model``/``optimizer``: a plain
    module and torch optimizer, a plain module and an :class:`~offload.OffloadOptimizer`, or the pair
    :func:`offload.wrap` returned. ``extra`` is the caller's JSON (data position, ...); ``scheduler`` an LR
    scheduler. Atomic: the previous checkpoint at ``path`` survives a crash at any moment.
    With a :class:`~offload.ShardedOffloadOptimizer`: on every rank (see "Sharded runs").
``load_checkpoint(path, model, optimizer, *, scheduler=None) -> dict``
    Loads into any of those pairs, whatever placement or world size saved it. Returns the metadata: ``step``,
    ``extra``, ``config`` (the saving run's OffloadConfig as JSON, or None), ``optimizer`` (class name),
    ``world`` (the saving world size), ``torch``. Weights, persistent buffers, optimizer state and
    hyperparameters, LR scheduler, loss scaler and the torch / numpy / python RNGs are restored; grads are not
    saved (as with torch's state dicts). Everything about the checkpoint and the model is checked before anything
    is changed; a chunk found corrupt while loading raises, naming it, and leaves the model partly loaded (load
    another checkpoint).
``CheckpointReader(path)``
    ``.read(name, key, start=None, stop=None)``: elements ``[start, stop)`` of a saved tensor, flattened,
    assembled from the entries that cover them; ``.tensor(name, key)`` the whole one in its shape;
    ``.optimizer_state_dict()`` a plain torch optimizer state dict; ``.verify()`` every checksum.

Format (version 1)
------------------
A directory holding ``manifest.json`` and raw data files (``data-00000.bin``). Each **entry** of the manifest
names a tensor by ``name`` (the fully-qualified name from ``model.named_parameters()`` / ``named_buffers()``, or
``rng.*``) and ``key`` (``"param"`` the weights in their own dtype, ``"buffer"``, an optimizer state key such as
``"exp_avg"`` or ``"step"``, ``"master"`` the fp32 master weights of a low-precision param, ``"state"`` for RNG),
and holds the elements ``[start, stop)`` of that tensor flattened (C order), with its full ``shape``, ``dtype``,
``file``, byte ``offset``, ``nbytes`` and ``crc32c``. An entry may cover a range only: a state-on-NVMe run writes
one entry per subgroup piece, and a sharded run (each rank owning a slice of every parameter's state) can write
its own slices, in its own data file, into one manifest; a reader with any rank count assembles any range.
Non-tensor state (an optimizer's Python ints) is in ``values``; hyperparameters, scheduler and small RNG parts
are JSON in the manifest. Nothing is ever unpickled; file paths must be plain names inside the directory.

Masters of fp32 params are not written (they equal the weights, saved as ``"param"``); loading gives a
master-keeping placement (fp32 params updated where they do not live: on the device for a CPU update, off it for
a device update) the weights as masters, so a checkpoint moves between placements.

Sharded runs
------------
With a :class:`~offload.ShardedOffloadOptimizer` both functions are collective: every rank of its process group
calls them, with the same ``path`` on a file system every rank sees. Saving: rank 0 makes the temporary
directory; each rank writes the ranges of the weights and of the state it owns (``shard_ranges()``) into its own
``data-<rank>.bin``, so the I/O of weights and state alike is spread over the ranks as training spreads it, and
rank 0 adds what no rank owns (frozen params, buffers). A per-parameter value (Adam's ``step``), held by every
rank that owns part of the parameter, is written once, by the owner of its first element. Each rank makes its
file durable; rank 0 merges the ranks' parts into one ``manifest.json`` (``files`` name the rank of each) and
commits as above; then every rank returns. Loading: each rank reads only the ranges it owns now, whatever world
size saved the checkpoint (the reader assembles a range across the saving ranks' entries), then the weights are
all-gathered as at the end of a step. A one-process checkpoint loads into a sharded run and a sharded one into
one process (plain optimizer, OffloadOptimizer or ``offload.wrap``). Every step that can fail (the checks, the
writes, the commit, the reads) is followed by an exchange: if it failed on one rank, every rank raises, naming
that rank, instead of waiting forever in a collective the failed rank will not join; a save that fails anywhere
leaves the previous checkpoint in place. A rank killed mid-save breaks its peers' next collective (gloo and
NCCL report a closed connection), so they raise, and rank 0 removes the temporary directory.

RNG: each rank saves its own generators (``rng.rank<r>.*``, with ``rng`` a list in rank order). Loading, rank
*r* restores saved rank *r*'s, also when the world size changes: a rank keeps its own random stream (dropout
masks, sampling) across a resume, which is all the resumed run can reproduce when the world size differs,
since the data and the masks are spread over other ranks. A rank the save did not have (rank 1 of a 1-process
checkpoint) keeps its own state, with a warning: giving it another rank's would make two ranks draw the same
numbers. Saved ranks beyond the new world are not used.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import inspect
import itertools
import json
import math
import os
import random
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import crc32c
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from offload.config import config_to_dict
from offload.distributed import ShardedOffloadOptimizer
from offload.optimizer import OffloadOptimizer, PieceSpan
from storage.memory import byte_view, memview

FORMAT = "offload-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
RAW = "raw"  # the only file encoding: bytes as in memory, little-endian on every machine we run on
RESERVED_KEYS = ("param", "buffer")
IMPL_FLAGS = ("fused", "foreach", "capturable", "differentiable")
"""Group keys that say how this process runs the update, not where training is: kept, not restored, so that a
checkpoint from one implementation (or from offload's own choice) loads into another."""
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128, torch.int8,
    torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, truncated, not ours, unsafe) or that does not fit the model."""


# -- writing ------------------------------------------------------------------------------------------------------
class CheckpointWriter:
    """Appends entries to a data file in a temporary sibling of ``path``; :meth:`commit` swaps it into place.

    The temporary directory is ``.<name>.tmp-<pid>-<random>`` next to ``path`` (same file system, so the final
    rename is atomic); a crash leaves it behind and the next save removes it once its process is gone. In a
    sharded save rank 0 creates it and commits; each other rank writes its own data file into it (``tmp=``,
    ``rank=``) and hands rank 0 its part of the manifest (:meth:`finish`).
    """

    def __init__(self, path: str | os.PathLike, *, tmp: str | os.PathLike | None = None, rank: int = 0):
        self.path = Path(path).absolute()
        self.rank = rank
        self.file = _data_file(rank)
        self._owns_tmp = tmp is None
        self._fd = None
        if tmp is None:
            if self.path.exists() and not _is_checkpoint(self.path):
                raise CheckpointError(f"save_checkpoint: {self.path} exists and is not an offload checkpoint; "
                                      f"refusing to replace it: choose a new path or remove it")
            with self._os_errors(self.path.parent):
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _remove_stale(self.path)
            self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            with self._os_errors(self.tmp):
                os.mkdir(self.tmp, 0o700)
                os.chmod(self.tmp, 0o700)  # mkdir's mode is filtered by the umask; never wider than owner-only
        else:
            self.tmp = Path(tmp)
            if not self.tmp.is_dir():
                raise CheckpointError(f"save_checkpoint: rank {rank} does not see {self.tmp}, the temporary "
                                      f"directory rank 0 made for {self.path}: every rank must pass the same path, "
                                      f"on a file system all ranks share")
        with self._os_errors(self.tmp / self.file):
            self._fd = os.open(self.tmp / self.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._offset = 0
        self._part: dict | None = None
        self._committed = False
        self.entries: list[dict] = []
        self.values: list[dict] = []

    def add(self, name: str, key: str, tensor: torch.Tensor, *, start: int = 0,
            shape: Sequence[int] | None = None) -> None:
        """Write ``tensor``'s values as elements ``[start, start + numel)`` of the flattened tensor of ``shape``
        (default: the tensor's own shape, whole)."""
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise NotImplementedError(f"checkpoint: {name!r} {key!r} has dtype {tensor.dtype}; supported: "
                                      f"{sorted(DTYPES)}")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        shape = tuple(t.shape) if shape is None else tuple(int(s) for s in shape)
        stop = start + t.numel()
        if not 0 <= start <= stop <= math.prod(shape):
            raise ValueError(f"checkpoint: {name!r} {key!r}: range [{start}, {stop}) is outside a tensor of shape "
                             f"{list(shape)}")
        mv = memview(byte_view(t))
        with self._os_errors(self.tmp / self.file):
            _write_all(self._fd, mv)
        self.entries.append({"name": name, "key": key, "dtype": dtype, "shape": list(shape), "start": start,
                             "stop": stop, "file": self.rank, "offset": self._offset, "nbytes": len(mv),
                             "crc32c": crc32c.crc32c(mv)})
        self._offset += len(mv)

    def add_value(self, name: str, key: str, value) -> None:
        """A non-tensor value (an optimizer's Python int, say), kept as JSON."""
        self.values.append({"name": name, "key": key, "value": _json_checked(value, f"{name!r} {key!r}")})

    def finish(self) -> dict:
        """Make this writer's data file durable and close it; returns its part of the manifest (the same part when
        called again)."""
        if self._part is None:
            with self._os_errors(self.tmp / self.file):  # a full disk can show only here (delayed allocation)
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            self._part = {"rank": self.rank, "file": self.file, "entries": self.entries, "values": self.values}
        return self._part

    def commit(self, meta: dict, parts: Sequence[dict] | None = None) -> Path:
        """Write the manifest, make everything durable, and swap the directory into place. ``parts``: in a
        sharded save, every rank's :meth:`finish` in rank order, each already durable (rank 0 commits)."""
        parts = [self.finish()] if parts is None else parts
        assert [p["rank"] for p in parts] == list(range(len(parts))), "parts out of rank order"
        files = [{"path": p["file"], "encoding": RAW, **({"rank": p["rank"]} if len(parts) > 1 else {})}
                 for p in parts]
        manifest = {"format": FORMAT, "version": VERSION, **meta, "files": files,
                    "entries": [e for p in parts for e in p["entries"]],
                    "values": [v for p in parts for v in p["values"]]}
        text = json.dumps(manifest, indent=1)
        self.finish()
        with self._os_errors(self.tmp / MANIFEST):
            fd = os.open(self.tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, memoryview(text.encode()))
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self.tmp)  # the directory's entries, before it becomes the checkpoint
        if not self.path.exists():
            os.rename(self.tmp, self.path)
        elif _exchange(self.tmp, self.path):  # atomic: there is always a complete checkpoint at path
            shutil.rmtree(self.tmp)
        else:  # no RENAME_EXCHANGE here (NFS, old kernels): a short window where path is missing
            old = self.path.parent / f".{self.path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(self.path, old)
            os.rename(self.tmp, self.path)
            shutil.rmtree(old)
        self._committed = True
        _fsync_dir(self.path.parent)
        return self.path

    @contextlib.contextmanager
    def _os_errors(self, where: Path) -> Iterator[None]:
        """A failed system call of the save, said with the file it hit and what to do: a bare ``[Errno 28] No
        space left on device`` names neither the file system nor the checkpoint. The OSError keeps its errno."""
        try:
            yield
        except OSError as e:
            kept = (f"; the previous checkpoint at {self.path} is kept" if _is_checkpoint(self.path) else
                    "; nothing was written at that path")
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                msg = (f"save_checkpoint: no space left on the file system of {where} ({e.strerror}) while saving "
                       f"{self.path}: free space there or save to another file system{kept}")
            elif e.errno == errno.EROFS:
                msg = (f"save_checkpoint: {where} is on a read-only file system: save {self.path.name} to a "
                       f"directory on a writable one{kept}")
            elif e.errno in (errno.EACCES, errno.EPERM):
                msg = (f"save_checkpoint: no permission to write {where} ({e.strerror}): fix the permissions of "
                       f"{where.parent} or save elsewhere{kept}")
            else:
                raise
            raise OSError(e.errno, msg) from e

    def abort(self) -> None:
        """Drop this save (after a commit: nothing to drop). The temporary directory goes with its creator's
        abort: in a sharded save, rank 0's."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._owns_tmp and not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                    step: int | None = None, extra: Any = None, scheduler=None) -> Path:
    """Save ``model``'s weights and buffers and ``optimizer``'s state to the directory ``path`` (see the module
    docstring), streaming: at most one unit's weights or one subgroup's state is read into memory at a time.
    With a :class:`~offload.ShardedOffloadOptimizer`, call it on every rank with the same ``path``."""
    ranks = _Ranks(optimizer)
    path = Path(path).absolute()
    writer = None
    try:
        with ranks.together("save_checkpoint") as mine:  # checks first, on every rank: none starts writing alone
            runtime = _runtime_of(model, optimizer)
            if ranks.sharded:
                optimizer.check_between_steps("save a checkpoint")
            names = _param_names(model)
            opt_params = [p for g in optimizer.param_groups for p in g["params"]]
            meta = _meta(model, optimizer, runtime, names, opt_params, step, extra, scheduler, ranks.world)
            if ranks.rank == 0:  # rank 0 makes the temporary directory every rank writes into
                writer = CheckpointWriter(path)
                mine["tmp"] = str(writer.tmp)
            mine["path"] = str(path)
        with ranks.together("save_checkpoint") as mine:  # each rank its own data file
            path0 = ranks.shared[0]["path"]
            if str(path) != path0:
                raise ValueError(f"save_checkpoint: every rank must pass the same path: rank 0 passed {path0}, rank "
                                 f"{ranks.rank} {path}")
            if writer is None:
                writer = CheckpointWriter(path, tmp=ranks.shared[0]["tmp"], rank=ranks.rank)
            _write_rank(writer, model, optimizer, runtime, names, opt_params, ranks.rank)
            mine["rng"] = _save_rng(writer, _rng_prefix(ranks.rank, ranks.world))
            mine["part"] = writer.finish()  # durable before rank 0 can commit it
        with ranks.together("save_checkpoint"):  # rank 0 commits; no rank returns before the checkpoint is in place
            if ranks.rank == 0:
                rngs = [m["rng"] for m in ranks.shared]
                meta["rng"] = rngs[0] if ranks.world == 1 else rngs
                writer.commit(meta, [m["part"] for m in ranks.shared])
        return path
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def _meta(model, optimizer, runtime, names, opt_params, step, extra, scheduler, world: int) -> dict:
    """The manifest's description of the run (everything but the entries and the RNG), after checking it."""
    extra = _json_checked(extra, "extra")
    for k, p in enumerate(opt_params):
        if p not in names:
            raise ValueError(f"save_checkpoint: optimizer parameter {k} is not a parameter of the model: pass the "
                             f"model the optimizer was built for")
    index = {p: k for k, p in enumerate(opt_params)}
    group_of = {p: gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
    groups = []
    for gi, g in enumerate(optimizer.param_groups):
        hp = {k: _json_checked(v, f"param group {gi} {k!r}") for k, v in g.items() if k != "params"}
        groups.append({**hp, "params": [names[p] for p in g["params"]]})
    return {
        "step": step, "extra": extra, "torch": torch.__version__, "world": world,
        "params": [{"name": n, "shape": list(_shape(p, runtime)), "dtype": _dtype_name(p),
                    "index": index.get(p), "group": group_of.get(p)} for p, n in names.items()],
        "buffers": [n for n, _ in _buffers(model)],
        "optimizer": {"class": _optimizer_class(optimizer).__name__, "param_groups": groups},
        "config": _config_json(optimizer),
        "scheduler": None if scheduler is None else _json_checked(scheduler.state_dict(), "scheduler.state_dict()"),
        "loss_scaler": optimizer.loss_scaler_state() if isinstance(optimizer, OffloadOptimizer) else None,
    }


def _write_rank(writer: CheckpointWriter, model, optimizer, runtime, names, opt_params, rank: int) -> None:
    """This rank's weights, buffers and optimizer state into ``writer``. A sharded rank writes the ranges it owns
    (so the weights' I/O is spread over the ranks like the state's, each to its own file); rank 0 also writes
    what no rank owns: frozen params and buffers (equal on every rank)."""
    if isinstance(optimizer, ShardedOffloadOptimizer):
        for span, view in optimizer.iter_params():
            writer.add(names[opt_params[span.index]], "param", view, start=span.start, shape=span.shape)
        params = ((p, p) for p in names if rank == 0 and not optimizer.sharded(p))
    else:
        params = runtime.iter_params() if runtime is not None else ((p, p) for p in names)
    for p, value in params:
        writer.add(names[p], "param", value)
    if rank == 0:
        for n, b in _buffers(model):
            writer.add(n, "buffer", b)
    for name, key, value, start, shape in _iter_optimizer_state(optimizer, opt_params, names):
        if torch.is_tensor(value):
            writer.add(name, key, value, start=start, shape=shape)
        else:
            writer.add_value(name, key, value)


def _iter_optimizer_state(optimizer, opt_params, names) -> Iterator[tuple]:
    """(name, key, value, start, full shape) for every piece of optimizer state, streamed."""
    def check(name, key):
        if key in RESERVED_KEYS:
            raise NotImplementedError(f"save_checkpoint: the optimizer keeps state {key!r} for {name!r}, a key the "
                                      f"checkpoint format reserves for the model ({RESERVED_KEYS})")

    if isinstance(optimizer, (OffloadOptimizer, ShardedOffloadOptimizer)):
        # Per-parameter values (Adam's step) come from every rank owning part of the parameter: the owner of its
        # first element writes the one copy.
        first = (None if isinstance(optimizer, OffloadOptimizer)
                 else {s.index for s in optimizer.shard_ranges() if s.start == 0})
        for span, key, value in optimizer.iter_state():
            p = opt_params[span.index]
            name = names[p]
            check(name, key)
            if key == "master" and _dtype_name(p) == "float32":
                continue  # equal to the weights, saved as "param"
            if torch.is_tensor(value) and value.dim() > 0 and value.numel() == span.stop - span.start:
                yield name, key, value, span.start, span.shape
            elif first is None or span.index in first:
                yield name, key, value, 0, None
        return
    for p in opt_params:
        for key, value in optimizer.state.get(p, {}).items():
            check(names[p], key)
            yield names[p], key, value, 0, None


# -- reading ------------------------------------------------------------------------------------------------------
class _Entry:
    __slots__ = ("id", "name", "key", "dtype", "shape", "start", "stop", "file", "offset", "nbytes", "crc")

    def __init__(self, i: int, e: dict, where: str, nfiles: int):
        def field(k, typ):
            v = e.get(k) if isinstance(e, dict) else None
            if not isinstance(v, typ) or isinstance(v, bool):  # JSON true is a Python int: never a valid field
                raise CheckpointError(f"{where}: entry {i} field {k!r}: expected {typ.__name__}, got {v!r}")
            return v
        self.id = i
        self.name, self.key = field("name", str), field("key", str)
        dtype = field("dtype", str)
        if dtype not in DTYPES:
            raise CheckpointError(f"{where}: entry {i} ({self.name!r} {self.key!r}) has dtype {dtype!r}; this reader "
                                  f"knows {sorted(DTYPES)}")
        self.dtype = DTYPES[dtype]
        shape = field("shape", list)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise CheckpointError(f"{where}: entry {i} ({self.name!r} {self.key!r}): bad shape {shape!r}")
        self.shape = tuple(shape)
        self.start, self.stop = field("start", int), field("stop", int)
        self.file, self.offset = field("file", int), field("offset", int)
        self.nbytes, self.crc = field("nbytes", int), field("crc32c", int)
        if not 0 <= self.start <= self.stop <= math.prod(self.shape):
            raise CheckpointError(f"{where}: {self}: range outside a tensor of shape {list(self.shape)}")
        if self.nbytes != (self.stop - self.start) * self.dtype.itemsize or self.offset < 0:
            raise CheckpointError(f"{where}: {self}: {self.nbytes} bytes at offset {self.offset} do not hold "
                                  f"{self.stop - self.start} elements of {dtype}")
        if not 0 <= self.file < nfiles:
            raise CheckpointError(f"{where}: {self}: file index {self.file}, but the manifest lists {nfiles} files")

    def __str__(self) -> str:
        return f"entry {self.name!r} {self.key!r} [{self.start}, {self.stop})"


class CheckpointReader:
    """Reads a checkpoint directory: validates its manifest and files on opening, checks each entry's CRC-32C as
    it is read. Use as a context manager (it keeps the data files open)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        where = f"checkpoint {self.path}"
        if not self.path.is_dir():
            hint = ""
            if self.path.is_file():
                hint = (": it is a file, not a checkpoint directory (a torch.save file? this loader reads only its "
                        "own format and never unpickles)")
            else:
                left = _siblings(self.path, ".old-")
                if left:
                    hint = f": a save was interrupted while replacing it; the previous checkpoint is {left[-1]}"
            raise CheckpointError(f"{where} not found{hint}")
        try:
            text = (self.path / MANIFEST).read_text()
        except FileNotFoundError:
            raise CheckpointError(f"{where}: no {MANIFEST}: not an offload checkpoint") from None
        try:
            m = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{where}: {MANIFEST} is not valid JSON ({e}): the checkpoint is damaged") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            got = m.get("format") if isinstance(m, dict) else type(m).__name__
            raise CheckpointError(f"{where}: expected format {FORMAT!r}, got {got!r}: not an offload checkpoint")
        if m.get("version") != VERSION:
            raise CheckpointError(f"{where}: format version {m.get('version')!r}; this reader reads version "
                                  f"{VERSION}: load it with the offload release that wrote it")
        self.meta = m
        files = m.get("files")
        if not isinstance(files, list) or not files:
            raise CheckpointError(f"{where}: expected a non-empty list of files, got {files!r}")
        self._fds: list[int] = []
        try:
            sizes, self._names = [], []
            root = os.path.realpath(self.path)
            for f in files:
                rel = f.get("path") if isinstance(f, dict) else None
                enc = f.get("encoding") if isinstance(f, dict) else None
                if enc != RAW:
                    raise CheckpointError(f"{where}: file {rel!r} has encoding {enc!r}; only {RAW!r} bytes are read "
                                          f"(a checkpoint never holds pickles)")
                full = _inside(root, rel, where)
                rank = f.get("rank")  # which rank of a sharded save wrote it: errors name it
                self._names.append(f"{rel!r}" + (f" (rank {rank}'s part of a {m.get('world')}-rank save)"
                                                 if isinstance(rank, int) else ""))
                try:
                    fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise CheckpointError(f"{where}: data file {self._names[-1]} is missing") from None
                self._fds.append(fd)
                sizes.append(os.fstat(fd).st_size)
            raw = m.get("entries")
            if not isinstance(raw, list):
                raise CheckpointError(f"{where}: expected a list of entries, got {type(raw).__name__}")
            self._entries = [_Entry(i, e, where, len(files)) for i, e in enumerate(raw)]
            self._by: dict[tuple[str, str], list[_Entry]] = {}
            for e in self._entries:
                if e.offset + e.nbytes > sizes[e.file]:
                    raise CheckpointError(f"{where}: {e} needs bytes [{e.offset}, {e.offset + e.nbytes}) of "
                                          f"{self._names[e.file]}, which has {sizes[e.file]}: the file is "
                                          f"truncated (an incomplete copy?)")
                self._by.setdefault((e.name, e.key), []).append(e)
            for es in self._by.values():
                es.sort(key=lambda e: e.start)
                for a, b in itertools.pairwise(es):
                    if a.shape != b.shape or a.dtype != b.dtype or b.start < a.stop:
                        raise CheckpointError(f"{where}: {a} and {b} disagree (shape, dtype) or overlap")
            self._check_params_record(where)
            self._values = {}
            for v in m.get("values", []):
                if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not isinstance(v.get("key"), str):
                    raise CheckpointError(f"{where}: bad value record {v!r}")
                self._values[(v["name"], v["key"])] = v.get("value")
        except BaseException:
            self.close()
            raise
        self._where = where
        self.verified: set[int] = set()

    # -- queries ------------------------------------------------------------------------------------------------
    def keys(self, name: str) -> list[str]:
        """The keys saved for ``name`` (tensors and values)."""
        return sorted({k for n, k in self._by if n == name} | {k for n, k in self._values if n == name})

    def has(self, name: str, key: str) -> bool:
        return (name, key) in self._by

    def info(self, name: str, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a saved tensor."""
        e = self._entries_for(name, key)[0]
        return e.shape, e.dtype

    def files(self, name: str, key: str) -> str:
        """The data file(s) holding a saved tensor, as error messages name them."""
        return ", ".join(dict.fromkeys(self._names[e.file] for e in self._entries_for(name, key)))

    def value(self, name: str, key: str):
        return self._values[(name, key)]

    def values(self, name: str) -> dict[str, Any]:
        return {k: v for (n, k), v in self._values.items() if n == name}

    def read(self, name: str, key: str, start: int | None = None, stop: int | None = None, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor ``name``/``key`` (default: all of it), from however
        many entries cover them, each checked against its CRC-32C. ``out``: a contiguous CPU tensor to read into
        (its shape is kept); returns it, or a new flat tensor."""
        es = self._entries_for(name, key)
        shape, dtype = es[0].shape, es[0].dtype
        numel = math.prod(shape)
        start = 0 if start is None else start
        stop = numel if stop is None else stop
        if not 0 <= start <= stop <= numel:
            raise ValueError(f"read {name!r} {key!r}: range [{start}, {stop}) is outside [0, {numel})")
        if out is None:
            out = torch.empty(stop - start, dtype=dtype)
        elif out.dtype != dtype or out.numel() != stop - start or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"read {name!r} {key!r}: out must be a contiguous CPU {dtype} tensor of {stop - start} "
                             f"elements, got {out.dtype} {list(out.shape)} on {out.device}")
        flat = out.view(-1)
        pos = start
        for e in es:
            if e.stop <= start or e.start >= stop or e.start == e.stop:
                continue
            if e.start > pos:
                break
            lo, hi = max(e.start, start), min(e.stop, stop)
            if (lo, hi) == (e.start, e.stop):
                self._read_entry(e, flat[lo - start:hi - start])
            else:
                flat[lo - start:hi - start].copy_(self._read_entry(e)[lo - e.start:hi - e.start])
            pos = hi
        if pos < stop:
            have = ", ".join(f"[{e.start}, {e.stop})" for e in es)
            raise CheckpointError(f"{self._where}: no data for {name!r} {key!r} elements [{pos}, {stop}) (entries "
                                  f"cover {have}): the run that wrote it did not save that range")
        return out

    def tensor(self, name: str, key: str) -> torch.Tensor:
        """The whole tensor in its shape."""
        return self.read(name, key).view(self.info(name, key)[0])

    def verify(self, rank: int = 0, world: int = 1) -> None:
        """Check the CRC-32C of every entry not checked yet (one entry in memory at a time); with ``world`` > 1,
        only this ``rank``'s 1/world of them (every rank of a sharded load checks its own share)."""
        for e in self._entries[rank::world]:
            if e.id not in self.verified:
                self._read_entry(e)

    def optimizer_state_dict(self, groups: Sequence[Sequence[str]] | None = None, *, masters: bool = False) -> dict:
        """A plain torch optimizer state dict (``load_state_dict`` of the saved class takes it). ``groups``: the
        parameter names of each param group in the target optimizer's order (default: as saved); parameters are
        numbered in that order. ``masters``: include ``"master"`` entries (plain optimizers keep none)."""
        saved = self.meta["optimizer"]["param_groups"]
        groups = [g["params"] for g in saved] if groups is None else groups
        if len(groups) != len(saved):
            raise CheckpointError(f"{self._where}: saved with {len(saved)} param groups, the optimizer has "
                                  f"{len(groups)}")
        state, out_groups, k = {}, [], 0
        for g, names in zip(saved, groups):
            ids = []
            for name in names:
                entry = {}
                for key in self.keys(name):
                    if key in RESERVED_KEYS or key == "master" and not masters:
                        continue
                    entry[key] = self.tensor(name, key) if self.has(name, key) else self.value(name, key)
                if entry:
                    state[k] = entry
                ids.append(k)
                k += 1
            out_groups.append({**{key: v for key, v in g.items() if key != "params"}, "params": ids})
        return {"state": state, "param_groups": out_groups}

    # -- internals ----------------------------------------------------------------------------------------------
    def _check_params_record(self, where: str) -> None:
        """Each parameter's weights (and fp32 masters) as the manifest's own record of the parameter says: so that
        a reader used without a model never hands out an entry whose dtype was edited (its bytes, size and CRC
        stay the same)."""
        records = self.meta.get("params")
        if not isinstance(records, list):
            return  # written by CheckpointWriter alone: no record to hold the entries to
        for rec in records:
            if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
                raise CheckpointError(f"{where}: bad parameter record {rec!r}")
            for key, dtype in (("param", rec.get("dtype")), ("master", "float32")):
                es = self._by.get((rec["name"], key))
                if es and (_dtype_str(es[0].dtype) != dtype or list(es[0].shape) != rec.get("shape")):
                    raise CheckpointError(
                        f"{where}: entry {rec['name']!r} {key!r} in {self._names[es[0].file]}: expected {dtype} "
                        f"{rec.get('shape')} (the manifest's record of parameter {rec['name']!r}), got "
                        f"{_dtype_str(es[0].dtype)} {list(es[0].shape)}: the manifest was edited; use another "
                        f"checkpoint")

    def _entries_for(self, name: str, key: str) -> list[_Entry]:
        es = self._by.get((name, key))
        if not es:
            raise CheckpointError(f"{self._where}: no entry {name!r} {key!r} (keys saved for {name!r}: "
                                  f"{self.keys(name) or 'none'})")
        return es

    def _read_entry(self, e: _Entry, out: torch.Tensor | None = None) -> torch.Tensor:
        """Entry ``e``'s elements (into ``out``, contiguous, when given), after checking their CRC-32C."""
        if out is None:
            out = torch.empty(e.stop - e.start, dtype=e.dtype)
        mv = memview(byte_view(out))
        got = 0
        while got < e.nbytes:
            n = os.preadv(self._fds[e.file], [mv[got:]], e.offset + got)
            if n == 0:
                raise CheckpointError(f"{self._where}: {e}: {self._names[e.file]} ended early (truncated while "
                                      f"reading?)")
            got += n
        crc = crc32c.crc32c(mv)
        if crc != e.crc:
            raise CheckpointError(f"{self._where}: {e} in {self._names[e.file]} at byte {e.offset}: CRC-32C "
                                  f"{crc:#010x}, expected {e.crc:#010x}: the data is corrupt; restore the file or "
                                  f"use another checkpoint")
        self.verified.add(e.id)
        return out

    def close(self) -> None:
        for fd in getattr(self, "_fds", []):
            os.close(fd)
        self._fds = []

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                    scheduler=None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` and ``optimizer`` (any placement, any
    world size); returns its metadata (``step``, ``extra``, ``config``, ``world``, ...). With a
    :class:`~offload.ShardedOffloadOptimizer`, call it on every rank. See the module docstring."""
    ranks = _Ranks(optimizer)
    reader = None
    try:
        with ranks.together("load_checkpoint"):  # every rank checks everything before any rank changes anything
            runtime = _runtime_of(model, optimizer)
            if runtime is not None:
                runtime.check_between_steps("load a checkpoint")
            if ranks.sharded:
                optimizer.check_between_steps("load a checkpoint")
            reader = CheckpointReader(path)
            meta = reader.meta
            if not isinstance(meta.get("params"), list) or not isinstance(meta.get("optimizer"), dict):
                raise CheckpointError(f"checkpoint {reader.path} holds no model and optimizer (written by "
                                      f"CheckpointWriter alone?): read it with CheckpointReader")
            names = _param_names(model)
            _check_model(reader, model, names, runtime)
            opt_names = _check_optimizer(reader, optimizer, names)
            _check_entries(reader, model, optimizer, names, runtime)
            if scheduler is not None and meta.get("scheduler") is None:
                raise CheckpointError(f"checkpoint {reader.path} has no LR scheduler state, but scheduler= was "
                                      f"given: it was saved without scheduler=")
            if meta.get("loss_scaler") is not None and getattr(optimizer, "loss_scale", None) is None:
                raise CheckpointError(f"checkpoint {reader.path} was saved with fp16 loss scaling; resume with "
                                      f"OffloadOptimizer and OffloadConfig(loss_scale=...) as it was saved")

        # Weights first: OffloadOptimizer seeds masters it was not given from them. A sharded rank reads the ranges
        # it owns, then the all-gather gives every rank all of them, as at the end of a step.
        with ranks.together("load_checkpoint"), torch.no_grad():
            if ranks.sharded:
                for span, view in optimizer.iter_params():
                    _read_into(reader, opt_names[span.index], "param", view, span.start, span.stop)
                whole = [(p, name) for p, name in names.items() if not optimizer.sharded(p)]
            elif runtime is not None:
                runtime.load_params(lambda p, out: reader.read(names[p], "param", out=out))
                whole = []
            else:
                whole = names.items()
            for p, name in whole:
                _read_into(reader, name, "param", p.data)
            for n, b in _buffers(model):
                _read_into(reader, n, "buffer", b)
        if ranks.sharded:
            optimizer.gather_params()

        with ranks.together("load_checkpoint"):
            if isinstance(optimizer, (OffloadOptimizer, ShardedOffloadOptimizer)):  # each piece's own range
                optimizer.load_state_stream(
                    lambda span, master: _fetch(reader, opt_names[span.index], span, master))
                if isinstance(optimizer, OffloadOptimizer):
                    optimizer.load_loss_scaler_state(meta.get("loss_scaler"))
                for mine, saved in zip(optimizer.param_groups, meta["optimizer"]["param_groups"]):
                    _restore_hparams(mine, saved)
            else:
                sd = reader.optimizer_state_dict([[names[p] for p in g["params"]] for g in optimizer.param_groups])
                for mine, g in zip(optimizer.param_groups, sd["param_groups"]):
                    g.update({k: mine[k] for k in IMPL_FLAGS if k in mine})
                    for k, v in g.items():  # JSON has no tuples (betas): give back the optimizer's own types
                        if isinstance(mine.get(k), tuple) and isinstance(v, list):
                            g[k] = tuple(v)
                optimizer.load_state_dict(sd)
            if scheduler is not None:
                scheduler.load_state_dict(meta["scheduler"])
            _load_rng(reader, ranks.rank, ranks.world)
            reader.verify(ranks.rank, ranks.world)  # entries no rank needed (masters, ...) are checked too
    finally:
        if reader is not None:
            reader.close()
    return {k: meta.get(k) for k in ("step", "extra", "config", "torch")} | {
        "optimizer": meta["optimizer"]["class"], "world": meta.get("world", 1), "path": str(reader.path)}


def _fetch(reader: CheckpointReader, name: str, span: PieceSpan, master: bool) -> dict:
    """One optimizer piece's state from the checkpoint, in the form OffloadOptimizer.load_state_stream takes."""
    out: dict[str, Any] = {}
    for key in reader.keys(name):
        if key in RESERVED_KEYS or key == "master" and not master:
            continue
        if not reader.has(name, key):
            out[key] = reader.value(name, key)
            continue
        shape, _ = reader.info(name, key)
        if span.whole or shape != span.shape:  # whole, or a per-parameter scalar (step) of a sliced param
            out[key] = reader.tensor(name, key)
        else:
            out[key] = reader.read(name, key, span.start, span.stop)
    if master and "master" not in out and reader.info(name, "param")[1] == torch.float32:
        out["master"] = reader.read(name, "param", span.start, span.stop)  # an fp32 param's master is its weights
    return out


def _read_into(reader: CheckpointReader, name: str, key: str, dst: torch.Tensor, start: int | None = None,
               stop: int | None = None) -> None:
    if dst.device.type == "cpu" and dst.is_contiguous():
        reader.read(name, key, start, stop, out=dst)
    else:
        dst.copy_(reader.read(name, key, start, stop).view(dst.shape))


def _restore_hparams(mine: dict, saved: dict) -> None:
    for k, v in saved.items():
        if k == "params" or k in IMPL_FLAGS:
            continue
        mine[k] = tuple(v) if isinstance(mine.get(k), tuple) and isinstance(v, list) else v


# -- checks -------------------------------------------------------------------------------------------------------
def _check_model(reader: CheckpointReader, model: nn.Module, names: dict, runtime) -> None:
    saved = {p["name"]: p for p in reader.meta.get("params", [])}
    mine = {n: p for p, n in names.items()}
    missing, unexpected = sorted(mine.keys() - saved.keys()), sorted(saved.keys() - mine.keys())
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {reader.path} is for a different model: parameters not in the checkpoint "
                              f"{missing[:5]}, in the checkpoint but not in the model {unexpected[:5]}")
    for n, p in mine.items():
        shape, dtype = list(_shape(p, runtime)), _dtype_name(p)
        if saved[n]["shape"] != shape or saved[n]["dtype"] != dtype:
            raise CheckpointError(f"checkpoint {reader.path} is for a different model: parameter {n!r} was saved as "
                                  f"{saved[n]['dtype']} {saved[n]['shape']}, the model has {dtype} {shape}")
    bufs = {n for n, _ in _buffers(model)}
    if bufs != set(reader.meta.get("buffers", [])):
        raise CheckpointError(f"checkpoint {reader.path} is for a different model: buffers differ "
                              f"({sorted(bufs ^ set(reader.meta.get('buffers', [])))[:5]})")


def _check_optimizer(reader: CheckpointReader, optimizer, names: dict) -> list[str]:
    """The optimizer's parameter names in its order, after checking it matches the saved one."""
    saved = reader.meta["optimizer"]
    cls = _optimizer_class(optimizer).__name__
    if saved["class"] != cls:
        raise CheckpointError(f"checkpoint {reader.path} holds {saved['class']} state; the optimizer is {cls}")
    groups = optimizer.param_groups
    if len(groups) != len(saved["param_groups"]):
        raise CheckpointError(f"checkpoint {reader.path}: saved with {len(saved['param_groups'])} param groups, the "
                              f"optimizer has {len(groups)}")
    out = []
    for gi, (g, sg) in enumerate(zip(groups, saved["param_groups"])):
        here = []
        for k, p in enumerate(g["params"]):
            if p not in names:
                raise ValueError(f"load_checkpoint: optimizer parameter {k} of group {gi} is not a parameter of the "
                                 f"model")
            here.append(names[p])
        if set(here) != set(sg["params"]):
            diff = sorted(set(here) ^ set(sg["params"]))
            raise CheckpointError(f"checkpoint {reader.path}: param group {gi} differs from the saved one in "
                                  f"{diff[:5]}: build the optimizer's groups as the saving run did")
        out += here
    return out


def _check_entries(reader: CheckpointReader, model: nn.Module, optimizer, names: dict, runtime) -> None:
    """Every tensor entry's dtype and shape against what will receive it: the param, the buffer, the state the
    optimizer class makes for that param, the RNG. The data's CRC cannot catch an edited manifest (a float32 entry
    relabelled int32 has the same bytes and size): loading it would reinterpret the bits, and a plain optimizer
    would train on them without a word."""
    for n, b in _buffers(model):
        _expect(reader, n, "buffer", {"tensor": True, "shape": tuple(b.shape), "dtypes": {b.dtype}}, "the model's")
    probes: dict = {}
    saved_groups = reader.meta["optimizer"]["param_groups"]
    opt_group = {p: gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
    for p, n in names.items():
        shape = _shape(p, runtime)
        _expect(reader, n, "param", {"tensor": True, "shape": shape, "dtypes": {p.dtype}}, "the model's")
        if reader.has(n, "master"):
            _expect(reader, n, "master", {"tensor": True, "shape": shape, "dtypes": {torch.float32}},
                    "fp32 master weights")
        gi = opt_group.get(p)
        if gi is None:
            continue
        made = probes.get((gi, p.dtype, shape))
        if made is None:
            hp = {k: v for k, v in optimizer.param_groups[gi].items() if k != "params"}
            _restore_hparams(hp, saved_groups[gi])  # the hyperparameters the load will give (amsgrad adds state)
            made = probes[(gi, p.dtype, shape)] = _state_made(_optimizer_class(optimizer), hp, p.dtype, shape)
        cls = _optimizer_class(optimizer).__name__
        for key, want in made.items():
            if key in reader.keys(n):
                _expect(reader, n, key, want, f"what {cls} makes for a {_dtype_name(p)} {list(shape)} parameter")
    _check_rng_entries(reader)


def _state_made(cls: type, hparams: dict, dtype: torch.dtype, shape: tuple[int, ...]) -> dict[str, dict]:
    """The state ``cls`` makes for a param of ``dtype`` and ``shape``, per key: ``{"tensor": bool, "shape": tuple
    or None (unknown), "dtypes": set or None}``. Learnt from one step of the class itself, on a meta tensor (no
    memory, no arithmetic), so any class is described as it really behaves. Floating state of a low-precision
    param may also be fp32: offload keeps it beside fp32 masters, and torch's load_state_dict casts it back.
    A class whose step cannot run on meta tensors (it calls ``.item()``) is probed on a real tensor of that
    shape when small, else on a small one that tells the dtypes but not the shapes. A class that cannot be
    probed at all (a step that needs a closure) gives ``{}``: its state is loaded unchecked, as torch would."""
    out: dict[str, dict] = {}
    dtypes = [dtype] + ([torch.float32] if dtype.is_floating_point and dtype != torch.float32 else [])
    for dt in dtypes:
        state, exact = _probe_state(cls, hparams, dt, shape)
        for key, v in state.items():
            tensor = torch.is_tensor(v)
            want = out.setdefault(key, {"tensor": tensor, "shape": None, "dtypes": set() if tensor else None})
            if tensor and want["tensor"]:
                want["dtypes"].add(v.dtype)
                if exact or v.dim() == 0:
                    want["shape"] = tuple(v.shape)
    return out


def _probe_state(cls: type, hparams: dict, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[dict, bool]:
    """(the state after one step of ``cls`` on a zero-grad param, whether its shapes are those of ``shape``)."""
    accepted = inspect.signature(cls.__init__).parameters
    hp = {k: v for k, v in hparams.items() if k not in IMPL_FLAGS}  # the default implementation works on meta
    small = tuple(min(d, 2) for d in shape)
    for device, probe_shape in (("meta", shape), ("cpu", shape if math.prod(shape) <= 1 << 16 else small)):
        try:
            p = torch.zeros(probe_shape, dtype=dtype, device=device, requires_grad=True)
            opt = cls([p], **{k: v for k, v in hp.items() if k in accepted})
            opt.param_groups[0].update(hp)
            p.grad = torch.zeros_like(p)
            opt.step()
            return dict(opt.state[p]), probe_shape == shape
        except Exception:  # noqa: BLE001 - a class that cannot take this probe: try the next, then check nothing
            continue
    return {}, False


def _expect(reader: CheckpointReader, name: str, key: str, want: dict, what: str) -> None:
    """Raise, naming the entry, its file and both sides, unless the saved ``name``/``key`` is what ``want`` says
    (see :func:`_state_made`). Absent entries are someone else's to report."""
    if not reader.has(name, key):
        if want["tensor"] and (name, key) in reader._values:
            raise CheckpointError(f"checkpoint {reader.path}: {name!r} {key!r} is saved as the value "
                                  f"{reader.value(name, key)!r}; expected a tensor ({what}): the manifest was "
                                  f"edited or written for another optimizer; use another checkpoint")
        return
    shape, dtype = reader.info(name, key)
    if not want["tensor"]:
        raise CheckpointError(f"checkpoint {reader.path}: {name!r} {key!r} is saved as a {_dtype_str(dtype)} "
                              f"{list(shape)} tensor in {reader.files(name, key)}; expected a plain value "
                              f"({what}): use a checkpoint written for this optimizer")
    if (want["dtypes"] is None or dtype in want["dtypes"]) and (want["shape"] is None or shape == want["shape"]):
        return
    expected = " or ".join(sorted(_dtype_str(d) for d in want["dtypes"])) if want["dtypes"] else "any dtype"
    if want["shape"] is not None:
        expected += f" {list(want['shape'])}"
    raise CheckpointError(f"checkpoint {reader.path}: entry {name!r} {key!r} in {reader.files(name, key)}: expected "
                          f"{expected} ({what}), got {_dtype_str(dtype)} {list(shape)}. The data's checksums cannot "
                          f"catch this (the manifest says how to read the bytes): the manifest was edited or belongs "
                          f"to another run; use another checkpoint")


def _check_rng_entries(reader: CheckpointReader) -> None:
    """The RNG entries as :func:`_save_rng` writes them (torch's and CUDA's states are bytes; numpy's and
    python's Mersenne Twister keys int64)."""
    for (name, key) in list(reader._by):
        if not name.startswith("rng.") or key != "state":
            continue
        leaf = name.rsplit(".", 1)[-1]
        kind = name.split(".")[-2] if leaf.isdigit() else leaf  # rng[.rankR].cuda.<i>
        want = {"torch": torch.uint8, "cuda": torch.uint8, "numpy": torch.int64, "python": torch.int64}.get(kind)
        if want is not None:
            _expect(reader, name, key, {"tensor": True, "shape": None, "dtypes": {want}}, "a saved RNG state")


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- helpers ------------------------------------------------------------------------------------------------------
def _runtime_of(model: nn.Module, optimizer):
    runtime = getattr(model, "_offload_runtime", None)
    if runtime is not None and optimizer is not runtime.optimizer:
        raise ValueError("checkpoint: the model is wrapped by offload.wrap; pass the optimizer wrap returned")
    if runtime is None and isinstance(optimizer, OffloadOptimizer) and optimizer.runtime is not None:
        raise ValueError("checkpoint: the optimizer comes from offload.wrap; pass the model wrap returned")
    return runtime


def _param_names(model: nn.Module) -> dict[nn.Parameter, str]:
    """Each parameter's first fully-qualified name (tied weights are one parameter, saved once)."""
    return {p: n for n, p in model.named_parameters()}


def _shape(p: nn.Parameter, runtime) -> tuple[int, ...]:
    if runtime is not None:  # released params are empty tensors; the unit recorded the shapes
        return runtime.param_shape(p)
    return tuple(p.shape)


def _dtype_name(p: nn.Parameter) -> str:
    return _dtype_str(p.dtype)


def _buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers ``model.state_dict()`` holds (persistent ones)."""
    out = []
    for n, b in model.named_buffers():
        mod_name, _, leaf = n.rpartition(".")
        if leaf not in model.get_submodule(mod_name)._non_persistent_buffers_set:
            out.append((n, b))
    return out


def _optimizer_class(optimizer) -> type:
    return (optimizer.optimizer_class if isinstance(optimizer, (OffloadOptimizer, ShardedOffloadOptimizer))
            else type(optimizer))


def _config_json(optimizer) -> dict | None:
    """The saving run's OffloadConfig, in the form a config file or ``offload run`` takes."""
    return (config_to_dict(optimizer.config) if isinstance(optimizer, (OffloadOptimizer, ShardedOffloadOptimizer))
            else None)


def _json_checked(value, what: str):
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint: {what} must be JSON (dict, list, str, number, bool, None), got {value!r} "
                         f"({e}); tensors belong in the model or optimizer") from None
    return value


def _rng_prefix(rank: int, world: int) -> str:
    """The RNG entries' names: ``rng.torch``, ... for one process; ``rng.rank<r>.torch``, ... for rank ``r`` of a
    sharded save (a world-1 save is a one-process checkpoint)."""
    return "rng." if world == 1 else f"rng.rank{rank}."


def _save_rng(writer: CheckpointWriter, prefix: str) -> dict:
    """torch, CUDA, numpy and python RNG states as raw entries (never pickled); their small parts as JSON."""
    writer.add(f"{prefix}torch", "state", torch.get_rng_state())
    cuda = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            writer.add(f"{prefix}cuda.{i}", "state", s)
        cuda = torch.cuda.device_count()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    writer.add(f"{prefix}numpy", "state", torch.from_numpy(keys.astype(np.int64)))
    version, internal, gauss_next = random.getstate()
    writer.add(f"{prefix}python", "state", torch.tensor(internal, dtype=torch.int64))
    return {"cuda": cuda, "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                                    "cached_gaussian": float(cached)},
            "python": {"version": version, "gauss_next": gauss_next}}


def _load_rng(reader: CheckpointReader, rank: int, world: int) -> None:
    """This rank's RNGs: rank ``r`` restores saved rank ``r``'s, whatever the two world sizes (the module
    docstring says why); a rank the save did not have keeps its own, with a warning."""
    saved = reader.meta.get("rng") or {}
    per_rank = saved if isinstance(saved, list) else [saved]
    if not all(isinstance(r, dict) for r in per_rank):
        raise CheckpointError(f"checkpoint {reader.path}: bad RNG record {saved!r}")
    if rank >= len(per_rank):
        warnings.warn(f"load_checkpoint: the checkpoint has the RNG states of {len(per_rank)} rank(s); this is rank "
                      f"{rank} of {world}, which keeps its own RNG state (another rank's would repeat that rank's "
                      f"random numbers: dropout masks, sampling)", RuntimeWarning, stacklevel=3)
        return
    rng, prefix = per_rank[rank], _rng_prefix(rank, len(per_rank))
    if reader.has(f"{prefix}torch", "state"):
        torch.set_rng_state(reader.tensor(f"{prefix}torch", "state"))
    if rng.get("cuda"):
        if torch.cuda.is_available() and torch.cuda.device_count() == rng["cuda"]:
            torch.cuda.set_rng_state_all([reader.tensor(f"{prefix}cuda.{i}", "state") for i in range(rng["cuda"])])
        else:
            warnings.warn(f"load_checkpoint: the checkpoint has the RNG state of {rng['cuda']} CUDA devices and this "
                          f"process sees {torch.cuda.device_count() if torch.cuda.is_available() else 0}; CUDA RNG "
                          f"not restored", RuntimeWarning, stacklevel=3)
    if "numpy" in rng:
        n = rng["numpy"]
        keys = reader.tensor(f"{prefix}numpy", "state").numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "python" in rng:
        py = rng["python"]
        random.setstate((py["version"], tuple(reader.tensor(f"{prefix}python", "state").tolist()), py["gauss_next"]))


class _Ranks:
    """Who takes part in a save or load: one process, or every rank of a ShardedOffloadOptimizer's group, which
    must act as one (module docstring, "Sharded runs")."""

    def __init__(self, optimizer):
        self.sharded = isinstance(optimizer, ShardedOffloadOptimizer)
        self.group = optimizer.process_group if self.sharded else None
        self.rank, self.world = (optimizer.rank, optimizer.world) if self.sharded else (0, 1)
        self.shared: list[dict] = []

    @contextlib.contextmanager
    def together(self, what: str) -> Iterator[dict]:
        """Run the block on every rank, then exchange: the dict it yields, filled by the block, is in
        ``self.shared[rank]`` on every rank. If the block raised on any rank, every rank raises (its own error, or
        one naming the rank that failed), so that no rank goes on to a collective that a failed one never joins."""
        mine: dict = {}
        if not self.sharded:
            yield mine
            self.shared = [mine]
            return
        error = None
        try:
            yield mine
        except Exception as e:  # told to the other ranks, then raised again below
            error = e
        got: list = [None] * self.world
        try:
            dist.all_gather_object(got, (None if error is None else f"{type(error).__name__}: {error}",
                                         None if error is not None else mine), group=self.group)
        except Exception as e:
            if error is not None:
                raise error from e
            raise CheckpointError(f"{what}: rank {self.rank} of {self.world} lost the other ranks (one died, or its "
                                  f"connection did): {e}") from e
        if error is not None:
            raise error
        failed = [(r, e) for r, (e, _) in enumerate(got) if e is not None]
        if failed:
            r, e = failed[0]
            raise CheckpointError(f"{what}: rank {r} of {self.world} failed, so every rank stops: {e}")
        self.shared = [m for _, m in got]


def _data_file(rank: int) -> str:
    """The data file of one process, or of rank ``rank`` of a sharded save."""
    return f"data-{rank:05d}.bin"


def _inside(root: str, rel, where: str) -> str:
    """``rel`` resolved inside the checkpoint directory ``root``, or an error: never an absolute path, ``..``, or a
    link leading out."""
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise CheckpointError(f"{where}: refusing file path {rel!r}: expected a plain relative name inside the "
                              f"checkpoint directory")
    full = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([full, root]) != root:
        raise CheckpointError(f"{where}: refusing file path {rel!r}: it resolves to {full}, outside the checkpoint")
    return full


def _is_checkpoint(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _remove_stale(path: Path) -> None:
    """Temporary directories of saves to ``path`` whose process died (a crash mid-save)."""
    for d in _siblings(path, ".tmp-"):
        try:
            pid = int(d.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid() or not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def _siblings(path: Path, tag: str) -> list[Path]:
    """``.<name><tag>*`` next to ``path``: a save's temporary (``.tmp-``) or set-aside (``.old-``) directories."""
    prefix = f".{path.name}{tag}"
    try:
        return sorted(path.parent / n for n in os.listdir(path.parent) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_all(fd: int, mv: memoryview) -> None:
    done = 0
    while done < len(mv):
        done += os.write(fd, mv[done:])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where it is not available."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))
