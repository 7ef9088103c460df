"""The namespace as plain objects, without a mount."""

import errno
import json

import pytest

from snapfs.errors import AlreadyExists, NotFound, ReadOnly
from snapfs.store.store import Store
from snapfs.fs.vfs import ROOT_INODE, Vfs
from tests.support.mounting import snapfs
from tests.support.qemu import qemu_img, qemu_io
from tests.support.vfstree import path


@pytest.fixture
def vfs(tmp_path, store):
    src = tmp_path / "src"
    src.mkdir()
    qemu_img("create", "-f", "qcow2", src / "monday.qcow2", "1M")
    qemu_io(src / "monday.qcow2", "write -P 1 0 64k", fmt="qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "monday.qcow2", "-F", "qcow2",
             src / "tuesday.qcow2", cwd=src)
    qemu_img("create", "-f", "qcow2", "-b", "tuesday.qcow2", "-F", "qcow2",
             src / "now.qcow2", cwd=src)
    qemu_io(src / "now.qcow2", "write -P 2 0 4k", fmt="qcow2")
    snapfs("vm", "add", store, "web", "--disk", f"sda={src / 'now.qcow2'}", "--disk", "sdb=2M")
    v = Vfs(Store.open(store))
    yield v
    v.close()


def test_layout(vfs):
    assert [n for n, _ in vfs.listdir(ROOT_INODE)] == ["web"]
    assert [n for n, _ in vfs.listdir(path(vfs, "web").inode)] == ["active", "snapshots", "control"]
    snaps = path(vfs, "web", "snapshots")
    assert [n for n, _ in vfs.listdir(snaps.inode)] == ["monday", "tuesday", "latest"]
    assert vfs.readlink(path(vfs, "web", "snapshots", "latest").inode) == "tuesday"
    names = [n for n, _ in vfs.listdir(path(vfs, "web", "snapshots", "monday").inode)]
    assert names == ["sda.raw", "sdb.raw", "snapshot.json"]
    # Inodes are stable across lookups.
    assert path(vfs, "web", "active", "sda.raw").inode == path(vfs, "web", "active", "sda.raw").inode


def read(vfs, node, offset, length):
    return vfs.read(vfs.open(node.inode, writable=False), offset, length)


def test_contents(vfs):
    monday = path(vfs, "web", "snapshots", "monday", "sda.raw")
    active = path(vfs, "web", "active", "sda.raw")
    assert vfs.size(monday) == 1 << 20
    assert read(vfs, monday, 0, 8192) == b"\x01" * 8192
    assert read(vfs, active, 0, 8192) == b"\x02" * 4096 + b"\x01" * 4096
    assert read(vfs, active, (1 << 20) - 10, 100) == bytes(10)
    doc = json.loads(read(vfs, path(vfs, "web", "snapshots", "tuesday", "snapshot.json"),
                          0, 1 << 16))
    assert doc["name"] == "tuesday" and doc["description"] == "imported from tuesday.qcow2"
    assert len(doc["volumes"]["sda"]["chain"]) == 2 and doc["volumes"]["sdb"]["size"] == 2 << 20


def test_errors_carry_errno(vfs):
    with pytest.raises(NotFound) as e:
        path(vfs, "web", "snapshots", "friday")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(ReadOnly) as e:
        vfs.open(path(vfs, "web", "snapshots", "monday", "snapshot.json").inode, writable=True)
    assert e.value.errno == errno.EROFS
    with pytest.raises(NotFound):
        vfs.listdir(path(vfs, "web", "active", "sda.raw").inode)


def test_writable_open_of_a_snapshot_view_gets_a_private_overlay(vfs, store):
    node = path(vfs, "web", "snapshots", "monday", "sda.raw")
    private = vfs.open(node.inode, writable=True)
    shared = vfs.open(node.inode, writable=False)
    assert private.overlay is not None and shared.overlay is None
    assert vfs.write(private, 100, b"mine") == 4
    assert vfs.read(private, 96, 12) == b"\x01" * 4 + b"mine" + b"\x01" * 4
    assert vfs.read(shared, 96, 12) == b"\x01" * 12
    # It may have to copy from the snapshot: never answered in the event loop.
    assert vfs.read_nowait(private, 0, 4096) is None
    status = json.loads(vfs._status(node.vm))
    assert status["overlays"] == [{"file": "web/snapshots/monday/sda.raw", "bytes": 4096}]
    assert vfs.needs_release(private)
    vfs.closed(private)
    vfs.release(private)
    assert json.loads(vfs._status(node.vm))["overlays"] == []
    assert vfs.read(vfs.open(node.inode, writable=False), 96, 12) == b"\x01" * 12
    assert not (store / "scratch").exists() or list((store / "scratch").iterdir()) == []


def test_clone_through_the_control_file_adds_the_vm(vfs, store):
    control = path(vfs, "web", "control", "clone")
    handle = vfs.open(control.inode, writable=True, readable=False)
    assert vfs.write(handle, 0, b"tuesday copy\n") == 13
    assert [n for n, _ in vfs.listdir(ROOT_INODE)] == ["web", "copy"]
    copy = path(vfs, "copy", "active", "sda.raw")
    tuesday = path(vfs, "web", "snapshots", "tuesday", "sda.raw")
    assert read(vfs, copy, 0, 1 << 20) == read(vfs, tuesday, 0, 1 << 20)
    assert [n for n, _ in vfs.listdir(path(vfs, "copy", "snapshots").inode)] == []
    # A name of the top level is taken; the error is kept for control/status.
    with pytest.raises(AlreadyExists):
        vfs.write(handle, 0, b"monday copy\n")
    status = json.loads(read(vfs, path(vfs, "web", "control", "status"), 0, 1 << 16))
    assert status["last_error"]["errno"] == errno.EEXIST
    assert [n for n, _ in vfs.listdir(ROOT_INODE)] == ["web", "copy"]
