"""A VM attached to a real QEMU (qemu-system-x86_64, CPUs stopped, TCG):
``vm qemu-args`` starts it on the store's chains, ``vm attach`` verifies
it, operations refuse while it runs (and name a QEMU on other volumes),
and work again once it exits, from the CLI and through a mount."""

import errno
import json
import os

import pytest

from snapfs.qemu.args import disk_id
from snapfs.qemu.qmp import QmpSession
from tests.support.mounting import control, expect_errno, mounted, snapfs
from tests.support.qemu import info_chain, qemu_img, qemu_io
from tests.support.qemu_vm import qemu_running

pytestmark = pytest.mark.mount

PREVIEW_REFUSED = ("VM web runs in QEMU (attached): previewing a snapshot needs it stopped, as "
                   "in RHV; stop the VM first")


@pytest.fixture
def vm_store(tmp_path, store, run_dir):
    """web: sda imported as monday <- now, and "data disk" (an id QEMU
    would refuse as it is), with a snapshot monday."""
    src = tmp_path / "src"
    src.mkdir()
    qemu_img("create", "-f", "qcow2", src / "monday.qcow2", "8M")
    qemu_io(src / "monday.qcow2", "write -P 1 0 1M", fmt="qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "monday.qcow2", "-F", "qcow2", src / "now.qcow2",
             cwd=src)
    snapfs("vm", "add", store, "web", "--disk", f"sda={src / 'now.qcow2'}",
           "--disk", "data disk=2M")
    return store


def manifest(store):
    return json.loads((store / "vms" / "web" / "manifest.json").read_text())


def leaf(store, disk):
    return str(store / "vms" / "web" / manifest(store)["active"][disk])


def qemu_args(store, qmp):
    return snapfs("vm", "qemu-args", store, "web", "--qmp", qmp).stdout.splitlines()


def attached(store):
    [row] = json.loads(snapfs("vm", "list", store, "--json").stdout)
    return row["attached"]


def refused(store, *op):
    """``snapfs snapshot OP...`` fails with one line; returns it."""
    r = snapfs("snapshot", *op, check=False)
    assert r.returncode == 1, r
    assert r.stderr.count("\n") == 1, r.stderr
    return r.stderr.strip()


def test_attach_refuse_while_running_then_offline(tmp_path, vm_store):
    store, sock = vm_store, tmp_path / "qmp.sock"
    vm_dir = store / "vms" / "web"
    with qemu_running(qemu_args(store, sock), sock, tmp_path / "qemu.log"):
        # QEMU opened the store's chains itself: the bare backing names
        # resolved inside the VM's directory.
        with QmpSession(sock) as qmp:
            devices = {d["qdev"]: d["inserted"] for d in qmp.execute("query-block")}
        sda = devices[f"/machine/peripheral/{disk_id('sda')}/virtio-backend"]
        base = manifest(store)["snapshots"][0]["volumes"]["sda"]
        assert sda["image"]["filename"] == leaf(store, "sda")
        assert sda["image"]["backing-filename"] == base
        assert sda["image"]["backing-image"]["filename"] == str(vm_dir / base)
        assert devices[f"/machine/peripheral/{disk_id('data disk')}/virtio-backend"][
            "image"]["filename"] == leaf(store, "data disk")

        r = snapfs("vm", "attach", store, "web", "--qmp", sock)
        assert "QEMU runs its active volumes" in r.stdout
        assert attached(store)["qmp"] == str(sock)
        assert attached(store)["guest_agent"] is None
        assert refused(store, "preview", store, "web", "monday") == \
            f"snapfs: error: {PREVIEW_REFUSED}"
        # A delete runs live, inside QEMU (tests/mount/test_live_merge.py).
        snapfs("snapshot", "create", store, "web", "tuesday")
        snapfs("snapshot", "delete", store, "web", "tuesday")
        assert manifest(store)["last_operation"]["live"] is True
        snapfs("snapshot", "rename", store, "web", "monday", "mon")   # metadata only
        snapfs("snapshot", "rename", store, "web", "mon", "monday")
    # QEMU is gone; still attached, the VM is offline and operations work.
    assert attached(store)["qmp"] == str(sock)
    snapfs("snapshot", "create", store, "web", "x")
    snapfs("snapshot", "delete", store, "web", "monday")
    # No absolute backing path was written into any header, by QEMU or snapfs.
    for disk in ("sda", "data disk"):
        for image in info_chain(leaf(store, disk)):
            backing = image.get("backing-filename")
            assert backing is None or "/" not in backing, image
    snapfs("vm", "detach", store, "web")
    assert attached(store) is None
    assert os.listdir(next((tmp_path / "run").iterdir())) == []
    r = snapfs("vm", "detach", store, "web", check=False)
    assert r.returncode == 1 and "not attached" in r.stderr


def test_a_qemu_on_other_volumes_is_a_mismatch(tmp_path, vm_store):
    store, sock = vm_store, tmp_path / "qmp.sock"
    # Attached while QEMU is not running: offline until it is.
    r = snapfs("vm", "attach", store, "web", "--qmp", sock)
    assert "QEMU is not running now: the VM is treated as offline until it is" in r.stdout
    monday = str(store / "vms" / "web" / manifest(store)["snapshots"][0]["volumes"]["sda"])
    copy = tmp_path / "copy.qcow2"
    qemu_img("create", "-f", "qcow2", copy, "2M")
    # A QEMU on monday's volume and on a copy: the devices snapfs would
    # make, but not the active leaves.
    args = qemu_args(store, sock)
    args = [a.replace(leaf(store, "sda"), monday).replace(leaf(store, "data disk"), str(copy))
            for a in args]
    with qemu_running(args, sock, tmp_path / "qemu.log"):
        line = refused(store, "create", store, "web", "x")
        assert f"disk sda: QEMU has device {disk_id('sda')} on {monday} (the volume of " \
               f"snapshot monday); the store's active leaf is {leaf(store, 'sda')}" in line
        assert f"disk data disk: QEMU has device {disk_id('data disk')} on {copy}; the " \
               f"store's active leaf is {leaf(store, 'data disk')}" in line
        # attach verifies too, and refuses.
        r = snapfs("vm", "attach", store, "web", "--qmp", sock, check=False)
        assert r.returncode == 1 and "disk sda: QEMU has" in r.stderr
    assert attached(store)["qmp"] == str(sock)     # the earlier record stays
    snapfs("snapshot", "create", store, "web", "x")


def touch(path):
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def test_through_a_mount(tmp_path, vm_store):
    store, sock = vm_store, tmp_path / "qmp.sock"
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "web"
        # Attached while mounted: the mount reads the record per operation.
        snapfs("vm", "attach", store, "web", "--qmp", sock)
        with qemu_running(qemu_args(store, sock), sock, tmp_path / "qemu.log"):
            expect_errno(errno.EBUSY, control, vm, "preview", "monday")
            status = json.loads((vm / "control" / "status").read_text())
            assert status["last_error"]["error"] == PREVIEW_REFUSED
            control(vm, "delete", "monday")          # live, inside QEMU
            assert manifest(store)["last_operation"]["live"] is True
        touch(vm / "snapshots" / "x")
        assert (vm / "snapshots" / "x" / "snapshot.json").exists()
        control(vm, "delete", "x")
        snapfs("vm", "detach", store, "web")
