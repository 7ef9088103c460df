"""Layer operations through the mount: every error path of DESIGN.md
section 2 with its errno, the kernel's caches after deletes and renames,
QEMU's image locks, and operations that run while other views are read."""

import errno
import json
import os
import subprocess
import time

import pytest

from tests.support.mounting import control, expect_errno, mounted, snapfs
from tests.support.qemu import qemu_img, qemu_io


def status(vm):
    return json.loads((vm / "control" / "status").read_text())


@pytest.fixture
def vm_store(tmp_path, store):
    src = tmp_path / "src"
    src.mkdir()
    qemu_img("create", "-f", "qcow2", src / "monday.qcow2", "8M")
    qemu_io(src / "monday.qcow2", "write -P 1 0 1M", fmt="qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "monday.qcow2", "-F", "qcow2", src / "now.qcow2",
             cwd=src)
    qemu_io(src / "now.qcow2", "write -P 2 0 64k", fmt="qcow2")
    snapfs("vm", "add", store, "web", "--disk", f"sda={src / 'now.qcow2'}", "--disk", "sdb=2M")
    return store


def test_error_paths_have_their_errno(tmp_path, vm_store):
    with mounted(vm_store, tmp_path / "mnt") as mnt:
        vm = mnt / "web"
        snaps = vm / "snapshots"
        # Unknown VM or snapshot: ENOENT.
        expect_errno(errno.ENOENT, os.listdir, mnt / "nope")
        expect_errno(errno.ENOENT, os.rmdir, snaps / "nope")
        expect_errno(errno.ENOENT, control, vm, "delete", "nope")
        expect_errno(errno.ENOENT, control, vm, "preview", "nope")
        expect_errno(errno.ENOENT, os.rename, snaps / "nope", snaps / "other")
        # Name already taken: EEXIST.
        os.mkdir(snaps / "tuesday")
        expect_errno(errno.EEXIST, control, vm, "create", "tuesday")
        expect_errno(errno.EEXIST, os.rename, snaps / "tuesday", snaps / "monday")
        # Invalid names: EINVAL; too long: ENAMETOOLONG (finding 11).
        for bad in ("a/b", ".", "..", "latest", "a\0b", "a\tb"):
            expect_errno(errno.EINVAL, control, vm, "create", bad)
        expect_errno(errno.ENAMETOOLONG, control, vm, "create", "x" * 256)
        expect_errno(errno.ENAMETOOLONG, os.mkdir, snaps / ("x" * 256))
        expect_errno(errno.EINVAL, control, vm, "commit")      # no preview open
        expect_errno(errno.EINVAL, control, vm, "undo")
        # A preview is open: EBUSY for create and delete.
        control(vm, "preview", "monday")
        expect_errno(errno.EBUSY, os.mkdir, snaps / "wednesday")
        expect_errno(errno.EBUSY, os.rmdir, snaps / "tuesday")
        expect_errno(errno.EBUSY, control, vm, "preview", "tuesday")
        assert status(vm)["state"] == "preview"
        assert status(vm)["last_error"]["errno"] == errno.EBUSY
        control(vm, "undo")
        # Writes to snapshot.json: EROFS (root passes the mode check); to
        # a disk view, they go to a throwaway overlay.
        expect_errno(errno.EROFS, open, snaps / "monday" / "snapshot.json", "r+b")
        expect_errno(errno.EROFS, open, vm / "control" / "status", "w")
        # Creating elsewhere than snapshots/: EPERM.
        expect_errno(errno.EPERM, os.mkdir, vm / "active" / "x")
        expect_errno(errno.EPERM, os.mkdir, mnt / "newvm")
        assert sorted(os.listdir(snaps)) == ["latest", "monday", "tuesday"]
    assert snapfs("check", vm_store).returncode == 0


def test_kernel_never_shows_deleted_or_renamed(tmp_path, vm_store):
    with mounted(vm_store, tmp_path / "mnt") as mnt:
        vm = mnt / "web"
        snaps = vm / "snapshots"
        control(vm, "create", "a first one")
        control(vm, "create", "b")
        # Warm the kernel's caches: entries and attributes of both.
        for name in ("a", "b"):
            assert os.listdir(snaps / name) and os.stat(snaps / name / "sda.raw")
        control(vm, "delete", "a")              # the kernel did not see this coming
        assert not os.path.exists(snaps / "a")
        expect_errno(errno.ENOENT, os.stat, snaps / "a" / "sda.raw")
        os.rename(snaps / "b", snaps / "c")
        assert not os.path.exists(snaps / "b")
        assert os.readlink(snaps / "latest") == "c"
        assert json.loads((snaps / "c" / "snapshot.json").read_text())["name"] == "c"
        assert json.loads((snaps / "c" / "snapshot.json").read_text())["description"] == ""
        assert sorted(os.listdir(snaps)) == ["c", "latest", "monday"]


def test_operations_refused_while_qemu_holds_the_image(tmp_path, vm_store):
    manifest = json.loads((vm_store / "vms" / "web" / "manifest.json").read_text())
    leaf = vm_store / "vms" / "web" / manifest["active"]["sda"]
    # A real QEMU process with the active leaf open, as a running VM would.
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(leaf)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        r = snapfs("snapshot", "create", vm_store, "web", "x", check=False)
        assert r.returncode == 1 and "in use by QEMU" in r.stderr
        r = snapfs("snapshot", "delete", vm_store, "web", "monday", check=False)
        assert r.returncode == 1 and "in use by QEMU" in r.stderr
        with mounted(vm_store, tmp_path / "mnt") as mnt:
            vm = mnt / "web"
            expect_errno(errno.EBUSY, os.mkdir, vm / "snapshots" / "x")
            expect_errno(errno.EBUSY, control, vm, "preview", "monday")
            expect_errno(errno.EBUSY, os.rmdir, vm / "snapshots" / "monday")
            assert "QEMU" in status(vm)["last_error"]["error"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    snapfs("snapshot", "create", vm_store, "web", "x")


def test_reads_go_on_during_a_merge_and_operations_wait(tmp_path, store, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    qemu_img("create", "-f", "qcow2", src / "big.qcow2", "256M")
    qemu_io(src / "big.qcow2", "write -P 3 0 64M", fmt="qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "big.qcow2", "-F", "qcow2", src / "top.qcow2",
             cwd=src)
    # Disjoint data: either direction of the merge moves 64 MiB.
    qemu_io(src / "top.qcow2", "write -P 4 64M 64M", fmt="qcow2")
    snapfs("vm", "add", store, "big", "--disk", f"sda={src / 'top.qcow2'}")
    snapfs("vm", "add", store, "small", "--disk", "sda=1M")
    # The merge stops after its first copied chunk until the test says so.
    flag = tmp_path / "paused"
    monkeypatch.setenv("SNAPFS_PAUSE_AT", "delete:copy")
    monkeypatch.setenv("SNAPFS_PAUSE_FILE", str(flag))
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "big"
        try:
            # rmdir answers once the deletion is recorded; the merge goes on.
            os.rmdir(vm / "snapshots" / "big")
            deadline = time.monotonic() + 30
            while not flag.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert flag.exists(), "the merge never started"
            assert not os.path.exists(vm / "snapshots" / "big")
            st = status(vm)
            assert st["state"] == "running" and st["operation"]["op"] == "delete"
            # An operation asked meanwhile waits for the merge (mkdir: is
            # queued behind it and answered at once; tests/mount/test_merge_wait.py).
            os.mkdir(vm / "snapshots" / "other")
            assert flag.exists()
            # The snapshots directory, other VMs and this VM's active view
            # all answer while the merge is held.
            assert os.listdir(vm / "snapshots") == []
            with open(mnt / "small" / "active" / "sda.raw", "rb") as f:
                assert f.read(65536) == bytes(65536)
            with open(vm / "active" / "sda.raw", "rb") as f:
                assert f.read(65536) == b"\x03" * 65536
        finally:
            flag.unlink(missing_ok=True)
        deadline = time.monotonic() + 60
        while status(vm)["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status(vm)["last_operation"]["op"] == "create"     # the queued mkdir
        assert status(vm)["last_error"] is None
        assert status(vm)["snapshots"] == ["other"]
        with open(vm / "active" / "sda.raw", "rb") as f:
            assert f.read(1 << 20) == b"\x03" * (1 << 20)
            f.seek(100 << 20)
            assert f.read(4096) == b"\x04" * 4096
            f.seek(200 << 20)
            assert f.read(4096) == bytes(4096)
    assert snapfs("check", store).returncode == 0
