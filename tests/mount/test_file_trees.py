"""The files inside snapshots (fs/filetree.py) against the kernel: every
path, mode, owner, link, time, attribute and byte of a snapshot's tree
equals what a loop mount of the same view shows."""

import json
import os
import secrets
import stat
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings

from ext4chain import DEFAULT_VERSIONS, build_ext4_chain, logs_tree
from tests.support import users as U
from tests.support.dirty_ext4 import build_dirty_ext4, needs_recovery
from tests.support.mounting import control, expect_errno, loop_mounted, mounted, read_tree, snapfs
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


@pytest.fixture
def guest_user():
    """A throwaway host user with the uid the guest's files are owned by."""
    U.require_tools()
    user = U.create_user(f"snapfs-t-tree-{secrets.token_hex(3)}")
    try:
        yield user
    finally:
        error = U.remove_user(user)
        assert error is None, error


@pytest.fixture
def shared_dir():
    with U.traversable_dir("snapfs-tree-") as path:
        yield path


def _owned_tree(tmp_path, uid, gid):
    src = tmp_path / "src"
    write_tree(src, {"pub/readme": ("file", b"for everyone\n", 0o644),
                     "home/u/private": ("file", b"only u\n", 0o600),
                     "home/u/big": ("file", os.urandom(3 << 20), 0o600),
                     "home/u": ("dir", 0o700)},
               owners={"home/u": (uid, gid), "home/u/private": (uid, gid),
                       "home/u/big": (uid, gid)})
    image = tmp_path / "sda.img"
    _mkfs(image, src)
    return src, image


def test_non_root_user_copies_out_with_plain_cp(tmp_path, shared_dir, guest_user):
    """Root mounts with allow_other; a user copies a file out of a snapshot
    with cp: no root, no loop device.  The guest's modes hold: the guest's
    uid owns its private files, and another user is refused them."""
    src, image = _owned_tree(tmp_path, guest_user.uid, guest_user.gid)
    store = _store_of(tmp_path, image)
    out = shared_dir / "out"
    out.mkdir()
    os.chown(out, guest_user.uid, guest_user.gid)
    with mounted(store, shared_dir / "mnt", "-o", "allow_other") as mnt:
        os.mkdir(mnt / "vm" / "snapshots" / "s")
        files = mnt / "vm" / "snapshots" / "s" / "sda.files"
        U.run_as(guest_user, ["cp", "-r", files / "home/u", files / "pub/readme", out], check=True)
        assert (out / "u" / "private").read_bytes() == b"only u\n"
        assert (out / "u" / "big").read_bytes() == (src / "home/u/big").read_bytes()
        assert (out / "readme").read_bytes() == b"for everyone\n"
        refused = U.run_as("nobody", ["cat", files / "home/u/private"])
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
        assert U.run_as("nobody", ["cat", files / "pub/readme"], check=True).stdout == \
            "for everyone\n"


def test_owner_files_shows_every_file_as_the_mount_owners(tmp_path, shared_dir, guest_user):
    _, image = _owned_tree(tmp_path, guest_user.uid, guest_user.gid)
    store = _store_of(tmp_path, image)
    with mounted(store, shared_dir / "mnt", "-o", "allow_other,owner_files") as mnt:
        os.mkdir(mnt / "vm" / "snapshots" / "s")
        files = mnt / "vm" / "snapshots" / "s" / "sda.files"
        for rel, mode in (("pub/readme", 0o600), ("home/u/private", 0o600), ("home/u", 0o700)):
            st = os.stat(files / rel)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, mode), rel
        # The guest's uid is nobody special on the host now.
        refused = U.run_as(guest_user, ["cat", files / "home/u/private"])
        assert refused.returncode != 0 and "Permission denied" in refused.stderr


def test_partition_trees_and_before_preview(tmp_path, store):
    layers = build_ext4_chain(tmp_path / "src", table="gpt")
    snapfs("vm", "add", store, "web", "--disk", f"sda={layers[-1]}")
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "web"
        base = vm / "snapshots" / "base"
        listing = os.listdir(base)
        assert {"sda-part1", "sda-part2", "sda-part3"} <= set(listing)
        assert "sda.files" not in listing       # the disk has a partition table
        for version, name in enumerate(["base", "v2"]):
            tree = vm / "snapshots" / name / "sda-part1"
            assert read_tree(tree) == DEFAULT_VERSIONS[version]
        assert read_tree(base / "sda-part3") == logs_tree(1)
        control(vm, "preview", "base\n")
        assert read_tree(vm / "before-preview" / "sda-part1") == DEFAULT_VERSIONS[-1]
        assert not [n for n in os.listdir(vm / "active") if not n.endswith(".raw")]
        control(vm, "undo")


def test_damaged_inode_gives_eio_for_that_file_only(tmp_path):
    """A corrupted inode (its extent tree's magic) fails its own reads
    with EIO; its directory, its neighbours and the mount stay up."""
    src = tmp_path / "src"
    write_tree(src, {"good": ("file", b"fine\n" * 1000, 0o644),
                     "bad": ("file", os.urandom(100_000), 0o644),
                     "dir/other": ("file", b"other\n", 0o644)})
    image = tmp_path / "sda.img"
    _mkfs(image, src, "-b", "4096")
    stat_out = subprocess.run(["debugfs", "-R", "imap /bad", str(image)], check=True,
                              capture_output=True, text=True).stdout
    block, offset = _inode_location(stat_out)
    with open(image, "r+b") as f:
        f.seek(block * 4096 + offset + 40)      # i_block: the extent header's magic
        f.write(b"\xde\xad")
    store = _store_of(tmp_path, image)
    with mounted(store, tmp_path / "mnt") as mnt:
        os.mkdir(mnt / "vm" / "snapshots" / "s")
        files = mnt / "vm" / "snapshots" / "s" / "sda.files"
        assert sorted(os.listdir(files)) == ["bad", "dir", "good", "lost+found"]
        expect_errno(5, lambda: (files / "bad").read_bytes())
        assert (files / "good").read_bytes() == b"fine\n" * 1000
        assert (files / "dir" / "other").read_bytes() == b"other\n"
        assert os.path.getsize(mnt / "vm" / "snapshots" / "s" / "sda.raw") > 0


def _inode_location(imap_output):
    """(block, byte offset) from ``debugfs -R "imap PATH"``."""
    words = imap_output.replace(",", " ").split()
    at = words.index("located")             # "located at block B, offset 0xO"
    return int(words[at + 3]), int(words[at + 5], 16)


def _journal_only(mnt):
    """A directory and file whose metadata only the journal holds: fsync
    commits the journal and leaves the home blocks to the checkpoint."""
    os.mkdir(mnt / "after-sync")
    (mnt / "after-sync" / "file").write_bytes(b"journalled\n" * 500)
    for path in (mnt / "after-sync" / "file", mnt / "after-sync", mnt):
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def test_crash_consistent_snapshot_shows_the_replayed_tree(tmp_path):
    """An ext4 copied while mounted: its tree, after the journal is
    replayed in memory, equals a loop mount through the throwaway overlay
    (where the kernel replays it), and control/status says so."""
    image = tmp_path / "sda.img"
    build_dirty_ext4(image, tmp_path, then=_journal_only)
    assert needs_recovery(image)
    store = _store_of(tmp_path, image)
    with mounted(store, tmp_path / "mnt") as mnt:
        snap = mnt / "vm" / "snapshots" / "crash"
        os.mkdir(snap)
        with loop_mounted(snap / "sda.raw", tmp_path / "loop", readonly=False) as loop:
            expected = snapshot_tree(loop)
        assert expected[0]["after-sync/file"]["data"] == b"journalled\n" * 500
        assert snapshot_tree(snap / "sda.files") == expected
        status = json.loads((mnt / "vm" / "control" / "status").read_bytes())
        [said] = status["file_trees"]
        assert said["tree"] == "vm/snapshots/crash/sda.files"
        assert "journal was replayed in memory" in said["shown"]
    assert needs_recovery(image)        # the volume itself is untouched


def test_a_log_snapfs_cannot_replay_refuses_the_tree_with_eio(tmp_path):
    """An XFS copied while mounted needs log recovery, which snapfs does not
    do: its tree is there, answers EIO, and control/status says why."""
    live, image = tmp_path / "live.img", tmp_path / "sda.img"
    with open(live, "wb") as f:
        f.truncate(320 << 20)       # mkfs.xfs's smallest
    subprocess.run(["mkfs.xfs", "-q", "-f", str(live)], check=True)
    with loop_mounted(live, tmp_path / "xfs", readonly=False) as xfs:
        for i in range(50):
            (xfs / f"f{i}").write_text("x")
        subprocess.run(["sync", "-f", str(xfs)], check=True)
        subprocess.run(["cp", "--sparse=always", str(live), str(image)], check=True)
    store = _store_of(tmp_path, image)
    with mounted(store, tmp_path / "mnt") as mnt:
        snap = mnt / "vm" / "snapshots" / "crash"
        os.mkdir(snap)
        assert "sda.files" in os.listdir(snap)
        expect_errno(5, os.listdir, snap / "sda.files")
        status = json.loads((mnt / "vm" / "control" / "status").read_bytes())
        [said] = status["file_trees"]
        assert said["tree"] == "vm/snapshots/crash/sda.files"
        assert "log needs recovery" in said["refused"]


def test_xfs_tree_equals_loop_mount_of_its_view(tmp_path):
    image = tmp_path / "sda.img"
    with open(image, "wb") as f:
        f.truncate(320 << 20)       # mkfs.xfs's smallest
    subprocess.run(["mkfs.xfs", "-q", "-f", str(image)], check=True)
    with loop_mounted(image, tmp_path / "fill", readonly=False) as fill:
        write_tree(fill, {"etc/hostname": ("file", b"db1\n", 0o644),
                          "big": ("file", os.urandom(5 << 20), 0o600),
                          "many": ("dir", 0o755),
                          "l": ("link", "etc/hostname"),
                          "h": ("hard", "etc/hostname")},
                   owners={"big": (1000, 1000)})
        for i in range(600):        # a directory in leaf format
            (fill / "many" / f"entry-{i:04}").write_bytes(b"%d\n" % i)
        os.mkfifo(fill / "fifo")
    store = _store_of(tmp_path, image)
    with mounted(store, tmp_path / "mnt") as mnt:
        snap = mnt / "vm" / "snapshots" / "s"
        os.mkdir(snap)
        with loop_mounted(snap / "sda.raw", tmp_path / "loop") as loop:
            expected = snapshot_tree(loop)
        got = snapshot_tree(snap / "sda.files")
        # dissect.xfs parses no extended attributes; XFS made here has none.
        assert got == expected


def test_damaged_directories_and_a_loop_stay_local(tmp_path):
    """A directory block overwritten with garbage fails that directory
    with EIO; a directory entry that leads back to the root (a loop) is
    not followed; find over the whole tree ends; the rest reads right."""
    src = tmp_path / "src"
    write_tree(src, {"ok/file": ("file", b"fine\n", 0o644),
                     "broken/inner": ("file", b"lost\n", 0o644),
                     "deep/er/f": ("file", b"deep\n", 0o644)})
    image = tmp_path / "sda.img"
    _mkfs(image, src, "-b", "4096")
    subprocess.run(["debugfs", "-w", "-R", "link / deep/er/up", str(image)], check=True,
                   capture_output=True)
    blocks = subprocess.run(["debugfs", "-R", "blocks /broken", str(image)], check=True,
                            capture_output=True, text=True).stdout.split()
    with open(image, "r+b") as f:
        f.seek(int(blocks[0]) * 4096)
        f.write(b"\xff" * 4096)
    store = _store_of(tmp_path, image)
    with mounted(store, tmp_path / "mnt") as mnt:
        os.mkdir(mnt / "vm" / "snapshots" / "s")
        files = mnt / "vm" / "snapshots" / "s" / "sda.files"
        expect_errno(5, os.listdir, files / "broken")
        assert os.listdir(files / "deep" / "er") == ["f"]
        found = subprocess.run(["find", str(files)], capture_output=True, text=True, timeout=60)
        listed = {os.path.relpath(p, files) for p in found.stdout.split()}
        assert {"ok/file", "deep/er/f", "broken"} <= listed and "deep/er/up" not in listed
        assert (files / "ok" / "file").read_bytes() == b"fine\n"
