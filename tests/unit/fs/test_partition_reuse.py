"""Partition views when a table is reused along the chain (see
snapfs/fs/partition_reuse.py), checked against ``sfdisk --json`` of each
layer's flattened image, and the active disk's table read without a writer."""

import json
import re
import subprocess

import pytest

from snapfs.store.store import Store
from snapfs.fs.vfs import Vfs
from tests.support.mounting import snapfs
from tests.support.qemu import qemu_img, qemu_io, to_raw_file
from tests.support.vfstree import path

MiB = 1 << 20
ONE_PARTITION = "label: dos\n2048,4096,L\n"
TWO_PARTITIONS = "label: dos\n2048,2048,L\n4096,2048,L\n"


def mbr(path, script, size=8 * MiB):
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
                   input=script, text=True, check=True, capture_output=True)
    return path


def sfdisk_parts(raw):
    """(number, start, length) of each partition, by util-linux's parser."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], check=True,
                                      capture_output=True, text=True).stdout)
    return [(int(re.search(r"(\d+)$", p["node"]).group(1)), p["start"] * 512, p["size"] * 512)
            for p in table["partitiontable"]["partitions"]]


@pytest.fixture
def layers(tmp_path):
    """monday (one partition) <- tuesday (repartitioned: two) <- wednesday
    (data elsewhere) <- now (empty), imported as VM "web"."""
    src = tmp_path / "src"
    src.mkdir()
    qemu_img("convert", "-f", "raw", "-O", "qcow2", mbr(tmp_path / "one.raw", ONE_PARTITION),
             src / "monday.qcow2")
    two = mbr(tmp_path / "two.raw", TWO_PARTITIONS)
    names = ["monday", "tuesday", "wednesday", "now"]
    for parent, name in zip(names, names[1:]):
        qemu_img("create", "-f", "qcow2", "-b", f"{parent}.qcow2", "-F", "qcow2",
                 src / f"{name}.qcow2", cwd=src)
    qemu_io(src / "tuesday.qcow2", f"write -s {two} 0 512", fmt="qcow2")
    qemu_io(src / "wednesday.qcow2", "write -P 5 3M 64k", fmt="qcow2")
    return src


@pytest.fixture
def vfs(layers, store):
    snapfs("vm", "add", store, "web", "--disk", f"sda={layers / 'now.qcow2'}")
    v = Vfs(Store.open(store))
    yield v
    v.close()


def shown_parts(vfs, *dirs):
    return sorted((n, vfs.node(node.inode).view.start, vfs.size(node))
                  for n, node in vfs.listdir(path(vfs, "web", *dirs).inode) if "-part" in n)


def expected(layers, tmp_path, name):
    raw = tmp_path / f"{name}.flat"
    to_raw_file(layers / f"{name}.qcow2", raw)
    return sorted((f"sda-part{n}.raw", start, length)
                  for n, start, length in sfdisk_parts(raw))


@pytest.mark.parametrize("order", [("active", "monday", "tuesday", "wednesday"),
                                   ("wednesday", "tuesday", "monday", "active"),
                                   ("tuesday", "active", "wednesday", "monday")])
def test_each_layer_shows_its_own_table(vfs, layers, tmp_path, order):
    # Each order fills the table cache from a different end of the chain.
    for name in order:
        dirs = ("active",) if name == "active" else ("snapshots", name)
        want = expected(layers, tmp_path, "now" if name == "active" else name)
        assert shown_parts(vfs, *dirs) == want, name
    assert len(expected(layers, tmp_path, "monday")) == 1
    assert len(expected(layers, tmp_path, "wednesday")) == 2


def test_listing_active_opens_no_writer(vfs):
    vfs.listdir(path(vfs, "web", "active").inode)
    slot = path(vfs, "web", "active", "sda.raw").view
    assert not slot.disk.writer_open


def test_active_table_follows_unflushed_writes(vfs, tmp_path):
    """Through an open writer the table is read from it: its L2 updates are
    not in the leaf's file until a flush."""
    inode = path(vfs, "web", "active", "sda.raw").inode
    # Another open keeps the writer open (the last release closes it).
    keep = vfs.open(inode, writable=False)
    handle = vfs.open(inode, writable=True)
    sector0 = mbr(tmp_path / "one-again.raw", ONE_PARTITION).read_bytes()[:512]
    vfs.write(handle, 0, sector0)
    vfs.release(handle)
    assert path(vfs, "web", "active", "sda.raw").view.disk.writer_open
    assert [n for n, _, _ in shown_parts(vfs, "active")] == ["sda-part1.raw"]
    # The snapshots below keep theirs.
    assert len(shown_parts(vfs, "snapshots", "wednesday")) == 2
    vfs.release(keep)
    assert not path(vfs, "web", "active", "sda.raw").view.disk.writer_open
    assert [n for n, _, _ in shown_parts(vfs, "active")] == ["sda-part1.raw"]
