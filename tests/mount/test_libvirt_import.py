"""`snapfs vm add --libvirt` through a real mount: every view of the
imported domain is byte-identical to `qemu-img convert -O raw` of its
layer; a snapshot shows only the disks it holds; the LUN (a loop device)
and the shareable disk read as their device and image."""

import json
import os

import pytest

from tests.support.libvirt import (NIGHTLY_TIME, PRE_UPGRADE_TIME, TEMPLATE_TIME, build_web01,
                                   loop_device, utc)
from tests.support.mounting import mounted, snapfs
from tests.support.qemu import to_raw

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE and loop devices")

KIB = 1024


def read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("move", [False, True], ids=["copy", "move"])
def test_views_equal_qemu_convert(tmp_path, store, move):
    lun_file = tmp_path / "lun.img"
    lun_file.write_bytes(os.urandom(512 * KIB))
    with loop_device(lun_file) as lun:
        built = build_web01(tmp_path / "libvirt", lun=lun)
        want = {name: {disk: to_raw(path) for disk, path in disks.items()}
                for name, disks in built.views.items()}
        shared = built.shared.read_bytes()
        result = snapfs("vm", "add", store, "web01", "--libvirt", built.domain,
                        "--libvirt-snapshots", built.snapshots, *(["--move"] if move else []))
        assert "lun: vdc, shareable: vdd, 3 snapshot(s)" in result.stdout
        assert "a CD-ROM is not imported" in result.stderr
        assert "a network disk is not imported" in result.stderr
        with mounted(store, tmp_path / "mnt") as mnt:
            vm = mnt / "web01"
            listed = sorted(os.listdir(vm / "snapshots"))
            assert listed == ["debian12", "latest", "nightly", "pre-upgrade"]
            assert os.readlink(vm / "snapshots" / "latest") == "nightly"
            for name, disks in want.items():
                where = vm / "active" if name == "active" else vm / "snapshots" / name
                shown = sorted(f for f in os.listdir(where) if f.endswith(".raw")
                               and "-part" not in f)
                held = sorted(f"{d}.raw" for d in disks)
                if name == "active":
                    held = sorted(held + ["vdc.raw", "vdd.raw"])
                assert shown == held, (name, shown)
                for disk, data in disks.items():
                    assert read(where / f"{disk}.raw") == data, (name, disk)
            # The LUN reads as its device, the shareable disk as its image.
            assert read(vm / "active" / "vdc.raw") == lun_file.read_bytes()
            assert read(vm / "active" / "vdd.raw") == shared
            meta = {name: json.loads(read(vm / "snapshots" / name / "snapshot.json"))
                    for name in ("debian12", "pre-upgrade", "nightly")}
        assert [(m["name"], m["description"], m["created"], m["consistency"])
                for m in meta.values()] == [
            ("debian12", "imported from debian12.qcow2", utc(TEMPLATE_TIME), "offline"),
            ("pre-upgrade", "Before the upgrade to 2.0", utc(PRE_UPGRADE_TIME), "crash"),
            ("nightly", "nightly", utc(NIGHTLY_TIME), "offline")]
        assert meta["nightly"]["excluded"] == {"vdb": "not selected", "vdc": "lun",
                                               "vdd": "shareable"}
        assert meta["debian12"]["excluded"] == {"vdb": "not selected", "vdc": "lun",
                                                "vdd": "shareable"}
        assert meta["pre-upgrade"]["excluded"] == {"vdc": "lun", "vdd": "shareable"}
        assert len(os.listdir(store / "shared")) == 1
        assert "ok: 1 VM(s)" in snapfs("check", store).stdout
        if move:
            assert [p for p in built.sources if p.exists()] == []
        # The VM goes before the loop device does (the mount is gone already).
        snapfs("vm", "remove", store, "web01")
