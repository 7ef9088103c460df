"""The active views of a VM whose QEMU runs (issue 12, section 4): QEMU
owns the leaf, so opening them is EBUSY while it runs; once it exits they
serve the leaf as QEMU left it, and writes through them land beside
QEMU's clusters, not over them.  ``vm remove`` of a running VM is refused."""

import errno
import os

from tests.support.live_vm import LiveVm
from tests.support.mounting import expect_errno, mounted, snapfs

MiB = 1 << 20
K64 = 64 << 10
SIZES = {"sda": 4 * MiB, "data": 2 * MiB}


def write_view(path, offset, data):
    with open(path, "r+b", buffering=0) as f:
        f.seek(offset)
        f.write(data)
        os.fsync(f.fileno())


def test_active_views_are_busy_while_qemu_runs_and_fresh_after(tmp_path, store, run_dir):
    snapfs("vm", "add", store, "web", "--disk", "sda=4M", "--disk", "data=2M")
    vm = LiveVm(store, "web", tmp_path, SIZES)
    with mounted(store, tmp_path / "mnt") as mnt:
        active = mnt / "web" / "active" / "sda.raw"
        # Through the mount first: its writer reads (and caches) the tables.
        write_view(active, 0, b"\x01" * K64)
        vm.model["sda"][0:K64] = b"\x01" * K64
        with vm.running():
            expect_errno(errno.EBUSY, open, active, "rb")
            expect_errno(errno.EBUSY, open, active, "r+b")
            expect_errno(errno.EBUSY, open, mnt / "web" / "active" / "data.raw", "rb")
            # QEMU allocates clusters of its own in the leaf.
            vm.write("sda", 0x33, K64, 2 * K64, flush=True)
            vm.write("sda", 0x34, 3 * MiB, K64, flush=True)
        # QEMU is gone: the view shows what it wrote, not stale tables.
        assert active.read_bytes() == bytes(vm.model["sda"])
        # A write now allocates beside QEMU's clusters.
        write_view(active, 2 * MiB, b"\x05" * (2 * K64))
        vm.model["sda"][2 * MiB:2 * MiB + 2 * K64] = b"\x05" * (2 * K64)
        assert active.read_bytes() == bytes(vm.model["sda"])
    m = vm.manifest()
    assert vm.view(m["active"]["sda"]) == bytes(vm.model["sda"])
    vm.check_volumes()


def test_vm_remove_is_refused_while_qemu_runs(tmp_path, store, run_dir):
    snapfs("vm", "add", store, "web", "--disk", "sda=4M", "--disk", "data=2M")
    vm = LiveVm(store, "web", tmp_path, SIZES)
    with vm.running():
        r = snapfs("vm", "remove", store, "web", check=False)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "in use by QEMU" in r.stderr and "stop the VM first" in r.stderr
        assert (store / "vms" / "web" / "manifest.json").exists()
    snapfs("vm", "remove", store, "web")
    assert not (store / "vms" / "web").exists()
