"""Configuration of the runtime: frozen, keyword-only dataclasses, validated where they are made.

Every error names the field, the value and a fix. Config files and the CLI are converted to these at the edge;
nothing inside the runtime reads a dict.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from storage import StoreConfig, Tier
from storage.memory import available_host_bytes

IMPLS = ("auto", "fused", "foreach", "forloop", "as_given")
UPDATE_SITES = ("cpu", "device")


def _tier(value, field: str) -> Tier:
    if isinstance(value, Tier):
        return value
    try:
        return Tier(value)
    except ValueError:
        raise ValueError(f"OffloadConfig.{field}: expected one of {[t.value for t in Tier]}, got {value!r}") from None


def _check_profile(name_or_path, *, read: bool) -> None:
    """A profile :func:`scheduler.profile.resolve` loads. Made in code, a config checks the name; read from a file,
    the command line or the environment (``read``), it also reads a path's profile, so that ``offload run`` refuses
    a bad one before the script starts. Not on every copy of a config (the runtime makes some while training)."""
    from scheduler.profile import HardwareProfile, shipped_profiles

    what = f"OffloadConfig.profile = {name_or_path!r}"
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"{what}: expected a shipped profile name or the path of a JSON profile")
    if os.path.sep not in name_or_path and not name_or_path.endswith(".json"):
        if name_or_path not in shipped_profiles():
            raise ValueError(f"{what}: expected one of {shipped_profiles()} or the path of a JSON profile "
                             f"(offload probe --json > my.json)")
        return
    if not read:
        return
    if not os.path.isfile(name_or_path):
        raise ValueError(f"{what}: no such file; give the path of a JSON profile (offload probe --json > my.json) "
                         f"or a shipped name ({', '.join(shipped_profiles())})")
    try:
        HardwareProfile.load(name_or_path)
    except (ValueError, OSError) as e:  # its message names the file and what is wrong in it
        raise ValueError(f"{what}: {e}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """Where optimizer state lives and how it is updated.

    Until the scheduler plans it, placement is uniform (``state_tier``, ``update_on``) or given per subgroup
    (``update_on`` as a sequence, one entry per subgroup in order).
    """

    state_tier: Tier | str = Tier.HOST
    """Where each subgroup's optimizer state (and fp32 master weights, for low-precision params) lives between
    steps: ``"device"``, ``"host"`` (pinned pool) or ``"nvme"`` (the store, streamed through host buffers)."""
    update_on: str | Sequence[str] = "cpu"
    """Where each subgroup's update runs: ``"cpu"`` (on host memory) or ``"device"`` (state copied to the device,
    updated there by the same optimizer class, copied back: Deep Optimizer States). A sequence gives one entry
    per subgroup. On a CPU-only machine both run on the CPU, through the same code and copies."""
    param_tier: Tier | str = Tier.HOST
    """With :func:`offload.wrap`: where each unit's parameters live between uses, ``"host"`` or ``"nvme"``; on the
    device they exist only while their unit computes (and the units prefetched for it)."""
    grad_tier: Tier | str = Tier.HOST
    """With :func:`offload.wrap`: where accumulated fp32 grads wait between backward and the update, ``"host"``
    (one buffer per unit, kept) or ``"nvme"`` (written after each micro-batch, read back for the next one or for
    the update; with the overlapped update the last micro-batch's grads go straight to the update)."""
    prefetch: int = 2
    """With :func:`offload.wrap`: units whose params are fetched ahead of use, within the device budget."""
    overlap_update: bool = True
    """With :func:`offload.wrap`: update each unit on the CPU as soon as its grads are off the device, while
    backward goes on with earlier units (Fuyou), instead of all at ``step()``. With ``max_grad_norm`` or
    ``loss_scale``, which need every grad first, it is speculative (``speculate``). Results are the same either
    way."""
    speculate: bool = True
    """With the overlapped update and ``max_grad_norm`` or ``loss_scale``: update during backward with the grads
    as they are, then check the global norm (and inf/NaN) once backward ends; when the step should have clipped
    (or overflowed) everything the updates changed is put back exactly (the swap manager keeps each chunk's
    pre-update bytes: a host copy, or the store's previous version) and the step is redone with clipped grads
    (or skipped). A policy stops speculating while recent steps clip. ``False``: such steps wait for backward."""
    accumulation_steps: int = 1
    """With the overlapped update: backward passes per ``step()``; the updates run during the last one."""
    max_grad_norm: float | None = None
    """Clip the global grad norm to this at each step (what ``torch.nn.utils.clip_grad_norm_`` does, over
    grads wherever they live)."""
    subgroup_numel: int = 16 << 20
    """Target parameters per subgroup: the unit of transfer and of update. Small tensors are packed together;
    a larger tensor is cut into pieces (on 1024-element boundaries, which keeps fused kernels bit-exact) when the
    optimizer is elementwise, or kept whole otherwise. Larger subgroups mean fewer, bigger transfers but bigger
    host buffers (``buffers x`` state bytes of one subgroup). Host-resident state updated on the CPU is not cut
    (one subgroup per param group): it moves nowhere, and each cut costs an optimizer call. Under
    ``offload.wrap`` a subgroup never spans units: state on NVMe is cut to this size within each unit, state
    elsewhere is one subgroup per unit."""
    buffers: int = 4
    """Host buffers the NVMe pipeline cycles through (one updating, the rest reading ahead or writing back).
    Bounded further by the host budget."""
    host_budget_bytes: int | None = None
    """Hard cap on the host pool (pinned when CUDA is present). ``None``: the memory this process may use (the
    machine's RAM, or a container's limit when lower). ``offload.wrap`` refuses a cap below what its placement
    needs and names that minimum (``runtime_of(model).host_minimum()`` itemizes it)."""
    device_budget_bytes: int | None = None
    """Cap on device memory the optimizer may hold (state on the device tier, device-update buffers). ``None``:
    no cap of ours (CUDA's own limit applies)."""
    nvme_dirs: str | Sequence[str] | None = None
    """Directories for the NVMe store (several stripe over drives). Needed when ``state_tier="nvme"``."""
    nvme_capacity_bytes: int | None = None
    """Store size; ``None``: twice the state (a write needs room beside the committed copy) plus 10%."""
    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)
    impl: str = "auto"
    """Implementation of the inner update: ``"auto"`` picks ``fused`` where the optimizer class and device
    support it (5-8x faster than foreach on the CPU here), else what the optimizer was given. ``"fused"``,
    ``"foreach"``, ``"forloop"`` force one; ``"as_given"`` keeps the user's flags. Results are bit-identical to a
    plain optimizer using the same implementation."""
    loss_scale: str | float | None = None
    """fp16 loss scaling: ``"dynamic"`` (start 2**16, halve on inf/NaN and skip the step, double after 2000 good
    steps), a fixed float, or ``None`` (bf16 and fp32 need none)."""
    replan: bool = False
    """With :func:`offload.wrap`: re-plan during training from measured rates (:mod:`offload.autoplan`): when the
    disk, the links, the CPU update or compute run more than 20% off the profile for a few iterations, switch to
    the plan the corrected profile says is faster, between iterations. Results are the same either way."""
    profile: str | None = None
    """The hardware profile re-planning starts from: a shipped name (``scheduler/profiles/``) or the path of a
    JSON profile (``offload probe --json``). ``None``: this machine's cached ``offload probe``, else
    ``cpu-dev-2core`` (as ``offload plan`` resolves it). Calibration corrects its rates as the run goes."""

    def __post_init__(self):
        object.__setattr__(self, "state_tier", _tier(self.state_tier, "state_tier"))
        object.__setattr__(self, "param_tier", _tier(self.param_tier, "param_tier"))
        object.__setattr__(self, "grad_tier", _tier(self.grad_tier, "grad_tier"))
        if self.grad_tier is Tier.DEVICE:
            raise ValueError("OffloadConfig.grad_tier: expected 'host' or 'nvme', got 'device' (grads leave the "
                             "device as they complete)")
        if self.prefetch < 0:
            raise ValueError(f"OffloadConfig.prefetch: expected >= 0 units, got {self.prefetch}")
        sites = [self.update_on] if isinstance(self.update_on, str) else list(self.update_on)
        for s in sites:
            if s not in UPDATE_SITES:
                raise ValueError(f"OffloadConfig.update_on: expected 'cpu', 'device' or a sequence of them, got {s!r}")
        if not isinstance(self.update_on, str):
            object.__setattr__(self, "update_on", tuple(sites))
        if self.subgroup_numel < 1024:
            raise ValueError(f"OffloadConfig.subgroup_numel: expected >= 1024, got {self.subgroup_numel}; "
                             f"try 16 << 20")
        if self.buffers < 1:
            raise ValueError(f"OffloadConfig.buffers: expected >= 1, got {self.buffers}; 3-4 keep the disk busy")
        for name in ("host_budget_bytes", "device_budget_bytes", "nvme_capacity_bytes"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"OffloadConfig.{name}: expected a positive number of bytes or None, got {v}")
        if self.accumulation_steps < 1:
            raise ValueError(f"OffloadConfig.accumulation_steps: expected >= 1, got {self.accumulation_steps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"OffloadConfig.max_grad_norm: expected a positive number or None, got "
                             f"{self.max_grad_norm}")
        if self.impl not in IMPLS:
            raise ValueError(f"OffloadConfig.impl: expected one of {IMPLS}, got {self.impl!r}")
        if self.loss_scale is not None and self.loss_scale != "dynamic" and not (
                isinstance(self.loss_scale, (int, float)) and self.loss_scale > 0):
            raise ValueError(f"OffloadConfig.loss_scale: expected 'dynamic', a positive number or None, got "
                             f"{self.loss_scale!r}")
        if self.replan and self.accumulation_steps != 1:
            raise ValueError(f"OffloadConfig.replan: expected accumulation_steps=1 to re-plan, got "
                             f"{self.accumulation_steps}; the cost model prices one backward per step: set "
                             f"replan=false to accumulate")
        if self.profile is not None:
            _check_profile(self.profile, read=False)
        if Tier.NVME in (self.state_tier, self.param_tier, self.grad_tier) and not self.nvme_dirs:
            raise ValueError("OffloadConfig.nvme_dirs: state_tier='nvme' needs a directory on a local disk, e.g. "
                             "nvme_dirs='/mnt/nvme/offload'")
        if isinstance(self.nvme_dirs, (str, os.PathLike)):
            object.__setattr__(self, "nvme_dirs", (str(self.nvme_dirs),))
        elif self.nvme_dirs is not None:
            object.__setattr__(self, "nvme_dirs", tuple(str(d) for d in self.nvme_dirs))

    def update_site(self, index: int, count: int) -> str:
        if isinstance(self.update_on, str):
            return self.update_on
        if len(self.update_on) != count:
            raise ValueError(f"OffloadConfig.update_on: expected one entry per subgroup ({count}), got "
                             f"{len(self.update_on)}")
        return self.update_on[index]


# -- config files, CLI overrides and the launcher's environment ---------------------------------------------------
# A config file is TOML: top-level keys are OffloadConfig fields, a [store] table holds StoreConfig fields. Sizes
# may be written "8GiB" / "2TB". `offload run` validates the file here, then hands the result to the script's
# process(es) as JSON in OFFLOAD_CONFIG, which `offload.wrap` and `OffloadOptimizer` read when given no config.

ENV_VAR = "OFFLOAD_CONFIG"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message is one line naming the key, the value and
    the fix."""


def parse_bytes(text) -> int:
    """``24GiB``, ``2TB``, ``512MB``, ``1048576`` -> bytes (KiB/MiB/GiB/TiB are powers of 2, KB/MB/GB/TB of 10)."""
    import re

    if isinstance(text, bool):
        raise ValueError(f"expected a size like 8GiB or a number of bytes, got {text!r}")
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"expected a size like 8GiB, 512MiB or 2TB, got {text!r}")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    power = {"B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30,
             "TI": 2**40}
    return int(float(m.group(1)) * power[unit])


def _kind(cls, name: str) -> str:
    """What a field accepts, from its annotation (kept in one place: the dataclass)."""
    ann = str(cls.__dataclass_fields__[name].type)
    if "Tier" in ann:
        return "tier"
    if ann.startswith("bool"):
        return "bool"
    if name.endswith("_bytes"):
        return "bytes"
    if ann.startswith("int"):
        return "int"
    if ann.startswith("float"):
        return "float"
    if "Sequence" in ann:
        return "strs"
    if ann.startswith("str | float"):
        return "str_or_float"
    if ann.startswith("str"):
        return "str"
    return "table"


_EXAMPLES = {"tier": '"nvme"', "bool": "true", "bytes": '"8GiB"', "int": "4", "float": "1.0", "strs": '"/mnt/nvme/offload"',
             "str_or_float": '"dynamic"', "str": '"auto"'}
_FIELD_EXAMPLES = {"profile": '"cpu-dev-2core"'}  # where the kind's example is no value of the field


def _check_value(cls, name: str, value, where: str, prefix: str):
    kind = _kind(cls, name)
    what = f"{where}{prefix}{name} = {value!r}"

    def bad(expected: str):
        example = _FIELD_EXAMPLES.get(name) or _EXAMPLES.get(kind, "...")
        return ConfigError(f"{what}: expected {expected}; e.g. {prefix}{name} = {example}")

    if kind == "bytes":
        try:
            return parse_bytes(value)
        except ValueError:
            raise bad("a size such as \"8GiB\" or a number of bytes") from None
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if kind == "strs":
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise bad("a string or a list of strings")
    if kind == "str_or_float":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad("a string or a number")
        return value
    if kind in ("str", "tier"):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise bad("a table")


def _unknown_key(cls, key: str, where: str, prefix: str) -> ConfigError:
    import difflib

    valid = [f.name for f in dataclasses.fields(cls)]
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"{where}unknown key {prefix + key!r}{hint}; valid keys{' in [' + prefix.rstrip('.') + ']' if prefix else ''}: "
                       f"{', '.join(valid)}")


def _build(cls, data: dict, where: str, prefix: str = ""):
    kwargs = {}
    for key, value in data.items():
        if key not in cls.__dataclass_fields__:
            raise _unknown_key(cls, key, where, prefix)
        if _kind(cls, key) == "table":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} = {value!r}: expected a table, e.g. [{key}] with its own keys")
            kwargs[key] = _build(StoreConfig, value, where, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_value(cls, key, value, where, prefix)
    try:
        return cls(**kwargs)
    except ValueError as e:  # the dataclass's own checks (ranges, combinations): already name field and fix
        raise ConfigError(f"{where}{e}") from None


def config_from_dict(data: dict, *, source: str = "") -> OffloadConfig:
    """Validate a dict (a parsed config file) into an :class:`OffloadConfig`. ``source`` prefixes errors."""
    cfg = _build(OffloadConfig, data, f"{source}: " if source else "")
    if cfg.profile is not None:
        try:
            _check_profile(cfg.profile, read=True)
        except ValueError as e:
            raise ConfigError(f"{source + ': ' if source else ''}{e}") from None
    total = available_host_bytes()  # 0 when unknown: skip the check rather than refuse the config
    if cfg.host_budget_bytes is not None and total and cfg.host_budget_bytes > total:
        from storage import format_bytes

        raise ConfigError(f"{source + ': ' if source else ''}host_budget_bytes = {cfg.host_budget_bytes}: more than "
                          f"the {format_bytes(total)} of memory this process may use (this machine's RAM, or its "
                          f"container's cgroup limit when lower); lower it or leave it unset")
    return cfg


def parse_override(text: str) -> tuple[list[str], object]:
    """``state_tier=nvme``, ``store.block_bytes=4MiB``, ``prefetch=3``, ``nvme_dirs=["/a","/b"]`` -> (path,
    value). The value is read as TOML where it parses, else taken as a string."""
    import tomllib

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. --set state_tier=nvme")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> OffloadConfig:
    """Read a TOML config file (or start from the defaults), apply ``KEY=VALUE`` overrides, validate."""
    import tomllib

    data: dict = {}
    source = path or "--set"
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file; pass an existing .toml file or leave --config out") \
                from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e}); see examples/offload.toml") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a table")
        node[keys[-1]] = value
    return config_from_dict(data, source=source)


def config_to_dict(cfg: OffloadConfig) -> dict:
    """The inverse of :func:`config_from_dict`: JSON- and TOML-ready, defaults included, ``None`` left out."""
    out: dict = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        if isinstance(v, Tier):
            v = v.value
        elif isinstance(v, StoreConfig):
            v = {k: x for k, x in dataclasses.asdict(v).items() if x is not None}
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def config_from_env(environ=None) -> OffloadConfig | None:
    """The config `offload run` passed to this process, or ``None``. Under several ranks (``WORLD_SIZE`` > 1),
    each rank gets its own store directory: ``<dir>/rank<RANK>`` (ZeRO-Infinity's per-rank I/O)."""
    import json

    env = os.environ if environ is None else environ
    text = env.get(ENV_VAR)
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{ENV_VAR}: not valid JSON ({e}); it is set by `offload run`, unset it to run without") \
            from None
    if int(env.get("WORLD_SIZE", "1")) > 1 and data.get("nvme_dirs"):
        dirs = [data["nvme_dirs"]] if isinstance(data["nvme_dirs"], str) else data["nvme_dirs"]
        data["nvme_dirs"] = [os.path.join(d, f"rank{env.get('RANK', '0')}") for d in dirs]
        for d, parent in zip(data["nvme_dirs"], dirs):
            if os.path.isdir(parent):  # a missing drive must still fail loudly, in the store
                os.makedirs(d, mode=0o700, exist_ok=True)
    return config_from_dict(data, source=ENV_VAR)
