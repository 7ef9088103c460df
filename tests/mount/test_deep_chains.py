"""Finding 1 of the hardening issue: the 64th snapshot broke the VM (every
load failed), and through the mount later writes landed in a snapshot.
Now a chain may hold MAX_CHAIN_DEPTH volumes, checked before anything is
written.  200 snapshots, through the CLI and through the mount, with every
view checked and writes only in the active leaf."""

import errno
import json
import os
from pathlib import Path

import pytest

from snapfs.store.chain import MAX_CHAIN_DEPTH
from snapfs.errors import ChainTooDeep
from snapfs.ops.operations import VmOperations
from snapfs.store.store import Store
from tests.support import qemu
from tests.support.mounting import mounted, snapfs

KiB = 1024
DEPTH = 200
MARK = 4 * KiB


def manifest(store, vm="vm"):
    return json.loads((Path(store) / "vms" / vm / "manifest.json").read_text())


def volume(store, vid, vm="vm"):
    return Path(store) / "vms" / vm / vid


def test_the_limit_is_far_above_a_year_of_nightly_snapshots():
    assert MAX_CHAIN_DEPTH >= 1000


def test_a_snapshot_past_the_limit_is_refused_before_anything_is_written(store, monkeypatch):
    snapfs("vm", "add", store, "vm", "--disk", "sda=1M", "--disk", "sdb=1M")
    monkeypatch.setattr("snapfs.ops.operations.MAX_CHAIN_DEPTH", 4)
    ops = VmOperations(Store.open(store), "vm")
    for name in ("a", "b", "c"):
        ops.create(name)
    before = sorted(os.listdir(Path(store) / "vms" / "vm"))
    text = (Path(store) / "vms" / "vm" / "manifest.json").read_bytes()
    with pytest.raises(ChainTooDeep) as e:
        ops.create("d")
    assert e.value.errno == errno.EMLINK
    assert "delete a snapshot first" in str(e.value)
    # A preview's overlay adds a layer on the snapshot's own chain.
    monkeypatch.setattr("snapfs.ops.operations.MAX_CHAIN_DEPTH", 3)
    with pytest.raises(ChainTooDeep):
        ops.preview("c")
    monkeypatch.setattr("snapfs.ops.operations.MAX_CHAIN_DEPTH", 4)
    assert sorted(os.listdir(Path(store) / "vms" / "vm")) == before
    assert (Path(store) / "vms" / "vm" / "manifest.json").read_bytes() == text
    # Deleting one makes room again.
    ops.delete("a")
    ops.create("d")
    assert [s.name for s in Store.open(store).load_vm("vm").snapshots] == ["b", "c", "d"]


def test_200_snapshots_through_the_cli(store):
    snapfs("vm", "add", store, "vm", "--disk", "sda=4M")
    written = {}
    for i in range(DEPTH):
        if i % 25 == 0:
            # A guest write between snapshots, by QEMU into the active leaf.
            leaf = volume(store, manifest(store)["active"]["sda"])
            qemu.qemu_io(leaf, f"write -P {i % 250 + 1} {i * MARK} {MARK}", fmt="qcow2")
            written[i] = i % 250 + 1
        snapfs("snapshot", "create", store, "vm", f"s{i:03}")
    m = manifest(store)
    assert [s["name"] for s in m["snapshots"]] == [f"s{i:03}" for i in range(DEPTH)]
    assert snapfs("check", store).returncode == 0
    top = volume(store, m["active"]["sda"])
    assert len(qemu.info_chain(top)) == DEPTH + 1
    assert qemu.is_clean(qemu.check(top))
    with mounted(store, store.parent / "mnt") as mnt:
        snaps = mnt / "vm" / "snapshots"
        for i in range(0, DEPTH, 7):
            snap = m["snapshots"][i]
            view = (snaps / snap["name"] / "sda.raw").read_bytes()
            assert view == qemu.to_raw(volume(store, snap["volumes"]["sda"])), snap["name"]
            for j, pattern in written.items():
                want = bytes([pattern]) * MARK if j <= i else bytes(MARK)
                assert view[j * MARK:(j + 1) * MARK] == want
        assert os.readlink(snaps / "latest") == f"s{DEPTH - 1:03}"


def test_200_snapshots_through_the_mount_with_the_active_disk_open(tmp_path, store):
    """mkdir 200 times while active/sda.raw stays open for writing, writing
    a mark after each: every snapshot shows exactly the marks made before
    it, and no write lands anywhere but the active leaf."""
    snapfs("vm", "add", store, "vm", "--disk", "sda=4M")
    model = bytearray(DEPTH * MARK)
    states = []
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "vm"
        fd = os.open(vm / "active" / "sda.raw", os.O_RDWR)
        try:
            for i in range(DEPTH):
                os.mkdir(vm / "snapshots" / f"s{i:03}")
                states.append(bytes(model))
                mark = bytes([i % 250 + 1]) * MARK
                os.pwrite(fd, mark, i * MARK)
                model[i * MARK:(i + 1) * MARK] = mark
            assert os.pread(fd, len(model), 0) == bytes(model)
        finally:
            os.close(fd)
        for i in range(DEPTH):
            with open(vm / "snapshots" / f"s{i:03}" / "sda.raw", "rb") as f:
                assert f.read(len(model)) == states[i], f"s{i:03}"
    assert snapfs("check", store).returncode == 0
    m = manifest(store)
    assert len(m["snapshots"]) == DEPTH
    top = volume(store, m["active"]["sda"])
    assert qemu.to_raw(top)[:len(model)] == bytes(model)
    for snap in m["snapshots"][::40]:
        vol = volume(store, snap["volumes"]["sda"])
        assert qemu.is_clean(qemu.check(vol))
        i = int(snap["name"][1:])
        assert qemu.to_raw(vol)[:len(model)] == states[i]
