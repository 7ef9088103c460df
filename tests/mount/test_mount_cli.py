"""Mounting and unmounting from the shell: background and foreground,
signals, privacy, and refusals while the store is in use."""

import errno
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.mounting import (
    SNAPFS, force_unmount, mounted, mountinfo_fields, snapfs, snapfs_mounts, wait_for,
)


@pytest.fixture
def small_store(store):
    snapfs("vm", "add", store, "web", "--disk", "sda=1M")
    return store



def test_refusals_while_mounted(tmp_path, small_store):
    with mounted(small_store, tmp_path / "mnt") as mnt:
        (tmp_path / "other").mkdir()
        r = snapfs("mount", small_store, tmp_path / "other", check=False)
        assert r.returncode == 1 and "in use" in r.stderr and str(mnt) in r.stderr
        r = snapfs("vm", "add", small_store, "db", "--disk", "sda=1M", check=False)
        assert r.returncode == 1 and f"mounted at {mnt}" in r.stderr
        r = snapfs("vm", "remove", small_store, "web", check=False)
        assert r.returncode == 1 and f"mounted at {mnt}" in r.stderr
        r = snapfs("mount", small_store, mnt, check=False)
        assert r.returncode == 1 and "already mounted" in r.stderr
        assert os.listdir(mnt) == ["web"]
    # Unmounting released the lock at once.
    snapfs("vm", "add", small_store, "db", "--disk", "sda=1M")


def test_mount_and_umount_errors(tmp_path, small_store):
    r = snapfs("mount", small_store, tmp_path / "missing", check=False)
    assert r.returncode == 1 and "not a directory" in r.stderr
    r = snapfs("umount", tmp_path, check=False)
    assert r.returncode == 1 and "no snapfs store is mounted" in r.stderr
    r = snapfs("mount", tmp_path / "nostore", tmp_path, check=False)
    assert r.returncode == 1 and "no such store" in r.stderr


def test_foreground_mount_ends_on_sigterm(tmp_path, small_store):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(SNAPFS + ["mount", "--foreground", str(small_store), str(mnt)])
    try:
        assert wait_for(lambda: str(mnt) in snapfs_mounts())
        assert os.listdir(mnt) == ["web"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert str(mnt) not in snapfs_mounts()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mnt)


def test_background_daemon_unmounts_on_sigterm(tmp_path, small_store):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    snapfs("mount", small_store, mnt)
    try:
        holder = (small_store / "lock").read_text()
        pid = int(holder.split()[1].rstrip(":"))
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: str(mnt) not in snapfs_mounts())
    finally:
        force_unmount(mnt)


@pytest.fixture
def public_dir():
    """A directory every user can reach (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="snapfs-public-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_mount_is_private_unless_allow_other(public_dir, small_store):
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls"]
    # The mount point's parent is reachable by anyone; only FUSE can refuse.
    r = subprocess.run(as_nobody + [str(public_dir)], capture_output=True, text=True)
    assert r.returncode == 0
    with mounted(small_store, public_dir / "private") as mnt:
        assert "allow_other" not in " ".join(mountinfo_fields(mnt))
        r = subprocess.run(as_nobody + [str(mnt)], capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr
    with mounted(small_store, public_dir / "shared", "-o", "allow_other") as mnt:
        assert "allow_other" in " ".join(mountinfo_fields(mnt))
        r = subprocess.run(as_nobody + [str(mnt)], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.split() == ["web"]
        # The active view is 0660 and owned by the mounting user: others
        # cannot read it.
        view = mnt / "web" / "active" / "sda.raw"
        assert oct(os.stat(view).st_mode & 0o777) == "0o660"
        r = subprocess.run(as_nobody[:-1] + ["cat", str(view)], capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr


def test_snapshot_view_writes_stay_private(tmp_path, small_store):
    with mounted(small_store, tmp_path / "mnt") as mnt:
        (mnt / "web" / "snapshots" / "s").touch()
        view = mnt / "web" / "snapshots" / "s" / "sda.raw"
        assert oct(os.stat(view).st_mode & 0o777) == "0o640"
        original = view.read_bytes()
        with open(view, "r+b", buffering=0) as f:
            f.write(b"\x5a" * 1000)
            f.seek(0)
            assert f.read(1000) == b"\x5a" * 1000
        assert view.read_bytes() == original
        with pytest.raises(OSError) as e:
            open(view.parent / "snapshot.json", "r+b")
        assert e.value.errno == errno.EROFS
