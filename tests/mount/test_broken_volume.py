"""A damaged volume returns EIO for its own views only; the rest of the
mount keeps serving and the problem is logged."""

import errno
import json
import os

import pytest

from snapfs.qcow2.image import Qcow2Image
from snapfs.qcow2.mapping import COMPRESSED

from tests.support.mounting import mounted, snapfs
from tests.support.qemu import qemu_img, qemu_io, to_raw


def _volume(store, vm, which):
    m = json.loads((store / "vms" / vm / "manifest.json").read_text())
    vid = m["active"]["sda"] if which == "active" else m["snapshots"][0]["volumes"]["sda"]
    return store / "vms" / vm / vid


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _l1_offset(path):
    with open(path, "rb") as f:
        f.seek(40)
        return int.from_bytes(f.read(8), "big")


def _read_errno(path, offset=0, length=1 << 20):
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            f.read(length)
    except OSError as e:
        return e.errno
    return 0


@pytest.mark.parametrize("damage", ["header", "l2-past-eof", "compressed-garbage"])
def test_broken_volume_is_eio_and_nothing_else(tmp_path, store, damage):
    src = tmp_path / "src"
    src.mkdir()
    qemu_img("create", "-f", "qcow2", src / "base.qcow2", "4M")
    qemu_io(src / "base.qcow2", "write -P 1 0 1M", fmt="qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", src / "top.qcow2",
             cwd=src)
    qemu_io(src / "top.qcow2", "write -c -P 2 2M 64k", "write -P 3 3M 64k", fmt="qcow2")
    good = to_raw(src / "base.qcow2")
    snapfs("vm", "add", store, "bad", "--disk", f"sda={src / 'top.qcow2'}")
    snapfs("vm", "add", store, "fine", "--disk", f"sda={src / 'top.qcow2'}")
    active = _volume(store, "bad", "active")
    if damage == "header":
        _patch(active, 20, (40).to_bytes(4, "big"))           # cluster_bits 40
    elif damage == "l2-past-eof":
        _patch(active, _l1_offset(active), (1 << 40 | 1 << 63).to_bytes(8, "big"))
    else:
        with Qcow2Image(active) as img:
            (host, nbytes), = [(h, n) for _, _, kind, h, n in img.runs() if kind == COMPRESSED]
        _patch(active, host, b"\xff" * nbytes)
    expected_fine = to_raw(src / "top.qcow2")

    with mounted(store, tmp_path / "mnt") as mnt:
        bad_active = mnt / "bad" / "active" / "sda.raw"
        if damage == "compressed-garbage":
            # The map is sound; only the damaged cluster's bytes are EIO.
            assert _read_errno(bad_active, 2 << 20, 65536) == errno.EIO
            with open(bad_active, "rb") as f:
                assert f.read(1 << 20) == b"\x01" * (1 << 20)
        else:
            assert _read_errno(bad_active) == errno.EIO
        # The older snapshot does not include the damaged volume.
        with open(mnt / "bad" / "snapshots" / "base" / "sda.raw", "rb") as f:
            assert f.read() == good
        with open(mnt / "fine" / "active" / "sda.raw", "rb") as f:
            assert f.read() == expected_fine
        assert sorted(os.listdir(mnt)) == ["bad", "fine"]
    log = (store / "snapfs.log").read_text()
    assert active.name in log
