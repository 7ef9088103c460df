"""Clone a VM from a snapshot (issue 13): ``snapfs vm clone`` and
``echo "SNAPSHOT NEW_VM" > VM/control/clone``.

QEMU's tools are the oracle: each clone volume reads (``qemu-img convert``)
exactly as the snapshot's chain, is clean for ``qemu-img check`` and has no
backing file.  Then writes and deletes in either VM never change the
other; shareable disks are attached and direct LUNs left out; every error
has its errno and leaves nothing behind; the source may be previewing or
running in QEMU; and a clone killed at each of its crash points leaves no
half VM, the source untouched, a store that ``snapfs check --repair``
cleans, and a retry that succeeds."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.crash.harness import copy_store
from tests.support.daemon import daemon_pid
from tests.support.live_vm import LiveVm
from tests.support.mounting import control, expect_errno, mounted, snapfs, wait_for
from tests.support.qemu import check, info, is_clean, qemu_img, qemu_io, to_raw

pytestmark = pytest.mark.mount

MiB = 1 << 20
K64 = 64 * 1024


# -- helpers ------------------------------------------------------------------------

def manifest(store, vm):
    return json.loads((Path(store) / "vms" / vm / "manifest.json").read_text())


def view(store, vm, vid):
    """The bytes of volume ``vid``'s chain, as QEMU reads them."""
    m = manifest(store, vm)
    return to_raw(Path(store) / "vms" / vm / vid, fmt=m["volumes"][vid]["format"])


def snapshot_views(store, vm, name):
    snap = next(s for s in manifest(store, vm)["snapshots"] if s["name"] == name)
    return {disk: view(store, vm, vid) for disk, vid in snap["volumes"].items()}


def active_views(store, vm):
    return {disk: view(store, vm, vid) for disk, vid in manifest(store, vm)["active"].items()}


def check_clone(store, vm, expected):
    """The clone holds one clean, sparse qcow2 volume per disk, without
    backing file, reading as ``expected`` ({disk: bytes}); no snapshots."""
    m = manifest(store, vm)
    assert m["snapshots"] == [] and m["operation"] is None
    assert set(m["active"]) == set(expected)
    assert set(m["volumes"]) == set(m["active"].values())
    files = {p.name for p in (Path(store) / "vms" / vm).iterdir()} - {"manifest.json"}
    assert files == set(m["volumes"])
    for disk, vid in m["active"].items():
        path = Path(store) / "vms" / vm / vid
        assert m["volumes"][vid] == {"disk": disk, "format": "qcow2", "parent": None}
        image = info(path)
        assert image["format"] == "qcow2" and "backing-filename" not in image, image
        assert image["virtual-size"] == len(expected[disk])
        assert is_clean(check(path)), (disk, check(path))
        assert to_raw(path, fmt="qcow2") == expected[disk], disk
        # Sparse: no more than the data that is not zero, plus tables.
        data = len(expected[disk]) - expected[disk].count(0)
        assert os.stat(path).st_blocks * 512 <= data + 2 * MiB, disk


def fingerprint(*directories):
    """{path: sha256} of every file under ``directories``."""
    out = {}
    for directory in directories:
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def vms_entries(store):
    return sorted(os.listdir(Path(store) / "vms"))


def status(vm):
    return json.loads((vm / "control" / "status").read_text())


def wait_idle(vm):
    deadline = time.monotonic() + 60
    while (st := status(vm))["state"] == "running" or st["queue"]:
        assert time.monotonic() < deadline, st
        time.sleep(0.02)


def pwrite(path, data, offset):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def build_web(store, src, shareable=None):
    """VM web: sda a qcow2 chain (data, a compressed cluster, zeroed
    clusters over data), sdb a sparse raw base, and the shareable disk
    ``shareable`` (an image) if given; snapshots 'base' and 's1', and an
    active state that differs from s1."""
    src.mkdir(exist_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", src / "base.qcow2", "64M")
    qemu_io(src / "base.qcow2", "write -q -P 1 0 5M", "write -q -c -P 3 8M 64k",
            "write -q -P 4 40M 1M", fmt="qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             src / "top.qcow2", cwd=src)
    qemu_io(src / "top.qcow2", "write -q -P 2 1M 1M", "write -q -z 4M 512k", fmt="qcow2")
    with open(src / "data.raw", "wb") as f:
        f.truncate(16 * MiB)
        f.seek(2 * MiB)
        f.write(b"\x05" * MiB)
    extra = ["--shareable", f"q={shareable}"] if shareable else []
    snapfs("vm", "add", store, "web", "--disk", f"sda={src / 'top.qcow2'}",
           "--disk", f"sdb={src / 'data.raw'}", *extra)
    leaves = manifest(store, "web")["active"]
    vm_dir = Path(store) / "vms" / "web"
    qemu_io(vm_dir / leaves["sda"], "write -q -P 6 2M 64k", fmt="qcow2")
    qemu_io(vm_dir / leaves["sdb"], "write -q -P 7 0 64k", fmt="qcow2")
    snapfs("snapshot", "create", store, "web", "s1")
    leaves = manifest(store, "web")["active"]
    qemu_io(vm_dir / leaves["sda"], "write -q -P 8 0 64k", fmt="qcow2")
    return store


@pytest.fixture
def web(tmp_path, store):
    return build_web(store, tmp_path / "src")


# -- the clone's bytes, and its independence -------------------------------------------

def test_cli_clone_reads_as_the_snapshot_and_stays_independent(tmp_path, web):
    store = web
    expected = snapshot_views(store, "web", "s1")
    r = snapfs("vm", "clone", store, "web", "s1", "copy")
    assert r.stdout.startswith("cloned snapshot s1 of web into VM copy: disk(s) sda, sdb"), r.stdout
    assert r.stderr == ""
    check_clone(store, "copy", expected)
    m = manifest(store, "copy")
    assert m["last_operation"]["op"] == "clone"
    assert m["last_operation"]["from"]["vm"] == "web"
    assert m["last_operation"]["from"]["snapshot"] == "s1"
    assert m["last_operation"]["left_out"] == {}
    assert [line.split("\t")[0] for line in
            snapfs("vm", "list", store).stdout.splitlines()] == ["copy", "web"]
    # A clone of the oldest snapshot too.
    snapfs("vm", "clone", store, "web", "base", "old")
    check_clone(store, "old", snapshot_views(store, "web", "base"))

    web_active = {d: bytearray(b) for d, b in active_views(store, "web").items()}
    web_base = snapshot_views(store, "web", "base")
    copy_model = {d: bytearray(b) for d, b in expected.items()}
    with mounted(store, tmp_path / "mnt") as mnt:
        src, copy = mnt / "web", mnt / "copy"
        assert sorted(os.listdir(mnt)) == ["copy", "old", "web"]
        assert os.listdir(copy / "snapshots") == []
        for disk, data in expected.items():
            assert (copy / "active" / f"{disk}.raw").read_bytes() == data
            assert (src / "snapshots" / "s1" / f"{disk}.raw").read_bytes() == data
        # Writes to either VM's active views never reach the other.
        pwrite(src / "active" / "sda.raw", b"\xaa" * K64, 0)
        web_active["sda"][:K64] = b"\xaa" * K64
        pwrite(copy / "active" / "sda.raw", b"\xbb" * K64, MiB)
        copy_model["sda"][MiB:MiB + K64] = b"\xbb" * K64
        pwrite(copy / "active" / "sdb.raw", b"\xcc" * K64, 2 * MiB)
        copy_model["sdb"][2 * MiB:2 * MiB + K64] = b"\xcc" * K64
        for disk in expected:
            assert (copy / "active" / f"{disk}.raw").read_bytes() == copy_model[disk]
            assert (src / "active" / f"{disk}.raw").read_bytes() == web_active[disk]
            assert (src / "snapshots" / "s1" / f"{disk}.raw").read_bytes() == expected[disk]
        # The clone's own snapshots: created and merged away, in its own volumes.
        os.mkdir(copy / "snapshots" / "c1")
        pwrite(copy / "active" / "sda.raw", b"\xdd" * K64, 3 * MiB)
        copy_model["sda"][3 * MiB:3 * MiB + K64] = b"\xdd" * K64
        os.rmdir(copy / "snapshots" / "c1")
        wait_idle(copy)
        # Deletes in the source merge its layers; the clone reads the same.
        os.rmdir(src / "snapshots" / "s1")
        wait_idle(src)
        os.rmdir(src / "snapshots" / "base")
        wait_idle(src)
        assert status(src)["last_error"] is None and status(copy)["last_error"] is None
        for disk in expected:
            assert (copy / "active" / f"{disk}.raw").read_bytes() == copy_model[disk]
            assert (src / "active" / f"{disk}.raw").read_bytes() == web_active[disk]
            assert (mnt / "old" / "active" / f"{disk}.raw").read_bytes() == web_base[disk]
    # QEMU reads the same, and every volume is clean.
    assert active_views(store, "copy") == {d: bytes(b) for d, b in copy_model.items()}
    assert active_views(store, "web") == {d: bytes(b) for d, b in web_active.items()}
    assert active_views(store, "old") == web_base
    for vm in ("web", "copy", "old"):
        for vid, vol in manifest(store, vm)["volumes"].items():
            if vol["format"] == "qcow2":
                assert is_clean(check(Path(store) / "vms" / vm / vid)), (vm, vid)
    assert snapfs("check", store).returncode == 0


def test_clone_through_the_mount_shows_progress_and_the_new_vm(tmp_path, web, monkeypatch):
    store = web
    snapfs("vm", "add", store, "other", "--disk", "sda=1M")
    expected = snapshot_views(store, "web", "s1")
    # The clone stops after its first piece until the test says so.
    flag = tmp_path / "paused"
    monkeypatch.setenv("SNAPFS_PAUSE_AT", "clone:copy")
    monkeypatch.setenv("SNAPFS_PAUSE_FILE", str(flag))
    with mounted(store, tmp_path / "mnt") as mnt:
        src = mnt / "web"
        assert sorted(os.listdir(mnt)) == ["other", "web"]
        assert "clone" in os.listdir(src / "control")
        outcome = []

        def ask():
            try:
                control(src, "clone", "s1 copy\n")
                outcome.append(None)
            except OSError as e:
                outcome.append(e)

        asker = threading.Thread(target=ask)
        asker.start()
        try:
            assert wait_for(flag.exists, 30), "the clone never started copying"
            st = status(src)
            assert st["state"] == "running", st
            op = st["operation"]
            assert (op["op"], op["snapshot"], op["to"]) == ("clone", "s1", "copy"), op
            assert 0 < op["progress"]["done"] < op["progress"]["total"], op
            # Reads go on meanwhile: other VMs, the source's snapshots and active disks.
            assert (mnt / "other" / "active" / "sda.raw").read_bytes() == bytes(MiB)
            assert (src / "snapshots" / "s1" / "sda.raw").read_bytes() == expected["sda"]
            assert len((src / "active" / "sdb.raw").read_bytes()) == 16 * MiB
            # No half VM: not listed, not found, not in the store's list.
            assert sorted(os.listdir(mnt)) == ["other", "web"]
            expect_errno(errno.ENOENT, os.stat, mnt / "copy")
            assert "copy" not in snapfs("vm", "list", store).stdout
            # A read-only check beside the mount sees nothing wrong.
            r = snapfs("check", store, check=False)
            assert r.returncode == 0, r.stdout + r.stderr
        finally:
            flag.unlink(missing_ok=True)
            asker.join(60)
        assert not asker.is_alive() and outcome == [None], outcome
        # The write returned once the new VM was in place: it is listed.
        assert sorted(os.listdir(mnt)) == ["copy", "other", "web"]
        copy = mnt / "copy"
        for disk, data in expected.items():
            assert (copy / "active" / f"{disk}.raw").read_bytes() == data
        assert os.listdir(copy / "snapshots") == []
        doc = status(copy)
        assert doc["last_operation"]["op"] == "clone"
        assert doc["last_operation"]["from"]["snapshot"] == "s1"
        st = status(src)
        assert st["state"] == "idle" and st["last_error"] is None and st["operation"] is None
        # The new VM works like any other: a snapshot through its control file.
        control(copy, "create", "first")
        assert os.listdir(copy / "snapshots") == ["first", "latest"]
        assert (copy / "snapshots" / "first" / "sda.raw").read_bytes() == expected["sda"]
    log = (Path(store) / "snapfs.log").read_text()
    assert "VM copy cloned from snapshot s1 of VM web" in log
    assert [s["name"] for s in manifest(store, "copy")["snapshots"]] == ["first"]
    assert active_views(store, "copy") == expected
    assert snapfs("check", store).returncode == 0


# -- disks of other kinds, partial snapshots -------------------------------------------

@pytest.fixture
def lun(tmp_path):
    """A loop device on a 4 MiB file with data: a direct LUN.  Always
    detached, even on failure."""
    backing = tmp_path / "lun.img"
    with open(backing, "wb") as f:
        f.write(b"\x4c" * (4 * MiB))
    device = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=True, capture_output=True)


def test_shareable_disk_is_attached_and_lun_left_out(tmp_path, store, lun):
    shared_image = tmp_path / "q.raw"
    with open(shared_image, "wb") as f:
        f.truncate(2 * MiB)
        f.write(b"\x51" * K64)
    snapfs("vm", "add", store, "db", "--disk", "sda=4M", "--lun", f"l={lun}",
           "--shareable", f"q={shared_image}")
    db_dir = Path(store) / "vms" / "db"
    qemu_io(db_dir / manifest(store, "db")["active"]["sda"], "write -q -P 9 0 1M", fmt="qcow2")
    snapfs("snapshot", "create", store, "db", "s")
    source = manifest(store, "db")
    shared_id = source["kinds"]["q"]["id"]
    expected = snapshot_views(store, "db", "s")
    r = snapfs("vm", "clone", store, "db", "s", "db2")
    assert "left out: direct LUN(s) l" in r.stdout, r.stdout
    assert "shareable: q (attached, shared with db)" in r.stdout, r.stdout
    assert f"direct LUN l ({lun}) left out" in r.stderr, r.stderr
    m = manifest(store, "db2")
    assert m["disks"] == ["sda", "q"]
    assert m["kinds"] == {"q": {"kind": "shareable", "id": shared_id}}
    assert m["last_operation"]["left_out"] == {"l": "direct LUN"}
    assert list(m["active"]) == ["sda"]
    assert to_raw(Path(store) / "vms" / "db2" / m["active"]["sda"], fmt="qcow2") == expected["sda"]
    assert is_clean(check(Path(store) / "vms" / "db2" / m["active"]["sda"]))
    assert os.listdir(Path(store) / "shared") == [shared_id]
    with mounted(store, tmp_path / "mnt") as mnt:
        assert sorted(os.listdir(mnt / "db2" / "active")) == ["q.raw", "sda.raw"]
        assert (mnt / "db2" / "active" / "sda.raw").read_bytes() == expected["sda"]
        # One volume, two VMs: a write through either is seen by both.
        pwrite(mnt / "db2" / "active" / "q.raw", b"\x52" * K64, MiB)
        with open(mnt / "db" / "active" / "q.raw", "rb") as f:
            f.seek(MiB)
            assert f.read(K64) == b"\x52" * K64
        # Through the mount: the same, and the log says what was left out.
        control(mnt / "db", "clone", "s db3")
        assert sorted(os.listdir(mnt)) == ["db", "db2", "db3"]
        assert sorted(os.listdir(mnt / "db3" / "active")) == ["q.raw", "sda.raw"]
        assert status(mnt / "db3")["last_operation"]["left_out"] == {"l": "direct LUN"}
    log = (Path(store) / "snapfs.log").read_text()
    assert f"clone db3 of VM db: direct LUN l ({lun}) left out" in log
    assert manifest(store, "db3")["kinds"] == {"q": {"kind": "shareable", "id": shared_id}}
    assert snapfs("check", store).returncode == 0
    # The shared volume stays while any VM attaches it.
    snapfs("vm", "remove", store, "db2")
    snapfs("vm", "remove", store, "db")
    assert os.listdir(Path(store) / "shared") == [shared_id]
    assert snapfs("check", store).returncode == 0
    snapfs("vm", "remove", store, "db3")
    assert os.listdir(Path(store) / "shared") == []


def test_partial_snapshot_gives_its_disks_only(tmp_path, web):
    store = web
    # A snapshot that holds sda only, as RHV's "disks to include" makes one.
    path = Path(store) / "vms" / "web" / "manifest.json"
    doc = json.loads(path.read_text())
    s1 = next(s for s in doc["snapshots"] if s["name"] == "s1")
    del s1["volumes"]["sdb"]
    path.write_text(json.dumps(doc))
    expected = snapshot_views(store, "web", "s1")
    assert list(expected) == ["sda"]
    r = snapfs("vm", "clone", store, "web", "s1", "part")
    assert "disk(s) sda (" in r.stdout and "left out: sdb (not in snapshot s1)" in r.stdout, \
        r.stdout
    assert "disk sdb left out: snapshot s1 does not hold it" in r.stderr, r.stderr
    check_clone(store, "part", expected)
    assert manifest(store, "part")["disks"] == ["sda"]
    with mounted(store, tmp_path / "mnt") as mnt:
        control(mnt / "web", "clone", "s1 part2")
        assert os.listdir(mnt / "part2" / "active") == ["sda.raw"]
        assert status(mnt / "part2")["last_operation"]["left_out"] == {"sdb": "not in the snapshot"}
    check_clone(store, "part2", expected)


# -- errors ---------------------------------------------------------------------------

def test_errors_have_their_errno_and_leave_nothing(tmp_path, web):
    store = web
    snapfs("vm", "add", store, "other", "--disk", "sda=1M")
    before = fingerprint(Path(store) / "vms")
    entries = vms_entries(store)
    cases = [
        (("nope", "s1", "x"), "no VM named 'nope'"),
        (("web", "nope", "x"), "has no snapshot named 'nope'"),
        (("web", "s1", "web"), "VM 'web' already exists"),
        (("web", "s1", "other"), "VM 'other' already exists"),
        (("web", "s1", "a/b"), "invalid VM name"),
        (("web", "s1", ".hidden"), "invalid VM name"),
        (("web", "s1", ""), "invalid VM name"),
        (("web", "s1", "tab\there"), "invalid VM name"),
        (("web", "s1", "x" * 256), "invalid VM name"),
    ]
    for args, message in cases:
        r = snapfs("vm", "clone", store, *args, check=False)
        assert r.returncode == 1 and r.stdout == "", (args, r)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("snapfs: error: ") and message in lines[0], \
            (args, r.stderr)
    assert vms_entries(store) == entries
    with mounted(store, tmp_path / "mnt") as mnt:
        src = mnt / "web"
        expect_errno(errno.ENOENT, control, mnt / "nope", "clone", "s1 x\n")
        expect_errno(errno.ENOENT, control, src, "clone", "nope x\n")
        assert status(src)["last_error"]["errno"] == errno.ENOENT
        expect_errno(errno.EEXIST, control, src, "clone", "s1 web\n")
        expect_errno(errno.EEXIST, control, src, "clone", "s1 other\n")
        assert status(src)["last_error"]["errno"] == errno.EEXIST
        for line in ("s1 a/b", "s1 .x", "s1", "", "s1 bad\x01name"):
            expect_errno(errno.EINVAL, control, src, "clone", line + "\n")
        assert status(src)["last_error"]["errno"] == errno.EINVAL
        expect_errno(errno.ENAMETOOLONG, control, src, "clone", "s1 " + "x" * 256 + "\n")
        # Reading control/clone is refused, as for every control file.
        expect_errno(errno.EACCES, open, src / "control" / "clone", "rb")
        assert sorted(os.listdir(mnt)) == ["other", "web"]
    assert vms_entries(store) == entries
    assert fingerprint(Path(store) / "vms") == before
    assert snapfs("check", store).returncode == 0


def test_mount_read_only_refuses(tmp_path, web):
    with mounted(web, tmp_path / "mnt", "-o", "ro") as mnt:
        expect_errno(errno.EROFS, open, mnt / "web" / "control" / "clone", "w")
    assert vms_entries(web) == ["web"]




def fill(directory, leave):
    """Fill ``directory``'s filesystem until ``leave`` bytes are free."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    filler = directory / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(1, free - leave))
    return filler


def test_no_space_changes_nothing(tmp_path, small_fs, monkeypatch):
    store = small_fs / "store"
    snapfs("init", store)
    src = tmp_path / "src"
    src.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", src / "disk.qcow2", "64M")
    qemu_io(src / "disk.qcow2", "write -q -P 1 0 24M", fmt="qcow2")
    snapfs("vm", "add", store, "vm", "--disk", f"sda={src / 'disk.qcow2'}")
    snapfs("snapshot", "create", store, "vm", "s")
    expected = snapshot_views(store, "vm", "s")
    before = fingerprint(store / "vms")
    filler = fill(small_fs, 12 * MiB)
    # Refused before anything is written: CLI and mount.
    r = snapfs("vm", "clone", store, "vm", "s", "copy", check=False)
    assert r.returncode == 1 and "nothing was changed" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1
    with mounted(store, tmp_path / "mnt") as mnt:
        expect_errno(errno.ENOSPC, control, mnt / "vm", "clone", "s copy\n")
        assert status(mnt / "vm")["last_error"]["errno"] == errno.ENOSPC
        assert os.listdir(mnt) == ["vm"]
    assert vms_entries(store) == ["vm"]
    assert fingerprint(store / "vms") == before
    # Out of space half-way (the check forced off): nothing is left either.
    from snapfs.errors import NoSpace
    from snapfs.ops import clone
    from snapfs.ops.operations import VmOperations
    from snapfs.store.store import Store
    monkeypatch.setattr(clone, "_check_space", lambda *args: None)
    opened = Store.open(store)
    with opened.locked("test"):
        with pytest.raises(NoSpace, match="nothing was changed"):
            VmOperations(opened, "vm").clone("s", "copy")
    assert vms_entries(store) == ["vm"]
    assert fingerprint(store / "vms") == before
    filler.unlink()
    snapfs("vm", "clone", store, "vm", "s", "copy")
    check_clone(store, "copy", expected)
    assert snapfs("check", store).returncode == 0


# -- sources that are busy -------------------------------------------------------------

def test_source_in_preview_or_held_by_qemu(tmp_path, web):
    store = web
    s1 = snapshot_views(store, "web", "s1")
    base = snapshot_views(store, "web", "base")
    snapfs("snapshot", "preview", store, "web", "base")
    snapfs("vm", "clone", store, "web", "s1", "a")
    check_clone(store, "a", s1)
    with mounted(store, tmp_path / "mnt") as mnt:
        assert status(mnt / "web")["state"] == "preview"
        control(mnt / "web", "clone", "base b")
        assert (mnt / "b" / "active" / "sda.raw").read_bytes() == base["sda"]
    check_clone(store, "b", base)
    snapfs("snapshot", "undo", store, "web")
    # QEMU holds the active leaf (its image lock), as a running VM does.
    leaf = Path(store) / "vms" / "web" / manifest(store, "web")["active"]["sda"]
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(leaf)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        assert holder.poll() is None
        snapfs("vm", "clone", store, "web", "s1", "c")
        with mounted(store, tmp_path / "mnt") as mnt:
            control(mnt / "web", "clone", "s1 d")
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    check_clone(store, "c", s1)
    check_clone(store, "d", s1)
    assert snapfs("check", store).returncode == 0


def test_source_running_in_attached_qemu(tmp_path, store, run_dir):
    snapfs("vm", "add", store, "web", "--disk", "sda=4M", "--disk", "data=2M")
    vm = LiveVm(store, "web", tmp_path, {"sda": 4 * MiB, "data": 2 * MiB})
    with vm.running():
        vm.write("sda", 0x11, 0, K64)
        vm.write("data", 0x21, K64, K64, flush=True)
        model = vm.snapshot_model()
        snapfs("snapshot", "create", store, "web", "s1")        # live
        vm.write("sda", 0x12, 0, 4096, flush=True)             # after it
        snapfs("vm", "clone", store, "web", "s1", "c")
        with mounted(store, tmp_path / "mnt") as mnt:
            control(mnt / "web", "clone", "s1 d")
            assert (mnt / "d" / "active" / "sda.raw").read_bytes() == model["sda"]
        assert vm.tops()["sda"] == str(vm.dir / manifest(store, "web")["active"]["sda"])
    for name in ("c", "d"):
        check_clone(store, name, model)
        assert manifest(store, name)["last_operation"]["from"]["consistency"] == "crash"
    vm.check_volumes()


# -- crashes --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A store whose VM web has two layered disks and a shareable one, and
    the views of its snapshot s1."""
    base = tmp_path_factory.mktemp("clone-crash")
    store = base / "store"
    snapfs("init", store)
    shared_image = base / "q.raw"
    with open(shared_image, "wb") as f:
        f.truncate(MiB)
        f.write(b"\x51" * K64)
    build_web(store, base / "src", shareable=shared_image)
    return store, snapshot_views(store, "web", "s1")


def run_cli(*args, env=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_CRASH_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "snapfs.cli", *map(str, args)],
                          capture_output=True, text=True, env=full, timeout=120)


def crash_points(store, tmp_path):
    trace = tmp_path / "trace"
    r = run_cli("vm", "clone", store, "web", "s1", "traced",
                env={"SNAPFS_CRASH_TRACE": str(trace)})
    assert r.returncode == 0, r.stderr
    snapfs("vm", "remove", store, "traced")
    return [line.split(" ", 1)[1] for line in trace.read_text().splitlines()]


def test_crash_points_of_a_clone(tmp_path, pristine):
    points = crash_points(copy_store(pristine[0], tmp_path / "store"), tmp_path)
    # sda: four pieces of data (one 4 MiB piece, then three smaller
    # ranges); sdb: two ranges.
    assert points == ["clone:staged"] + ["clone:copy"] * 4 + ["clone:volume"] \
        + ["clone:copy"] * 2 + ["clone:volume", "clone:manifest", "clone:done"], points


def _verify_after_kill(store, point, expected, source_before):
    """No half VM, the source as it was, a clean store after check --repair,
    and a retry that succeeds (or finds the finished clone)."""
    done = point == "clone:done"
    listed = [line.split("\t")[0] for line in
              snapfs("vm", "list", store).stdout.splitlines()]
    assert listed == (["copy", "web"] if done else ["web"]), (point, listed)
    assert fingerprint(Path(store) / "vms" / "web", Path(store) / "shared") == source_before, point
    r = snapfs("check", "--repair", store, check=False)
    assert r.returncode == 0, (point, r.stdout, r.stderr)
    if point not in ("clone:done",):
        assert "removed" in r.stderr and ".clone-" in r.stderr, (point, r.stderr)
    assert snapfs("check", store).returncode == 0
    assert vms_entries(store) == (["copy", "web"] if done else ["web"]), point
    assert fingerprint(Path(store) / "vms" / "web", Path(store) / "shared") == source_before, point
    if done:
        r = snapfs("vm", "clone", store, "web", "s1", "copy", check=False)
        assert r.returncode == 1 and "already exists" in r.stderr
    else:
        snapfs("vm", "clone", store, "web", "s1", "copy")
    check_clone(store, "copy", expected)
    assert manifest(store, "copy")["kinds"] == manifest(store, "web")["kinds"]
    assert snapfs("check", store).returncode == 0


@pytest.mark.parametrize("form", ["cli", "mount"])
def test_kill_at_each_crash_point(tmp_path, pristine, form, monkeypatch):
    pristine_store, expected = pristine
    points = crash_points(copy_store(pristine_store, tmp_path / "traced"), tmp_path)
    for n, point in enumerate(points, 1):
        store = copy_store(pristine_store, tmp_path / f"store{n}")
        source_before = fingerprint(store / "vms" / "web", store / "shared")
        if form == "cli":
            r = run_cli("vm", "clone", store, "web", "s1", "copy",
                        env={"SNAPFS_CRASH_AT": str(n)})
            assert r.returncode == -9, (point, r.returncode, r.stderr)
        else:
            _kill_mount_clone(store, tmp_path / f"mnt{n}", n, monkeypatch)
        _verify_after_kill(store, point, expected, source_before)
        shutil.rmtree(store)


def _kill_mount_clone(store, mountpoint, n, monkeypatch):
    """The mount's daemon SIGKILLs itself at the n-th crash point of a
    control/clone (nothing else reaches one in it)."""
    monkeypatch.setenv("SNAPFS_CRASH_AT", str(n))
    with mounted(store, mountpoint) as mnt:
        monkeypatch.delenv("SNAPFS_CRASH_AT")      # not for the umount
        pid = daemon_pid(store)
        with pytest.raises(OSError) as e:
            control(mnt / "web", "clone", "s1 copy\n")
        assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED), e.value
        assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10)
