"""Disk full: a clear DiskFullError, and the previous version kept.

Two ways to run out of space: a fake at the syscall boundary (``os.pwritev``, ``os.write``,
``os.posix_fallocate`` raising ENOSPC: runs anywhere), and a real small file system (tmpfs with ``size=``, or a
loop-mounted ext4 image: needs root, skipped with the reason otherwise).
"""

from __future__ import annotations

import errno
import os
import shutil
import types
import warnings

import pytest
import torch

from conftest import SMALL, mounted
from storage import DiskFullError, NvmeStore, StoreError, StoreOpenError
from storage.nvme import DATA

V1 = torch.full((100_000,), 1.0)  # 400 KB: 25 blocks of 16 KiB
V2 = torch.full((100_000,), 2.0)


def _enospc(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def _check_disk_full(e: DiskFullError, key: str) -> None:
    assert isinstance(e, StoreError) and isinstance(e, OSError) and e.errno == errno.ENOSPC
    assert f"disk full writing chunk {key!r}" in str(e)
    assert "the previous version is kept; free space on that drive" in str(e)


@pytest.mark.parametrize("fail_after", [0, 5], ids=["first-block", "mid-chunk"])
def test_enospc_on_data_write_keeps_the_previous_version(store_dir, monkeypatch, fail_after):
    real = os.pwritev
    calls = [0]

    def pwritev(fd, views, offset):
        calls[0] += 1
        if calls[0] > fail_after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, views, offset)

    with NvmeStore(store_dir, capacity_bytes=4 << 20, config=SMALL) as s:
        s.write("k", V1).wait()
        free = s.free_bytes
        monkeypatch.setattr(os, "pwritev", pwritev)
        h = s.write("k", V2)
        assert torch.equal(s.read("k").wait(), V1)  # the read waits for the write, which fails: v1 it is
        with pytest.raises(DiskFullError) as e:
            h.wait()
        _check_disk_full(e.value, "k")
        assert torch.equal(s.read("k").wait(), V1)
        assert s.free_bytes == free  # the failed version's extents came back
        monkeypatch.setattr(os, "pwritev", real)  # space again
        s.write("k", V2).wait()
        assert torch.equal(s.read("k").wait(), V2)
    with NvmeStore(store_dir) as s:
        assert torch.equal(s.read("k").wait(), V2) and s.verify() == {}


def test_enospc_on_a_new_key_leaves_no_key(store_dir, monkeypatch):
    with NvmeStore(store_dir, capacity_bytes=4 << 20, config=SMALL) as s:
        monkeypatch.setattr(os, "pwritev", _enospc)
        with pytest.raises(DiskFullError):
            s.write("new", V1).wait()
        assert "new" not in s and s.free_bytes == s.capacity_bytes


@pytest.mark.parametrize("mode", ["enospc", "short"])
def test_journal_full_keeps_the_previous_version(store_dir, monkeypatch, mode):
    real = os.write
    with NvmeStore(store_dir, capacity_bytes=4 << 20, config=SMALL) as s:
        s.write("k", V1).wait()
        free = s.free_bytes
        journal_fd = s._journal._fd

        def write(fd, data):
            if fd != journal_fd:
                return real(fd, data)
            if mode == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, bytes(data)[:len(data) // 2])  # the disk filled up half way through the line

        monkeypatch.setattr(os, "write", write)
        with pytest.raises(DiskFullError) as e:
            s.write("k", V2).wait()
        assert e.value.errno == errno.ENOSPC
        assert "cannot commit chunk 'k' to the store journal" in str(e.value)
        assert "the previous version is kept" in str(e.value)
        assert torch.equal(s.read("k").wait(), V1) and s.free_bytes == free
        monkeypatch.setattr(os, "write", real)
        s.write("other", V2).wait()  # a later commit after the cut-off line
        s._simulate_crash()  # reopen from the journal, not from a snapshot written by close()
    with NvmeStore(store_dir) as s:  # a half line left in the middle would read as corruption here
        assert torch.equal(s.read("k").wait(), V1) and torch.equal(s.read("other").wait(), V2)


def test_enospc_when_preallocating_leaves_nothing_behind(tmp_path, monkeypatch):
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    real = os.posix_fallocate
    calls = [0]

    def fallocate(fd, offset, length):
        calls[0] += 1
        if calls[0] == 2:  # the first drive had room, the second has not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    with pytest.raises(DiskFullError) as e:
        NvmeStore(dirs, capacity_bytes=2 << 20, config=SMALL)
    assert e.value.errno == errno.ENOSPC
    msg = str(e.value)
    assert f"not enough free space in {dirs[1]} to pre-allocate 1.0 MiB" in msg
    assert "lower capacity_bytes, or add directories on other drives" in msg
    assert os.listdir(dirs[0]) == [] and os.listdir(dirs[1]) == []  # no half-made store
    monkeypatch.setattr(os, "posix_fallocate", real)
    with NvmeStore(dirs, capacity_bytes=2 << 20, config=SMALL) as s:  # and a later create works
        s.write("k", V1).wait()


def test_capacity_beyond_the_free_space_fails_before_writing_anything(store_dir):
    free = os.statvfs(store_dir).f_bavail * os.statvfs(store_dir).f_frsize
    with pytest.raises(DiskFullError) as e:
        NvmeStore(store_dir, capacity_bytes=free + (1 << 40))
    msg = str(e.value)
    assert f"not enough free space in {store_dir} for the store" in msg
    assert "Free space, lower capacity_bytes, or add directories on other drives" in msg
    assert os.listdir(store_dir) == []


# -- real small file systems ---------------------------------------------------------------------------------------
FS = ["tmpfs", "ext4"]


@pytest.mark.parametrize("fstype", FS)
def test_real_small_fs_too_small_for_the_store(tmp_path, fstype):
    with mounted(tmp_path / "mnt", fstype, 16 << 20) as mnt:
        before = sorted(os.listdir(mnt))
        with pytest.raises(DiskFullError, match=r"not enough free space .* lower capacity_bytes"):
            NvmeStore(mnt, capacity_bytes=64 << 20)
        assert sorted(os.listdir(mnt)) == before


@pytest.mark.parametrize("fstype", FS)
def test_real_enospc_during_a_write_keeps_the_previous_version(tmp_path, monkeypatch, fstype):
    """A file system that cannot pre-allocate (faked: EOPNOTSUPP) gets a sparse data file; filling the disk
    then makes the kernel itself return ENOSPC from the data write."""
    with mounted(tmp_path / "mnt", fstype, 16 << 20) as mnt:
        def no_fallocate(fd, offset, length):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(os, "posix_fallocate", no_fallocate)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s = NvmeStore(mnt, capacity_bytes=4 << 20, config=SMALL)
        assert any("cannot pre-allocate" in str(w.message) for w in caught)
        monkeypatch.undo()
        with s:
            s.write("k", V1).wait()
            filler = os.path.join(mnt, "filler")
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            try:
                chunk = b"\xab" * (64 << 10)
                for _ in range((16 << 20) // len(chunk) + 1):  # more than the 16 MiB file system holds
                    os.write(fd, chunk)
                pytest.fail("wrote more than the file system's size without ENOSPC")
            except OSError as e:
                assert e.errno == errno.ENOSPC
            finally:
                os.close(fd)
            h = s.write("k", torch.full((400_000,), 2.0))  # 1.6 MB into holes of the sparse file: no room
            with pytest.raises(DiskFullError) as e:
                h.wait()
            _check_disk_full(e.value, "k")
            assert os.path.join(mnt, DATA) in str(e.value)
            assert torch.equal(s.read("k").wait(), V1)
            os.unlink(filler)
            s.write("k", V2).wait()
        with NvmeStore(mnt) as s:
            assert torch.equal(s.read("k").wait(), V2) and s.verify() == {}


# -- read-only file systems, and a directory deleted under a running store ----------------------------------------
def test_read_only_fs_is_named_as_such_not_as_a_permissions_problem(store_dir, monkeypatch):
    """On a read-only file system access(W_OK) fails for every user (root too): "fix its permissions" is wrong
    advice there. Faked: access() as the kernel answers it, statvfs() saying ST_RDONLY."""
    real_statvfs = os.statvfs
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: not mode & os.W_OK)
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(
        **{k: getattr(real_statvfs(p), k) for k in ("f_bavail", "f_frsize", "f_blocks")}, f_flag=os.ST_RDONLY))
    with pytest.raises(StoreOpenError) as e:
        NvmeStore(store_dir, capacity_bytes=1 << 20, config=SMALL)
    assert f"store directory {store_dir} is on a read-only file system" in str(e.value)
    assert "permission" not in str(e.value)


def test_real_read_only_mount_is_named_as_such(tmp_path):
    with mounted(tmp_path / "ro", "tmpfs", 1 << 20, options="ro") as mnt:
        with pytest.raises(StoreOpenError, match=r"is on a read-only file system: choose a directory on a writable"):
            NvmeStore(mnt, capacity_bytes=1 << 20, config=SMALL)


def test_a_file_system_turned_read_only_under_a_running_store(store_dir, monkeypatch):
    """ext4 with errors=remount-ro: writes start failing with EROFS. Said as such, not as "I/O error" or as a
    full disk."""
    def erofs(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    with NvmeStore(store_dir, capacity_bytes=4 << 20, config=SMALL) as s:
        s.write("k", V1).wait()
        monkeypatch.setattr(os, "pwritev", erofs)
        with pytest.raises(StoreError) as e:
            s.write("k", V2).wait()
        assert f"{store_dir} is on a read-only file system now (write of chunk 'k')" in str(e.value)
        monkeypatch.undo()
        journal_fd, real = s._journal._fd, os.write
        monkeypatch.setattr(os, "write", lambda fd, data: erofs() if fd == journal_fd else real(fd, data))
        with pytest.raises(StoreError) as e:
            s.write("k", V2).wait()
        assert not isinstance(e.value, DiskFullError)
        assert "cannot commit chunk 'k' to the store journal" in str(e.value) and "read-only" in str(e.value)
        monkeypatch.undo()
        assert torch.equal(s.read("k").wait(), V1)


def test_store_directory_deleted_while_open_is_reported_at_flush_and_close(store_dir):
    """The open descriptors keep working on the deleted files, so writes "succeed" into files that vanish at
    close: flush() and close() say so, naming the directory, instead of a FileNotFoundError from compaction."""
    s = NvmeStore(store_dir, capacity_bytes=4 << 20, config=SMALL)
    s.write("k", V1).wait()
    shutil.rmtree(store_dir)
    s.write("k", V2).wait()  # lands in the unlinked file: nothing can notice here
    with pytest.raises(StoreError) as e:
        s.flush()
    assert f"the store directory {store_dir} was deleted or replaced while this store was open" in str(e.value)
    assert "restart from a checkpoint" in str(e.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compacting failed, nothing is lost" warning either
        with pytest.raises(StoreError) as e:
            s.close()
    assert type(e.value) is StoreError and f"{store_dir} was deleted" in str(e.value)
    s.close()  # closed all the same: a second close is a no-op, the descriptors are released
    assert not s._fds
    store_dir.mkdir()  # and a directory recreated in its place is not taken for the store
    with NvmeStore(store_dir, capacity_bytes=4 << 20, config=SMALL) as s2:
        assert len(s2) == 0
