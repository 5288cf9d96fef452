"""Errors of the storage layer. Each message says what was expected, what was found, and what to do."""

from __future__ import annotations

from storage.units import format_bytes as _fmt


class TierFullError(MemoryError):
    """A reservation did not fit in a tier's byte budget."""

    def __init__(self, tier: str, what: str, requested: int, used: int, capacity: int, *,
                 never: bool = False, waited: float | None = None):
        self.tier, self.what, self.requested, self.used, self.capacity = tier, what, requested, used, capacity
        if never:
            msg = (f"{what} needs {_fmt(requested)} on the {tier} tier, more than its whole budget of "
                   f"{_fmt(capacity)}: raise the {tier} budget or split the {what} into smaller pieces")
        else:
            short = requested - (capacity - used)
            msg = (f"{what} needs {_fmt(requested)} on the {tier} tier but only {_fmt(capacity - used)} of "
                   f"{_fmt(capacity)} is free ({_fmt(short)} short)"
                   + (f" after waiting {waited:.1f} s" if waited is not None else "")
                   + f": raise the {tier} budget, release buffers sooner, or ask to wait for space")
        super().__init__(msg)


class StoreError(Exception):
    """Base class of NVMe store errors."""


class StoreOpenError(StoreError):
    """The store's directory is missing, not writable, or holds a different store."""


class StoreLockedError(StoreOpenError):
    """Another process (or another open store object) holds this store."""


class StoreCorruptError(StoreError):
    """The store's files do not match its index: truncated, overwritten, or mixed up."""


class ChecksumError(StoreCorruptError):
    """A chunk's bytes on disk do not match the checksum recorded when it was written."""

    def __init__(self, key: str, block: int, path: str, offset: int, expected: int, got: int):
        self.key, self.block, self.path, self.offset = key, block, path, offset
        super().__init__(
            f"checksum mismatch in chunk {key!r} (block {block}, {path} at byte {offset}): expected "
            f"{expected:016x}, got {got:016x}. The bytes on disk changed after they were written (disk error or "
            f"another writer); this chunk cannot be trusted: restore it from a checkpoint")


class StoreFullError(StoreError):
    """The store's pre-allocated files have no free extent large enough."""


class DiskFullError(StoreError, OSError):
    """The file system ran out of space (ENOSPC) under the store."""


class ChunkKeyError(StoreError, KeyError):
    """No committed chunk under this key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ChunkMismatchError(StoreError, ValueError):
    """A read's destination tensor does not match the stored chunk's dtype or size."""
