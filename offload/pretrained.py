"""Pretrained checkpoints in, fine-tuned weights out, one unit at a time: a model larger than memory is never
whole anywhere but on its tiers.

    with torch.device("meta"):                           # or accelerate.init_empty_weights()
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
    model, opt = offload.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-5), config)
    offload.load_pretrained(model, ckpt)                 # model.safetensors, or shards and their index
    ...                                                  # train
    offload.save_pretrained(model, "out/")               # transformers' from_pretrained("out/") reads it

The format is safetensors (what transformers' ``save_pretrained`` writes), read and written with the
``safetensors`` package: no pickle, each tensor read on its own. Loading reads a unit's tensors into its host
copy (or a pool buffer written to the store while the next unit is read); the optimizer's fp32 masters follow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from offload.runtime import OffloadRuntime
from offload.config import parse_bytes
from storage import format_bytes

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, or cannot be read: the message names the key and the file."""


class SafetensorsCheckpoint:
    """A checkpoint as transformers writes it: one ``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``; or a single ``.safetensors`` file. Reads the headers at once (which keys,
    dtypes and shapes, in which file) and each tensor only when asked."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open  # a runtime dependency; imported here so `import offload` stays light

        path = Path(path)
        self._index: dict[str, str] | None = None  # key -> file name, from the index of a sharded checkpoint
        if path.is_dir():
            index, single = path / SAFE_INDEX, path / SAFE_WEIGHTS
            if index.exists():
                files = self._files_of_index(index)
            elif single.exists():
                files = [single]
            else:
                found = sorted(p.name for p in path.glob("*.safetensors"))
                bins = sorted(p.name for p in path.glob("*.bin"))
                hint = (f"it holds {', '.join(found[:3])}: pass the file itself" if found else
                        f"it holds only {', '.join(bins[:3])} (pickle): re-save it with save_pretrained("
                        f"safe_serialization=True)" if bins else "it holds no safetensors file")
                raise CheckpointError(f"{path}: no {SAFE_WEIGHTS} or {SAFE_INDEX}; {hint}")
        elif path.is_file():
            files = [path]
        else:
            raise CheckpointError(f"{path}: no such checkpoint (a directory with {SAFE_WEIGHTS} or {SAFE_INDEX}, "
                                  f"or a .safetensors file)")
        self.path = path
        self._handles = {}
        self._offsets: dict[str, tuple[Path, int, int]] = {}  # key -> (file, first byte, end) in the file
        self._fds: dict[Path, int] = {}
        self.specs: dict[str, tuple[torch.dtype | str, tuple[int, ...], Path]] = {}
        """Every key: (dtype, shape, file)."""
        for f in files:
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # a torn or foreign file: say which
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
            self._handles[f] = h
            self._offsets.update(_data_offsets(f))
            for key in h.keys():
                sl = h.get_slice(key)
                if key in self.specs:
                    raise CheckpointError(f"{key} is in two files of {path}: {self.specs[key][2].name} and {f.name}")
                self.specs[key] = (_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape()), f)
        if self._index is not None:
            wrong = [k for k, name in self._index.items() if k not in self.specs or self.specs[k][2].name != name]
            if wrong:
                k = wrong[0]
                where = f"it is in {self.specs[k][2].name}" if k in self.specs else "it is in none of them"
                raise CheckpointError(f"{path / SAFE_INDEX} puts {k} in {self._index[k]}, but {where} "
                                      f"({len(wrong)} such key(s)): the index does not match its shards")

    def _files_of_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (a JSON object with a 'weight_map' of key -> "
                                  f"file): {e!r}") from e
        self._index = weight_map
        files = []
        for name in dict.fromkeys(weight_map.values()):
            f = index.parent / name
            if not f.exists():
                raise CheckpointError(f"{index} lists {name}, which is not in {index.parent}: the checkpoint is "
                                      f"incomplete (download or copy the missing shard)")
            files.append(f)
        return files

    @property
    def files(self) -> list[Path]:
        return list(self._handles)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self._handles)

    def read(self, key: str) -> torch.Tensor:
        return self._handles[self.specs[key][2]].get_tensor(key)

    def read_into(self, key: str, out: torch.Tensor) -> int:
        """Copy ``key``'s tensor into ``out`` (its shape; a dtype it converts to) and return the bytes read. Of
        the same dtype and contiguous, the bytes are read straight into ``out`` with large ``preadv`` calls (one
        copy, the kernel's read-ahead running); otherwise through safetensors' own tensor."""
        dtype, shape, f = self.specs[key]
        _, start, end = self._offsets[key]
        if dtype != out.dtype or not out.is_contiguous() or out.device.type != "cpu" or \
                end - start != out.numel() * out.element_size():
            t = self.read(key)
            out.copy_(t.reshape(out.shape))
            return t.numel() * t.element_size()
        if end == start:
            return 0
        fd = self._fds.get(f)
        if fd is None:
            fd = self._fds[f] = os.open(f, os.O_RDONLY)
        view = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B")
        done = 0
        while done < end - start:
            n = os.preadv(fd, [view[done:]], start + done)
            if n <= 0:
                raise CheckpointError(f"{f}: {key} ends at byte {end}, past the end of the file (it is truncated)")
            done += n
        return done

    def close(self) -> None:
        self._handles.clear()  # safe_open's handles unmap their file when dropped
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _data_offsets(f: Path) -> dict[str, tuple[Path, int, int]]:
    """Where each tensor's bytes are in a safetensors file (its header, which safe_open has validated: an
    8-byte little-endian length, then a JSON object of key -> dtype, shape and data_offsets, relative to the
    end of the header)."""
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    base = 8 + n
    return {k: (f, base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


@dataclasses.dataclass
class LoadResult:
    """What :func:`load_pretrained` did."""
    loaded: list[str]
    """Checkpoint keys loaded."""
    missing: list[str]
    """The model's params and buffers the checkpoint has no key for (kept, or initialized: ``initialized``)."""
    initialized: list[str]
    """Params with no key and no weights (built on meta), set by their module's own initializer."""
    unexpected: list[str]
    """Checkpoint keys no param or buffer takes."""
    nbytes: int
    """Bytes of tensors read."""
    seconds: float

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else float("inf")


def _candidates(name: str, prefix: str) -> Iterator[str]:
    """The checkpoint keys a model's param may be stored under: its own name; under peft, the base model's name
    (``base_model.model.`` and ``.base_layer`` gone); with or without the base model's prefix (a checkpoint of
    ``LlamaModel`` loaded into ``LlamaForCausalLM``, or the reverse), as transformers allows."""
    names = [name]
    if name.startswith("base_model.model."):
        names.append(name[len("base_model.model."):].replace(".base_layer.", "."))
    for n in names:
        yield n
        if prefix:
            if n.startswith(prefix + "."):
                yield n[len(prefix) + 1:]
            else:
                yield f"{prefix}.{n}"


def _peft_adapter_names(model: nn.Module) -> set[str]:
    config = getattr(model, "peft_config", None)
    return set(config) if isinstance(config, dict) else set()


def _initializer(model: nn.Module, modules: dict[str, nn.Module], name: str):
    """``name``'s module and how to set its params afresh: a peft LoRA layer's ``reset_lora_parameters`` (B at
    zero, so the adapted model starts as the base), a transformers model's ``_init_weights``, else the
    module's ``reset_parameters``; ``None`` when there is none."""
    parts = name.split(".")[:-1]
    for cut in range(len(parts), 0, -1):  # nearest ancestor that is a LoRA layer
        m = modules.get(".".join(parts[:cut]))
        if m is not None and hasattr(m, "reset_lora_parameters") and cut < len(parts):
            adapter = parts[cut + 1] if cut + 1 < len(parts) else None
            cfg = getattr(model, "peft_config", {}).get(adapter)
            if cfg is not None:
                return m, lambda m=m, a=adapter, c=cfg: m.reset_lora_parameters(a, c.init_lora_weights)
    owner = modules[".".join(parts)]
    hf_init = getattr(model, "_init_weights", None)  # a peft model passes the lookup on to the model it wraps
    if hf_init is not None:
        return owner, lambda m=owner: hf_init(m)
    if hasattr(owner, "reset_parameters"):
        return owner, owner.reset_parameters
    return owner, None


def load_pretrained(model: nn.Module, path: str | os.PathLike, *, strict: bool = True, cast: bool = False,
                    progress: bool = True) -> LoadResult:
    """Load a safetensors checkpoint (a transformers directory: ``model.safetensors``, or the shards of
    ``model.safetensors.index.json``; or one ``.safetensors`` file) into a model wrapped by :func:`offload.wrap`,
    one unit at a time: each unit's tensors are read into its host copy, or into a pool buffer that is written
    to the store while the next unit is read; the optimizer's fp32 masters follow. Peak host memory is about
    one unit plus the pool's buffers. The model may have been built on the meta device.

    Every problem is found before anything is written, and reported together, each naming the key and its
    file: a key the checkpoint lacks (``strict``), one the model does not take (``strict``), a shape that
    differs, or a dtype that differs (``cast=True`` converts floating-point weights instead; build the model in
    the checkpoint's dtype to train in it). Tied params (an LM head sharing the embedding) are loaded once, from
    whichever name the checkpoint has. Under peft, base weights are found under the base model's names, and the
    adapters, which a base checkpoint lacks, keep the values peft gave them, or, built on meta, are set by
    peft's own initializer. ``progress``: a line on stderr with bytes and rate."""
    rt = getattr(model, "_offload_runtime", None)
    if rt is None:
        raise TypeError("offload.load_pretrained loads into a model wrapped by offload.wrap (so that each unit goes "
                        "straight to its tier); for a plain model use transformers' from_pretrained, or wrap first")
    t0 = time.perf_counter()
    ckpt = SafetensorsCheckpoint(path)
    try:
        return _load(rt, model, ckpt, strict=strict, cast=cast, progress=progress, t0=t0)
    finally:
        ckpt.close()


def _load(rt: OffloadRuntime, model: nn.Module, ckpt: SafetensorsCheckpoint, *, strict, cast, progress, t0):
    prefix = getattr(model, "base_model_prefix", "") or ""  # a peft model passes the lookup on to its base
    adapters = _peft_adapter_names(model)
    modules = dict(model.named_modules())
    names: dict[nn.Parameter, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(p, []).append(name)
    persistent = {}
    for mname, m in modules.items():
        for bname, b in m.named_buffers(recurse=False):
            if b is not None and bname not in m._non_persistent_buffers_set:
                persistent[f"{mname}.{bname}" if mname else bname] = (m, bname)

    def find(name_list: list[str]) -> str | None:
        for n in name_list:
            for key in _candidates(n, prefix):
                if key in ckpt.specs:
                    return key
        return None

    keys: dict[nn.Parameter, str] = {}
    missing, to_init, errors = [], [], []
    for p, ns in names.items():
        key = find(ns)
        if key is not None:
            keys[p] = key
            continue
        missing.append(ns[0])
        is_adapter = bool(adapters) and p.requires_grad and any(f".{a}." in ns[0] for a in adapters)
        if rt.meta_born(p):  # no weights anywhere: its module's initializer sets them
            to_init.append(ns[0])
        if strict and not is_adapter:
            errors.append(f"missing: {ns[0]} (no key {ns[0]!r} in {ckpt.path})")
    buffer_keys = {}
    for bname, (m, b) in persistent.items():
        key = find([bname])
        if key is not None:
            buffer_keys[bname] = key
        else:
            missing.append(bname)
            if strict:
                errors.append(f"missing: buffer {bname} (no key {bname!r} in {ckpt.path})")
    used = set(keys.values()) | set(buffer_keys.values())
    ignore = [re.compile(r) for r in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    unexpected = [k for k in ckpt.specs if k not in used and not any(r.search(k) for r in ignore)]
    if strict:
        errors += [f"unexpected: {k} in {ckpt.specs[k][2].name} (the model has no such param or buffer)"
                   for k in unexpected]

    def check(key: str, shape: tuple, dtype: torch.dtype, what: str) -> None:
        cdtype, cshape, f = ckpt.specs[key]
        if tuple(cshape) != tuple(shape):
            errors.append(f"shape: {key} in {f.name} is {list(cshape)}, the model's {what} is {list(shape)}")
        elif cdtype != dtype and not (cast and isinstance(cdtype, torch.dtype) and cdtype.is_floating_point
                                      and dtype.is_floating_point):
            errors.append(f"dtype: {key} in {f.name} is {cdtype}, the model's {what} is {dtype}")

    for p, key in keys.items():
        check(key, rt.param_shape(p), p.dtype, names[p][0])
    for bname, key in buffer_keys.items():
        m, b = persistent[bname]
        check(key, tuple(m._buffers[b].shape), m._buffers[b].dtype, f"buffer {bname}")
    inits: dict[nn.Parameter, tuple[nn.Module, Callable | None]] = {}
    for p, ns in names.items():
        if ns[0] in to_init:
            inits[p] = _initializer(model, modules, ns[0])
            if inits[p][1] is None:
                errors.append(f"no initializer: {ns[0]} is not in {ckpt.path}, was built on meta (no weights), and "
                              f"its module {type(inits[p][0]).__name__} has none: load a checkpoint that has it, or "
                              f"build that module off meta")
    if errors:
        hints = []
        if any(e.startswith("dtype:") for e in errors):
            hints.append("build the model in the checkpoint's dtype (from_config(config, dtype=...), or "
                         "model.to(dtype) before wrap), or pass cast=True")
        if any(e.startswith(("missing:", "unexpected:")) for e in errors):
            hints.append("strict=False loads what matches and returns the rest in LoadResult.missing / .unexpected")
        shown = errors[:12] + ([f"... and {len(errors) - 12} more"] if len(errors) > 12 else [])
        raise CheckpointError(f"{ckpt.path} does not fit {type(model).__name__} ({len(errors)} problem(s)):\n  "
                              + "\n  ".join(shown) + "".join(f"\nfix: {h}" for h in hints))

    meter = _Progress(f"loading {ckpt.path}", ckpt.nbytes(), progress)
    read = [0]

    def fill(p: nn.Parameter, out: torch.Tensor) -> None:
        if p not in keys:
            return  # set by its initializer (fill_unit)
        read[0] += ckpt.read_into(keys[p], out)
        meter.update(read[0])

    def fill_unit(u, views: dict[nn.Parameter, torch.Tensor]) -> None:
        mine = [p for p in u.params if p in inits]
        if not mine:
            return
        with _standing_in(mine, views):
            done = set()
            for p in mine:
                owner, init = inits[p]
                if id(owner) not in done:  # an initializer sets all of its module's params at once
                    done.add(id(owner))
                    init()

    with torch.no_grad():
        for bname, key in buffer_keys.items():
            m, b = persistent[bname]
            t = ckpt.read(key)
            m._buffers[b].copy_(t)
            read[0] += t.numel() * t.element_size()
    rt.write_params(fill, set(keys) | set(inits), fill_unit=fill_unit)
    seconds = time.perf_counter() - t0
    meter.done(read[0], seconds)
    return LoadResult(loaded=sorted(used), missing=missing, initialized=to_init, unexpected=unexpected,
                      nbytes=read[0], seconds=seconds)


class _standing_in:
    """For the ``with`` block, ``params`` hold ``views`` (their places in a unit's host copy) as their data, so
    a module's own initializer writes into the unit; then they are empty again."""

    def __init__(self, params: list[nn.Parameter], views: dict[nn.Parameter, torch.Tensor]):
        self.params, self.views = params, views

    def __enter__(self):
        self.old = [p.data for p in self.params]
        for p in self.params:
            p.data = self.views[p]

    def __exit__(self, *exc):
        for p, old in zip(self.params, self.old):
            p.data = old


class _Progress:
    """A progress line on stderr, redrawn at most twice a second."""

    def __init__(self, what: str, total: int, enabled: bool):
        self.what, self.total, self.enabled = what, total, enabled
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        now = time.perf_counter()
        if self.enabled and now - self.last >= 0.5:
            self.last = now
            rate = n / max(now - self.t0, 1e-9)
            print(f"\r{self.what}: {format_bytes(n)} / {format_bytes(self.total)} ({format_bytes(rate)}/s)",
                  end="", file=sys.stderr, flush=True)

    def done(self, n: int, seconds: float) -> None:
        if self.enabled:
            print(f"\r{self.what}: {format_bytes(n)} in {seconds:.1f} s ({format_bytes(n / max(seconds, 1e-9))}/s)",
                  file=sys.stderr, flush=True)


# -- export ---------------------------------------------------------------------------------------------------------
def save_pretrained(model: nn.Module, path: str | os.PathLike, *, max_shard_size: int | str = "2GB",
                    progress: bool = True) -> list[Path]:
    """Write a wrapped model's weights as transformers does: ``model.safetensors``, or shards
    ``model-0000i-of-0000n.safetensors`` of at most ``max_shard_size`` with ``model.safetensors.index.json``,
    plus ``config.json`` (and ``generation_config.json``) when the model has them, so that
    ``from_pretrained(path)`` reads it. Streamed: the shards are planned from the units' shapes, then filled one
    unit at a time; host memory holds one shard at most. Tied params are written once, under their first name
    (transformers ties them again on load). A peft model writes its adapters (``adapter_model.safetensors`` and
    ``adapter_config.json``, what ``PeftModel.from_pretrained`` reads). Returns the files written."""
    from safetensors.torch import save_file

    rt = getattr(model, "_offload_runtime", None)
    if rt is None:
        raise TypeError("offload.save_pretrained writes a model wrapped by offload.wrap; for a plain model use "
                        "its own save_pretrained")
    limit = parse_bytes(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    adapters = _peft_adapter_names(model)
    if len(adapters) > 1:
        raise NotImplementedError(f"offload.save_pretrained: the peft model has adapters {sorted(adapters)}; peft's "
                                  f"file holds one (its tensors are named without the adapter): delete the others "
                                  f"(model.delete_adapter(name)) before saving")
    entries = _export_entries(model, rt, adapters)  # (name, param or buffer, nbytes), in the model's order
    if not entries:
        raise ValueError("offload.save_pretrained: the model has nothing to write (no params or persistent buffers "
                         "selected)")
    shards: list[list[tuple[str, object, int]]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e[2] > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e[2]
    if adapters:
        if len(shards) > 1:
            shards = [[e for s in shards for e in s]]  # peft reads one adapter file
        names = [ADAPTER_WEIGHTS]
    elif len(shards) == 1:
        names = [SAFE_WEIGHTS]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(e[2] for e in entries)
    meter = _Progress(f"writing {path}", total, progress)
    t0 = time.perf_counter()
    values = _export_values(rt, {e[1] for e in entries if isinstance(e[1], nn.Parameter)})
    written, done = [], 0
    for shard, fname in zip(shards, names):
        tensors = {}
        for name, obj, nbytes in shard:
            tensors[name] = next(values) if isinstance(obj, nn.Parameter) else obj.detach().cpu().clone()
            done += nbytes
            meter.update(done)
        tmp = path / (fname + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / fname)
        written.append(path / fname)
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: fname for shard, fname in zip(shards, names) for name, _, _ in shard}}
        (path / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(path / SAFE_INDEX)
    written += _write_configs(model, path, adapters)
    meter.done(done, time.perf_counter() - t0)
    return written


def _export_entries(model: nn.Module, rt: OffloadRuntime, adapters: set[str]) -> list[tuple[str, object, int]]:
    """(name in the file, param or buffer, bytes) of what to write, params in the order the runtime reads its
    units (so each is written as its unit comes by), then the persistent buffers."""
    first: dict[nn.Parameter, str] = {}
    for name, p in model.named_parameters():  # tied params come once, under their first name
        first.setdefault(p, name)
    entries = []
    for u in rt.units:
        for p, shape in zip(u.params, u.shapes):
            name = first.get(p)
            if name is None or (adapters and not (p.requires_grad and any(f".{a}." in name for a in adapters))):
                continue
            key = name
            for a in adapters:  # peft's file names the adapter's tensors without the adapter's name
                key = key.replace(f".{a}.", ".")
            entries.append((key, p, math.prod(shape) * p.dtype.itemsize))
    if not adapters:
        for mname, m in model.named_modules():
            for bname, b in m.named_buffers(recurse=False):
                if b is not None and bname not in m._non_persistent_buffers_set:
                    entries.append((f"{mname}.{bname}" if mname else bname, b, b.numel() * b.element_size()))
    return entries


def _export_values(rt: OffloadRuntime, wanted: set[nn.Parameter]) -> Iterator[torch.Tensor]:
    """Copies of the wanted params' weights, in the runtime's order, one unit read at a time."""
    for p, view in rt.iter_params():
        if p in wanted:
            yield view.detach().clone()


def _write_configs(model: nn.Module, path: Path, adapters: set[str]) -> list[Path]:
    written = []
    if adapters:
        (cfg,) = model.peft_config.values()
        cfg.save_pretrained(str(path))
        return [path / "adapter_config.json"]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(str(path))
        written.append(path / "config.json")
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        try:
            gen.save_pretrained(str(path))
            written.append(path / "generation_config.json")
        except Exception:  # a default generation config some models refuse to validate: the weights matter here
            pass
    return written
