"""Qcow2Writer against QEMU: random images and writes, refcount table growth,
crash safety (SIGKILL at every ordering point), refusals, and the map.

The oracles are ``qemu-img check`` (no corruption, no leak), ``qemu-img
convert`` (guest bytes) and ``qemu-img map`` (what is allocated where), plus
a bytearray model of the disk.
"""

import errno
import os
import random
import shutil
import signal
import struct
import traceback

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapfs.errors import CorruptImage, NoSpace
from snapfs.qcow2 import structs as S
from snapfs.qcow2 import writer as writer_module
from snapfs.qcow2.mapping import COMPRESSED, DATA, ZERO
from snapfs.qcow2.writer import Qcow2Writer
from tests.support import qemu
from tests.support.chains import (
    QCOW2_OP_KINDS, RAW_OP_KINDS, SECTOR, ChainSpec, LayerSpec, _ops,
    _snapshot_fits, build_chain, qcow_options,
)

KiB, MiB = 1024, 1024 * 1024


# --------------------------------------------------------------------------
# helpers

def _below_of(view):
    """below() over a backing view: bounded by its size, zero-padded past it."""
    def below(offset, length):
        data = view[offset:offset + length]
        return data + bytes(length - len(data))
    return below


def _op_data(op):
    """The bytes a (kind, offset, length, seed) op writes; None for write_zeroes."""
    kind, _, length, seed = op
    if kind == "write_zeroes":
        return None
    if kind == "random":
        return random.Random(seed).randbytes(length)
    if kind == "pattern":
        return bytes([seed % 255 + 1]) * length
    return bytes(length)   # "zeros", through write()


def _apply(writer, model, op):
    """Apply one op to the writer (if any) and to the model (if any)."""
    _, offset, length, _ = op
    data = _op_data(op)
    if writer is not None:
        if data is None:
            writer.write_zeroes(offset, length)
        else:
            writer.write(offset, data)
    if model is not None:
        model[offset:offset + length] = bytes(length) if data is None else data


def _assert_clean(path):
    report = qemu.check(path)
    assert qemu.is_clean(report), report


def _own_segments_qemu(path):
    """(start, end, kind, host) of this image's own clusters per qemu-img map."""
    out = []
    for e in qemu.map_json(path):
        if e["depth"] != 0 or not e.get("present", True):
            continue
        if not e["data"]:
            out.append((e["start"], e["start"] + e["length"], ZERO, None))
        elif "offset" in e:
            out.append((e["start"], e["start"] + e["length"], DATA, e["offset"]))
        else:
            out.append((e["start"], e["start"] + e["length"], COMPRESSED, None))
    return out


def _own_segments_ours(runs):
    return [(s, s + n, k, h if k == DATA else None) for s, n, k, h, _ in runs]


def _split(segments, cuts):
    result = []
    for start, end, kind, host in segments:
        points = [start] + [c for c in cuts if start < c < end] + [end]
        for a, b in zip(points, points[1:]):
            result.append((a, b, kind, None if host is None else host + a - start))
    return result


def assert_same_map(writer, path):
    ours = _own_segments_ours(writer.allocated_runs())
    theirs = _own_segments_qemu(path)
    cuts = sorted({s for s, *_ in ours} | {e for _, e, *_ in ours}
                  | {s for s, *_ in theirs} | {e for _, e, *_ in theirs})
    assert _split(ours, cuts) == _split(theirs, cuts)


def _create(path, size, options="", backing=None, backing_fmt=None):
    args = ["create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", options]
    if backing:
        args += ["-b", os.path.basename(backing), "-F", backing_fmt]
    qemu.qemu_img(*args, os.path.basename(path), str(size), cwd=os.path.dirname(path))


# --------------------------------------------------------------------------
# 1. random images, random writes

@st.composite
def write_ops(draw, size, cluster):
    ops = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["random", "pattern", "zeros", "write_zeroes"]))
        grain = draw(st.sampled_from([1, SECTOR, cluster]))
        if grain > size:
            grain = 1
        offset = grain * draw(st.integers(0, (size - 1) // grain))
        room = size - offset
        if draw(st.integers(0, 5)) == 0:
            length = room
        else:
            cap = max(1, min(room, 3 * cluster + 5000) // grain)
            length = min(room, grain * draw(st.integers(1, cap)))
        ops.append((kind, offset, length, draw(st.integers(0, 2**32))))
    return ops


@st.composite
def scenarios(draw):
    """(ChainSpec whose top layer is qcow2, writes on the top layer)."""
    options = draw(qcow_options())
    cluster = options.cluster_size
    size = SECTOR * draw(st.integers(1, 4 * MiB // SECTOR))
    size = max(size, min(4 * MiB, 2 * cluster)) if draw(st.booleans()) else size
    backing = draw(st.sampled_from([None, "raw", "qcow2"]))
    layers = []
    if backing:
        bsize = draw(st.sampled_from([size, SECTOR * draw(st.integers(1, 4 * MiB // SECTOR))]))
        if backing == "raw":
            layers.append(LayerSpec(bsize, _ops(draw, bsize, SECTOR, RAW_OP_KINDS, 1)))
        else:
            bopts = draw(qcow_options())
            layers.append(LayerSpec(bsize, _ops(draw, bsize, bopts.cluster_size,
                                                QCOW2_OP_KINDS, 1), options=bopts))
    ops = _ops(draw, size, cluster, QCOW2_OP_KINDS, 0)
    snapshot = None
    if ops and options.refcount_bits >= 2 and draw(st.booleans()):
        snapshot = draw(st.integers(1, len(ops)))
        if not _snapshot_fits(options, ops[:snapshot]):
            snapshot = None
    layers.append(LayerSpec(size, ops, snapshot))
    spec = ChainSpec(layers, backing == "raw", options.compat, cluster,
                     options.refcount_bits, options.extended_l2, options.compression_type)
    return spec, draw(write_ops(size, cluster))


@given(scenario=scenarios(), write_back=st.booleans())
def test_random_writes_match_qemu(tmp_path_factory, scenario, write_back):
    spec, ops = scenario
    built = build_chain(spec, tmp_path_factory.mktemp("w"))
    top = built.top
    below = None
    if len(built.layers) > 1:
        below = _below_of(qemu.to_raw(built.layers[-2], fmt=built.formats[-2]))
    model = bytearray(qemu.to_raw(top))
    with Qcow2Writer(top, below, write_back=write_back) as w:
        assert w.read(0, w.size) == model
        for op in ops:
            _apply(w, model, op)
        assert w.read(0, w.size) == model
        w.flush()   # write-back mode: the tables reach the file here
        assert_same_map(w, top)
    _assert_clean(top)
    assert qemu.to_raw(top) == model


def test_snapshot_compressed_and_extended_l2(tmp_path):
    """Shared L2 tables, shared and compressed clusters, subclusters."""
    path = str(tmp_path / "a.qcow2")
    _create(path, 4 * MiB, "extended_l2=on,cluster_size=64k,compression_type=zstd")
    qemu.qemu_io(path, "write -P 1 0 1M", "write -P 2 1M 8k", "write -z 1040k 4k")
    qemu.qemu_io(path, "write -c -P 3 2M 128k")
    qemu.qemu_img("snapshot", "-c", "s", path)
    qemu.qemu_io(path, "write -P 4 3M 64k")
    before_snapshot = qemu.to_raw(path)
    model = bytearray(before_snapshot)
    with Qcow2Writer(path) as w:
        for op in [("random", 100, 5000, 1), ("pattern", MiB - 10, 40, 2),
                   ("random", 2 * MiB + 3, 70000, 3), ("write_zeroes", 0, 256 * KiB, 0),
                   ("zeros", 1040 * KiB, 4 * KiB, 0), ("pattern", 3 * MiB, 64 * KiB, 9)]:
            _apply(w, model, op)
        assert w.read(0, w.size) == model
        assert_same_map(w, path)
    _assert_clean(path)
    assert qemu.to_raw(path) == model
    # The internal snapshot still holds the old content.
    qemu.qemu_img("snapshot", "-a", "s", path)
    _assert_clean(path)


# --------------------------------------------------------------------------
# 2. refcount table growth

def test_refcount_table_grows_more_than_once(tmp_path):
    path = str(tmp_path / "g.qcow2")
    _create(path, 16 * MiB, "cluster_size=512,refcount_bits=64")
    model = bytearray(16 * MiB)
    tables = set()
    rng = random.Random(7)
    with Qcow2Writer(path) as w:
        tables.add(w.header.refcount_table_offset)
        offset = 0
        while len(tables) < 4 and offset < w.size:
            n = min(rng.randrange(1, 600 * KiB), w.size - offset)
            _apply(w, model, ("random", offset, n, rng.randrange(2**32)))
            offset += n
            tables.add(w.header.refcount_table_offset)
        # Overwrite some (in place) and zero some (freed clusters).
        _apply(w, model, ("random", 1000, 300 * KiB, 5))
        _apply(w, model, ("write_zeroes", 2 * MiB + 7, 900 * KiB, 0))
        clusters = w.header.refcount_table_clusters
        assert w.read(0, w.size) == model
    assert len(tables) >= 3, "the refcount table should have moved at least twice"
    assert clusters > 2
    _assert_clean(path)
    assert qemu.to_raw(path) == model


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_every_refcount_width(tmp_path, bits):
    """New refcount blocks (512 B clusters fill them fast) and releases
    (compressed and zeroed clusters) at every refcount width."""
    path = str(tmp_path / "w.qcow2")
    _create(path, 4 * MiB, f"cluster_size=512,refcount_bits={bits}")
    qemu.qemu_io(path, "write -P 1 0 64k")
    qemu.qemu_io(path, "write -c -P 2 64k 4k")
    model = bytearray(qemu.to_raw(path))
    with Qcow2Writer(path) as w:
        for op in [("random", 100 * KiB, 3 * MiB, 1), ("pattern", 65 * KiB, 2000, 2),
                   ("write_zeroes", 1000, 40 * KiB, 0), ("random", 3, 100 * KiB, 3)]:
            _apply(w, model, op)
        assert w.read(0, w.size) == model
    _assert_clean(path)
    assert qemu.to_raw(path) == model


# --------------------------------------------------------------------------
# 3. crash safety

def _run_child(path, below_view, ops, kill_at, write_back=False, flush_every=1):
    """Apply ops in a child process that SIGKILLs itself at step ``kill_at``,
    flushing after every ``flush_every`` ops.

    Returns (index of the op running at the kill or None, step names seen,
    ops started, ops completed as of the last completed flush).
    """
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 1
        try:
            os.close(r)
            count = 0

            def on_step(name):
                nonlocal count
                count += 1
                os.write(wfd, f"step {name}\n".encode())
                if count == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            below = _below_of(below_view) if below_view is not None else None
            with Qcow2Writer(path, below, on_step, write_back=write_back) as w:
                for i, op in enumerate(ops):
                    os.write(wfd, f"start {i}\n".encode())
                    _apply(w, None, op)   # the parent keeps the models
                    if (i + 1) % flush_every == 0 or i + 1 == len(ops):
                        w.flush()
                        os.write(wfd, f"flushed {i + 1}\n".encode())
                    os.write(wfd, f"done {i}\n".encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    lines = b"".join(chunks).decode().splitlines()
    steps = [line.split()[1] for line in lines if line.startswith("step ")]
    running, started, flushed = None, 0, 0
    for line in lines:
        word, arg = line.split()
        if word == "start":
            running, started = int(arg), int(arg) + 1
        elif word == "done":
            running = None
        elif word == "flushed":
            flushed = int(arg)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
    else:
        assert os.WEXITSTATUS(status) == 0, "the child failed"
        assert running is None
    return running, steps, started, flushed


def _models(initial, ops):
    """Model of the disk before each op, and after the last."""
    models = [bytes(initial)]
    model = bytearray(initial)
    for op in ops:
        _apply(None, model, op)
        models.append(bytes(model))
    return models


def _crash_ops(rng, size, cluster, count):
    ops = []
    for _ in range(count):
        kind = rng.choice(["random", "random", "pattern", "zeros", "write_zeroes"])
        if rng.random() < 0.4:
            offset = rng.randrange(size // cluster) * cluster
            length = min(size - offset, cluster * rng.randrange(1, 6))
        else:
            offset = rng.randrange(size)
            length = rng.randrange(1, min(size - offset, 4 * cluster + 3000) + 1)
        ops.append((kind, offset, length, rng.randrange(2**32)))
    return ops


def _setup_crash_image(directory, name, seed):
    """Build one crash-test image; returns (path, below view or None, ops)."""
    d = str(directory)
    path = os.path.join(d, "top.qcow2")
    rng = random.Random(f"{name}-{seed}")
    if name == "tiny-clusters":
        # 512 B clusters, 64-bit refcounts: the file is near the end of what
        # the refcount table covers (2 MiB), so the writes grow it.
        base = os.path.join(d, "base.qcow2")
        _create(base, 3 * MiB, "cluster_size=4k")
        qemu.qemu_io(base, "write -P 7 0 3M")
        _create(path, 3 * MiB, "cluster_size=512,refcount_bits=64", base, "qcow2")
        qemu.qemu_io(path, "write -P 1 0 1950k", "write -z 1960k 4k")
        qemu.qemu_io(path, "write -c -P 2 2000k 2k")
        qemu.qemu_img("snapshot", "-c", "s", path)
        ops = [("random", 1900 * KiB, 20 * KiB, 1), ("zeros", 1990 * KiB, 11 * KiB, 0)]
        ops += _crash_ops(rng, 3 * MiB, 512, 6)
        ops += [("random", 2100 * KiB, 600 * KiB, 2)]
        return path, qemu.to_raw(base), ops
    if name == "extended-l2":
        base = os.path.join(d, "base.raw")
        with open(base, "wb") as f:
            f.write(random.Random(1).randbytes(1 * MiB))
        _create(path, 2 * MiB, "extended_l2=on,cluster_size=32k,refcount_bits=4,"
                "compression_type=zstd", base, "raw")
        qemu.qemu_io(path, "write -P 1 0 100k", "write -z 200k 4k", "write -P 3 300k 3k")
        qemu.qemu_io(path, "write -c -P 2 512k 64k")
        qemu.qemu_img("snapshot", "-c", "s", path)
        qemu.qemu_io(path, "write -P 4 40k 2k")
        view = open(base, "rb").read()
        return path, view, _crash_ops(rng, 2 * MiB, 32 * KiB, 8)
    # "v2": compat 0.10 (zeros are real zero clusters), 4 KiB clusters, a
    # snapshot, a raw backing file half the size of the disk.
    base = os.path.join(d, "base.raw")
    with open(base, "wb") as f:
        f.write(random.Random(2).randbytes(512 * KiB))
    _create(path, 1 * MiB, "compat=0.10,cluster_size=4k", base, "raw")
    qemu.qemu_io(path, "write -P 1 0 200k", "write -z 300k 8k")
    qemu.qemu_io(path, "write -c -P 2 400k 8k")
    qemu.qemu_img("snapshot", "-c", "s", path)
    view = open(base, "rb").read()
    return path, view, _crash_ops(rng, 1 * MiB, 4 * KiB, 8)


def _crash_baseline(tmp_path, path, ops):
    """Keep a pristine copy of ``path``; its size, cluster size, and the
    model of the disk before each op and after the last."""
    pristine = str(tmp_path / "pristine.qcow2")
    shutil.copyfile(path, pristine)
    info = qemu.info(path)
    return pristine, info["virtual-size"], info["cluster-size"], _models(qemu.to_raw(path), ops)


def _assert_no_corruption(path, context):
    """qemu-img check finds at most leaks."""
    report = qemu.check(path)
    assert report["returncode"] in (0, 3), (context, report)
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, context


@pytest.mark.parametrize("name,seed", [("tiny-clusters", 0), ("extended-l2", 0),
                                       ("extended-l2", 1), ("v2", 0), ("v2", 1)])
def test_crash_at_every_step(tmp_path, name, seed):
    """SIGKILL at every ordering point of a write sequence: no corruption,
    every cluster old or new, completed writes kept, the image still usable."""
    path, below_view, ops = _setup_crash_image(tmp_path, name, seed)
    pristine, size, cluster, models = _crash_baseline(tmp_path, path, ops)

    running, steps, _, _ = _run_child(path, below_view, ops, kill_at=0)
    assert running is None
    _assert_clean(path)
    assert qemu.to_raw(path) == models[-1]
    if name == "tiny-clusters":
        assert {"reftable", "reftable-header", "reftable-entry", "free"} <= set(steps)

    for kill_at in range(1, len(steps) + 1):
        shutil.copyfile(pristine, path)
        running, seen, _, _ = _run_child(path, below_view, ops, kill_at)
        assert len(seen) == kill_at and running is not None
        _assert_no_corruption(path, (kill_at, seen[-1]))
        view = qemu.to_raw(path)
        old, new = models[running], models[running + 1]
        for start in range(0, size, cluster):
            got = view[start:start + cluster]
            assert got in (old[start:start + cluster], new[start:start + cluster]), \
                (kill_at, seen[-1], running, start)
        # The survivor is usable: our reader agrees with qemu, a further
        # write lands and leaves no corruption (leaks are allowed).
        below = _below_of(below_view) if below_view is not None else None
        model = bytearray(view)
        with Qcow2Writer(path, below) as w:
            assert w.read(0, size) == view
            _apply(w, model, ("random", size // 3 + 5, 3 * cluster, kill_at))
        report = qemu.check(path)
        assert report["returncode"] in (0, 3), (kill_at, seen[-1], report)
        assert qemu.to_raw(path) == model


@pytest.mark.parametrize("name,seed", [("tiny-clusters", 0), ("extended-l2", 1), ("v2", 0)])
def test_write_back_crash_at_every_step(tmp_path, name, seed):
    """Write-back mode, flushed after every third write: SIGKILL at every
    ordering point leaves no corruption, and every cluster as it was at
    some moment between the last completed flush and the kill."""
    path, below_view, ops = _setup_crash_image(tmp_path, name, seed)
    pristine, size, cluster, models = _crash_baseline(tmp_path, path, ops)

    _, steps, _, _ = _run_child(path, below_view, ops, 0, write_back=True, flush_every=3)
    _assert_clean(path)
    assert qemu.to_raw(path) == models[-1]
    assert {"refcounts", "data", "l2", "free"} <= set(steps)

    for kill_at in range(1, len(steps) + 1):
        shutil.copyfile(pristine, path)
        _, seen, started, flushed = _run_child(path, below_view, ops, kill_at,
                                               write_back=True, flush_every=3)
        assert len(seen) == kill_at
        _assert_no_corruption(path, (kill_at, seen[-1]))
        view = qemu.to_raw(path)
        states = models[flushed:started + 1]
        for start in range(0, size, cluster):
            got = view[start:start + cluster]
            assert any(got == m[start:start + cluster] for m in states), \
                (kill_at, seen[-1], flushed, started, start)


# --------------------------------------------------------------------------
# 3b. ENOSPC at every write (tests/unit/qcow2/test_writer_enospc.py: a real full
# file system)

class _NoSpaceAt:
    """Make the ``at``-th pwrite/pwritev/fdatasync of the writer's file
    (``fd``, set once it is open) fail with ENOSPC, once.  A failing write
    that extends the file lands its first half, as a real one may.
    ``where``: the functions on the stack at the failure; ``after``: the
    writer's last step before it (``on_step``).  ``extending``: count only
    the writes that extend the file."""

    def __init__(self, monkeypatch, at, extending=False):
        self.fd, self.at, self.calls, self.where = None, at, 0, None
        self.step = self.after = None
        real_pwritev, real_sync = os.pwritev, os.fdatasync

        def fail(fd, buffers, offset):
            if fd != self.fd or self.where is not None:
                return
            if extending and (buffers is None or offset + sum(len(b) for b in buffers)
                              <= os.fstat(fd).st_size):
                return
            self.calls += 1
            if self.calls != self.at:
                return
            self.where = {f.name for f in traceback.extract_stack()}
            self.after = self.step
            if buffers is not None:
                data = b"".join(bytes(b) for b in buffers)
                if offset + len(data) > os.fstat(fd).st_size:
                    real_pwritev(fd, [data[:len(data) // 2]], offset)
            raise OSError(errno.ENOSPC, "injected: no space left on device")

        def pwrite(fd, data, offset):
            fail(fd, [data], offset)
            return real_pwritev(fd, [data], offset)

        def pwritev(fd, buffers, offset):
            fail(fd, buffers, offset)
            return real_pwritev(fd, buffers, offset)

        def fdatasync(fd):
            fail(fd, None, 0)
            return real_sync(fd)

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "fdatasync", fdatasync)

    def on_step(self, name):
        self.step = name


def _assert_old_or_new(view, old, new, context):
    """Each byte of ``view`` as in ``old`` or as in ``new``."""
    for start in range(0, len(view), 4096):
        got = view[start:start + 4096]
        if got in (old[start:start + 4096], new[start:start + 4096]):
            continue
        for i, (g, a, b) in enumerate(zip(got, old[start:start + 4096], new[start:start + 4096])):
            assert g in (a, b), (context, start + i, g, a, b)


def _enospc_round(path, pristine, below_view, ops, models, at, write_back, monkeypatch):
    """One run of ``ops`` with ENOSPC at write call ``at``: the failed op
    leaves its range old or new and leaks nothing; the writer then finishes
    the ops.  Returns (the functions on the stack at the failure, the
    writer's last step before it), None if the ops made fewer than ``at``
    write calls."""
    shutil.copyfile(pristine, path)
    context = (at, write_back)
    with monkeypatch.context() as m:
        inject = _NoSpaceAt(m, at)
        below = _below_of(below_view) if below_view is not None else None
        with Qcow2Writer(path, below, inject.on_step, write_back=write_back) as w:
            inject.fd = w.fd
            failed = None
            for i, op in enumerate(ops):
                try:
                    _apply(w, None, op)
                except NoSpace:
                    failed = i
                    break
            if failed is not None:
                # The writer shows nothing of what was not written.
                _assert_old_or_new(w.read(0, w.size), models[failed], models[failed + 1],
                                   context)
            try:
                w.flush()
            except NoSpace:
                assert inject.where is not None and failed is None
                w.flush()
            if inject.where is None:
                return None
            # The sync of the header switch to a new refcount table failed:
            # whether the switch is on disk is unknown, as after a crash, so
            # the old table is never freed (a leak, the only one allowed).
            may_leak = inject.after == "reftable" and "fdatasync" in inject.where
            _assert_clean_or_leaks(path, may_leak, (context, sorted(inject.where)))
            view = qemu.to_raw(path)
            if failed is None:       # the flush failed, then made it
                assert view == models[-1], context
                return inject.where, inject.after
            _assert_old_or_new(view, models[failed], models[failed + 1], context)
            assert w.read(0, w.size) == view, context
            model = bytearray(view)
            for op in ops[failed:]:     # the failed op again, and the rest
                _apply(w, model, op)
    _assert_clean_or_leaks(path, may_leak, context)
    assert qemu.to_raw(path) == model, context
    return inject.where, inject.after


def _assert_clean_or_leaks(path, may_leak, context):
    report = qemu.check(path)
    if may_leak:
        assert report["returncode"] in (0, 3) and not report.get("corruptions"), (context, report)
    else:
        assert qemu.is_clean(report), (context, report)


@pytest.mark.parametrize("write_back", [False, True, "often"])
@pytest.mark.parametrize("name,seed", [("tiny-clusters", 0), ("extended-l2", 1), ("v2", 0)])
def test_enospc_at_every_write_call(tmp_path, monkeypatch, name, seed, write_back):
    """ENOSPC (or EDQUOT) can hit any write or sync: wherever it does, the
    failed write gives back what it allocated (qemu-img check finds no
    leak), and nothing else changes.  ``often``: write-back mode writing
    its tables back after every 16 KiB of data, inside write()."""
    if write_back == "often":
        monkeypatch.setattr(writer_module, "WRITE_BACK_BYTES", 16 * KiB)
    path, below_view, ops = _setup_crash_image(tmp_path, name, seed)
    pristine, _, _, models = _crash_baseline(tmp_path, path, ops)
    hits = []     # (functions on the stack, last step) of each failure
    while True:
        hit = _enospc_round(path, pristine, below_view, ops, models, len(hits) + 1,
                            bool(write_back), monkeypatch)
        if hit is None:
            break
        hits.append(hit)

    def failed_in(*functions, after=None):
        return any(set(functions) <= where and after in (None, step) for where, step in hits)

    # The failures hit the places this test is about.
    assert failed_in("pwrite_runs") and failed_in("write_dirty") and failed_in("fdatasync")
    if name == "tiny-clusters":
        assert failed_in("_grow") and failed_in("link_new_blocks")
    if write_back == "often":
        assert failed_in("_stage", "_write_back_pending")    # a write-back inside write()
    elif write_back:
        assert failed_in("flush", "_write_back_pending")
    else:
        assert failed_in("_write", after="data")    # writing pointers: the rest left pending


@pytest.mark.parametrize("write_back", [False, True])
def test_cluster_given_back_by_a_failed_write_is_reused_clean(tmp_path, monkeypatch, write_back):
    """The clusters a failed write gives back may hold part of its data (a
    short write, then ENOSPC), past the end of the file the writer knew.
    Reused for part of a fresh cluster, the rest must read as zeros, not as
    the failed write's bytes."""
    path = str(tmp_path / "r.qcow2")
    _create(path, 1 * MiB, "cluster_size=4k")
    qemu.qemu_io(path, "write -P 1 0 4k")    # the L2 table exists: the write allocates data only
    model = bytearray(qemu.to_raw(path))
    with Qcow2Writer(path, write_back=write_back) as w:
        with monkeypatch.context() as m:
            inject = _NoSpaceAt(m, 1, extending=True)
            inject.fd = w.fd
            size = os.path.getsize(path)
            with pytest.raises(NoSpace):
                w.write(64 * KiB, b"\xaa" * (16 * KiB))
            assert os.path.getsize(path) == size + 8 * KiB   # half of it landed
        assert w.read(0, w.size) == model    # nothing points at it
        for i in range(4):     # reuse the four clusters given back
            offset = 512 * KiB + i * 64 * KiB + 100
            w.write(offset, b"\x55" * 100)
            model[offset:offset + 100] = b"\x55" * 100
        assert w.read(0, w.size) == model
    _assert_clean(path)
    assert qemu.to_raw(path) == model


# --------------------------------------------------------------------------
# 4. refusals

def _set_incompat(path, bits):
    with open(path, "r+b") as f:
        f.seek(72)
        value = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", value | bits))


@pytest.mark.parametrize("bit,what", [(S.INCOMPAT_CORRUPT, "corrupt"),
                                      (S.INCOMPAT_DIRTY, "dirty")])
def test_refuses_to_write_corrupt_or_dirty(tmp_path, bit, what):
    path = str(tmp_path / "c.qcow2")
    _create(path, 1 * MiB)
    qemu.qemu_io(path, "write -P 5 0 64k")
    _set_incompat(path, bit)
    before = open(path, "rb").read()
    with Qcow2Writer(path) as w:
        assert w.read(0, 64 * KiB) == b"\5" * (64 * KiB)   # reading is fine
        with pytest.raises(CorruptImage, match=what):
            w.write(0, b"x")
        with pytest.raises(CorruptImage, match=what):
            w.write_zeroes(0, 64 * KiB)
    assert open(path, "rb").read() == before


def test_refuses_unknown_incompatible_bits(tmp_path):
    path = str(tmp_path / "u.qcow2")
    _create(path, 1 * MiB)
    _set_incompat(path, 1 << 40)
    with pytest.raises(CorruptImage, match="unknown incompatible"):
        Qcow2Writer(path)


def test_rejects_ranges_outside_the_disk(tmp_path):
    path = str(tmp_path / "r.qcow2")
    _create(path, 1 * MiB)
    with Qcow2Writer(path) as w:
        for offset, length in [(-1, 1), (MiB, 1), (MiB - 1, 2)]:
            with pytest.raises(ValueError):
                w.write(offset, bytes(length))
            with pytest.raises(ValueError):
                w.write_zeroes(offset, length)
        w.write(MiB - 1, b"z")
        assert w.read(MiB - 1, 1) == b"z"
    _assert_clean(path)


def test_refcount_block_past_the_end_is_corrupt(tmp_path):
    path = str(tmp_path / "h.qcow2")
    _create(path, 1 * MiB, "cluster_size=4k")
    with open(path, "r+b") as f:
        f.seek(48)
        rt = struct.unpack(">Q", f.read(8))[0]
        f.seek(rt)
        f.write(struct.pack(">Q", 1 << 40))
    with Qcow2Writer(path) as w:
        with pytest.raises(CorruptImage, match="past the end"):
            w.write(0, b"x" * 10)


def _set_first_l2_entry(path, entry):
    """Overwrite guest cluster 0's L2 entry with ``entry(l1_table_offset)``."""
    with open(path, "r+b") as f:
        f.seek(40)
        l1 = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & S.OFFSET_MASK
        f.seek(l2)
        f.write(struct.pack(">Q", entry(l1)))


def test_l2_entry_past_the_end_is_corrupt(tmp_path):
    path = str(tmp_path / "l.qcow2")
    _create(path, 1 * MiB, "cluster_size=4k")
    qemu.qemu_io(path, "write -P 1 0 4k")
    _set_first_l2_entry(path, lambda l1: S.L2E_COPIED | (1 << 40))
    with Qcow2Writer(path) as w:
        with pytest.raises(CorruptImage, match="past the end"):
            w.read(0, 10)
        with pytest.raises(CorruptImage, match="past the end"):
            w.write(0, b"x")


def test_data_cluster_on_metadata_is_corrupt(tmp_path):
    """An L2 entry aimed at the L1 table must not be written through."""
    path = str(tmp_path / "m.qcow2")
    _create(path, 1 * MiB, "cluster_size=4k")
    qemu.qemu_io(path, "write -P 1 0 4k")
    _set_first_l2_entry(path, lambda l1: S.L2E_COPIED | l1)
    before = open(path, "rb").read()
    with Qcow2Writer(path) as w:
        with pytest.raises(CorruptImage, match="metadata"):
            w.write(0, b"x" * 4096)
    assert open(path, "rb").read() == before


# --------------------------------------------------------------------------
# 5. allocated_runs

@pytest.mark.parametrize("options", ["cluster_size=4k", "compat=0.10,cluster_size=1k",
                                     "extended_l2=on,cluster_size=16k,refcount_bits=8"])
def test_allocated_runs_match_qemu_map(tmp_path, options):
    base = str(tmp_path / "base.qcow2")
    path = str(tmp_path / "top.qcow2")
    _create(base, 1 * MiB, "cluster_size=64k")
    qemu.qemu_io(base, "write -P 9 0 1M")
    _create(path, 1 * MiB, options, base, "qcow2")
    qemu.qemu_io(path, "write -P 1 0 20k", "write -z 100k 32k")
    qemu.qemu_io(path, "write -c -P 2 256k 32k")
    below = _below_of(qemu.to_raw(base))
    model = bytearray(qemu.to_raw(path))
    with Qcow2Writer(path, below) as w:
        assert_same_map(w, path)
        for op in [("random", 3, 5000, 1), ("write_zeroes", 64 * KiB, 64 * KiB, 0),
                   ("pattern", 260 * KiB, 100, 4), ("zeros", 500 * KiB, 48 * KiB, 0),
                   ("random", 700 * KiB, 100 * KiB, 2)]:
            _apply(w, model, op)
            assert_same_map(w, path)
        assert w.read(0, w.size) == model
    _assert_clean(path)
    assert qemu.to_raw(path) == model


# --------------------------------------------------------------------------
# 6. partial writes of new clusters

def _host_of(path, guest):
    for e in qemu.map_json(path):
        if e["start"] <= guest < e["start"] + e["length"] and e.get("data"):
            return e["offset"] + guest - e["start"]
    return None


@pytest.mark.parametrize("write_back", [False, True])
def test_partial_write_into_a_fresh_cluster_past_the_end(tmp_path, write_back):
    """Only the data is written; the rest of the cluster is a hole, and the
    file is extended to cover it before the tables point at it."""
    path = str(tmp_path / "d.qcow2")
    _create(path, 4 * MiB, "cluster_size=64k")
    model = bytearray(4 * MiB)
    with Qcow2Writer(path, write_back=write_back) as w:
        for op in [("pattern", 3 * 64 * KiB + 8 * KiB, 4 * KiB, 1),
                   ("random", 10 * 64 * KiB + 60 * KiB, 4 * KiB, 2),   # the cluster's tail
                   ("random", 20 * 64 * KiB, 100, 3)]:                 # its head
            _apply(w, model, op)
        assert w.read(0, w.size) == model
    _assert_clean(path)
    assert qemu.to_raw(path) == model
    for guest in (3 * 64 * KiB, 10 * 64 * KiB, 20 * 64 * KiB):
        host = _host_of(path, guest)
        assert host is not None and os.path.getsize(path) >= host + 64 * KiB


@pytest.mark.parametrize("write_back", [False, True])
def test_partial_write_into_a_reused_cluster_zeroes_the_rest(tmp_path, write_back):
    """A freed cluster inside the file still holds its old bytes: a write
    of part of a new cluster that reuses it must zero the rest."""
    path = str(tmp_path / "d.qcow2")
    _create(path, 4 * MiB, "cluster_size=64k")
    model = bytearray(4 * MiB)
    with Qcow2Writer(path, write_back=write_back) as w:
        _apply(w, model, ("pattern", 0, 64 * KiB, 0xAA))
        w.flush()
        old_host = _host_of(path, 0)
        _apply(w, model, ("write_zeroes", 0, 64 * KiB, 0))   # frees old_host
        w.flush()
        _apply(w, model, ("pattern", 5 * 64 * KiB + 4 * KiB, 4 * KiB, 7))
        w.flush()
        assert _host_of(path, 5 * 64 * KiB) == old_host   # the freed cluster was reused
        assert w.read(0, w.size) == model
    _assert_clean(path)
    assert qemu.to_raw(path) == model


# --------------------------------------------------------------------------
# 7. copy_from: clusters copied file to file by the kernel

@pytest.mark.parametrize("kernel_copy", [True, False])
@pytest.mark.parametrize("write_back", [False, True])
def test_copy_from_matches_write(tmp_path, monkeypatch, write_back, kernel_copy):
    """copy_from gives the guest the same bytes as write() of the source's
    bytes: whole clusters, partial ones over a backing view, in-place
    overwrites, and a source range running past the end of its file."""
    if not kernel_copy:
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    base = str(tmp_path / "base.qcow2")
    path = str(tmp_path / "top.qcow2")
    _create(base, 2 * MiB, "cluster_size=64k")
    qemu.qemu_io(base, "write -P 9 0 2M")
    _create(path, 2 * MiB, "cluster_size=64k", base, "qcow2")
    source_bytes = random.Random(5).randbytes(1 * MiB + 1000)
    source = tmp_path / "source.bin"
    source.write_bytes(source_bytes)
    model = bytearray(qemu.to_raw(path))
    ops = [(0, 0, 256 * KiB),                     # whole clusters
           (300 * KiB, 7, 10 * KiB),              # part of a cluster: the rest from below
           (64 * KiB, 4096, 64 * KiB),            # overwrite in place
           (1 * MiB, 1 * MiB - 4096, 64 * KiB)]   # past the source's end: zeros
    fd = os.open(source, os.O_RDONLY)
    try:
        with Qcow2Writer(path, _below_of(qemu.to_raw(base)), write_back=write_back) as w:
            for guest, src, n in ops:
                w.copy_from(guest, fd, src, n)
                chunk = source_bytes[src:src + n]
                model[guest:guest + n] = chunk + bytes(n - len(chunk))
                assert w.read(0, w.size) == model
    finally:
        os.close(fd)
    _assert_clean(path)
    assert qemu.to_raw(path) == model
