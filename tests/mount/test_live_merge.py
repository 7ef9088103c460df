"""Live delete (merge) on a VM attached to a real QEMU (TCG, CPUs stopped):
QEMU's own qemu-io writes through the guest devices, snapshots are deleted
from the CLI and through a mount in both directions (an intermediate
stream, an intermediate commit, an active commit that pivots, a stream
into the base-less oldest layer, a stream into the active leaf), and
every other view keeps its bytes.  Then SIGKILL of snapfs at every step of
a live delete, recovered with QEMU still running and with QEMU gone."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from snapfs.qemu.merge import open_paths
from snapfs.qemu.qmp import QmpSession
from tests.support.live_vm import LiveVm
from tests.support.mounting import control, expect_errno, mounted, snapfs

pytestmark = pytest.mark.mount

MiB = 1 << 20
K64 = 64 * 1024
SIZES = {"sda": 4 * MiB, "data": 2 * MiB}


@pytest.fixture
def vm(tmp_path, store, run_dir):
    snapfs("vm", "add", store, "web", "--disk", "sda=4M", "--disk", "data=2M")
    return LiveVm(store, "web", tmp_path, SIZES)


def snapshots(vm):
    return {s["name"]: s for s in vm.manifest()["snapshots"]}


def write_both(vm, pattern, offset, length):
    for i, disk in enumerate(SIZES):
        vm.write(disk, pattern + i, offset, length, flush=True)


def take(vm, name, expected):
    expected[name] = vm.snapshot_model()
    snapfs("snapshot", "create", vm.store, "web", name)


def wait_idle(vm, timeout=30):
    """A mount's delete answers once recorded; the merge goes on behind."""
    deadline = time.monotonic() + timeout
    while vm.manifest()["operation"] is not None:
        assert time.monotonic() < deadline, vm.manifest()["operation"]
        time.sleep(0.05)


def check_running(vm, expected, deleted, direction, mnt=None):
    """After a live delete: it ran live in ``direction``; QEMU writes the
    manifest's active leaves and holds no removed file; every remaining
    snapshot's view (through the mount, if given) is as taken."""
    m = vm.manifest()
    last = m["last_operation"]
    assert last["snapshot"] == deleted and last.get("live") is True, last
    assert {d: x["direction"] for d, x in last["disks"].items()} == \
        {d: direction for d in SIZES}, last
    assert m["operation"] is None
    assert deleted not in snapshots(vm)
    assert vm.tops() == {d: str(vm.dir / v) for d, v in m["active"].items()}
    with QmpSession(vm.qmp) as q:
        held = {p for p in open_paths(q) if p and p.startswith(str(vm.dir))}
    assert held <= {str(vm.dir / v) for v in m["volumes"]}, held
    files = {p.name for p in vm.dir.iterdir() if p.name != "manifest.json"}
    assert files == set(m["volumes"]), files ^ set(m["volumes"])
    del expected[deleted]
    if mnt is not None:
        for name, model in expected.items():
            for disk in SIZES:
                view = mnt / "web" / "snapshots" / name / f"{disk}.raw"
                assert view.read_bytes() == model[disk], (name, disk)


def check_stopped(vm, expected):
    """After QEMU quit: QEMU's own tools read every view and the leaf."""
    m = vm.manifest()
    assert set(snapshots(vm)) == set(expected)
    for name, model in expected.items():
        for disk, vid in snapshots(vm)[name]["volumes"].items():
            assert vm.view(vid) == model[disk], (name, disk)
    for disk, vid in m["active"].items():
        assert vm.view(vid) == vm.model[disk], disk
    vm.check_volumes()


def test_live_deletes_from_the_cli_and_the_mount(tmp_path, vm):
    expected = {}
    with vm.running():
        write_both(vm, 0x10, 0, 8 * K64)              # s1: a large base
        take(vm, "s1", expected)
        write_both(vm, 0x20, 0, K64)                  # s2: small
        take(vm, "s2", expected)
        write_both(vm, 0x30, 2 * K64, 10 * K64)       # s3: large, over s1's data
        take(vm, "s3", expected)
        write_both(vm, 0x40, 3 * K64, K64)            # s4: small, over s3's
        take(vm, "s4", expected)
        write_both(vm, 0x50, MiB, 3 * K64)            # s5: larger than the leaf will be
        take(vm, "s5", expected)
        write_both(vm, 0x60, MiB + 2 * K64, K64)      # the active leaf: small

        # s2's layer is smaller than s3's: streamed into s3's (intermediate).
        r = snapfs("snapshot", "delete", vm.store, "web", "s2")
        assert r.returncode == 0
        check_running(vm, expected, "s2", "stream")
        # s4's layer is small: committed into s3's, s5's relinked (bare name).
        snapfs("snapshot", "delete", vm.store, "web", "s3")
        check_running(vm, expected, "s3", "commit")
        write_both(vm, 0x70, 5 * K64, K64)
        with mounted(vm.store, tmp_path / "mnt") as mnt:
            snaps = mnt / "web" / "snapshots"
            # The newest: the active leaf is committed into it, QEMU pivots.
            os.rmdir(snaps / "s5")
            wait_idle(vm)
            check_running(vm, expected, "s5", "commit", mnt)
            write_both(vm, 0x80, 9 * K64, K64)
            # The oldest (no parent): what s4 doesn't override streams up.
            control(mnt / "web", "delete", "s1")
            check_running(vm, expected, "s1", "stream", mnt)
            write_both(vm, 0x90, 0, MiB + 4 * K64)     # the leaf now overrides s4
            take_in_mount = vm.snapshot_model()
            # Preview stays refused while QEMU runs.
            expect_errno(errno.EBUSY, control, mnt / "web", "preview", "s4")
            # The last one: streamed into the active leaf.
            control(mnt / "web", "delete", "s4")
            check_running(vm, expected, "s4", "stream", mnt)
            status = json.loads((mnt / "web" / "control" / "status").read_text())
            assert status["last_error"]["op"] == "preview", status    # no delete failed
        assert vm.snapshot_model() == take_in_mount
        write_both(vm, 0xa0, 2 * MiB - K64, K64)
    check_stopped(vm, expected)
    assert vm.manifest()["snapshots"] == []


# -- crashes ----------------------------------------------------------------------

# The crash points of a live delete of the newest snapshot, in order: an
# active commit of each of the two disks, or a stream into each leaf.
JOB_STEPS = {"commit": ["delete:started", "delete:ready", "delete:completing",
                        "delete:concluded", "delete:finalized"],
             "stream": ["delete:started", "delete:concluded", "delete:finalized"]}
POINTS = {d: ["delete:recorded"] + steps * 2 + ["delete:switched", "delete:unlinked",
                                                "delete:unlinked"]
          for d, steps in JOB_STEPS.items()}


def cli(vm, *args, env=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_CRASH_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "snapfs.cli", *map(str, args)],
                          capture_output=True, text=True, env=full, timeout=60)


def test_crash_points_of_a_live_delete(tmp_path, vm):
    with vm.running():
        write_both(vm, 0x10, 0, 2 * K64)
        snapfs("snapshot", "create", vm.store, "web", "a")
        write_both(vm, 0x20, K64, K64)
        trace = tmp_path / "trace"
        r = cli(vm, "snapshot", "delete", vm.store, "web", "a",
                env={"SNAPFS_CRASH_TRACE": str(trace)})
        assert r.returncode == 0, r.stderr
        assert [line.split(" ", 1)[1] for line in trace.read_text().splitlines()] == \
            POINTS["commit"]
    vm.check_volumes()


@pytest.mark.parametrize("direction", ["commit", "stream"])
@pytest.mark.parametrize("qemu_gone", [False, True], ids=["qemu-runs", "qemu-gone"])
def test_kill_at_each_step_then_recover(tmp_path, vm, qemu_gone, direction):
    """Each round: snapshot x of the running VM, a write (larger than x's
    layer for a stream, smaller for a commit), ``snapshot delete x`` killed at its n-th point, then ``snapfs check`` with QEMU running
    or killed.  The delete always rolls forward; the remaining views and
    the leaf read as before; QEMU writes the manifest's leaves; no orphan
    file; qemu-img clean."""
    expected = {}
    with vm.running():
        write_both(vm, 0x10, 0, 4 * K64)
        take(vm, "keep", expected)
    for n, point in enumerate(POINTS[direction], 1):
        with vm.running() as proc:
            write_both(vm, 0x20 + n, n * K64, 2 * K64)
            snapfs("snapshot", "create", vm.store, "web", "x")
            if direction == "stream":     # over all x holds (what earlier rounds left too)
                write_both(vm, 0x40 + n, 0, (n + 3) * K64)
            else:
                write_both(vm, 0x40 + n, (n + 1) * K64, K64)
            r = cli(vm, "snapshot", "delete", vm.store, "web", "x",
                    env={"SNAPFS_CRASH_AT": str(n)})
            assert r.returncode == -signal.SIGKILL, (point, r)
            op = vm.manifest()["operation"]
            assert op is not None and op["op"] == "delete", (point, op)
            if not qemu_gone:
                r = cli(vm, "check", vm.store)
                assert r.returncode == 0 and "live delete" in r.stderr, (n, point, r.stderr)
                m = vm.manifest()
                assert m["operation"] is None
                assert vm.tops() == {d: str(vm.dir / v) for d, v in m["active"].items()}
                write_both(vm, 0x60 + n, 0, 4096)      # lands in the new leaves
            else:
                # QEMU dies with a write in the leaf it has now: C before
                # a pivot, B after.  (Not while a job is "pending": QEMU
                # keeps the source drained from the sync to the pivot.)
                for i, disk in enumerate(SIZES):
                    if op.get("phase") == "cleanup" or op["live"][disk]["step"] != "concluded":
                        vm.write(disk, 0x60 + n + i, 0, 4096, flush=True)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if qemu_gone:
            r = cli(vm, "check", vm.store)
            assert r.returncode == 0 and "delete" in r.stderr, (n, point, r.stderr)
        m = vm.manifest()
        assert m["operation"] is None, point
        assert set(snapshots(vm)) == {"keep"}, point
        assert {x["direction"] for x in m["last_operation"]["disks"].values()} == {direction}
        check_stopped(vm, expected)
