"""The header parser against what qemu-img info reports for the same file."""

import os

import pytest

from snapfs.errors import CorruptImage, UnsupportedImage
from snapfs.qcow2.image import Qcow2Image
from tests.support.qemu import info, qemu_img, qemu_io

CASES = [
    dict(compat="0.10", cluster_size="65536"),
    dict(compat="1.1", cluster_size="512", refcount_bits="1"),
    dict(compat="1.1", cluster_size="4096", refcount_bits="64"),
    dict(compat="1.1", cluster_size="2M", refcount_bits="8"),
    dict(compat="1.1", cluster_size="65536", extended_l2="on"),
    dict(compat="1.1", cluster_size="32768", compression_type="zstd"),
    dict(compat="1.1", cluster_size="65536", lazy_refcounts="on"),
]


@pytest.mark.parametrize("opts", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("size", [1 << 20, 10 * (1 << 20) + 512 * 3])
def test_header_matches_qemu_img_info(tmp_path, opts, size):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(4096))
    path = tmp_path / "img.qcow2"
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    qemu_img("create", "-f", "qcow2", "-o", o, "-b", "base.raw", "-F", "raw", path, str(size),
             cwd=tmp_path)
    qemu_io(path, "write -P 7 0 64k", fmt="qcow2")
    expected = info(path)
    spec = expected["format-specific"]["data"]
    with Qcow2Image(path) as img:
        h = img.header
        assert h.size == expected["virtual-size"]
        assert h.cluster_size == expected["cluster-size"]
        assert h.compat == spec["compat"]
        assert h.refcount_bits == spec.get("refcount-bits", 16)
        assert h.extended_l2 == spec.get("extended-l2", False)
        assert h.compression == spec.get("compression-type", "zlib")
        assert h.corrupt == spec.get("corrupt", False)
        assert h.backing_file == expected["backing-filename"]
        assert h.backing_format == expected["backing-filename-format"]
        assert h.file_size == os.path.getsize(path)


def test_internal_snapshots_match_qemu(tmp_path):
    path = tmp_path / "snaps.qcow2"
    qemu_img("create", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -P 1 0 64k", fmt="qcow2")
    qemu_img("snapshot", "-c", "first", path)
    qemu_io(path, "write -P 2 0 64k", fmt="qcow2")
    qemu_img("snapshot", "-c", "second", path)
    expected = info(path)["snapshots"]
    with Qcow2Image(path) as img:
        snaps = img.internal_snapshots()
    assert [(s.id, s.name, int(s.date.timestamp()), s.vm_clock_nsec, s.vm_state_size)
            for s in snaps] == [
        (e["id"], e["name"], e["date-sec"], e["vm-clock-nsec"], e["vm-state-size"])
        for e in expected]
    assert all(s.disk_size == 4 << 20 for s in snaps)


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_refuses_with_file_and_reason(tmp_path):
    path = tmp_path / "x.qcow2"
    qemu_img("create", "-f", "qcow2", path, "1M")
    _patch(path, 72, (1 << 10).to_bytes(8, "big"))     # unknown incompatible bit
    with pytest.raises(UnsupportedImage) as e:
        Qcow2Image(path)
    assert str(path) in str(e.value) and "incompatible" in str(e.value)

    qemu_img("create", "-f", "qcow2", path, "1M")
    _patch(path, 20, (30).to_bytes(4, "big"))          # cluster_bits out of range
    with pytest.raises(CorruptImage, match="cluster_bits 30"):
        Qcow2Image(path)


def test_corrupt_bit_image_is_readable(tmp_path):
    path = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", path, "1M")
    qemu_io(path, "write -P 9 0 64k", fmt="qcow2")
    _patch(path, 72, (1 << 1).to_bytes(8, "big"))      # the corrupt bit
    with Qcow2Image(path) as img:
        assert img.header.corrupt
        assert img.runs()[0][:3] == (0, 65536, 1)
