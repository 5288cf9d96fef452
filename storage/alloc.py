"""A first-fit extent allocator over an address range, with coalescing of freed neighbours.

Used for slots in the store's files and for buffers inside the host pool's slabs. Not thread-safe: its owner
holds a lock.
"""

from __future__ import annotations

import bisect


ALIGN = 4096
"""Alignment of every extent, buffer address and file offset: what O_DIRECT needs on every file system we met."""


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


class ExtentAllocator:
    """Free space of ``[0, size)`` as sorted, non-adjacent ``(offset, length)`` runs; lengths are multiples of
    ``align``. First fit keeps a store's chunks packed towards the start of the file, so sequential chunks stay
    sequential on disk."""

    def __init__(self, size: int, align: int = ALIGN):
        if size % align:
            raise ValueError(f"allocator size: expected a multiple of {align}, got {size}")
        self.size = size
        self.align = align
        self._offsets: list[int] = [0] if size else []
        self._lengths: list[int] = [size] if size else []
        self.free_bytes = size

    def largest_free(self) -> int:
        return max(self._lengths, default=0)

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new extent of ``round_up(nbytes)`` bytes, or ``None`` if no free run is large enough."""
        n = round_up(max(nbytes, 1), self.align)
        for i, length in enumerate(self._lengths):
            if length >= n:
                off = self._offsets[i]
                if length == n:
                    del self._offsets[i], self._lengths[i]
                else:
                    self._offsets[i] = off + n
                    self._lengths[i] = length - n
                self.free_bytes -= n
                return off
        return None

    def reserve(self, offset: int, nbytes: int) -> None:
        """Mark ``[offset, offset + round_up(nbytes))`` used; it must be free (used when rebuilding from an index)."""
        n = round_up(max(nbytes, 1), self.align)
        i = bisect.bisect_right(self._offsets, offset) - 1
        if i < 0 or offset + n > self._offsets[i] + self._lengths[i] or offset % self.align:
            raise ValueError(f"extent [{offset}, {offset + n}) is not free (overlaps another extent or lies outside"
                             f" [0, {self.size}))")
        run_off, run_len = self._offsets[i], self._lengths[i]
        pieces = []
        if offset > run_off:
            pieces.append((run_off, offset - run_off))
        if offset + n < run_off + run_len:
            pieces.append((offset + n, run_off + run_len - offset - n))
        self._offsets[i:i + 1] = [p[0] for p in pieces]
        self._lengths[i:i + 1] = [p[1] for p in pieces]
        self.free_bytes -= n

    def free(self, offset: int, nbytes: int) -> None:
        n = round_up(max(nbytes, 1), self.align)
        i = bisect.bisect_left(self._offsets, offset)
        assert i == len(self._offsets) or self._offsets[i] >= offset + n, "double free or overlap"
        assert i == 0 or self._offsets[i - 1] + self._lengths[i - 1] <= offset, "double free or overlap"
        merge_prev = i > 0 and self._offsets[i - 1] + self._lengths[i - 1] == offset
        merge_next = i < len(self._offsets) and self._offsets[i] == offset + n
        if merge_prev and merge_next:
            self._lengths[i - 1] += n + self._lengths[i]
            del self._offsets[i], self._lengths[i]
        elif merge_prev:
            self._lengths[i - 1] += n
        elif merge_next:
            self._offsets[i] = offset
            self._lengths[i] += n
        else:
            self._offsets.insert(i, offset)
            self._lengths.insert(i, n)
        self.free_bytes += n
