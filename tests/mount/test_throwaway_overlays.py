"""Acceptance (issue 11, part 1): crash-consistent snapshots mount.

An ext4 copied while mounted read-write (``needs_recovery`` set), whole
disk and in an MBR partition, is imported as the base snapshot of a chain.
``mount -o loop,ro`` of its view fails as it would on a block device; a
read-write ``mount -o loop`` replays the journal into the open's private
throwaway overlay and shows every file.  The snapshot's bytes never change,
other readers never see the overlay, and nothing of it is left after
release, after a remount, or after the daemon is killed."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import time
import uuid

import pytest

from tests.support.daemon import daemon_pid, open_files
from tests.support.dirty_ext4 import PART_START, build_dirty_ext4, needs_recovery
from tests.support.mounting import force_unmount, mounted, read_tree, snapfs, wait_for
from tests.support.qemu import qemu_img

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE and loop devices")


@pytest.fixture(scope="module")
def dirty_images(tmp_path_factory):
    """sda: whole-disk ext4, sdb: ext4 in MBR partition 1; both dirty, each
    the base of a two-layer qcow2 chain.  Returns (top images, files)."""
    work = tmp_path_factory.mktemp("dirty")
    tops, files = {}, {}
    for disk, partitioned, seed in (("sda", False, 1), ("sdb", True, 2)):
        raw = work / f"{disk}.img"
        files[disk] = build_dirty_ext4(raw, work, partitioned=partitioned, seed=seed)
        assert needs_recovery(raw, PART_START if partitioned else 0)
        base = work / disk / "crashed.qcow2"
        base.parent.mkdir()
        qemu_img("convert", "-O", "qcow2", raw, base)
        top = work / disk / "now.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "crashed.qcow2", "-F", "qcow2", top)
        tops[disk] = top
    return tops, files


@pytest.fixture
def vm_store(store, dirty_images):
    tops, _ = dirty_images
    snapfs("vm", "add", store, "web", "--disk", f"sda={tops['sda']}", "--disk", f"sdb={tops['sdb']}")
    return store


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def mount_loop(view, mountpoint, *options):
    mountpoint.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-o", ",".join(("loop",) + options), str(view), str(mountpoint)],
                          capture_output=True, text=True)


def umount(mountpoint):
    # mount -o loop sets autoclear: the loop device goes with the unmount.
    subprocess.run(["umount", str(mountpoint)], check=True, capture_output=True)


def status(vm):
    return json.loads((vm / "control" / "status").read_text())


def scratch_files(pid, scratch):
    return [t for t in open_files(pid).values() if t.startswith(str(scratch))]


VIEWS = (("sda.raw", "sda"), ("sdb-part1.raw", "sdb"))


def test_dirty_journal_mounts_through_a_private_overlay(tmp_path, vm_store, dirty_images):
    _, files = dirty_images
    scratch = vm_store / "scratch"
    with mounted(vm_store, tmp_path / "mnt") as mnt:
        snap = mnt / "web" / "snapshots" / "crashed"
        pid = daemon_pid(vm_store)
        for view, disk in VIEWS:
            before = sha256(snap / view)
            assert needs_recovery(snap / view)
            # Read-only, the kernel refuses: it will not replay onto it.
            ro = mount_loop(snap / view, tmp_path / "ro", "ro")
            assert ro.returncode != 0, "a dirty journal mounted read-only: the fixture is not dirty"
            target = tmp_path / f"x-{disk}"
            result = mount_loop(snap / view, target)
            assert result.returncode == 0, result.stderr
            try:
                assert read_tree(target) == files[disk]
                # Replayed into the overlay: the snapshot is unchanged for
                # every other reader, during the mount too.
                assert sha256(snap / view) == before
                assert needs_recovery(snap / view)
                overlays = status(mnt / "web")["overlays"]
                assert [o["file"] for o in overlays] == [f"web/snapshots/crashed/{view}"]
                assert overlays[0]["bytes"] > 0
                (target / "written-in-overlay").write_bytes(b"private")
                os.sync()
                # The overlay has no name in the scratch directory.
                assert not scratch.exists() or os.listdir(scratch) == []
                assert len(scratch_files(pid, scratch)) == 1
            finally:
                umount(target)
            assert sha256(snap / view) == before
            assert wait_for(lambda: status(mnt / "web")["overlays"] == [])
            assert scratch_files(pid, scratch) == []
    # The next mount shows none of the previous mount's writes.
    with mounted(vm_store, tmp_path / "mnt") as mnt:
        snap = mnt / "web" / "snapshots" / "crashed"
        for view, disk in VIEWS:
            assert needs_recovery(snap / view)
            target = tmp_path / f"again-{disk}"
            assert mount_loop(snap / view, target).returncode == 0
            try:
                assert not (target / "written-in-overlay").exists()
                assert all((target / rel).read_bytes() == data for rel, data in files[disk].items())
            finally:
                umount(target)
    result = snapfs("check", vm_store, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not scratch.exists() or os.listdir(scratch) == []


def test_overlay_never_reaches_the_page_cache_of_other_readers(tmp_path, vm_store):
    with mounted(vm_store, tmp_path / "mnt") as mnt:
        view = mnt / "web" / "snapshots" / "crashed" / "sda.raw"
        with open(view, "rb") as reader:
            original = reader.read(1 << 20)          # now in the page cache
            with open(view, "r+b", buffering=0) as writer:
                writer.seek(4096 + 100)
                writer.write(b"overlay bytes")
                writer.seek(0)
                mine = writer.read(1 << 20)
                assert mine[4196:4209] == b"overlay bytes"
                assert mine[:4196] == original[:4196] and mine[4209:] == original[4209:]
                reader.seek(0)
                assert reader.read(1 << 20) == original
            # Another open, cached or not, reads the snapshot.
            with open(view, "rb") as fresh:
                assert fresh.read(1 << 20) == original
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
        with open(view, "rb") as f:
            assert f.read(1 << 20) == original


def test_scratch_dir_and_limit(tmp_path, vm_store):
    scratch = tmp_path / "elsewhere"
    scratch.mkdir()
    leftover = scratch / f"overlay-{2 ** 22 + 1}-{uuid.uuid4()}"     # past pid_max: dead
    leftover.write_bytes(b"x")
    with mounted(vm_store, tmp_path / "mnt", "-o", f"scratch={scratch},scratch_limit=1M") as mnt:
        view = mnt / "web" / "snapshots" / "crashed" / "sda.raw"
        pid = daemon_pid(vm_store)
        assert not leftover.exists()
        with open(view, "r+b", buffering=0) as f:
            f.write(b"a" * (1 << 20))                # exactly the limit
            assert len(scratch_files(pid, scratch)) == 1
            with pytest.raises(OSError) as e:
                f.write(b"b")                        # one block more
            assert e.value.errno == errno.ENOSPC
            f.seek(0)
            assert f.read(1 << 20) == b"a" * (1 << 20)
        # FUSE releases the file just after close() returns.
        assert wait_for(lambda: scratch_files(pid, scratch) == [])
        assert not (vm_store / "scratch").exists() or os.listdir(vm_store / "scratch") == []


def test_killed_daemon_leaves_nothing_the_remount_keeps(tmp_path, vm_store):
    scratch = vm_store / "scratch"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    target = tmp_path / "x"
    snapfs("mount", vm_store, mnt)
    try:
        pid = daemon_pid(vm_store)
        view = mnt / "web" / "snapshots" / "crashed" / "sdb-part1.raw"
        assert mount_loop(view, target).returncode == 0
        assert len(scratch_files(pid, scratch)) == 1
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"))
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)
        force_unmount(mnt)
        time.sleep(0.2)
    # What the fallback of a filesystem without O_TMPFILE could leave: a
    # named file of the dead daemon.
    leftover = scratch / f"overlay-{pid}-{uuid.uuid4()}"
    leftover.write_bytes(b"x" * 8192)
    with mounted(vm_store, mnt):
        assert not leftover.exists()
        assert os.listdir(scratch) == []
    result = snapfs("check", vm_store, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
