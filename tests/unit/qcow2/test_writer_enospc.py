"""Qcow2Writer on a file system that fills up (finding 6b: "never corrupt,
never leak").

A write that fails with ENOSPC must give back the clusters it allocated:
once space is freed and the writer flushed, ``qemu-img check`` finds no
leak and no corruption, every write that succeeded reads back, and the
failed write's range reads, byte by byte, as before or as written.  The
writer then keeps working (it reuses what it released).

The file system is a small tmpfs, filled by a file so that the space runs
out at a different point in each round: writing data, new L2 tables or new
refcount blocks, or writing the tables back.  ENOSPC at each single write
call in turn, refcount table growth included, is in test_qcow2_writer.py
(test_enospc_at_every_write_call).
"""

import os
import random
import subprocess

import pytest

from snapfs.errors import NoSpace
from snapfs.qcow2 import writer as writer_module
from snapfs.qcow2.header import read_header
from snapfs.qcow2.writer import Qcow2Writer
from tests.support import qemu

KiB, MiB = 1024, 1024 * 1024
# The guest's last RESERVE bytes are left alone until space runs out, then
# get small writes into fresh clusters (which reuse released ones).
RESERVE = 256 * KiB


class Scenario:
    def __init__(self, options, size, prewrite, gen, leaves):
        self.options = options      # qemu-img create -o
        self.size = size            # guest bytes
        self.prewrite = prewrite    # qemu-io commands before the writer opens
        self.gen = gen              # gen(rng, i, end of write i - 1) -> (offset, length) of write i
        self.leaves = leaves        # free bytes left by the filler, one round each


def _random_range(rng, i, end):
    """Anywhere in the first 2 MiB but the reserve."""
    return rng.randrange(2 * MiB - RESERVE - 40 * KiB), rng.randrange(1, 40 * KiB)


def _spread(rng, i, end):
    """One write per 2 MiB: each in its own L2 table (of 4 KiB clusters)."""
    return i * 2 * MiB + rng.randrange(2 * MiB - RESERVE), rng.randrange(1, 12 * KiB)


def _sequential(rng, i, end):
    """Back to back, 1 B to 24 KiB at a time."""
    return (end if i else rng.randrange(512)), rng.randrange(1, 24 * KiB)


SCENARIOS = {
    # One L2 table exists already: the writes only allocate data clusters
    # (and overwrite some in place).
    "data-clusters": Scenario("cluster_size=4k", 2 * MiB, ["write -P 1 0 4k"],
                              _random_range, [0, 6 * KiB, 50 * KiB, 130 * KiB, 300 * KiB]),
    # Every write allocates an L2 table.
    "l2-tables": Scenario("cluster_size=4k", 64 * MiB, [], _spread,
                          [0, 10 * KiB, 30 * KiB, 70 * KiB, 100 * KiB]),
    # 512 B clusters, 64-bit refcounts: a refcount block covers 32 KiB of
    # file and the first refcount table 2 MiB, so the writes allocate
    # blocks all along and grow the table once the file passes 2 MiB.
    "refcount-blocks": Scenario("cluster_size=512,refcount_bits=64", 4 * MiB,
                                ["write -P 1 0 1k"], _sequential,
                                [3 * KiB, 40 * KiB, 150 * KiB, 2000 * KiB, 2100 * KiB,
                                 2200 * KiB]),
}


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs; always unmounted."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _fill(directory, leave):
    """A file taking all of ``directory``'s free space but ``leave`` bytes."""
    st = os.statvfs(directory)
    filler = directory / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(1, st.f_bavail * st.f_frsize - leave))
    return filler


def _assert_old_or_new(view, model, failed, context):
    """``view`` equals ``model`` except in the failed write's range, where
    each byte is as before or as written."""
    offset, data = failed
    end = offset + len(data)
    assert view[:offset] == model[:offset], context
    assert view[end:] == model[end:], context
    for i, (got, old, new) in enumerate(zip(view[offset:end], model[offset:end], data)):
        assert got in (old, new), (context, offset + i, got, old, new)


def _assert_clean(path, context):
    report = qemu.check(path)
    assert qemu.is_clean(report), (context, report)


def _round(directory, scenario, write_back, leave, seed):
    """Write until NoSpace, free the space, flush, check; then write more.
    Returns what happened: {"flush_nospace": bool, "reftable_moved": bool}."""
    context = (leave, seed)
    path = directory / "a.qcow2"
    for name in ("a.qcow2", "filler"):
        if (directory / name).exists():
            (directory / name).unlink()
    args = ["create", "-q", "-f", "qcow2", "-o", scenario.options, str(path), str(scenario.size)]
    qemu.qemu_img(*args)
    if scenario.prewrite:
        qemu.qemu_io(path, *scenario.prewrite, fmt="qcow2")
    with open(path, "rb") as f:
        reftable_before = read_header(f.fileno(), path).refcount_table_offset
    model = bytearray(qemu.to_raw(path))
    filler = _fill(directory, leave)
    rng = random.Random(seed)
    failed = None
    flush_nospace = False
    with Qcow2Writer(path, write_back=write_back) as w:
        end = 0
        for i in range(100000):
            offset, length = scenario.gen(rng, i, end)
            end = offset + length
            data = rng.randbytes(length)
            try:
                w.write(offset, data)
            except NoSpace:
                failed = (offset, data)
                break
            model[offset:offset + length] = data
        assert failed is not None, context
        # The writer's own view never shows data that was not written.
        _assert_old_or_new(w.read(0, w.size), model, failed, context)
        try:
            w.flush()
        except NoSpace:
            flush_nospace = True    # the tables need room: free it, flush again
            filler.unlink()
            w.flush()
        _assert_clean(path, context)
        view = qemu.to_raw(path)
        _assert_old_or_new(view, model, failed, context)
        assert w.read(0, w.size) == view, context
        if filler.exists():
            filler.unlink()
        # The writer keeps working: small writes into fresh clusters (they
        # reuse the clusters the failed write gave back, which may hold part
        # of its data: the rest of each cluster must read as zeros), then
        # the failed write again.
        model[:] = view
        for j in range(8):
            offset = scenario.size - RESERVE + j * (RESERVE // 8) + rng.randrange(64)
            data = rng.randbytes(rng.randrange(1, 300))
            w.write(offset, data)
            model[offset:offset + len(data)] = data
        offset, data = failed
        w.write(offset, data)
        model[offset:offset + len(data)] = data
        assert w.read(0, w.size) == model, context
    _assert_clean(path, context)
    assert qemu.to_raw(path) == model, context
    with open(path, "rb") as f:
        reftable_moved = read_header(f.fileno(), path).refcount_table_offset != reftable_before
    return {"flush_nospace": flush_nospace, "reftable_moved": reftable_moved}


@pytest.mark.parametrize("write_back", [False, True, "often"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_enospc_mid_write_leaks_nothing(tmpfs, monkeypatch, name, write_back):
    """``often``: write-back mode writing its tables back after every 8 KiB
    of new data, so that ENOSPC also hits the write-back that a write()
    triggers (after which that write's clusters are the image's)."""
    if write_back == "often":
        monkeypatch.setattr(writer_module, "WRITE_BACK_BYTES", 8 * KiB)
    scenario = SCENARIOS[name]
    outcomes = [_round(tmpfs, scenario, bool(write_back), leave, seed)
                for seed, leave in enumerate(scenario.leaves)]
    if name == "refcount-blocks":
        # The larger budgets let the file pass 2 MiB: the table grew.
        assert any(o["reftable_moved"] for o in outcomes)
    if write_back is True and name != "data-clusters":
        # The new tables written back at the flush needed room too.
        assert any(o["flush_nospace"] for o in outcomes)
