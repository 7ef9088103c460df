"""Operations asked while a merge of the same VM runs wait for it instead
of failing (DESIGN.md section 1).

Each test deletes snapshot A with rmdir and holds the merge that goes on
after rmdir answered half-way (the store's pause hook: SNAPFS_PAUSE_AT /
SNAPFS_PAUSE_FILE, see snapfs/store/faults.py), asks another operation
at once, then lets the merge go:

- control-file commands and ``touch snapshots/NAME`` wait: their write()
  or close() returns only after the merge, with the command's own errno;
- mkdir, rmdir and mv are answered at once (the kernel holds the
  snapshots directory's lock while they are in the daemon) and queued;
  ``ls snapshots/`` keeps answering meanwhile.

Afterwards the listing is what the shell asked for, every view reads the
bytes it read before (through the mount and through ``qemu-img
convert``), and ``snapfs check`` passes.  Runtime: about 2 s per test.
"""

import errno
import json
import os
import threading
import time

import pytest

from snapfs.store.store import Store
from tests.support.mounting import control, expect_errno, mounted, snapfs, snapfs_mounts
from tests.support.qemu import to_raw

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE")

MiB = 1 << 20
DISKS = {"sda": 8 * MiB, "sdb": 2 * MiB}
# A generous bound for "answers at once" on 2 busy cores: a request that
# waited for the held merge would never return before it is let go.
RESPONSIVE = 5.0


def status(vm):
    return json.loads((vm / "control" / "status").read_text())


def read(path):
    with open(path, "rb") as f:
        return f.read()


def touch(path):
    """``touch PATH``: open(O_CREAT), set the times, close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOCTTY | os.O_NONBLOCK, 0o666)
    try:
        os.utime(fd)
    finally:
        os.close(fd)


class Call:
    """``fn()`` in a thread of its own: a command that waits for the merge."""

    def __init__(self, fn, *args):
        self.error = None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(fn, args), daemon=True).start()

    def _run(self, fn, args):
        try:
            fn(*args)
        except BaseException as e:
            self.error = e
        finally:
            self._done.set()

    @property
    def done(self):
        return self._done.is_set()

    def result(self, timeout=60):
        assert self._done.wait(timeout), "the call never returned"
        if self.error is not None:
            raise self.error


class HeldMerge:
    """VM ``vm`` with snapshots A and B (each disk's bytes differ between
    them and the active state), and the means to hold A's merge."""

    def __init__(self, store, mnt, flag):
        self.store, self.mnt, self.flag = store, mnt, flag
        self.vm = mnt / "vm"
        self.snaps = self.vm / "snapshots"

    def prepare(self):
        for fill, name in ((1, "A"), (2, "B"), (3, None)):
            with open(self.vm / "active" / "sda.raw", "r+b") as f:
                f.seek((fill - 1) * MiB)
                f.write(bytes([fill]) * (2 * MiB))
            with open(self.vm / "active" / "sdb.raw", "r+b") as f:
                f.seek(fill * 4096)
                f.write(bytes([fill + 10]) * 4096)
            if name:
                os.mkdir(self.snaps / name)
        self.before = self.views()

    def views(self):
        """{"active" or snapshot name: {disk: bytes}} read through the mount."""
        out = {"active": {d: read(self.vm / "active" / f"{d}.raw") for d in DISKS}}
        for name in status(self.vm)["snapshots"]:
            out[name] = {d: read(self.snaps / name / f"{d}.raw") for d in DISKS}
        return out

    def hold(self):
        """rmdir A; return once its merge is held half-way."""
        os.rmdir(self.snaps / "A")
        deadline = time.monotonic() + 30
        while not self.flag.exists():
            assert time.monotonic() < deadline, "the merge never started copying"
            time.sleep(0.01)
        assert status(self.vm)["operation"]["op"] == "delete"

    @property
    def held(self):
        return self.flag.exists()

    def release(self, timeout=60):
        """Let the merge go; wait until it and everything queued ran."""
        self.flag.unlink()
        deadline = time.monotonic() + timeout
        while status(self.vm)["state"] == "running":
            assert time.monotonic() < deadline, status(self.vm)
            time.sleep(0.02)

    def waiting(self, call, op):
        """``call`` waits for the merge: not returned, and listed in
        control/status's queue as a request not answered yet (it cannot
        return while the merge is held)."""
        deadline = time.monotonic() + 30
        while not any(j["op"] == op and not j["answered"] for j in status(self.vm)["queue"]):
            assert not call.done, f"{op} returned while the merge was held: {call.error!r}"
            assert time.monotonic() < deadline, status(self.vm)
            time.sleep(0.02)
        assert not call.done and self.held

    def listing(self):
        """``ls snapshots/``, which must answer while the merge is held."""
        result = []
        call = Call(lambda: result.extend(sorted(os.listdir(self.snaps))))
        call.result(timeout=RESPONSIVE)
        return result

    def check(self, want):
        """The snapshots are ``want`` (names in order, each {disk: bytes},
        plus "active" and maybe "before-preview"), through the mount and
        through qemu-img."""
        names = [n for n in want if n not in ("active", "before-preview")]
        st = status(self.vm)
        assert st["snapshots"] == names and st["queue"] == [], st
        assert sorted(os.listdir(self.snaps)) == sorted(names + (["latest"] if names else []))
        got = self.views()
        for name in ["active"] + names:
            for d in DISKS:
                assert got[name][d] == want[name][d], f"{name}/{d}.raw through the mount"
        manifest = json.loads((self.store / "vms" / "vm" / "manifest.json").read_text())
        volumes = {"active": manifest["active"]}
        volumes.update({s["name"]: s["volumes"] for s in manifest["snapshots"]})
        if "before-preview" in want:
            volumes["before-preview"] = manifest["preview"]["before"]
            for d in DISKS:
                assert read(self.vm / "before-preview" / f"{d}.raw") == want["before-preview"][d]
        for name, disks in volumes.items():
            for d in DISKS:
                raw = to_raw(self.store / "vms" / "vm" / disks[d])
                assert raw == want[name][d], f"qemu-img convert of {name}/{d}"


@pytest.fixture
def merge(tmp_path, store, monkeypatch):
    snapfs("vm", "add", store, "vm", *[a for d, size in DISKS.items()
                                       for a in ("--disk", f"{d}={size}")])
    flag = tmp_path / "paused"
    monkeypatch.setenv("SNAPFS_PAUSE_AT", "delete:copy")
    monkeypatch.setenv("SNAPFS_PAUSE_FILE", str(flag))
    with mounted(store, tmp_path / "mnt") as mnt:
        held = HeldMerge(store, mnt, flag)
        try:
            held.prepare()
            yield held
        finally:
            flag.unlink(missing_ok=True)
    assert snapfs("check", store).returncode == 0


# -- commands that wait: control files and touch --------------------------------------------

def test_preview_waits_for_the_merge(merge):
    merge.hold()
    call = Call(control, merge.vm, "preview", "B\n")
    merge.waiting(call, "preview")
    assert merge.listing() == ["B", "latest"]
    merge.release()
    call.result()
    b = merge.before
    merge.check({"B": b["B"], "active": b["B"], "before-preview": b["active"]})


def test_control_create_waits_for_the_merge(merge):
    merge.hold()
    call = Call(control, merge.vm, "create", "C after the merge\n")
    merge.waiting(call, "create")
    merge.release()
    call.result()
    b = merge.before
    merge.check({"B": b["B"], "C": b["active"], "active": b["active"]})
    assert json.loads(read(merge.snaps / "C" / "snapshot.json"))["description"] == "after the merge"


def test_touch_creates_once_the_merge_is_done(merge):
    merge.hold()
    call = Call(touch, merge.snaps / "D")
    merge.waiting(call, "create")
    merge.release()
    call.result()
    b = merge.before
    merge.check({"B": b["B"], "D": b["active"], "active": b["active"]})


def test_control_delete_waits_for_the_merge(merge):
    merge.hold()
    call = Call(control, merge.vm, "delete", "B\n")
    merge.waiting(call, "delete")
    merge.release()
    call.result()
    merge.check({"active": merge.before["active"]})


# -- mkdir, rmdir and mv: answered at once, queued ---------------------------------------

def test_mkdir_is_queued_and_ls_answers(merge):
    merge.hold()
    os.mkdir(merge.snaps / "E")
    assert merge.held, "mkdir waited for the merge"
    # Nothing changed yet: the snapshot is made once the merge is done.
    assert merge.listing() == ["B", "latest"]
    assert not os.path.exists(merge.snaps / "E")
    queue = status(merge.vm)["queue"]
    assert [(j["op"], j["snapshot"], j["asked_by"]) for j in queue] == [("create", "E", "mkdir")]
    # Names are checked against what the queue will leave.
    expect_errno(errno.EEXIST, os.mkdir, merge.snaps / "E")
    expect_errno(errno.EEXIST, os.rename, merge.snaps / "B", merge.snaps / "E")
    merge.release()
    b = merge.before
    merge.check({"B": b["B"], "E": b["active"], "active": b["active"]})


def test_a_queued_mkdir_holds_the_disks_as_they_were_when_answered(merge):
    """Writes issued after mkdir returned wait until its snapshot is made,
    on every disk, and land in the new leaves: the snapshot is the state
    the shell saw when mkdir returned, not the state after the merge."""
    merge.hold()
    os.mkdir(merge.snaps / "E")
    data = b"\x77" * 4096

    def write(disk, offset):
        with open(merge.vm / "active" / f"{disk}.raw", "r+b", buffering=0) as f:
            f.seek(offset)
            f.write(data)
            os.fsync(f.fileno())        # the check below reads the files too

    writes = [Call(write, "sdb", 0), Call(write, "sda", 6 * MiB)]
    time.sleep(0.5)
    assert not any(w.done for w in writes), "a write after a queued mkdir went on"
    merge.release()
    for w in writes:
        w.result()
    b = merge.before
    after = {"sda": b["active"]["sda"][:6 * MiB] + data + b["active"]["sda"][6 * MiB + 4096:],
             "sdb": data + b["active"]["sdb"][4096:]}
    merge.check({"B": b["B"], "E": b["active"], "active": after})


def test_rename_is_queued_and_ls_answers(merge):
    merge.hold()
    os.rename(merge.snaps / "B", merge.snaps / "C")
    assert merge.held, "mv waited for the merge"
    assert merge.listing() == ["B", "latest"]
    merge.release()
    b = merge.before
    merge.check({"C": b["B"], "active": b["active"]})
    assert os.readlink(merge.snaps / "latest") == "C"
    assert json.loads(read(merge.snaps / "C" / "snapshot.json"))["name"] == "C"


def test_rmdir_is_queued(merge):
    merge.hold()
    os.rmdir(merge.snaps / "B")
    assert merge.held, "rmdir waited for the merge"
    assert merge.listing() == ["B", "latest"]
    expect_errno(errno.ENOENT, os.rename, merge.snaps / "B", merge.snaps / "C")
    merge.release()
    merge.check({"active": merge.before["active"]})


def test_queued_operations_run_in_order_before_a_waiting_command(merge):
    """mkdir E and mv E F are queued; a delete of F written after them
    waits, and runs after them (F exists by then)."""
    merge.hold()
    os.mkdir(merge.snaps / "E")
    os.rename(merge.snaps / "B", merge.snaps / "C")
    call = Call(control, merge.vm, "delete", "C\n")
    merge.waiting(call, "delete")
    os.mkdir(merge.snaps / "F")                   # queued after the waiting delete
    st = status(merge.vm)
    assert [(j["op"], j["snapshot"]) for j in st["queue"]] == \
        [("create", "E"), ("rename", "B"), ("delete", "C"), ("create", "F")]
    merge.release()
    call.result()
    b = merge.before
    merge.check({"E": b["active"], "F": b["active"], "active": b["active"]})


def test_a_write_held_by_the_merge_and_operations_waiting_all_finish(merge):
    """The merge holds sda: a write to it waits, as do a command and a
    queued mkdir; once the merge goes, all of them finish (no deadlock
    between the disk's hold, the queue and the waiting threads)."""
    merge.hold()
    data = b"\x42" * 65536

    def write():
        with open(merge.vm / "active" / "sda.raw", "r+b") as f:
            f.seek(7 * MiB)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    writing = Call(write)
    os.mkdir(merge.snaps / "E")
    create = Call(control, merge.vm, "create", "C\n")
    merge.waiting(create, "create")
    assert not writing.done, "a write to the disk being merged went on"
    merge.release()
    writing.result()
    create.result()
    b = merge.before
    after = dict(b["active"], sda=b["active"]["sda"][:7 * MiB] + data
                 + b["active"]["sda"][7 * MiB + len(data):])
    got = merge.views()
    # The write raced the operations queued behind the merge: each
    # snapshot holds the disk with it or without it.
    for name in ("E", "C"):
        assert got[name] in (b["active"], after), name
    merge.check({"B": b["B"], "E": got["E"], "C": got["C"], "active": after})


# -- what still refuses ---------------------------------------------------------------------

def test_refusals_that_waiting_cannot_help(merge):
    merge.hold()
    # A view of B is open: deleting B is refused at once, as when idle.
    with open(merge.snaps / "B" / "sda.raw", "rb"):
        expect_errno(errno.EBUSY, os.rmdir, merge.snaps / "B")
    # A preview waits behind the merge; whatever needs no preview open,
    # asked after it, is refused (the queue is checked, not just the
    # manifest).
    preview = Call(control, merge.vm, "preview", "B\n")
    merge.waiting(preview, "preview")
    expect_errno(errno.EBUSY, os.mkdir, merge.snaps / "E")
    expect_errno(errno.EBUSY, os.rmdir, merge.snaps / "B")
    assert status(merge.vm)["last_error"]["errno"] == errno.EBUSY
    # A command that waits gets its own errno once its turn comes.
    create = Call(control, merge.vm, "create", "E\n")
    merge.waiting(create, "create")
    merge.release()
    preview.result()
    with pytest.raises(OSError) as e:
        create.result()
    assert e.value.errno == errno.EBUSY
    b = merge.before
    merge.check({"B": b["B"], "active": b["B"], "before-preview": b["active"]})


def test_a_queued_operation_that_fails_is_shown(merge):
    merge.hold()
    os.mkdir(merge.snaps / "E")
    # Valid when asked (nothing is open), refused when it runs.
    os.rmdir(merge.snaps / "B")
    fd = os.open(merge.snaps / "B" / "sda.raw", os.O_RDONLY)
    try:
        merge.release()
    finally:
        os.close(fd)
    st = status(merge.vm)
    assert st["last_error"]["op"] == "delete" and st["last_error"]["errno"] == errno.EBUSY
    assert st["last_error"]["asked_by"] == "rmdir"
    b = merge.before
    merge.check({"B": b["B"], "E": b["active"], "active": b["active"]})


# -- unmounting --------------------------------------------------------------------------------

def test_unmount_finishes_the_queue(tmp_path, merge):
    """Unmounting with a merge held and operations queued: the mount goes
    at once, and the daemon runs what was queued before it lets the store
    go (README: "Snapshot operations from the shell")."""
    merge.hold()
    os.mkdir(merge.snaps / "E")
    os.rename(merge.snaps / "B", merge.snaps / "C")
    b = merge.before
    store = Store(merge.store)
    umount = Call(snapfs, "umount", merge.mnt)
    deadline = time.monotonic() + 30
    while str(merge.mnt) in snapfs_mounts():
        assert time.monotonic() < deadline, "the mount did not go"
        time.sleep(0.02)
    # Gone from the namespace; the daemon still holds the store, queue and all.
    assert store.lock_holder() is not None
    manifest = json.loads((merge.store / "vms" / "vm" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["snapshots"]] == ["B"]
    merge.flag.unlink()
    umount.result()
    deadline = time.monotonic() + 60
    while store.lock_holder() is not None:
        assert time.monotonic() < deadline, "the daemon never let the store go"
        time.sleep(0.05)
    manifest = json.loads((merge.store / "vms" / "vm" / "manifest.json").read_text())
    assert manifest["operation"] is None
    assert [s["name"] for s in manifest["snapshots"]] == ["C", "E"]
    vms = merge.store / "vms" / "vm"
    for name, disks in {"active": manifest["active"],
                        **{s["name"]: s["volumes"] for s in manifest["snapshots"]}}.items():
        for d in DISKS:
            want = b["B"][d] if name == "C" else b["active"][d]
            assert to_raw(vms / disks[d]) == want, f"qemu-img convert of {name}/{d}"
    # Remounted: the same.
    with mounted(merge.store, tmp_path / "again") as mnt:
        assert sorted(os.listdir(mnt / "vm" / "snapshots")) == ["C", "E", "latest"]
