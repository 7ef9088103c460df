"""Mounting as at boot: ``mount -t fuse.snapfs``, an fstab line, plain
``umount``, the standard mount options and ``-o ro``."""

import errno
import json
import os
import signal

import pytest

from snapfs.errors import ReadOnly
from snapfs.fs.vfs import Vfs
from snapfs.store.store import Store
from tests.support.fstab import (
    alive, daemon_pid, run, snapfs_on_mount_path, system_mounted,
)
from tests.support.mounting import mountinfo_fields, snapfs, snapfs_mounts, wait_for
from tests.support.qemu import qemu_img, qemu_io, to_raw
from tests.support.vfstree import path as vfs_path


@pytest.fixture(scope="module", autouse=True)
def on_mount_path():
    with snapfs_on_mount_path():
        yield


@pytest.fixture
def images(tmp_path):
    """base.qcow2 <- top.qcow2, each with its own data."""
    src = tmp_path / "src"
    src.mkdir()
    qemu_img("create", "-f", "qcow2", src / "base.qcow2", "4M")
    qemu_io(src / "base.qcow2", "write -P 7 0 96k", "write -P 9 1M 4k", fmt="qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", src / "top.qcow2",
             cwd=src)
    qemu_io(src / "top.qcow2", "write -P 3 64k 64k", fmt="qcow2")
    return src


@pytest.fixture
def web(store, images):
    """A store holding VM web: snapshot base, and the active state top."""
    snapfs("vm", "add", store, "web", "--disk", f"sda={images / 'top.qcow2'}")
    return store


def mount_flags(mnt):
    """The per-mount flags (ro, nosuid, nodev, noexec...)."""
    return set(mountinfo_fields(mnt)[5].split(","))


def assert_errno(code, fn, *args):
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == code, e.value


def test_mount_t_fuse_snapfs_and_umount(tmp_path, web, images):
    mnt = tmp_path / "mnt"
    with system_mounted(web, mnt, "-t", "fuse.snapfs", web, mnt, "-o", "allow_other") as pid:
        assert os.listdir(mnt) == ["web"]
        assert os.listdir(mnt / "web" / "snapshots") == ["base", "latest"]
        view = mnt / "web" / "snapshots" / "base" / "sda.raw"
        assert view.read_bytes() == to_raw(images / "base.qcow2")
        assert (mnt / "web" / "active" / "sda.raw").read_bytes() == to_raw(images / "top.qcow2")
        flags = mount_flags(mnt)
        # mount.fuse3 asks for dev,suid: snapfs keeps nodev,nosuid.
        assert {"rw", "nosuid", "nodev"} <= flags and "noexec" not in flags
        assert "allow_other" in mountinfo_fields(mnt)[-1]
        # The store's own daemon: `snapfs umount` finds it too.
        assert snapfs("check", web).returncode == 0
        r = run("umount", mnt)
        assert r.returncode == 0, r.stderr
        assert str(mnt) not in snapfs_mounts()
        # The kernel ended the connection: the daemon exits on its own.
        assert wait_for(lambda: not alive(pid))
    assert daemon_pid(web) is None or not alive(daemon_pid(web))
    # The lock is free: the CLI may change the store again.
    snapfs("snapshot", "create", web, "web", "after")
    assert "unmounted" in (web / "snapfs.log").read_text()


def test_fstab_line(tmp_path, web, images):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# a snapfs store\n{web} {mnt} fuse.snapfs defaults,allow_other,nofail 0 0\n")
    with system_mounted(web, mnt, "--fstab", fstab, mnt):
        assert (mnt / "web" / "snapshots" / "base" / "sda.raw").read_bytes() == \
            to_raw(images / "base.qcow2")
        assert "allow_other" in mountinfo_fields(mnt)[-1]
        # A shell inside keeps it mounted: umount refuses, and it still serves.
        with open(mnt / "web" / "snapshots" / "base" / "sda.raw", "rb"):
            r = run("umount", mnt)
            assert r.returncode != 0 and "busy" in r.stderr.lower()
        assert os.listdir(mnt) == ["web"]
    snapfs("snapshot", "create", web, "web", "after")


def test_sigterm_unmounts_a_daemon_started_by_mount(tmp_path, web):
    """mount(8) leaves the daemon no PATH; it still finds fusermount3."""
    mnt = tmp_path / "mnt"
    with system_mounted(web, mnt, "-t", "fuse.snapfs", web, mnt) as pid:
        with open(f"/proc/{pid}/environ", "rb") as f:
            names = {entry.split(b"=")[0] for entry in f.read().split(b"\0")}
        assert b"PATH" not in names
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: str(mnt) not in snapfs_mounts())
        assert wait_for(lambda: not alive(pid))
    snapfs("snapshot", "create", web, "web", "after")


def test_read_only_mount(tmp_path, web, images):
    mnt = tmp_path / "mnt"
    before = snapfs("snapshot", "list", web, "web", "--json").stdout
    with system_mounted(web, mnt, "-t", "fuse.snapfs", "-o", "ro", web, mnt):
        assert "ro" in mount_flags(mnt)
        vm = mnt / "web"
        snaps = vm / "snapshots"
        # Reads work.
        assert (snaps / "base" / "sda.raw").read_bytes() == to_raw(images / "base.qcow2")
        active = vm / "active" / "sda.raw"
        assert active.read_bytes() == to_raw(images / "top.qcow2")
        assert json.loads((vm / "control" / "status").read_text())["state"] == "idle"
        # Nothing changes.
        assert_errno(errno.EROFS, os.mkdir, snaps / "new")
        assert_errno(errno.EROFS, open, snaps / "touched", "w")
        assert_errno(errno.EROFS, os.rmdir, snaps / "base")
        assert_errno(errno.EROFS, os.rename, snaps / "base", snaps / "renamed")
        for command in ("create", "delete", "preview", "commit", "undo"):
            assert_errno(errno.EROFS, open, vm / "control" / command, "w")
        assert_errno(errno.EROFS, open, active, "r+b")
        assert_errno(errno.EROFS, os.truncate, active, 0)
        # No throwaway overlay either.
        assert_errno(errno.EROFS, open, snaps / "base" / "sda.raw", "r+b")
        assert os.listdir(snaps) == ["base", "latest"]
    assert snapfs("snapshot", "list", web, "web", "--json").stdout == before
    assert (tmp_path / "src" / "top.qcow2").exists()


def test_read_only_vfs_refuses_without_the_kernel(web):
    """The namespace refuses on its own too, should a request get past the
    kernel's MS_RDONLY."""
    vfs = Vfs(Store.open(web), read_only=True)
    try:
        for parts in (("web", "active", "sda.raw"), ("web", "control", "create"),
                      ("web", "snapshots", "base", "sda.raw")):
            with pytest.raises(ReadOnly):
                vfs.open(vfs_path(vfs, *parts).inode, writable=True, readable=False)
        vfs.open(vfs_path(vfs, "web", "active", "sda.raw").inode, writable=False)
        snaps = vfs_path(vfs, "web", "snapshots")
        with pytest.raises(ReadOnly):
            vfs.mkdir(snaps.inode, "new")
        with pytest.raises(ReadOnly):
            vfs.rmdir(snaps.inode, "base")
        status = vfs_path(vfs, "web", "control", "status")
        handle = vfs.open(status.inode, writable=False)
        assert "read-only" in json.loads(vfs.read(handle, 0, 1 << 16))["last_error"]["error"]
    finally:
        vfs.close()
    assert [s["name"] for s in json.loads(
        snapfs("snapshot", "list", web, "web", "--json").stdout)] == ["base"]


def test_standard_options_are_accepted(tmp_path, web):
    mnt = tmp_path / "mnt"
    options = "nodev,nosuid,noexec,noauto,nofail,_netdev,defaults,rw,users,relatime,sync"
    with system_mounted(web, mnt, "-t", "fuse.snapfs", "-o", options, web, mnt):
        assert {"rw", "nodev", "nosuid", "noexec"} <= mount_flags(mnt)
        assert os.listdir(mnt) == ["web"]
    with system_mounted(web, mnt, "-t", "fuse.snapfs", "-o", "auto,exec,atime,dev,suid,async",
                        web, mnt):
        assert "noexec" not in mount_flags(mnt)
        assert os.listdir(mnt / "web") == ["active", "snapshots", "control"]


@pytest.mark.parametrize("options, words", [
    ("allow_other,bogus", "unknown mount option 'bogus'"),
    ("scratch_limit=lots", "scratch_limit: invalid size 'lots'"),
])
def test_bad_option_is_one_clear_line_and_no_mount(tmp_path, web, options, words):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run("mount", "-t", "fuse.snapfs", "-o", options, web, mnt)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert str(mnt) not in snapfs_mounts()
    assert daemon_pid(web) is None or not alive(daemon_pid(web))
    snapfs("snapshot", "create", web, "web", "after")


def test_missing_store_is_one_clear_line(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run("mount", "-t", "fuse.snapfs", tmp_path / "nostore", mnt)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such store" in lines[0], r.stderr
    assert str(mnt) not in snapfs_mounts()


def test_drop_privileges_is_refused(tmp_path, web):
    """mount.fuse3 mounts by itself for drop_privileges, without
    default_permissions: snapfs refuses to serve it, and says to unmount."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = run("mount", "-t", "fuse.snapfs", "-o", "drop_privileges", web, mnt)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "drop_privileges" in lines[0] and "umount" in lines[0]
        snapfs("snapshot", "create", web, "web", "after")
    finally:
        if str(mnt) in snapfs_mounts():
            run("umount", mnt)
    assert str(mnt) not in snapfs_mounts()
