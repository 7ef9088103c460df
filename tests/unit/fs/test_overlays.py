"""Throwaway overlays (snapfs/fs/overlays.py) against a bytearray model:
random writes of any alignment, reads of any range, the scratch limit, and
that nothing of an overlay outlives it."""

import errno
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapfs.errors import NoSpace
from snapfs.fs.overlays import BLOCK, Extents, Scratch
from snapfs.store.scratch import OVERLAY_PREFIX, leftover_overlays, remove_leftover_overlays


class Base:
    """An immutable view: fixed bytes, counting reads."""

    def __init__(self, data):
        self.data = bytes(data)
        self.size = len(data)

    def read(self, offset, length):
        return self.data[offset:offset + length]


def _scratch_files(directory):
    return os.listdir(directory) if os.path.isdir(directory) else []


sizes = st.integers(1, 5 * BLOCK + 123)


@st.composite
def sessions(draw):
    size = draw(sizes)
    steps = []
    for _ in range(draw(st.integers(1, 25))):
        offset = draw(st.integers(0, size - 1))
        length = draw(st.integers(0, min(size - offset, 3 * BLOCK)))
        steps.append((draw(st.sampled_from(["write", "read"])), offset, length))
    return size, steps


@settings(max_examples=200, deadline=None)
@given(sessions(), st.randoms())
def test_reads_follow_writes_and_base_stays(tmp_path_factory, session, rnd):
    size, steps = session
    directory = tmp_path_factory.mktemp("scratch") / "scratch"
    base = Base(rnd.randbytes(size))
    model = bytearray(base.data)
    scratch = Scratch(str(directory), limit=1 << 30)
    overlay = scratch.open(base, "vm/snapshots/s/sda.raw", owner="vm")
    for kind, offset, length in steps:
        if kind == "write":
            data = rnd.randbytes(length)
            assert overlay.write(offset, data) == length
            model[offset:offset + length] = data
        else:
            assert overlay.read(offset, length) == bytes(model[offset:offset + length])
    assert overlay.read(0, size + 10) == bytes(model)
    # Accounting: whole blocks, at most the view rounded up.
    assert overlay.bytes % BLOCK == 0 and overlay.bytes <= -(-size // BLOCK) * BLOCK
    assert scratch.used == overlay.bytes
    assert scratch.overlays("vm") == [("vm/snapshots/s/sda.raw", overlay.bytes)]
    overlay.close()
    assert scratch.used == 0 and scratch.overlays("vm") == []
    assert base.data == bytes(base.data)
    # The file had no name while open, and none is left.
    assert _scratch_files(directory) == []


def test_write_past_the_end_is_refused(tmp_path):
    scratch = Scratch(str(tmp_path / "s"), limit=1 << 20)
    overlay = scratch.open(Base(b"x" * 5000), "v")
    with pytest.raises(NoSpace):
        overlay.write(4999, b"ab")
    assert overlay.read(0, 5000) == b"x" * 5000
    overlay.close()


def test_scratch_limit_gives_enospc_and_space_comes_back(tmp_path):
    scratch = Scratch(str(tmp_path / "s"), limit=4 * BLOCK)
    a = scratch.open(Base(bytes(16 * BLOCK)), "a")
    b = scratch.open(Base(bytes(16 * BLOCK)), "b")
    a.write(0, b"1" * (3 * BLOCK))
    # One byte costs a whole block.
    b.write(10, b"2")
    with pytest.raises(NoSpace) as e:
        b.write(5 * BLOCK, b"3")
    assert e.value.errno == errno.ENOSPC
    # The refused write left nothing behind; rewriting written blocks is free.
    assert b.read(5 * BLOCK, 1) == b"\0"
    a.write(BLOCK, b"4" * BLOCK)
    a.close()
    b.write(5 * BLOCK, b"3")
    assert b.read(5 * BLOCK, 1) == b"3"
    b.close()
    assert scratch.used == 0


def test_extents_merge():
    ext = Extents()
    rnd = random.Random(7)
    covered = set()
    for _ in range(300):
        start = rnd.randrange(0, 200)
        end = start + rnd.randrange(1, 20)
        assert ext.uncovered(start, end) == len(set(range(start, end)) - covered)
        ext.add(start, end)
        covered |= set(range(start, end))
        # Kept disjoint, sorted and merged.
        pairs = list(zip(ext.starts, ext.ends))
        assert all(e1 < s2 for (_, e1), (s2, _) in zip(pairs, pairs[1:]))
        assert set().union(*(range(s, e) for s, e in pairs)) == covered
        for probe in range(0, 225, 5):
            assert ext.covers(probe) == (probe in covered)


def test_leftovers_of_dead_daemons_only(tmp_path):
    directory = tmp_path / "scratch"
    directory.mkdir()
    dead = directory / f"{OVERLAY_PREFIX}999999999-{'0' * 8}-0000-0000-0000-{'0' * 12}"
    mine = directory / f"{OVERLAY_PREFIX}{os.getpid()}-{'1' * 8}-0000-0000-0000-{'0' * 12}"
    other = directory / "notes.txt"
    for path in (dead, mine, other):
        path.write_bytes(b"x")
    assert leftover_overlays(str(directory)) == [str(dead)]
    assert remove_leftover_overlays(str(directory)) == [
        f"removed {dead} (throwaway overlay left by a daemon that died)"]
    assert sorted(os.listdir(directory)) == sorted([mine.name, other.name])
