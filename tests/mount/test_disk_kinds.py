"""The disks snapshots leave out (the seed's rule): a direct LUN (a loop
device stands in for it) and a shareable disk attached to two VMs.  Writes
through ``active/`` reach the device and the shared volume, one VM's
writes show in the other's view, and every operation (create, partial
create, preview, custom preview, undo, commit, delete, clone, live create) leaves
both untouched, byte for byte.  Bad input is refused in one line, with
nothing half-imported."""

import errno
import hashlib
import json
import os
import subprocess

import pytest

from tests.support.live_vm import LiveVm
from tests.support.mounting import control, expect_errno, mounted, snapfs
from tests.support.qemu import qemu_img
from tests.support.qemu_vm import qemu_running

pytestmark = pytest.mark.mount

MiB = 1 << 20
PART_START = 1 * MiB       # sfdisk's default first partition


@pytest.fixture
def lun(tmp_path):
    """A loop device over an 8 MiB file with one MBR partition; detached
    in teardown, even on failure."""
    backing = tmp_path / "lun.img"
    with open(backing, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["sfdisk", "-q", str(backing)], input="start=2048, type=83\n", text=True,
                   check=True, capture_output=True)
    device = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)


@pytest.fixture
def kinds_store(tmp_path, store, lun):
    quorum = tmp_path / "quorum.qcow2"      # imported as raw: a shareable disk is one raw volume
    qemu_img("create", "-f", "qcow2", quorum, "4M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x51 0 64k", str(quorum)],
                   check=True, capture_output=True)
    snapfs("vm", "add", store, "web", "--disk", "sda=4M", "--lun", f"lun={lun}",
           "--shareable", f"quorum={quorum}")
    snapfs("vm", "add", store, "db", "--disk", "sda=2M", "--shareable", "quorum")
    return store


def manifest(store, vm):
    return json.loads((store / "vms" / vm / "manifest.json").read_text())


def shared_file(store):
    [sid] = {k["id"] for k in manifest(store, "web")["kinds"].values()
             if k["kind"] == "shareable"}
    return store / "shared" / sid


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def pread(path, offset, length):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def pwrite(path, offset, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_writes_reach_the_device_and_the_other_vm(tmp_path, kinds_store, lun):
    with mounted(kinds_store, tmp_path / "mnt") as mnt:
        web, db = mnt / "web" / "active", mnt / "db" / "active"
        assert sorted(os.listdir(web)) == ["lun-part1.raw", "lun.raw", "quorum.raw", "sda.raw"]
        assert sorted(os.listdir(db)) == ["quorum.raw", "sda.raw"]
        assert os.path.getsize(web / "lun.raw") == 8 * MiB
        assert pread(web / "quorum.raw", 0, 4) == b"\x51" * 4          # the qcow2's bytes
        pwrite(web / "lun.raw", 3 * MiB, b"to the device")
        assert pread(lun, 3 * MiB, 13) == b"to the device"
        pwrite(web / "lun-part1.raw", 4096, b"in partition 1")
        assert pread(lun, PART_START + 4096, 14) == b"in partition 1"
        # A reader in the other VM, opened before the write, sees it: the
        # views of shared bytes bypass the page cache.
        fd = os.open(db / "quorum.raw", os.O_RDONLY)
        try:
            assert os.pread(fd, 5, 2 * MiB) == bytes(5)
            pwrite(web / "quorum.raw", 2 * MiB, b"quorum")
            assert os.pread(fd, 6, 2 * MiB) == b"quorum"
        finally:
            os.close(fd)
        pwrite(db / "quorum.raw", 2 * MiB + 6, b"-db")
        assert pread(web / "quorum.raw", 2 * MiB, 9) == b"quorum-db"
    assert pread(shared_file(kinds_store), 2 * MiB, 9) == b"quorum-db"


def test_operations_never_touch_them(tmp_path, kinds_store, lun):
    shared = shared_file(kinds_store)
    pwrite(lun, 5 * MiB, b"lun data")
    pwrite(shared, 1 * MiB, b"shared data")
    before = {"lun": digest(lun), "quorum": digest(shared)}

    def unchanged(step):
        assert {"lun": digest(lun), "quorum": digest(shared)} == before, step

    with mounted(kinds_store, tmp_path / "mnt") as mnt:
        vm, snaps = mnt / "web", mnt / "web" / "snapshots"
        (snaps / "one").touch()
        unchanged("create")
        assert sorted(os.listdir(snaps / "one")) == ["sda.raw", "snapshot.json"]
        doc = json.loads((snaps / "one" / "snapshot.json").read_text())
        assert doc["excluded"] == {"lun": "lun", "quorum": "shareable"}
        assert set(doc["volumes"]) == {"sda"}
        control(vm, "create", json.dumps({"name": "two", "disks": ["sda"]}))
        unchanged("partial create")
        expect_errno(errno.EINVAL, control, vm, "create",
                     json.dumps({"name": "x", "disks": ["lun"]}))
        expect_errno(errno.EINVAL, control, vm, "create",
                     json.dumps({"name": "x", "disks": ["quorum"]}))
        control(vm, "preview", "one")
        unchanged("preview")
        assert sorted(os.listdir(vm / "before-preview")) == ["sda.raw"]
        control(vm, "undo")
        unchanged("undo")
        control(vm, "preview", json.dumps({"snapshot": "two", "disks": {"sda": "one"}}))
        unchanged("custom preview")
        expect_errno(errno.EBUSY, control, vm, "preview", "one")
        control(vm, "commit")
        unchanged("commit")
        (snaps / "three").touch()
        os.rmdir(snaps / "one")
        unchanged("delete")
        control(vm, "clone", "three copy")
        unchanged("clone")
        assert sorted(os.listdir(mnt / "copy" / "active")) == ["quorum.raw", "sda.raw"]
    snapfs("snapshot", "create", kinds_store, "db", "cli")
    snapfs("snapshot", "delete", kinds_store, "db", "cli")
    unchanged("CLI create and delete in the other VM")
    assert "ok:" in snapfs("check", kinds_store).stdout


def test_vm_remove_keeps_a_shareable_disk_another_vm_uses(kinds_store):
    shared = shared_file(kinds_store)
    snapfs("vm", "remove", kinds_store, "web")
    assert shared.exists()
    assert {k["kind"] for k in manifest(kinds_store, "db")["kinds"].values()} == {"shareable"}
    snapfs("vm", "remove", kinds_store, "db")
    assert not shared.exists()
    assert "ok:" in snapfs("check", kinds_store).stdout


def test_a_shareable_disk_nobody_attaches_is_a_leftover(kinds_store):
    stray = kinds_store / "shared" / "0b8e4a2a-6a0e-4d6c-9d3c-2f1f5c0c1a11"
    stray.write_bytes(b"x")
    stray.chmod(0o600)
    r = snapfs("check", kinds_store, check=False)
    assert r.returncode != 0 and "a shareable disk no VM attaches" in r.stdout + r.stderr
    snapfs("check", "--repair", kinds_store)
    assert not stray.exists() and shared_file(kinds_store).exists()


def one_line_error(result, *words):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("snapfs: error: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_input_is_refused_whole(tmp_path, store, lun):
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(MiB))
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, cwd=tmp_path)
    cases = [
        (["--disk", "sda=1M", "--lun", f"lun={plain}"], "not a block device"),
        (["--disk", "sda=1M", "--lun", "lun=/dev/nonexistent"], "/dev/nonexistent"),
        (["--disk", "sda=1M", "--shareable", f"q={top}"], "without backing file"),
        (["--disk", "sda=1M", "--shareable", "q"], "no VM"),
        (["--disk", "sda=1M", "--lun", f"sda={lun}"], "duplicate"),
        # The import of a good shareable disk comes first: it goes too.
        (["--shareable", f"q={plain}", "--lun", f"lun={plain}"], "not a block device"),
    ]
    for args, words in cases:
        one_line_error(snapfs("vm", "add", store, "vm", *args, check=False), words)
        assert os.listdir(store / "vms") == []
        assert not (store / "shared").exists() or os.listdir(store / "shared") == []
    snapfs("vm", "add", store, "vm", "--disk", "sda=1M", "--lun", f"lun={lun}")
    one_line_error(snapfs("snapshot", "create", store, "vm", "s", "--disks", "lun",
                          check=False), "direct LUN")
    one_line_error(snapfs("snapshot", "create", store, "vm", "s", "--disks", "nope",
                          check=False), "no disk")
    assert manifest(store, "vm")["snapshots"] == []


def test_two_qemus_share_the_disk_and_a_live_snapshot_leaves_it_out(tmp_path, kinds_store,
                                                                     run_dir, lun):
    """QEMU opens the LUN as a host_device and the shareable disk with
    share-rw, so two VMs run on it at once; a live snapshot switches the
    layered disk only."""
    web = LiveVm(kinds_store, "web", tmp_path, {"sda": 4 * MiB})
    db_qmp = tmp_path / "db.qmp"
    db_args = snapfs("vm", "qemu-args", kinds_store, "db", "--qmp", db_qmp).stdout.splitlines()
    assert any("share-rw=on" in a for a in db_args)
    shared = shared_file(kinds_store)
    before = digest(lun)
    with web.running(), qemu_running(db_args, db_qmp, tmp_path / "db.log"):
        web.io("quorum", "write -P 0x77 65536 4096")
        web.io("quorum", "flush")
        snapfs("snapshot", "create", kinds_store, "web", "live")
        m = manifest(kinds_store, "web")
        assert m["last_operation"]["live"] is True
        assert set(m["snapshots"][-1]["volumes"]) == {"sda"}
        assert web.tops()["sda"] == str(kinds_store / "vms" / "web" / m["active"]["sda"])
    assert pread(shared, 65536, 4096) == b"\x77" * 4096
    assert digest(lun) == before
