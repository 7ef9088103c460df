"""Live create on a VM attached to a real QEMU (TCG, CPUs stopped): QEMU's
own qemu-io writes through the guest devices, snapshots are taken from the
CLI and through a mount, and every view holds what was written before it.
Then the guest agent that never answers (bounded, crash-consistent), and a
SIGKILL of snapfs at every step of a live create, recovered with QEMU still
running and with QEMU gone."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from snapfs.qemu.qmp import QmpSession
from snapfs.qemu.snapshot import node_names
from tests.support.live_vm import LiveVm
from tests.support.mounting import control, expect_errno, mounted, snapfs

pytestmark = pytest.mark.mount

MiB = 1 << 20
SIZES = {"sda": 4 * MiB, "data": 2 * MiB}
K64 = 64 * 1024


@pytest.fixture
def vm(tmp_path, store, run_dir):
    snapfs("vm", "add", store, "web", "--disk", "sda=4M", "--disk", "data=2M")
    return LiveVm(store, "web", tmp_path, SIZES)


def touch(path):
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def snapshots(vm):
    return {s["name"]: s for s in vm.manifest()["snapshots"]}


def test_live_snapshots_from_the_cli_and_the_mount(tmp_path, vm):
    expected = {}
    with vm.running():
        vm.write("sda", 0x11, 0, K64)
        vm.write("data", 0x21, K64, K64)
        expected["s1"] = vm.snapshot_model()
        r = snapfs("snapshot", "create", vm.store, "web", "s1")
        assert "crash-consistent: no guest agent is attached" in r.stderr
        m = vm.manifest()
        assert vm.tops() == {d: str(vm.dir / v) for d, v in m["active"].items()}
        assert m["active"] != snapshots(vm)["s1"]["volumes"]
        vm.write("sda", 0x12, K64, K64)
        vm.write("sda", 0x13, 0, 4096)            # over s1's data
        vm.write("data", 0x22, 3 * K64, K64)
        with mounted(vm.store, tmp_path / "mnt") as mnt:
            snaps = mnt / "web" / "snapshots"
            expected["s2"] = vm.snapshot_model()
            touch(snaps / "s2")
            vm.write("data", 0x23, 0, K64)
            expected["s3"] = vm.snapshot_model()
            os.mkdir(snaps / "s3")                # queued; runs at once (nothing else runs)
            vm.write("sda", 0x14, 2 * MiB, K64)
            expected["s4"] = vm.snapshot_model()
            control(mnt / "web", "create", "s4 from control")
            # QEMU writes the overlays the manifest calls active.
            m = vm.manifest()
            assert vm.tops() == {d: str(vm.dir / v) for d, v in m["active"].items()}
            assert sorted(snapshots(vm)) == ["s1", "s2", "s3", "s4"]
            for name, model in expected.items():
                doc = json.loads((snaps / name / "snapshot.json").read_text())
                assert doc["consistency"] == "crash"
                for disk in SIZES:
                    assert (snaps / name / f"{disk}.raw").read_bytes() == model[disk], (name, disk)
            # Preview stays refused while QEMU runs.
            expect_errno(errno.EBUSY, control, mnt / "web", "preview", "s1")
        vm.write("data", 0x24, MiB, K64, flush=True)
        final = vm.snapshot_model()
    # QEMU quit: QEMU's own tools read every view.
    m = vm.manifest()
    for name, model in expected.items():
        for disk, vid in snapshots(vm)[name]["volumes"].items():
            assert vm.view(vid) == model[disk], (name, disk)
    for disk, vid in m["active"].items():
        assert vm.view(vid) == final[disk], disk
    vm.check_volumes()
    # An offline create says so.
    snapfs("snapshot", "create", vm.store, "web", "off")
    assert snapshots(vm)["off"]["consistency"] == "offline"
    assert snapshots(vm)["s1"]["consistency"] == "crash"
    # Offline again: a live-made snapshot deletes like any other.
    snapfs("snapshot", "delete", vm.store, "web", "s2")
    vm.check_volumes()


def test_a_partial_live_snapshot_switches_only_its_disks(tmp_path, vm):
    """RHV's "disks to include" while the VM runs: one disk gets a new
    layer inside QEMU, the other keeps writing its leaf; then the partial
    snapshot is deleted live, and QEMU's own tools read every view."""
    with vm.running():
        vm.write("sda", 0x31, 0, K64)
        vm.write("data", 0x41, 0, K64, flush=True)
        before = vm.manifest()["active"]
        held = vm.snapshot_model()["data"]
        snapfs("snapshot", "create", vm.store, "web", "only-data", "--disks", "data")
        m = vm.manifest()
        assert snapshots(vm)["only-data"]["volumes"] == {"data": before["data"]}
        assert m["active"]["sda"] == before["sda"] and m["active"]["data"] != before["data"]
        assert vm.tops() == {d: str(vm.dir / v) for d, v in m["active"].items()}
        vm.write("data", 0x42, 0, 4096, flush=True)
        vm.write("sda", 0x32, 0, 4096, flush=True)
    assert vm.view(snapshots(vm)["only-data"]["volumes"]["data"]) == held
    vm.check_volumes()
    with vm.running():
        snapfs("snapshot", "delete", vm.store, "web", "only-data")
        last = vm.manifest()["last_operation"]
        assert last["live"] is True and set(last["disks"]) == {"data"}, last
        vm.write("data", 0x43, K64, 4096, flush=True)
    m = vm.manifest()
    for disk, vid in m["active"].items():
        assert vm.view(vid) == vm.model[disk], disk
    vm.check_volumes()


def test_an_agent_that_never_answers_costs_a_bounded_wait(vm, monkeypatch):
    monkeypatch.setenv("SNAPFS_AGENT_TIMEOUT", "0.5")
    with vm.running(agent=True):
        vm.write("sda", 0x31, 0, K64)
        before = vm.snapshot_model()
        start = time.monotonic()
        r = snapfs("snapshot", "create", vm.store, "web", "s1")
        took = time.monotonic() - start
        assert "crash-consistent: freeze failed" in r.stderr
        assert "no answer to guest-sync-delimited within 0.5 s" in r.stderr
        assert took < 4, took
        assert snapshots(vm)["s1"]["consistency"] == "crash"
        # The next one too (nothing queued in the channel confuses it).
        snapfs("snapshot", "create", vm.store, "web", "s2")
        vm.write("sda", 0x32, 0, 4096)
    assert vm.view(snapshots(vm)["s1"]["volumes"]["sda"]) == before["sda"]
    assert vm.view(vm.manifest()["active"]["sda"]) == vm.model["sda"]
    vm.check_volumes()
    snapfs("vm", "detach", vm.store, "web")


# -- crashes ----------------------------------------------------------------------

# The crash points of a live create, in order (two disks: two overlays).
POINTS = ["create:recorded", "create:overlay", "create:overlay", "create:added",
          "create:switching", "create:switched", "create:done"]


def crashed_create(vm, n, env=None):
    """``snapshot create web x`` killed at its n-th crash point."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_CRASH_")}
    full.update(env or {}, SNAPFS_CRASH_AT=str(n))
    r = subprocess.run([sys.executable, "-m", "snapfs.cli", "snapshot", "create", vm.store,
                        "web", "x"], capture_output=True, text=True, env=full, timeout=60)
    assert r.returncode == -signal.SIGKILL, r


def test_crash_points_of_a_live_create(tmp_path, vm):
    with vm.running():
        trace = tmp_path / "trace"
        full = dict(os.environ, SNAPFS_CRASH_TRACE=str(trace))
        subprocess.run([sys.executable, "-m", "snapfs.cli", "snapshot", "create", vm.store,
                        "web", "traced"], check=True, env=full, capture_output=True)
        assert [line.split(" ", 1)[1] for line in trace.read_text().splitlines()] == POINTS


@pytest.mark.parametrize("qemu_gone", [False, True], ids=["qemu-runs", "qemu-gone"])
def test_kill_at_each_step_then_recover(tmp_path, vm, qemu_gone):
    """After each kill, recovery (``snapfs check``) rolls back before the
    transaction and forward after it; views that existed never change; the
    active leaves are what QEMU writes; no orphan files; qemu-img clean."""
    views = {}      # (snapshot, disk) -> bytes, as of the last round
    for n, point in enumerate(POINTS, 1):
        with vm.running() as proc:
            vm.write("sda", 0x40 + n, n * K64, K64, flush=True)
            vm.write("data", 0x50 + n, n * K64, K64, flush=True)
            model = vm.snapshot_model()
            before = vm.manifest()
            crashed_create(vm, n)
            switched = point in ("create:switched", "create:done")
            if not qemu_gone:
                # QEMU still runs: recovery asks it.
                r = snapfs("check", vm.store)
                assert ("live create" in r.stderr) == (point != "create:done"), r.stderr
                forward = switched
                m = vm.manifest()
                assert m["operation"] is None
                assert vm.tops() == {d: str(vm.dir / v) for d, v in m["active"].items()}
                # QEMU keeps no node of a rolled-back overlay.
                with QmpSession(vm.qmp) as q:
                    nodes = {x["node-name"] for x in q.execute("query-named-block-nodes")}
                known = {name for v in m["volumes"] for name in node_names(v)}
                known |= {"snapfs-sda", "snapfs-data"}
                assert {x for x in nodes if x.startswith("snapfs-")} <= known, nodes
                # A write after the switch lands in the new leaves.
                vm.write("sda", 0x60 + n, 0, 4096, flush=True)
            else:
                # QEMU dies right after the kill, having written into the
                # overlays if it had switched.
                if switched:
                    vm.write("sda", 0x60 + n, 0, 4096, flush=True)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if qemu_gone:
            r = snapfs("check", vm.store)
            assert ("live create" in r.stderr) == (point != "create:done"), r.stderr
            # Rolled forward exactly when the overlays hold QEMU's writes.
            forward = switched
        m = vm.manifest()
        assert m["operation"] is None
        names = {s["name"] for s in m["snapshots"]}
        assert ("x" in names) == forward, (point, names)
        # Every view that existed reads as before.
        for s in before["snapshots"]:
            for disk, vid in s["volumes"].items():
                assert vm.view(vid) == views[(s["name"], disk)], (point, s["name"], disk)
        if forward:
            x = snapshots(vm)["x"]
            assert x["consistency"] == "crash"
            for disk, vid in x["volumes"].items():
                assert vm.view(vid) == model[disk], (point, disk)
        for disk, vid in m["active"].items():
            assert vm.view(vid) == vm.model[disk], (point, disk)
        vm.check_volumes()
        if forward:
            snapfs("snapshot", "rename", vm.store, "web", "x", f"x{n}")
        for s in vm.manifest()["snapshots"]:
            for disk, vid in s["volumes"].items():
                views[(s["name"], disk)] = vm.view(vid)
