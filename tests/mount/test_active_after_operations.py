"""Writes to the active view around operations land in the current active
leaf, never in a snapshot and never in a deleted volume, whether the file
was opened before the operation or after (regressions found by the model
test)."""

import errno
import json
import os
import time

import pytest

from tests.support.mounting import control, mounted, snapfs


def wait_idle(vm):
    deadline = time.monotonic() + 60
    while json.loads((vm / "control" / "status").read_text())["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)


def byte(path, offset=0):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(1)


def test_open_file_follows_the_leaf_across_operations(tmp_path, store):
    snapfs("vm", "add", store, "vm", "--disk", "sda=4M")
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "vm"
        active = vm / "active" / "sda.raw"
        fd = os.open(active, os.O_RDWR)
        try:
            os.pwrite(fd, b"\x01", 0)
            control(vm, "create", "s1")
            os.pwrite(fd, b"\x02", 0)                 # after the snapshot
            assert byte(vm / "snapshots" / "s1" / "sda.raw") == b"\x01"
            assert os.pread(fd, 1, 0) == b"\x02"
            os.mkdir(vm / "snapshots" / "s2")
            os.pwrite(fd, b"\x03", 0)
            assert byte(vm / "snapshots" / "s2" / "sda.raw") == b"\x02"
            # Finding 12: no preview switches the leaf under a writer.
            with pytest.raises(OSError) as e:
                control(vm, "preview", "s1\n")
            assert e.value.errno == errno.EBUSY
        finally:
            os.close(fd)
        # A preview shows the snapshot's bytes through a file opened before it.
        fd = os.open(active, os.O_RDONLY)
        try:
            control(vm, "preview", "s1\n")
            assert os.pread(fd, 1, 0) == b"\x01"
            with open(active, "r+b") as f:
                f.write(b"\x09")
            assert os.pread(fd, 1, 0) == b"\x09"
            assert byte(vm / "before-preview" / "sda.raw") == b"\x03"
            control(vm, "undo")
            assert os.pread(fd, 1, 0) == b"\x03"
        finally:
            os.close(fd)
        assert byte(vm / "snapshots" / "s1" / "sda.raw") == b"\x01"


def test_write_right_after_rmdir_is_kept(tmp_path, store):
    snapfs("vm", "add", store, "vm", "--disk", "sda=4M")
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "vm"
        active = vm / "active" / "sda.raw"
        with open(active, "r+b") as f:
            f.write(b"\x01" * (1 << 20))
        os.mkdir(vm / "snapshots" / "a")
        with open(active, "r+b") as f:
            f.seek(2 << 20)
            f.write(b"\x02" * 65536)
        os.rmdir(vm / "snapshots" / "a")
        # Immediately, while the merge may still run: a new open and a write.
        with open(active, "r+b") as f:
            f.write(b"\x05")
            f.flush()
            os.fsync(f.fileno())
        wait_idle(vm)
        assert byte(active) == b"\x05"
        assert byte(active, 1) == b"\x01"
        assert byte(active, 2 << 20) == b"\x02"
    with mounted(store, tmp_path / "mnt2") as mnt:
        assert byte(mnt / "vm" / "active" / "sda.raw") == b"\x05"
    assert snapfs("check", store).returncode == 0
