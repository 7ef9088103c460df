"""The files inside snapshots (fs/filetree.py) against the kernel: every
path, mode, owner, link, time, attribute and byte of a snapshot's tree
equals what a loop mount of the same view shows."""

import os
import stat
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings

from tests.support.mounting import expect_errno, loop_mounted, mounted, snapfs
from tests.support.trees import random_trees, snapshot_tree, write_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE and loop devices")

FS_SIZE = "32M"


def _mkfs(image, source, *extra):
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(source), *extra, str(image), FS_SIZE],
                   check=True, capture_output=True)


def _store_of(tmp_path, image, name="vm"):
    store = tmp_path / "store"
    snapfs("init", store)
    snapfs("vm", "add", store, name, "--disk", f"sda={image}")
    return store


def test_snapshot_tree_equals_loop_mount_of_its_view(tmp_path):
    src = tmp_path / "src"
    tree = {"etc/hostname": ("file", b"web1\n", 0o644),
            "etc/shadow": ("file", b"root:x:0\n", 0o600),
            "home/u": ("dir", 0o700),
            "home/u/notes": ("file", os.urandom(200_000), 0o640),
            "var/link": ("link", "../etc/hostname"),
            "var/hard": ("hard", "etc/hostname"),
            "run/fifo": ("fifo",),
            "empty": ("file", b"", 0o644)}
    write_tree(src, tree, owners={"home/u": (1000, 1000), "home/u/notes": (1000, 100)})
    os.setxattr(src / "etc/hostname", "user.origin", b"test")
    os.mknod(src / "run/tty", 0o620 | stat.S_IFCHR, os.makedev(4, 1))
    os.mknod(src / "run/big", 0o600 | stat.S_IFBLK, os.makedev(259, 300))
    image = tmp_path / "sda.img"
    _mkfs(image, src)
    store = _store_of(tmp_path, image)
    with mounted(store, tmp_path / "mnt") as mnt:
        snaps = mnt / "vm" / "snapshots"
        snapfs("snapshot", "create", store, "vm", "s1") if not os.listdir(snaps) else None
        os.mkdir(snaps / "s2")
        view = snaps / "s2"
        assert "sda.files" in os.listdir(view)
        assert not [n for n in os.listdir(mnt / "vm" / "active") if not n.endswith(".raw")]
        with loop_mounted(view / "sda.raw", tmp_path / "loop") as loop:
            expected = snapshot_tree(loop)
            root_stat = os.stat(loop)
        got = snapshot_tree(view / "sda.files")
        assert got == expected
        top = os.stat(view / "sda.files")
        assert (top.st_mode, top.st_uid, top.st_mtime_ns) == \
            (root_stat.st_mode, root_stat.st_uid, root_stat.st_mtime_ns)
        # Read-only, and nothing on the host is opened through a device node.
        expect_errno(30, open, view / "sda.files" / "etc/hostname", "r+b")     # EROFS
        expect_errno(13, open, view / "sda.files" / "run/tty", "rb")          # EACCES
        expect_errno(30, os.mkdir, view / "sda.files" / "new")
        assert os.getxattr(view / "sda.files" / "etc/hostname", "user.origin") == b"test"


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(tree=random_trees())
def test_random_trees_equal_loop_mounts(tmp_path_factory, tree):
    tmp_path = tmp_path_factory.mktemp("random")
    write_tree(tmp_path / "src", tree)
    image = tmp_path / "sda.img"
    _mkfs(image, tmp_path / "src")
    store = _store_of(tmp_path, image)
    with mounted(store, tmp_path / "mnt") as mnt:
        view = mnt / "vm" / "snapshots"
        os.mkdir(view / "s")
        with loop_mounted(view / "s" / "sda.raw", tmp_path / "loop") as loop:
            expected = snapshot_tree(loop)
        assert snapshot_tree(view / "s" / "sda.files") == expected
