"""Live snapshots of a guest that really runs: Debian's kernel booted by
TCG, with qemu-guest-agent, writing numbered files to two ext4 disks
without pause (tests/support/guest.py).  Snapshots are taken with the agent
attached (frozen) and without (crash-consistent), two are merged away
while the guest writes on, and then every remaining snapshot's views are
mounted: a frozen one read-only and clean, a crash-consistent one through
the throwaway overlay that replays its journal.  Each holds a prefix of
the guest's writes, and the two disks agree to within the one file the
guest was between."""

import subprocess
import time

import pytest

from tests.support.dirty_ext4 import needs_recovery
from tests.support.guest import boot_args, build_guest, wait_ready, written_files
from tests.support.live_vm import LiveVm
from tests.support.mounting import loop_mounted, mounted, snapfs

pytestmark = pytest.mark.mount

MiB = 1 << 20
DISKS = {"a": "vda", "b": "vdb"}        # store disk -> the guest's device
# (name, agent attached) in the order taken; the guest writes between.
SNAPSHOTS = [("frozen-1", True), ("crash-1", False), ("crash-2", False),
             ("frozen-2", True), ("newest", True)]
MERGED = ("crash-1", "newest")          # an intermediate layer, and the leaf's parent


@pytest.fixture(scope="module")
def guest():
    return build_guest()


@pytest.fixture
def vm(tmp_path, store, run_dir):
    specs = []
    for disk in DISKS:
        image = tmp_path / f"{disk}.img"
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image), "32M"], check=True,
                       capture_output=True)
        specs += ["--disk", f"{disk}={image}"]
    snapfs("vm", "add", store, "web", *specs)
    return LiveVm(store, "web", tmp_path, {disk: 0 for disk in DISKS})


def consistency(vm):
    """{name: consistency} of the live snapshots (not the import's base)."""
    return {s["name"]: s["consistency"] for s in vm.manifest()["snapshots"]
            if s["consistency"] != "offline"}


def test_snapshots_of_a_booted_guest_mount_and_hold_a_prefix(tmp_path, vm, guest):
    serial = tmp_path / "serial.log"
    with vm.running(agent=True, boot=boot_args(*guest, serial)) as proc:
        assert wait_ready(serial, proc) == list(DISKS.values())
        for name, agent in SNAPSHOTS:
            vm.attach(agent)
            time.sleep(1)                      # the guest writes on
            snapfs("snapshot", "create", vm.store, "web", name)
            frozen_for = vm.manifest()["last_operation"].get("frozen_seconds")
            # The freeze spans the switch only: well under the 10 s cap.
            assert (0 < frozen_for < 5) if agent else frozen_for is None, (name, frozen_for)
        assert consistency(vm) == {n: "frozen" if a else "crash" for n, a in SNAPSHOTS}
        for name in MERGED:
            time.sleep(0.5)
            snapfs("snapshot", "delete", vm.store, "web", name)
            assert vm.manifest()["last_operation"].get("live") is True
        time.sleep(0.5)
        assert proc.poll() is None, "QEMU died"
    vm.check_volumes()

    kept = [(n, a) for n, a in SNAPSHOTS if n not in MERGED]
    counts = []
    with mounted(vm.store, tmp_path / "mnt") as mnt:
        for name, frozen in kept:
            found = {}
            for disk, device in DISKS.items():
                view = mnt / "web" / "snapshots" / name / f"{disk}.raw"
                assert needs_recovery(view) is not frozen, (name, disk)
                if frozen:
                    fsck = subprocess.run(["e2fsck", "-fn", str(view)], capture_output=True,
                                          text=True)
                    assert fsck.returncode == 0, (name, disk, fsck.stdout)
                # Read-only for a frozen view; a crash-consistent one opens
                # read-write, so that ext4 replays its journal in the overlay.
                with loop_mounted(view, tmp_path / f"{name}-{disk}", readonly=frozen) as root:
                    found[disk] = written_files(root, device)
            # The guest writes f<i> to vda, then to vdb, each fsynced first.
            assert found["b"] <= found["a"] <= found["b"] + 1, (name, found)
            counts.append(found["a"])
    assert 0 < counts[0] and counts == sorted(counts), counts
