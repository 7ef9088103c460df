"""Acceptance 4: a merge on a small, nearly full filesystem fails cleanly
with ENOSPC; nothing changes, and it succeeds once space is freed.  Also
ENOSPC in the middle of a merge (the pre-check forced off): the store stays
consistent and a retry finishes the deletion.  And ENOSPC in the middle of
a guest write to the active disk: nothing leaks."""

import errno
import hashlib
import json
import os
import random

import pytest

from snapfs.ops import operations
from snapfs.errors import NoSpace
from snapfs.ops.operations import VmOperations
from snapfs.store.store import Store
from tests.support.mounting import mounted, snapfs
from tests.support.qemu import check, qemu_img, qemu_io, to_raw




def build_vm(tmp_path, store):
    """A VM whose snapshot 'base' holds 24 MiB and whose child 'mid' holds
    20 MiB elsewhere: deleting 'base' moves 20 MiB at the least."""
    src = tmp_path / "src"
    src.mkdir()
    qemu_img("create", "-f", "qcow2", src / "base.qcow2", "64M")
    qemu_io(src / "base.qcow2", "write -P 1 0 24M", fmt="qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", src / "mid.qcow2", cwd=src)
    qemu_io(src / "mid.qcow2", "write -P 2 24M 20M", fmt="qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", src / "top.qcow2", cwd=src)
    qemu_io(src / "top.qcow2", "write -P 3 0 64k", fmt="qcow2")
    snapfs("vm", "add", store, "vm", "--disk", f"sda={src / 'top.qcow2'}")
    return {"mid": to_raw(src / "mid.qcow2"), "active": to_raw(src / "top.qcow2")}


def fill(directory, leave):
    """Fill ``directory``'s filesystem until ``leave`` bytes are free."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    filler = directory / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        os.posix_fallocate(f.fileno(), 0, max(0, free - leave))
    return filler


def fingerprint(store):
    vm_dir = store / "vms" / "vm"
    return {name: hashlib.sha256((vm_dir / name).read_bytes()).hexdigest()
            for name in sorted(os.listdir(vm_dir))}


def views(store):
    m = json.loads((store / "vms" / "vm" / "manifest.json").read_text())
    vm_dir = store / "vms" / "vm"
    out = {s["name"]: to_raw(vm_dir / s["volumes"]["sda"]) for s in m["snapshots"]}
    out["active"] = to_raw(vm_dir / m["active"]["sda"])
    return out


def test_refused_before_anything_changes(tmp_path, small_fs):
    store = small_fs / "store"
    snapfs("init", store)
    expected = build_vm(tmp_path, store)
    filler = fill(small_fs, 4 << 20)
    before = fingerprint(store)
    with mounted(store, tmp_path / "mnt") as mnt:
        with pytest.raises(OSError) as e:
            os.rmdir(mnt / "vm" / "snapshots" / "base")
        assert e.value.errno == errno.ENOSPC
        assert os.path.isdir(mnt / "vm" / "snapshots" / "base")
        status = json.loads((mnt / "vm" / "control" / "status").read_text())
        assert status["last_error"]["errno"] == errno.ENOSPC
    r = snapfs("snapshot", "delete", store, "vm", "base", check=False)
    assert r.returncode == 1 and "nothing was changed" in r.stderr
    assert fingerprint(store) == before
    filler.unlink()
    with mounted(store, tmp_path / "mnt") as mnt:
        os.rmdir(mnt / "vm" / "snapshots" / "base")
    assert views(store) == expected
    assert snapfs("check", store).returncode == 0


def test_enospc_mid_merge_keeps_the_store_consistent(tmp_path, small_fs, monkeypatch):
    store_path = small_fs / "store"
    snapfs("init", store_path)
    expected = build_vm(tmp_path, store_path)
    filler = fill(small_fs, 6 << 20)         # less than the ~20 MiB the merge moves
    monkeypatch.setattr(operations, "check_space", lambda directory, plans: None)
    store = Store.open(store_path)
    with store.locked("test"):
        with pytest.raises(NoSpace):
            VmOperations(store, "vm").delete("base")
    # Consistent: no corruption and no leak (the failed write gave back the
    # clusters it allocated: finding 6b), 'base' is gone from the
    # namespace, and the views that were not being deleted read as before.
    vm_dir = store_path / "vms" / "vm"
    for name in os.listdir(vm_dir):
        if name != "manifest.json":
            assert check(vm_dir / name)["returncode"] == 0, name
    m = json.loads((vm_dir / "manifest.json").read_text())
    assert m["operation"]["op"] == "delete"
    assert [s["name"] for s in m["snapshots"]] == ["mid"]
    filler.unlink()
    # A retry (any command that takes the store) finishes the deletion.
    assert snapfs("check", "--repair", store_path).returncode == 0
    assert views(store_path) == expected
    for name in os.listdir(vm_dir):
        if name != "manifest.json":
            assert check(vm_dir / name)["returncode"] == 0, name
    assert snapfs("check", store_path).returncode == 0


def test_enospc_writing_the_active_disk_leaks_nothing(tmp_path, small_fs):
    """Finding 6b: guest writes to active/sda.raw until ENOSPC.  The write
    that failed gives back the clusters it allocated: after a flush (with
    space freed for the tables it writes back) and the unmount, qemu-img
    check finds no leaked cluster, every write that succeeded reads back,
    and the failed one's range reads as before or as written."""
    store = small_fs / "store"
    snapfs("init", store)
    src = tmp_path / "src"
    src.mkdir()
    qemu_img("create", "-f", "qcow2", src / "disk.qcow2", "64M")
    qemu_io(src / "disk.qcow2", "write -P 1 0 1M", fmt="qcow2")
    snapfs("vm", "add", store, "vm", "--disk", f"sda={src / 'disk.qcow2'}")
    model = bytearray(to_raw(src / "disk.qcow2"))
    filler = fill(small_fs, 3 << 20)
    rng = random.Random(6)
    failed = None
    with mounted(store, tmp_path / "mnt") as mnt:
        fd = os.open(mnt / "vm" / "active" / "sda.raw", os.O_WRONLY)
        try:
            offset = 1 << 20
            while failed is None:
                # Odd sizes and offsets: partial clusters too.
                data = rng.randbytes(rng.randrange(1, 200 << 10))
                done = 0
                try:
                    while done < len(data):
                        done += os.pwrite(fd, data[done:], offset + done)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    failed = (offset + done, data[done:])
                model[offset:offset + done] = data[:done]
                offset += len(data) + rng.randrange(0, 70 << 10)
                assert offset < len(model), "the file system never filled up"
            filler.unlink()     # the tables written back need room
            os.fsync(fd)
        finally:
            os.close(fd)
    vm_dir = store / "vms" / "vm"
    leaf = vm_dir / json.loads((vm_dir / "manifest.json").read_text())["active"]["sda"]
    report = check(leaf)
    assert report["returncode"] == 0, report
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, report
    view = to_raw(leaf)
    offset, data = failed
    end = offset + len(data)
    assert view[:offset] == model[:offset] and view[end:] == model[end:]
    for i, got in enumerate(view[offset:end]):
        assert got in (model[offset + i], data[i]), offset + i
    assert snapfs("check", store).returncode == 0
