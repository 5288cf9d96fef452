"""storage: bytes on a tier. Tiers and their budgets, the host pool, the NVMe tensor store.

The bottom layer: it imports neither ``scheduler`` nor ``offload`` (tests/test_layers.py enforces it).
"""

from storage.errors import (ChecksumError, ChunkKeyError, ChunkMismatchError, DiskFullError, StoreCorruptError,
                            StoreError, StoreFullError, StoreLockedError, StoreOpenError, TierFullError)
from storage.hostpool import HostBuffer, HostPool
from storage.memory import aligned_empty
from storage.nvme import ChunkInfo, IOHandle, NvmeStore, StoreConfig, StoreVersion
from storage.stats import TransferStats
from storage.tiers import Tier, TierBudget
from storage.units import format_bytes

__all__ = [
    "Tier", "TierBudget", "format_bytes", "HostPool", "HostBuffer", "aligned_empty", "NvmeStore", "StoreConfig",
    "ChunkInfo", "IOHandle", "StoreVersion", "TransferStats", "TierFullError", "StoreError", "StoreOpenError",
    "StoreLockedError", "StoreCorruptError", "ChecksumError", "StoreFullError", "DiskFullError", "ChunkKeyError", "ChunkMismatchError",
]
