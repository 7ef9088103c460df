"""ops/clone.py without a mount: what a clone reads, and what it reports."""

import os

import pytest

from snapfs.errors import AlreadyExists, NotFound
from snapfs.ops.clone import clone_vm
from snapfs.store.store import Store
from tests.support.mounting import snapfs
from tests.support.qemu import check, info, is_clean, to_raw

MiB = 1 << 20


def test_holes_of_a_raw_base_are_not_read(tmp_path, store):
    """A 64 MiB sparse raw base with 1 MiB of data: the clone reads (and
    reports as progress) only that MiB, and writes only what is not zero."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(10 * MiB)
        f.write(b"\x07" * (MiB // 2) + bytes(MiB // 2))
    snapfs("vm", "add", store, "web", "--disk", f"sda={image}")
    opened = Store.open(store)
    reports = []
    with opened.locked("test"):
        m = opened.load_vm("web")
        clone = clone_vm(opened, m, "disk", "copy",
                         lambda done, total: reports.append((done, total)))
    assert reports[0] == (0, MiB) and reports[-1] == (MiB, MiB), reports
    assert clone.last_operation["bytes"] == MiB
    path = opened.volume_path("copy", clone.active["sda"])
    assert "backing-filename" not in info(path) and is_clean(check(path))
    assert to_raw(path, fmt="qcow2") == image.read_bytes()
    # Half a MiB of data, zeros left unallocated.
    assert os.stat(path).st_blocks * 512 < MiB
    # The refusals come before anything is written.
    with opened.locked("test"):
        with pytest.raises(NotFound):
            clone_vm(opened, m, "nope", "other")
        with pytest.raises(AlreadyExists):
            clone_vm(opened, m, "disk", "copy")
    assert sorted(os.listdir(store / "vms")) == ["copy", "web"]
