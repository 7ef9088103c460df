"""Regressions of what a hostile and careless user found: each test names
its finding (the hardening issue).  Deep chains are in test_deep_chains.py,
the concurrent stress run in test_stress.py, the fuzzing of names and
control input in test_control_fuzz.py."""

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.daemon import daemon_pid, deleted_files
from tests.support.mounting import (
    control, expect_errno, loop_mounted, mounted, read_tree, snapfs,
)
from tests.support.qemu import qemu_img

MiB = 1 << 20


def status(vm):
    return json.loads((vm / "control" / "status").read_text())


def wait_idle(vm, timeout=60):
    deadline = time.monotonic() + timeout
    while status(vm)["state"] == "running":
        assert time.monotonic() < deadline, status(vm)
        time.sleep(0.02)


def snapshots(store, vm="vm"):
    out = snapfs("snapshot", "list", store, vm, "--json").stdout
    return [s["name"] for s in json.loads(out)]


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def manifest_bytes(store, vm="vm"):
    return (Path(store) / "vms" / vm / "manifest.json").read_bytes()


def make_ext4(path, tree, size=16 * MiB):
    """An ext4 image holding ``tree`` ({relative path: bytes}), by mkfs.ext4 -d."""
    root = path.parent / (path.name + ".d")
    for rel, data in tree.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", str(root), str(path)],
                   check=True, capture_output=True)
    return path


TREE_OLD = {"etc/motd": b"old motd\n", "srv/keep/a.txt": b"kept\n" * 100}
TREE_NEW = {"etc/motd": b"new motd, after the upgrade\n", "srv/other/b.txt": b"b\n" * 50}


# -- finding 2: deleting a snapshot in use ---------------------------------------------

@pytest.fixture
def two_ext4_snapshots(tmp_path, store):
    """VM "vm": snapshot "base" holds an ext4 of TREE_OLD; then the active
    disk got an ext4 of TREE_NEW and snapshot "later" was taken."""
    old = make_ext4(tmp_path / "base.img", TREE_OLD)
    new = make_ext4(tmp_path / "new.img", TREE_NEW)
    snapfs("vm", "add", store, "vm", "--disk", f"sda={old}")
    with mounted(store, tmp_path / "mnt") as mnt:
        with open(mnt / "vm" / "active" / "sda.raw", "r+b") as f:
            f.write(new.read_bytes())
        os.mkdir(mnt / "vm" / "snapshots" / "later")
    return store


def test_finding2_a_loop_mounted_snapshot_is_not_deleted(tmp_path, two_ext4_snapshots):
    store = two_ext4_snapshots
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "vm"
        view = vm / "snapshots" / "base" / "sda.raw"
        before = sha(view)
        with loop_mounted(view, tmp_path / "old") as old:
            assert read_tree(old) == TREE_OLD
            expect_errno(errno.EBUSY, os.rmdir, vm / "snapshots" / "base")
            expect_errno(errno.EBUSY, control, vm, "delete", "base\n")
            assert "views of snapshot base" in status(vm)["last_error"]["error"]
            # Nothing changed under the reader: not the files, not the device.
            subprocess.run(["sync"], check=True)
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            assert read_tree(old) == TREE_OLD
            assert sha(view) == before
        assert snapshots(store) == ["base", "later"]
        # Closed: the delete goes ahead, and "later" reads as before.
        later = sha(vm / "snapshots" / "later" / "sda.raw")
        os.rmdir(vm / "snapshots" / "base")
        wait_idle(vm)
        assert sha(vm / "snapshots" / "later" / "sda.raw") == later
        with loop_mounted(vm / "snapshots" / "later" / "sda.raw", tmp_path / "new") as new:
            assert read_tree(new) == TREE_NEW
    assert snapshots(store) == ["later"]
    assert snapfs("check", store).returncode == 0


def test_finding2_an_open_view_keeps_its_bytes(tmp_path, two_ext4_snapshots):
    store = two_ext4_snapshots
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "vm"
        fd = os.open(vm / "snapshots" / "base" / "sda-part1.raw"
                     if (vm / "snapshots" / "base" / "sda-part1.raw").exists()
                     else vm / "snapshots" / "base" / "sda.raw", os.O_RDONLY)
        try:
            first = os.pread(fd, MiB, 0)
            expect_errno(errno.EBUSY, os.rmdir, vm / "snapshots" / "base")
            assert os.pread(fd, MiB, 0) == first
        finally:
            os.close(fd)
        os.rmdir(vm / "snapshots" / "base")      # closed: allowed
        wait_idle(vm)
    assert snapshots(store) == ["later"]


# -- finding 3: names that are not UTF-8 -----------------------------------------------

def test_finding3_names_that_are_not_utf8_or_hold_control_characters(tmp_path, store):
    snapfs("vm", "add", store, "vm", "--disk", "sda=4M")
    snapfs("snapshot", "create", store, "vm", "s")
    with mounted(store, tmp_path / "mnt") as mnt:
        snaps = os.fsencode(mnt / "vm" / "snapshots")
        for bad in (b"bad\xff", b"a\nb", b"tab\there", b"\xc3"):
            expect_errno(errno.EINVAL, os.mkdir, snaps + b"/" + bad)
            expect_errno(errno.EINVAL, os.open, snaps + b"/" + bad,
                         os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK)
            expect_errno(errno.EINVAL, os.rename, snaps + b"/s", snaps + b"/" + bad)
            if b"\n" in bad:
                continue     # a newline in control input ends a command
            with pytest.raises(OSError) as e:
                with open(mnt / "vm" / "control" / "create", "wb") as f:
                    f.write(bad + b"\n")
            assert e.value.errno == errno.EINVAL
        # The daemon lives, lists, and the store is as before.
        assert sorted(os.listdir(mnt / "vm" / "snapshots")) == ["latest", "s"]
        assert status(mnt / "vm")["snapshots"] == ["s"]
    with mounted(store, tmp_path / "mnt2") as mnt:
        assert sorted(os.listdir(mnt / "vm" / "snapshots")) == ["latest", "s"]
    # The command line: one line, no traceback, nothing created.
    cli = [sys.executable, "-m", "snapfs.cli"]
    for argv in ([b"snapshot", b"create", os.fsencode(store), b"vm", b"x\xff"],
                 [b"snapshot", b"rename", os.fsencode(store), b"vm", b"s", b"y\xff"],
                 [b"vm", b"add", os.fsencode(store), b"bad\xff", b"--disk", b"sda=1M"],
                 [b"vm", b"add", os.fsencode(store), b"a\nb", b"--disk", b"sda=1M"],
                 [b"snapshot", b"create", os.fsencode(store), b"vm", b"ok", b"-d", b"two\nlines"]):
        r = subprocess.run(cli + argv, capture_output=True)
        assert r.returncode == 1, (argv, r.stderr)
        assert b"Traceback" not in r.stderr and r.stderr.count(b"\n") == 1, r.stderr
    assert snapfs("vm", "list", store).stdout.splitlines() == ["vm\tdisks: sda\tsnapshots: 1"]
    assert snapshots(store) == ["s"]
    assert snapfs("check", store).returncode == 0


# -- finding 4: no EIO for snapshots that are never deleted -------------------------------

def test_finding4_a_snapshot_whose_chain_a_merge_changed_reads_through_old_handles(
        tmp_path, store):
    """A directory of snapshot k looked up before a merge changed k's chain
    (the kernel keeps such inodes): listing it, and opening k's view
    through it, used to fail with EIO ("unknown volume"): the merge had
    removed k's own volume (commit direction), and the old node still
    named it."""
    snapfs("vm", "add", store, "vm", "--disk", "sda=8M")
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "vm"
        os.mkdir(vm / "snapshots" / "a")
        with open(vm / "active" / "sda.raw", "r+b") as f:
            f.write(b"\x01" * 4 * MiB)                # b's layer: big
        os.mkdir(vm / "snapshots" / "b")
        with open(vm / "active" / "sda.raw", "r+b") as f:
            f.write(b"\x02" * 65536)                  # k's layer: small
        os.mkdir(vm / "snapshots" / "k")
        with open(vm / "active" / "sda.raw", "r+b") as f:
            f.write(b"\x03" * 4096)
        want = (b"\x02" * 65536 + b"\x01" * (4 * MiB - 65536)).ljust(8 * MiB, b"\x00")
        fd = os.open(vm / "snapshots" / "k", os.O_RDONLY | os.O_DIRECTORY)
        try:
            control(vm, "delete", "b\n")              # commit: k's volume merged away
            assert "commit" in json.dumps(status(vm)["last_operation"])
            assert sorted(os.listdir(fd)) == ["sda.raw", "snapshot.json"]
            view = os.open("sda.raw", os.O_RDONLY, dir_fd=fd)
            try:
                assert os.pread(view, 8 * MiB, 0) == want
            finally:
                os.close(view)
        finally:
            os.close(fd)
        assert (vm / "snapshots" / "k" / "sda.raw").read_bytes() == want


# -- finding 5: replaced volumes are closed ----------------------------------------------

def test_finding5_deleted_volumes_are_not_kept_open(tmp_path, store):
    snapfs("vm", "add", store, "vm", "--disk", "sda=8M", "--disk", "sdb=4M")
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "vm"
        pid = daemon_pid(store)
        snaps = vm / "snapshots"
        os.mkdir(snaps / "keep")
        keep = sha(snaps / "keep" / "sda.raw")
        for i in range(12):
            with open(vm / "active" / "sda.raw", "r+b") as f:
                f.seek(i * 65536)
                f.write(bytes([i + 1]) * 65536)
            os.mkdir(snaps / f"s{i}")
            sha(snaps / f"s{i}" / "sda.raw")          # opens its chain
            sha(snaps / f"s{i}" / "sdb.raw")
            if i:
                os.rmdir(snaps / f"s{i - 1}")
                wait_idle(vm)
            assert sha(snaps / "keep" / "sda.raw") == keep
        wait_idle(vm)
        assert deleted_files(pid, store) == []
        volumes = len(json.loads(manifest_bytes(store))["volumes"])
        held = [t for t in os.listdir(f"/proc/{pid}/fd")]
        # One descriptor per volume at most, plus the daemon's own few.
        assert len(held) <= volumes + 16, held


def test_finding5_a_daemon_limited_to_128_files_keeps_working(tmp_path, store):
    """With an fd limit of 128, deletes gave EIO and reads EMFILE: each
    merge left the replaced volumes open.  60 creates and deletes, each
    snapshot read, then 40 snapshots kept and all read."""
    snapfs("vm", "add", store, "vm", "--disk", "sda=4M", "--disk", "sdb=1M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["prlimit", "--nofile=128:128", sys.executable, "-m", "snapfs.cli", "mount",
                    str(store), str(mnt)], check=True)
    try:
        vm = mnt / "vm"
        snaps = vm / "snapshots"
        for i in range(60):
            with open(vm / "active" / "sda.raw", "r+b") as f:
                f.seek(i * 4096)
                f.write(bytes([i + 1]) * 4096)
            os.mkdir(snaps / f"s{i}")
            assert (snaps / f"s{i}" / "sda.raw").read_bytes()[i * 4096] == i + 1
            (snaps / f"s{i}" / "sdb.raw").read_bytes()
            if i:
                os.rmdir(snaps / f"s{i - 1}")
                wait_idle(vm)
        for i in range(40):
            os.mkdir(snaps / f"k{i}")
        for i in range(40):
            view = (snaps / f"k{i}" / "sda.raw").read_bytes()
            assert view[59 * 4096] == 60 and view[60 * 4096] == 0
        assert deleted_files(daemon_pid(store), store) == []
    finally:
        if snapfs("umount", mnt, check=False).returncode:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert snapfs("check", store).returncode == 0


# -- finding 9: a command is one complete line ---------------------------------------------

def test_finding9_commands_are_lines_not_write_requests(tmp_path, store):
    snapfs("vm", "add", store, "vm", "--disk", "sda=4M")
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "vm"
        # One line in two writes is one command.
        fd = os.open(vm / "control" / "create", os.O_WRONLY)
        try:
            os.write(fd, b"spl")
            os.write(fd, b"it desc\n")
        finally:
            os.close(fd)
        assert status(vm)["snapshots"] == ["split"]
        assert json.loads((vm / "snapshots" / "split" / "snapshot.json").read_text()
                          )["description"] == "desc"
        # A 10 MiB write of one line makes nothing (the kernel splits it in
        # requests, which used to be taken as commands).
        fd = os.open(vm / "control" / "create", os.O_WRONLY)
        try:
            expect_errno(errno.EINVAL, os.write, fd, b"big " + b"x" * (10 * MiB) + b"\n")
            expect_errno(errno.EINVAL, os.write, fd, b"after\n")   # the line is lost
        finally:
            os.close(fd)
        assert status(vm)["snapshots"] == ["split"]
        # An overlong line without a newline, then close: nothing.
        with pytest.raises(OSError) as e:
            with open(vm / "control" / "create", "wb") as f:
                f.write(b"y" * 5000)
        assert e.value.errno == errno.EINVAL
        # A description is bounded too.
        expect_errno(errno.EINVAL, control, vm, "create", "d " + "x" * 1100 + "\n")
        # A line without a newline runs at close; two lines are two commands.
        control(vm, "create", "last")
        control(vm, "create", "two\nthree\n")
        assert status(vm)["snapshots"] == ["split", "last", "two", "three"]


# -- finding 10: a failed command creates nothing --------------------------------------------

def test_finding10_writing_data_to_a_snapshot_name_creates_nothing(tmp_path, store):
    snapfs("vm", "add", store, "vm", "--disk", "sda=4M")
    (tmp_path / "f").write_bytes(b"some data\n")
    with mounted(store, tmp_path / "mnt") as mnt:
        snaps = mnt / "vm" / "snapshots"
        # echo foo > snapshots/x: O_TRUNC, refused at open.
        expect_errno(errno.EROFS, os.open, snaps / "x", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        # cp f snapshots/y: the write is refused, and nothing is created.
        r = subprocess.run(["cp", tmp_path / "f", snaps / "y"], capture_output=True, text=True)
        assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
        fd = os.open(snaps / "z", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            expect_errno(errno.EROFS, os.write, fd, b"data")
        finally:
            os.close(fd)
        assert sorted(os.listdir(snaps)) == []
        # touch still creates.
        subprocess.run(["touch", snaps / "t"], check=True)
        assert sorted(os.listdir(snaps)) == ["latest", "t"]
        assert os.path.isdir(snaps / "t")
    assert snapshots(store) == ["t"]


# -- finding 11: errnos ------------------------------------------------------------------

def test_finding11_errnos(tmp_path, store):
    snapfs("vm", "add", store, "vm", "--disk", "sda=4M")
    snapfs("snapshot", "create", store, "vm", "s")
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "vm"
        view = vm / "snapshots" / "s" / "sda.raw"
        active = vm / "active" / "sda.raw"
        for path in (view, active, vm / "control" / "create", vm / "control" / "status",
                     vm / "snapshots"):
            expect_errno(errno.EPERM, os.chmod, path, 0o644)
            expect_errno(errno.EPERM, os.chown, path, 1, 1)
        for path in (view, active, vm / "control" / "delete"):
            expect_errno(errno.EPERM, os.utime, path, (1, 1))
        # An active view may be truncated to its own size (a no-op), no other.
        os.truncate(active, 4 * MiB)
        expect_errno(errno.EPERM, os.truncate, active, 2 * MiB)
        expect_errno(errno.EPERM, os.truncate, vm / "control" / "delete", 0)
        expect_errno(errno.ENAMETOOLONG, os.mkdir, vm / "snapshots" / ("n" * 256))
        expect_errno(errno.EPERM, os.rename, vm / "snapshots" / "latest", vm / "snapshots" / "foo")
        # Write-only files cannot be opened for reading, even by root.
        for name in ("create", "delete", "preview", "commit", "undo"):
            expect_errno(errno.EACCES, open, vm / "control" / name, "rb")
        assert status(vm)["snapshots"] == ["s"]


# -- finding 12: no leaf switch under a writer ----------------------------------------------

def test_finding12_preview_commit_undo_wait_for_writers_to_close(tmp_path, store):
    snapfs("vm", "add", store, "vm", "--disk", "sda=4M")
    snapfs("snapshot", "create", store, "vm", "s")
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "vm"
        for target in ("sda.raw",):
            with open(vm / "active" / target, "r+b"):
                expect_errno(errno.EBUSY, control, vm, "preview", "s\n")
                assert "open for writing" in status(vm)["last_error"]["error"]
        control(vm, "preview", "s\n")
        with open(vm / "active" / "sda.raw", "r+b"):
            expect_errno(errno.EBUSY, control, vm, "commit")
            expect_errno(errno.EBUSY, control, vm, "undo")
        with open(vm / "before-preview" / "sda.raw", "rb"):
            expect_errno(errno.EBUSY, control, vm, "undo")
        # A snapshot is taken of a disk open for writing (crash-consistent).
        with open(vm / "active" / "sda.raw", "rb"):
            control(vm, "undo")
        with open(vm / "active" / "sda.raw", "r+b"):
            os.mkdir(vm / "snapshots" / "t")
        assert status(vm)["snapshots"] == ["s", "t"]


# -- finding 13: a merge holds only its own disk ----------------------------------------------

def test_finding13_a_write_to_one_disk_does_not_wait_for_the_merge_of_another(tmp_path, store):
    snapfs("vm", "add", store, "vm", "--disk", "sda=16M", "--disk", "sdb=4M")
    pause = tmp_path / "paused"
    env = dict(os.environ, SNAPFS_PAUSE_AT="delete:copy", SNAPFS_PAUSE_FILE=str(pause))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run([sys.executable, "-m", "snapfs.cli", "mount", str(store), str(mnt)],
                   check=True, env=env)
    try:
        vm = mnt / "vm"
        with open(vm / "active" / "sda.raw", "r+b") as f:
            f.write(b"\x01" * 4 * MiB)
        os.mkdir(vm / "snapshots" / "a")
        with open(vm / "active" / "sda.raw", "r+b") as f:
            f.write(b"\x02" * MiB)
        os.rmdir(vm / "snapshots" / "a")       # the merge of sda pauses in its copy
        deadline = time.monotonic() + 30
        while not pause.exists():
            assert time.monotonic() < deadline, "the merge never reached its copy"
            time.sleep(0.01)

        def write(disk, data, done):
            with open(vm / "active" / disk, "r+b") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            done.set()

        other, same = threading.Event(), threading.Event()
        threading.Thread(target=write, args=("sdb.raw", b"\x07" * 4096, other), daemon=True).start()
        threading.Thread(target=write, args=("sda.raw", b"\x08" * 4096, same), daemon=True).start()
        assert other.wait(20), "a write to sdb waited for the merge of sda"
        time.sleep(0.5)
        assert not same.is_set(), "a write to sda went on while sda was being merged"
        pause.unlink()
        assert same.wait(60)
        wait_idle(vm)
        with open(vm / "active" / "sda.raw", "rb") as f:
            assert f.read(4096) == b"\x08" * 4096
            assert f.read(MiB - 4096) == b"\x02" * (MiB - 4096)
            assert f.read(MiB) == b"\x01" * MiB
        with open(vm / "active" / "sdb.raw", "rb") as f:
            assert f.read(4096) == b"\x07" * 4096
    finally:
        if pause.exists():
            pause.unlink()
        r = snapfs("umount", mnt, check=False)
        if r.returncode:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert snapfs("check", store).returncode == 0
    vms = Path(store) / "vms" / "vm"
    for volume in vms.iterdir():
        if volume.name != "manifest.json":
            qemu_img("check", "-f", "qcow2" if volume.read_bytes()[:4] == b"QFI\xfb" else "raw",
                     volume)
