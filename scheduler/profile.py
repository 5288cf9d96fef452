"""HardwareProfile: the rates and capacities of one machine, each number with where it came from.

A profile is measured by ``offload probe`` (scheduler/probe.py) or written by hand for a machine you do not have
(the shipped ones in ``scheduler/profiles/`` are such files). It is stored as versioned JSON in which every number
is ``{"value": ..., "source": ...}``: a vendor spec, a paper, an estimate (and from what), or "measured on ...
by offload probe". FlexGen's fitted constants could not be reproduced by its users; ours say where they came from.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

PROFILE_FORMAT = "offload-hardware-profile"
PROFILE_VERSION = 3
"""Bump when a field changes meaning; ``load`` refuses other versions (re-run ``offload probe``). 2: adds
``cpu_steal``, and ``compute_efficiency`` is measured on a training step instead of assumed 1.0. 3: adds
``device_reserve`` and ``host_reserve`` (the capacities become the whole tier, the reserve is what plans leave
free) and the probe's ``measured_at``, ``spread`` and ``warnings``. Version 2 still loads, with no reserve (what
it planned with) and a doubt that says so (:meth:`HardwareProfile.doubts`)."""
READABLE_VERSIONS = (2, PROFILE_VERSION)
OPTIONAL_FIELDS = ("collective_gbps", "collective_latency_s", "cpu_thread_speedup", "pcie_root_gbps")
"""Fields a profile may leave out (several ranks: ``scheduler/sharded.py``); each given one needs a source."""
SHIPPED_DIR = Path(__file__).resolve().parent / "profiles"
DTYPES = ("fp32", "bf16", "fp16")
STEAL_KINDS = ("copy", "update", "disk")
"""Host-side work that may slow the device's compute (``HardwareProfile.cpu_steal``): host<->device copies, CPU
optimizer updates, the NVMe store's I/O and checksum threads."""

# Numeric fields: each needs an entry in ``sources``. ``device_tflops`` (a per-dtype mapping) and ``cpu_steal``
# (per kind) are among them.
RATE_FIELDS = ("device_tflops", "compute_efficiency", "h2d_gbps", "d2h_gbps", "bidir_gbps", "disk_read_gbps",
               "disk_write_gbps", "disk_mixed_gbps", "disk_block_bytes", "cpu_update_params_per_s",
               "cpu_update_params_per_s_under_io", "device_update_params_per_s", "cpu_steal")
CAPACITY_FIELDS = ("device_memory_bytes", "host_memory_bytes", "nvme_bytes")
RESERVE_FIELDS = ("device_reserve", "host_reserve")
"""Per tier, what no plan may use: ``{"bytes": fixed, "fraction": of the capacity}``
(:meth:`HardwareProfile.reserve_bytes`)."""
NO_RESERVE = MappingProxyType({"bytes": 0, "fraction": 0.0})
STALE_DAYS = 90
"""A cached probe older than this is flagged when a plan uses it: drivers, firmware and the machine's load change."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    """Rates (per second, at the transfer sizes we use) and capacities of one machine."""

    name: str
    """Short name: ``h100-pcie5-gen4nvme``, or ``probe-<fingerprint>`` for a measured one."""
    fingerprint: str = ""
    """``fingerprint()`` of the machine it was measured on; empty for a hand-written profile."""
    device_name: str = "cpu"
    """``torch.cuda.get_device_name()``, or ``"cpu"`` when the compute device is the CPU."""
    device_tflops: Mapping[str, float]
    """Dense matmul rate per compute dtype (``fp32``, ``bf16``, ``fp16``), 1e12 FLOP/s."""
    compute_efficiency: float = 1.0
    """Fraction of ``device_tflops`` a whole training step reaches (MFU of the compute alone): the cost model
    divides FLOPs by ``device_tflops * compute_efficiency``. The probe measures it on a small LM's training step,
    which also prices the work FLOPs do not count (norms, softmax, embedding backward, the loss)."""
    compute_curve: Mapping[int, float] = dataclasses.field(default_factory=dict)
    """Tokens per step (batch x seq) -> the fraction of fp32 ``device_tflops`` a training step of that many tokens
    reaches: small steps run small matmuls and pay each op's fixed cost on fewer FLOPs, so a 1 x 64 step reaches
    about half of what a 2 x 256 one does on the development VM. Empty: ``compute_efficiency`` at every size.
    :meth:`efficiency_at` interpolates in log(tokens) between the points and keeps the end points' values beyond
    them. The probe measures it on the same small GPT as ``compute_efficiency``; a wider model's ops are larger
    at the same token count, so it is priced conservatively at small ones."""
    h2d_gbps: float
    """Host -> device copy rate from pinned memory, 1e9 B/s. On a CPU-only machine: a memcpy."""
    d2h_gbps: float
    """Device -> host copy rate into pinned memory, 1e9 B/s."""
    bidir_gbps: float
    """Sum of both directions when both run at once, 1e9 B/s (<= h2d + d2h)."""
    disk_read_gbps: float
    """NVMe store reads (O_DIRECT, ``disk_block_bytes`` requests, several in flight), 1e9 B/s."""
    disk_write_gbps: float
    disk_mixed_gbps: float
    """Reads plus writes per second when both run at once, 1e9 B/s."""
    disk_block_bytes: int = 8 << 20
    """The request size the disk rates were measured at (the store's ``StoreConfig.block_bytes``)."""
    cpu_update_params_per_s: float
    """fp32 AdamW parameters updated per second on the CPU (fused kernel, all cores)."""
    cpu_update_params_per_s_under_io: float
    """The same while the disk streams at full rate (the store's threads and memory traffic compete)."""
    device_update_params_per_s: float
    """fp32 AdamW parameters updated per second on the device."""
    cpu_steal: Mapping[str, float]
    """Per kind of host work (:data:`STEAL_KINDS`): seconds of device compute lost per second that work runs beside
    it. 0 for a GPU (its kernels run on its own SMs); about 1 where the device *is* the CPU and the work shares its
    cores at no extra cost; above 1 when sharing costs more than it takes (oversubscribed OpenMP threads spin).
    Measured by ``offload probe``: a training step timed alone and beside that work (cost.py, "Shared cores")."""
    device_memory_bytes: int
    """The device's memory, all of it (``total_memory``, the vendor's figure, ``--device-memory``); a plan may fill
    it less ``device_reserve`` (:meth:`usable_bytes`). On a CPU-only machine: a budget our accounting enforces."""
    host_memory_bytes: int
    """The host's memory (RAM, a container's limit, ``--host-memory``); a plan may fill it less ``host_reserve``
    with the runtime's pinned pool and staging."""
    nvme_bytes: int
    device_reserve: Mapping[str, float]
    """Of ``device_memory_bytes``, what no plan may use: ``bytes`` (the CUDA context with its kernels and library
    workspaces, a display) plus ``fraction`` of the capacity (the caching allocator's rounding and fragmentation).
    Kept when the capacity is overridden (``with_capacities``), so that ``--device-memory 24GiB`` means the card's
    24 GiB, not 24 GiB of tensors."""
    host_reserve: Mapping[str, float]
    """Of ``host_memory_bytes``, what no plan may use: the OS, this process itself, the data loader, page cache."""
    sources: Mapping[str, str]
    """Field name -> where its number came from. Every rate, capacity and reserve field needs one."""
    measured_at: str = ""
    """When ``offload probe`` measured it (ISO 8601, local time); empty for a hand-written profile."""
    spread: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """Rate field -> (slowest - fastest) / median of the probe's repeated rounds: how noisy its number is."""
    collective_gbps: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """Several ranks on this machine (``offload plan --nproc N``): bus bandwidth of each collective among them,
    1e9 B/s, per kind (``reduce_scatter``, ``all_gather``, ``all_reduce``), nccl-tests' convention (the bytes each
    rank sends in a ring over the time). Empty: :func:`scheduler.sharded.collective_rates` estimates it and says
    so. ``benchmarks/collective_bw.py`` measures it."""
    collective_latency_s: float = 0.0
    """The fixed time of one collective call among the ranks, seconds (from the same fit)."""
    cpu_thread_speedup: Mapping[int, float] = dataclasses.field(default_factory=dict)
    """A CPU device: threads -> a training step's speedup over one thread, up to the machine's cores. Ranks sharing
    the cores get ``cores / N`` threads each and run at that many threads' share of the all-core rate; threads scale
    less than linearly (memory bandwidth, synchronisation), so that is more than ``1/N`` of it. Empty: ``1/N``."""
    pcie_root_gbps: float = 0.0
    """Bandwidth the devices' host links share (a PCIe root complex or switch, host memory), 1e9 B/s: with several
    ranks each rank's copies get at most ``1/N`` of it. 0: each device's link is its own."""
    warnings: tuple[str, ...] = ()
    """What the probe found implausible (a noisy rate, fp32 matmul far below bf16, the update faster under disk
    traffic than alone, other processes busy): shown again whenever a plan uses this profile."""

    def __post_init__(self):
        if not self.name:
            raise ValueError("HardwareProfile.name: expected a non-empty name, got ''")
        tf = dict(self.device_tflops)
        for k, v in tf.items():
            if k not in DTYPES:
                raise ValueError(f"HardwareProfile.device_tflops: expected keys among {DTYPES}, got {k!r}")
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"HardwareProfile.device_tflops[{k!r}]: expected a positive number, got {v!r}")
        if not tf:
            raise ValueError("HardwareProfile.device_tflops: expected at least one dtype, e.g. {'bf16': 756.0}")
        object.__setattr__(self, "device_tflops", MappingProxyType(tf))
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))
        steal = dict(self.cpu_steal)
        if set(steal) != set(STEAL_KINDS) or not all(isinstance(v, (int, float)) and v >= 0 for v in steal.values()):
            raise ValueError(f"HardwareProfile.cpu_steal: expected a number >= 0 for each of {STEAL_KINDS} (0 for a "
                             f"GPU), got {steal!r}; `offload probe` measures them")
        object.__setattr__(self, "cpu_steal", MappingProxyType(steal))
        for f in RESERVE_FIELDS:
            r = dict(getattr(self, f))
            if set(r) != {"bytes", "fraction"} or not (isinstance(r["bytes"], (int, float)) and r["bytes"] >= 0
                                                       and isinstance(r["fraction"], (int, float))
                                                       and 0 <= r["fraction"] < 1):
                raise ValueError(f"HardwareProfile.{f}: expected {{'bytes': >= 0, 'fraction': in [0, 1)}}, got {r!r}; "
                                 f"e.g. {{'bytes': 1073741824, 'fraction': 0.05}} for a GPU's CUDA context and "
                                 f"fragmentation")
            object.__setattr__(self, f, MappingProxyType({"bytes": int(r["bytes"]), "fraction": float(r["fraction"])}))
        object.__setattr__(self, "spread", MappingProxyType(dict(self.spread)))
        object.__setattr__(self, "warnings", tuple(self.warnings))
        for f in RATE_FIELDS[1:-1] + CAPACITY_FIELDS:
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"HardwareProfile.{f}: expected a positive number, got {v!r}")
        curve = {}
        for k, v in dict(self.compute_curve).items():
            if not (int(k) >= 1 and isinstance(v, (int, float)) and 0 < v <= 1):
                raise ValueError(f"HardwareProfile.compute_curve: expected tokens (>= 1) -> a fraction in (0, 1], got "
                                 f"{k!r}: {v!r}")
            curve[int(k)] = float(v)
        object.__setattr__(self, "compute_curve", MappingProxyType(dict(sorted(curve.items()))))
        coll = dict(self.collective_gbps)
        if coll and (set(coll) != {"reduce_scatter", "all_gather", "all_reduce"}
                     or not all(isinstance(v, (int, float)) and v > 0 for v in coll.values())):
            raise ValueError(f"HardwareProfile.collective_gbps: expected a positive bus bandwidth for each of "
                             f"reduce_scatter, all_gather, all_reduce, got {coll!r}; benchmarks/collective_bw.py "
                             f"measures them")
        object.__setattr__(self, "collective_gbps", MappingProxyType(coll))
        speedup = {}
        for k, v in dict(self.cpu_thread_speedup).items():
            if not (int(k) >= 1 and isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"HardwareProfile.cpu_thread_speedup: expected threads (>= 1) -> a positive speedup, "
                                 f"got {k!r}: {v!r}")
            speedup[int(k)] = float(v)
        object.__setattr__(self, "cpu_thread_speedup", MappingProxyType(dict(sorted(speedup.items()))))
        for f in ("collective_latency_s", "pcie_root_gbps"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"HardwareProfile.{f}: expected a number >= 0, got {v!r}")
        for f in OPTIONAL_FIELDS:
            if getattr(self, f) and not self.sources.get(f):
                raise ValueError(f"HardwareProfile.sources: expected a source for {f}")
        if curve and not self.sources.get("compute_curve"):
            raise ValueError("HardwareProfile.sources: expected a source for compute_curve")
        if self.compute_efficiency > 1:
            raise ValueError(f"HardwareProfile.compute_efficiency: expected a fraction in (0, 1], got "
                             f"{self.compute_efficiency}")
        missing = [f for f in RATE_FIELDS + CAPACITY_FIELDS + RESERVE_FIELDS if not self.sources.get(f)]
        if missing:
            raise ValueError(f"HardwareProfile.sources: expected a source for every number, missing {missing}; "
                             f"write e.g. 'vendor spec: ...', 'estimate: ...' or 'measured ... by offload probe'")

    # -- derived ----------------------------------------------------------------------------------------------------
    def efficiency_at(self, tokens: int | None = None) -> float:
        """The fraction of peak a training step of ``tokens`` (batch x seq) reaches: ``compute_curve`` interpolated
        in log(tokens), its end points' values beyond it; ``compute_efficiency`` without a curve or tokens."""
        curve = sorted(self.compute_curve.items())
        if not curve or tokens is None:
            return self.compute_efficiency
        if tokens <= curve[0][0]:
            return curve[0][1]
        for (t0, e0), (t1, e1) in zip(curve, curve[1:]):
            if tokens <= t1:
                f = (math.log(tokens) - math.log(t0)) / (math.log(t1) - math.log(t0))
                return e0 + f * (e1 - e0)
        return curve[-1][1]

    def flops_per_s(self, dtype: str, tokens: int | None = None) -> float:
        """Sustained FLOP/s for ``dtype`` on a training step of ``tokens``: peak times :meth:`efficiency_at`."""
        if dtype not in self.device_tflops:
            raise ValueError(f"profile {self.name!r} has no rate for {dtype!r}: expected one of "
                             f"{sorted(self.device_tflops)}; add it to device_tflops or pick another dtype")
        return self.device_tflops[dtype] * 1e12 * self.efficiency_at(tokens)

    def reserve_bytes(self, tier: str) -> int:
        """Bytes of ``tier`` (``device``, ``host``; ``nvme`` has none) that no plan may use."""
        if tier == "nvme":
            return 0
        r, cap = getattr(self, f"{tier}_reserve"), getattr(self, f"{tier}_memory_bytes")
        return min(cap, int(r["bytes"] + r["fraction"] * cap))

    def usable_bytes(self, tier: str) -> int:
        """Capacity less reserve: what the planner may fill on ``tier``."""
        cap = self.nvme_bytes if tier == "nvme" else getattr(self, f"{tier}_memory_bytes")
        return cap - self.reserve_bytes(tier)

    def with_capacities(self, *, device_memory_bytes: int | None = None, host_memory_bytes: int | None = None,
                        nvme_bytes: int | None = None, device_reserve_bytes: int | None = None,
                        host_reserve_bytes: int | None = None,
                        source: str = "given on the command line") -> "HardwareProfile":
        """A copy with some capacities or reserves overridden (``offload plan --device-memory 24GiB
        --device-reserve 2GiB``); sources say so. A capacity given alone keeps the profile's reserve; a reserve
        given is that many bytes (no fraction), 0 for none."""
        changes, sources = {}, dict(self.sources)
        for f, v in (("device_memory_bytes", device_memory_bytes), ("host_memory_bytes", host_memory_bytes),
                     ("nvme_bytes", nvme_bytes)):
            if v is not None:
                changes[f] = int(v)
                sources[f] = source
        for f, v in (("device_reserve", device_reserve_bytes), ("host_reserve", host_reserve_bytes)):
            if v is not None:
                if v < 0:
                    raise ValueError(f"{f.replace('_', '-')}: expected bytes >= 0, got {v}")
                changes[f] = {"bytes": int(v), "fraction": 0.0}
                sources[f] = source
        return dataclasses.replace(self, **changes, sources=sources) if changes else self

    def doubts(self, *, today: datetime.date | None = None) -> list[str]:
        """Why this profile's numbers may not be this machine's now: the probe's own warnings, its age (over
        :data:`STALE_DAYS`), a version-2 file without reserves. Empty for a hand-written profile that says nothing."""
        out = list(self.warnings)
        if self.measured_at:
            try:
                age = ((today or datetime.date.today()) - datetime.date.fromisoformat(self.measured_at[:10])).days
            except ValueError:
                age = None
            if age is not None and age > STALE_DAYS:
                out.append(f"measured {age} days ago ({self.measured_at[:10]}): re-run `offload probe`")
        if any("profile version 2" in self.sources.get(f, "") for f in RESERVE_FIELDS):
            out.append("a version-2 profile: no memory reserve for the CUDA context and the OS, plans may fill "
                       "every byte; re-run `offload probe` or pass --device-reserve/--host-reserve")
        return out

    # -- JSON -------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "name": self.name,
               "fingerprint": self.fingerprint, "device_name": self.device_name}
        for f in RATE_FIELDS + CAPACITY_FIELDS + RESERVE_FIELDS:
            v = getattr(self, f)
            out[f] = {"value": dict(v) if isinstance(v, Mapping) else v, "source": self.sources[f]}
        if self.compute_curve:
            out["compute_curve"] = {"value": {str(k): v for k, v in self.compute_curve.items()},
                                    "source": self.sources["compute_curve"]}
        for f in OPTIONAL_FIELDS:
            v = getattr(self, f)
            if v:
                out[f] = {"value": {str(k): x for k, x in v.items()} if isinstance(v, Mapping) else v,
                          "source": self.sources[f]}
        if self.measured_at or self.spread or self.warnings:
            out["probe"] = {"measured_at": self.measured_at, "spread": dict(self.spread),
                            "warnings": list(self.warnings)}
        return out

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "profile") -> "HardwareProfile":
        if d.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{where}: expected a JSON object with format {PROFILE_FORMAT!r}, got "
                             f"{d.get('format')!r}; is this a hardware profile?")
        if d.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"{where}: expected profile version {PROFILE_VERSION}, got {d.get('version')!r}; "
                             f"re-run `offload probe` (or update the file by hand)")
        if d["version"] == 2:  # what it planned with: the whole capacity; doubts() says so
            d = dict(d, **{f: {"value": dict(NO_RESERVE), "source": "none: profile version 2 had no reserve"}
                           for f in RESERVE_FIELDS})
        kwargs, sources = {}, {}
        for f in RATE_FIELDS + CAPACITY_FIELDS + RESERVE_FIELDS:
            entry = d.get(f)
            if not isinstance(entry, dict) or "value" not in entry:
                raise ValueError(f"{where}: field {f!r}: expected {{\"value\": ..., \"source\": ...}}, got {entry!r}")
            kwargs[f] = entry["value"]
            sources[f] = entry.get("source", "")
        for f in ("disk_block_bytes",) + CAPACITY_FIELDS:
            kwargs[f] = int(kwargs[f])
        curve = d.get("compute_curve")  # optional: a flat compute_efficiency without it
        if curve is not None:
            if not isinstance(curve, dict) or not isinstance(curve.get("value"), dict):
                raise ValueError(f"{where}: field 'compute_curve': expected {{\"value\": {{tokens: fraction}}, "
                                 f"\"source\": ...}}, got {curve!r}")
            kwargs["compute_curve"] = {int(k): v for k, v in curve["value"].items()}
            sources["compute_curve"] = curve.get("source", "")
        for f in OPTIONAL_FIELDS:
            entry = d.get(f)
            if entry is None:
                continue
            if not isinstance(entry, dict) or "value" not in entry:
                raise ValueError(f"{where}: field {f!r}: expected {{\"value\": ..., \"source\": ...}}, got {entry!r}")
            kwargs[f] = {int(k): v for k, v in entry["value"].items()} if f == "cpu_thread_speedup" else entry["value"]
            sources[f] = entry.get("source", "")
        pr = d.get("probe") or {}
        return cls(name=d.get("name", ""), fingerprint=d.get("fingerprint", ""),
                   device_name=d.get("device_name", "cpu"), sources=sources, measured_at=pr.get("measured_at", ""),
                   spread=pr.get("spread", {}), warnings=tuple(pr.get("warnings", ())), **kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HardwareProfile":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: expected a JSON hardware profile, got invalid JSON ({e})") from None
        return cls.from_dict(d, where=str(path))


# -- where profiles live -----------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$OFFLOAD_CACHE_DIR/profiles`` if set, else ``~/.cache/offload/profiles``."""
    base = os.environ.get("OFFLOAD_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "offload") / "profiles"


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))


def cached_path(disk_path: str | None = None) -> Path:
    """Where ``offload probe`` caches this machine's profile: the default of every later ``offload plan``."""
    return cache_dir() / f"{fingerprint(disk_path)}.json"


def resolve(name_or_path: str | None) -> HardwareProfile:
    """A profile by path, shipped name, or (``None``) this machine's cached probe, else ``cpu-dev-2core``."""
    if name_or_path is None:
        cached = cached_path()
        if cached.exists():
            return HardwareProfile.load(cached)
        return HardwareProfile.load(SHIPPED_DIR / "cpu-dev-2core.json")
    if os.path.sep in name_or_path or name_or_path.endswith(".json"):
        if not os.path.exists(name_or_path):
            raise ValueError(f"--profile: expected a shipped name or an existing file, got {name_or_path!r}")
        return HardwareProfile.load(name_or_path)
    path = SHIPPED_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise ValueError(f"--profile: expected one of {shipped_profiles()} or a path to a JSON profile, got "
                         f"{name_or_path!r}")
    return HardwareProfile.load(path)


# -- fingerprint -------------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _disk_device(path: str) -> str:
    """``major:minor model`` of the block device holding ``path`` (model from sysfs where it says)."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return "unknown"
    majmin = f"{os.major(dev)}:{os.minor(dev)}"
    model = ""
    for rel in ("device/model", "../device/model"):
        try:
            model = Path(f"/sys/dev/block/{majmin}/{rel}").read_text().strip()
            break
        except OSError:
            continue
    return f"{majmin} {model}".strip()


def fingerprint_parts(disk_path: str | None = None) -> dict[str, str]:
    import psutil  # imported here: reading a profile must not need it

    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    ram_gib = round(psutil.virtual_memory().total / 2**30)
    return {"cpu": _cpu_model(), "cpus": str(os.cpu_count()), "ram_gib": str(ram_gib), "gpu": gpu,
            "disk": _disk_device(disk_path or os.environ.get("TMPDIR", "/tmp"))}


def fingerprint(disk_path: str | None = None) -> str:
    """16 hex digits identifying this machine's CPU model and count, RAM, GPU and disk: the probe cache key."""
    parts = fingerprint_parts(disk_path)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
