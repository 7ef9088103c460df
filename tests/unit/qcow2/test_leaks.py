"""Leak repair against qemu-img check: leaks made by raising refcounts are
counted as qemu-img counts them and released by repair_leaks."""

import os

import pytest

from snapfs.qcow2.header import read_header
from snapfs.qcow2.leaks import _RefcountBlocks, repair_leaks
from tests.support.qemu import check, qemu_img, qemu_io


@pytest.mark.parametrize("opts", ["refcount_bits=16", "refcount_bits=1", "refcount_bits=4",
                                  "refcount_bits=64,extended_l2=on", "compat=0.10",
                                  "cluster_size=512,refcount_bits=8"])
def test_repair_matches_qemu(tmp_path, opts):
    path = tmp_path / "x.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, path, "4M")
    qemu_io(path, "write -P 1 0 1M", "write -z 2M 64k", fmt="qcow2")
    qemu_io(path, "write -c -P 2 3M 64k", fmt="qcow2")
    assert repair_leaks(path, dry_run=True) == (0, 0)
    fd = os.open(path, os.O_RDWR)
    try:
        hdr = read_header(fd, str(path))
        blocks = _RefcountBlocks(fd, hdr)
        # Leaks as an interrupted write leaves them: clusters at the end of
        # the file, counted but referenced by nothing.
        end = -(-os.fstat(fd).st_size // hdr.cluster_size)
        os.ftruncate(fd, (end + 3) * hdr.cluster_size)
        for cluster in range(end, end + 3):
            first, offset, entries = next(
                b for b in blocks.blocks() if b[0] <= cluster < b[0] + len(b[2]))
            assert entries[cluster - first] == 0
            blocks.set(offset, cluster - first, 1)
    finally:
        os.close(fd)
    report = check(path)
    assert report["returncode"] == 3 and not report.get("corruptions")
    leaks, corruptions = repair_leaks(path, dry_run=True)
    assert corruptions == 0
    assert leaks == report["leaks"] == 3
    assert repair_leaks(path) == (leaks, 0)
    assert check(path)["returncode"] == 0
    assert repair_leaks(path, dry_run=True) == (0, 0)
