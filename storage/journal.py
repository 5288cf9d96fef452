"""The store's index on disk: a snapshot plus an append-only journal of commits.

Why a journal: a chunk's new bytes go to a free slot first, and only then does one journal line make them the
committed version (see :mod:`storage.nvme`). A line is ``<CRC-32C of payload, 16 hex> <json payload>\\n``, written
with one ``write`` to an ``O_APPEND`` file, so after ``kill -9`` the journal ends either with a whole line or
with a torn one, which the next open recognises by its checksum (or missing newline) and drops. A bad line
*followed by* good ones is not a crash but corruption, and raises.

The journal is compacted into a snapshot (write to a temporary file, fsync, rename: atomic) when it grows to
several times the number of live chunks. Snapshot generation ``G`` is followed by journal ``index.journal.G``;
a crash between the rename and the new journal's creation leaves no journal for ``G``, which reads as empty.
No pickle anywhere: the index is JSON, so opening a store never runs code from the disk.
"""

from __future__ import annotations

import json
import os

import crc32c

from storage.errors import StoreCorruptError

SNAPSHOT = "index.snapshot"
JOURNAL = "index.journal"


def _line(payload: dict) -> bytes:
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return b"%016x %s\n" % (crc32c.crc32c(body), body)


def _parse(line: bytes) -> dict | None:
    """The payload of a well-formed line, or ``None`` if the line is torn or damaged."""
    if len(line) < 18 or not line.endswith(b"\n") or line[16:17] != b" ":
        return None
    body = line[17:-1]
    try:
        if int(line[:16], 16) != crc32c.crc32c(body):
            return None
        return json.loads(body)
    except ValueError:
        return None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Snapshot + journal in one directory. Not thread-safe: the store calls it under its lock."""

    def __init__(self, directory: str, *, durable: bool, readonly: bool = False):
        self.directory = directory
        self.durable = durable
        self.readonly = readonly
        """Read the index and change nothing: no torn tail cut, no leftovers removed, no journal opened."""
        self.generation = 0
        self.records_since_snapshot = 0
        self._fd: int | None = None

    # -- opening --------------------------------------------------------------------------------------------------
    @staticmethod
    def create(directory: str) -> str:
        """The empty first journal of a new store, made before the store's manifest: from then on a store whose
        index files are all gone has lost its index (see :meth:`load`), never merely not made it yet."""
        path = os.path.join(directory, f"{JOURNAL}.0")
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return path

    def load(self) -> tuple[dict, list[dict]]:
        """Read the snapshot header and every committed record after it; truncate a torn tail (unless read-only).

        Returns ``(snapshot, records)`` where ``snapshot`` is the snapshot payload (``{}`` for a new store).
        Raises :class:`StoreCorruptError` when the index is gone (no snapshot and no journal) or the snapshot is
        (a journal of a later generation than 0 shows there was one): reading on would give an empty store, and
        the first compaction would make that the truth.
        """
        snap_path = os.path.join(self.directory, SNAPSHOT)
        if os.path.exists(snap_path + ".tmp") and not self.readonly:  # a compaction that crashed before its rename
            os.unlink(snap_path + ".tmp")
        journals = sorted((n for n in os.listdir(self.directory) if n.startswith(JOURNAL + ".")),
                          key=lambda n: (len(n), n))
        if not os.path.exists(snap_path):
            fix = (f"restore the index files from a copy of {self.directory}, or recreate the store with "
                   f"reset=True (which deletes its chunks)")
            if not journals:
                raise StoreCorruptError(f"the store index in {self.directory} is missing: expected {SNAPSHOT} or "
                                        f"{JOURNAL}.*, found neither, so the chunks in the data file cannot be "
                                        f"found: {fix}")
            if f"{JOURNAL}.0" not in journals:
                raise StoreCorruptError(f"{snap_path} is missing, but {journals[-1]} shows the store had one: the "
                                        f"chunks it listed cannot be found: {fix}")
        snapshot: dict = {}
        if os.path.exists(snap_path):
            with open(snap_path, "rb") as f:
                data = f.read()
            snapshot = _parse(data) if data.count(b"\n") == 1 else None
            if snapshot is None:
                raise StoreCorruptError(f"{snap_path} is damaged (bad checksum or not one JSON line). It is written "
                                        f"atomically, so this is not a crash but a changed file: restore the store "
                                        f"from a checkpoint, or recreate it with reset=True")
            self.generation = int(snapshot["generation"])
        records = []
        jpath = self._journal_path(self.generation)
        if os.path.exists(jpath):
            with open(jpath, "rb") as f:
                lines = f.readlines()
            good_end = 0
            for i, raw in enumerate(lines):
                rec = _parse(raw)
                if rec is None:
                    if any(_parse(later) is not None for later in lines[i + 1:]):
                        raise StoreCorruptError(
                            f"{jpath} line {i + 1} is damaged but later lines are intact: this is corruption, not "
                            f"a torn write from a crash. Restore the store from a checkpoint or recreate it with "
                            f"reset=True")
                    break  # torn tail of a crash: the commit it carried never happened
                records.append(rec)
                good_end += len(raw)
            if good_end != sum(len(x) for x in lines) and not self.readonly:
                os.truncate(jpath, good_end)
        self.records_since_snapshot = len(records)
        if self.readonly:
            return snapshot, records
        for name in journals:  # journals of older generations, left by a crash mid-compaction
            if name != os.path.basename(jpath):
                os.unlink(os.path.join(self.directory, name))
        self._open_append()
        return snapshot, records

    def _journal_path(self, generation: int) -> str:
        return os.path.join(self.directory, f"{JOURNAL}.{generation}")

    def _open_append(self) -> None:
        self._fd = os.open(self._journal_path(self.generation), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    # -- writing --------------------------------------------------------------------------------------------------
    def append(self, record: dict) -> None:
        """Commit one record: after this returns the record survives ``kill -9`` (and power loss if durable)."""
        line = _line(record)
        n = os.write(self._fd, line)
        if n != len(line):  # a short append (disk full): cut it off so the journal stays well formed
            os.ftruncate(self._fd, os.lseek(self._fd, 0, os.SEEK_END) - n)
            raise OSError(28, "short write to the store journal (disk full?)")
        if self.durable:
            os.fsync(self._fd)
        self.records_since_snapshot += 1

    def compact(self, snapshot: dict) -> None:
        """Write ``snapshot`` (the whole index) as generation ``G+1`` and start an empty journal for it."""
        gen = self.generation + 1
        snapshot = dict(snapshot, generation=gen)
        path = os.path.join(self.directory, SNAPSHOT)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = _line(snapshot)
            if os.write(fd, data) != len(data):
                raise OSError(28, "short write of the store snapshot (disk full?)")
            os.fsync(fd)
        finally:
            os.close(fd)
        # Open the new journal before the rename: once the snapshot is generation G+1, the next open reads journal
        # G+1 and drops journal G, so from the rename on every commit must go to G+1, whatever fails after it.
        new_fd = os.open(self._journal_path(gen), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.close(new_fd)
            os.unlink(self._journal_path(gen))
            raise
        old_fd, old_path = self._fd, self._journal_path(self.generation)
        self._fd, self.generation, self.records_since_snapshot = new_fd, gen, 0
        os.close(old_fd)
        _fsync_dir(self.directory)  # the rename is durable before the old journal goes
        os.unlink(old_path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
