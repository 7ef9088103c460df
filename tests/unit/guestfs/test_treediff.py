"""``snapfs diff`` of two ext4 versions equals a full comparison of the two
trees as the kernel shows them (tests/support/ext4diff.py), for random
trees and random edit sequences: add, remove, write, truncate, chmod,
touch, xattrs, rename of files and directories, hard links, symlinks,
odd names (spaces, newlines, bytes that are not UTF-8)."""

import os
import random
import re
import stat
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapfs.guestfs.probe import open_guest_fs
from snapfs.guestfs.treediff import diff_trees
from snapfs.ops.diff import diff_vm
from snapfs.store.changed import RangeSet
from snapfs.store.store import Store
from tests.support.ext4diff import differing_ranges, kernel_diff, loop_mounted_ro, overlay, run
from tests.support.mounting import snapfs

IMAGE_SIZE = 32 << 20
NAMES = st.lists(st.sampled_from([b"a", b"b", b"c", b"d0", b" ", b"\n", b"\xff",
                                  "é".encode()]), min_size=1, max_size=4).map(b"".join)
OPS = ["add", "add", "write", "write", "remove", "truncate", "chmod", "touch", "xattr",
       "rename", "rename", "mkdir", "rmtree", "link", "symlink"]


def _walk(root):
    """(directories, other entries) under ``root`` (bytes paths), without lost+found."""
    dirs, others = [root], []
    for parent, subdirs, files in os.walk(root):
        if parent == root and b"lost+found" in subdirs:
            subdirs.remove(b"lost+found")
        dirs += [os.path.join(parent, d) for d in subdirs]
        others += [os.path.join(parent, f) for f in files]
    return dirs, others


def _content(rnd, size):
    # Mostly random, sometimes runs of zeros (holes in the making).
    return rnd.randbytes(size) if rnd.random() < 0.8 else bytes(size)


def _build_base(src, data, rnd):
    os.makedirs(src)
    dirs = [src]
    for _ in range(data.draw(st.integers(0, 4), label="dirs")):
        path = os.path.join(rnd.choice(dirs), data.draw(NAMES, label="dir name"))
        if not os.path.exists(path):
            os.mkdir(path)
            dirs.append(path)
    for _ in range(data.draw(st.integers(0, 8), label="files")):
        path = os.path.join(rnd.choice(dirs), data.draw(NAMES, label="file name"))
        if not os.path.exists(path):
            size = data.draw(st.sampled_from([0, 10, 3000, 70_000, 300_000]), label="size")
            with open(path, "wb") as f:
                f.write(_content(rnd, size))


def _edit(root, data, rnd):
    """Apply a random sequence of edits under mounted ``root``."""
    for _ in range(data.draw(st.integers(1, 10), label="edits")):
        op = data.draw(st.sampled_from(OPS), label="op")
        dirs, others = _walk(root)
        files = [p for p in others if not os.path.islink(p)]
        where = os.path.join(rnd.choice(dirs), data.draw(NAMES, label="name"))
        try:
            if op == "add" and not os.path.lexists(where):
                with open(where, "wb") as f:
                    f.write(_content(rnd, rnd.choice([0, 50, 5000, 100_000])))
            elif op == "write" and files:
                with open(rnd.choice(files), "r+b") as f:
                    f.seek(rnd.randrange(0, 200_000))
                    f.write(_content(rnd, rnd.choice([1, 4096, 20_000])))
            elif op == "truncate" and files:
                os.truncate(rnd.choice(files), rnd.randrange(0, 100_000))
            elif op == "remove" and others:
                os.unlink(rnd.choice(others))
            elif op == "chmod" and len(dirs) + len(files) > 1:
                os.chmod(rnd.choice(dirs[1:] + files), rnd.choice([0o600, 0o755, 0o4711]))
            elif op == "touch" and files:
                os.utime(rnd.choice(files), ns=(10**18, rnd.randrange(1, 10**18)))
            elif op == "xattr" and files:
                os.setxattr(rnd.choice(files), "user.k", rnd.randbytes(rnd.choice([1, 100])))
            elif op == "rename" and len(dirs) + len(others) > 1:
                os.rename(rnd.choice(dirs[1:] + others), where)
            elif op == "mkdir" and not os.path.lexists(where):
                os.mkdir(where)
            elif op == "rmtree" and len(dirs) > 1:
                subprocess.run(["rm", "-rf", "--", rnd.choice(dirs[1:])], check=True)
            elif op == "link" and files and not os.path.lexists(where):
                os.link(rnd.choice(files), where)
            elif op == "symlink" and not os.path.lexists(where):
                os.symlink(rnd.choice([b"a", b"../x", b"/etc/hosts"]), where)
        except OSError:
            pass        # a move into itself, over a non-empty directory...: not an edit


def _versions(work, data):
    """base.raw and edited.raw: an ext4 filesystem before and after edits."""
    rnd = random.Random(data.draw(st.integers(0, 2**32), label="seed"))
    src = os.path.join(os.fsencode(work), b"src")
    _build_base(src, data, rnd)
    base, edited = work / "base.raw", work / "edited.raw"
    with open(base, "wb") as f:
        f.truncate(IMAGE_SIZE)
    # No inline_data: the kernel's edits of such a filesystem leaked a
    # journal handle here once (6.18), hanging every later sync.
    run("mkfs.ext4", "-q", "-d", os.fsdecode(src), base)
    run("cp", "--sparse=always", base, edited)
    mnt = work / "mnt"
    mnt.mkdir()
    run("mount", "-o", "loop", edited, mnt)
    try:
        _edit(os.fsencode(mnt), data, rnd)
    finally:
        run("umount", mnt)
    return base, edited


def _store_of(work, base, edited):
    """A store with VM "vm": snapshots "base" and "s1" (= edited), active = s1."""
    overlay(base, "raw", edited, work / "s1.qcow2", work)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "s1.qcow2", "-F", "qcow2",
        work / "top.qcow2")
    store = work / "store"
    snapfs("init", store)
    snapfs("vm", "add", store, "vm", "--disk", f"sda={work / 'top.qcow2'}")
    return Store.open(store)


def _changes(store, a, b):
    [disk] = diff_vm(store, "vm", a, b)
    [view] = disk.views
    assert view.status in ("compared", "unchanged"), view.reason
    assert view.damaged == []
    return sorted((c.path, c.change, c.new_path) for c in view.changes)


# SNAPFS_TREEDIFF_EXAMPLES=200 for a longer search than the default run's.
@settings(max_examples=int(os.environ.get("SNAPFS_TREEDIFF_EXAMPLES", "10")), deadline=None)
@given(data=st.data())
def test_diff_equals_a_full_kernel_comparison(tmp_path_factory, data):
    work = tmp_path_factory.mktemp("treediff")
    base, edited = _versions(work, data)
    store = _store_of(work, base, edited)
    expected = kernel_diff(base, edited, work)
    assert _changes(store, "base", "s1") == expected
    assert _changes(store, "base", "active") == expected
    assert _changes(store, "s1", "base") == kernel_diff(edited, base, work)


def test_unchanged_files_are_not_read_in_b(tmp_path):
    """One file of 300 changed: B's stats and listings stay few."""
    src = tmp_path / "src"
    for d in range(10):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(30):
            (src / f"d{d}" / f"f{f}").write_bytes(os.urandom(5000))
    base, edited = tmp_path / "base.raw", tmp_path / "edited.raw"
    with open(base, "wb") as f:
        f.truncate(IMAGE_SIZE)
    run("mkfs.ext4", "-q", "-d", src, base)
    run("cp", "--sparse=always", base, edited)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", "-o", "loop", edited, mnt)
    try:
        with open(mnt / "d3" / "f7", "r+b") as f:
            f.write(b"changed")
    finally:
        run("umount", mnt)
    store = _store_of(tmp_path, base, edited)
    [disk] = diff_vm(store, "vm", "base", "s1")
    [view] = disk.views
    assert sorted((c.change, c.path) for c in view.changes) == [("M", b"/d3/f7")]
    assert sorted((p, c, n) for c, p, n in [(c.change, c.path, c.new_path)
                                            for c in view.changes]) == \
        kernel_diff(base, edited, tmp_path)
    stats = view.stats
    assert stats["dirs_listed_a"] >= 11
    assert stats["dirs_listed_b"] <= 2 and stats["dirs_reused"] >= 10, stats
    # Stat'ed in B: the files whose data shares f7's 64 KiB cluster (a
    # dozen 5000-byte files), not the 300.
    assert stats["stats_b"] <= 30, stats
    assert stats["files_skipped"] >= 270, stats


def test_names_are_escaped_as_zfs_diff_does():
    from snapfs.ops.diff import escape
    assert escape(b"/etc/hosts") == "/etc/hosts"
    assert escape(b"/a b\n\\\t") == "/a\\0040b\\0012\\0134\\0011"
    assert escape(b"/\xff\x01") == "/\\0377\\0001"
    assert escape("/é".encode()) == "/é"


def test_a_directory_loop_is_walked_once_and_reported(tmp_path):
    """d1/d2/up names d1 again (debugfs writes such an entry; no kernel
    would): the diff ends, and still finds the change."""
    src = tmp_path / "src"
    (src / "d1" / "d2").mkdir(parents=True)
    (src / "d1" / "d2" / "f").write_bytes(b"before")
    base, edited = tmp_path / "base.raw", tmp_path / "edited.raw"
    with open(base, "wb") as f:
        f.truncate(IMAGE_SIZE)
    run("mkfs.ext4", "-q", "-d", src, base)
    run("debugfs", "-w", "-R", "link d1 d1/d2/up", base)
    run("cp", "--sparse=always", base, edited)
    run("debugfs", "-w", "-R", "rm d1/d2/f", edited)
    store = _store_of(tmp_path, base, edited)
    [disk] = diff_vm(store, "vm", "base", "s1")
    [view] = disk.views
    assert (b"/d1/d2/f", "-") in [(c.path, c.change) for c in view.changes]
    # The ext reader shows no second way into a directory (guestfs/ext.py),
    # so the loop's entry is not listed, and the walk ends.
    assert all(not c.path.startswith(b"/d1/d2/up") for c in view.changes), view.changes


BLOCK = 4096
# (mkfs, the edit of one block of the file, which block): on ext4 a written
# extent turned unwritten in place (a leaf of a 1000-extent tree changes,
# the data block stays as it was); on ext3 a block punched out under the
# double-indirect block (an indirect block changes, the freed block not).
MAP_EDITS = {
    "ext4-extent-leaf": ("mkfs.ext4", ["fallocate", "-z"], 1000),
    "ext3-double-indirect": ("mkfs.ext3", ["fallocate", "-p", "-n"], 1060),
}


def _fragmented_file(mnt, ext4):
    """/f on the mounted filesystem: on ext4 every other block written (one
    extent each, so a tree of several leaves); on ext3 1100 blocks, past
    the double-indirect block's start (12 + 1024)."""
    rnd = random.Random(7)
    with open(mnt / "f", "wb") as f:
        for block in (range(0, 2000, 2) if ext4 else range(1100)):
            os.pwrite(f.fileno(), rnd.randbytes(BLOCK), block * BLOCK)
        f.truncate(2000 * BLOCK if ext4 else 1100 * BLOCK)
        os.fsync(f.fileno())
    return os.stat(mnt / "f").st_ino


def _inode_record(image, ino):
    """(offset, length) of inode ``ino``'s record, as debugfs locates it."""
    out = run("debugfs", "-R", f"imap <{ino}>", image, text=True).stdout
    block, offset = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", out).groups()
    size = re.search(r"Inode size:\s+(\d+)", run("dumpe2fs", "-h", image, text=True).stdout)
    return int(block) * BLOCK + int(offset, 16), int(size.group(1))


def _map_blocks(image, ino):
    """The extent tree or indirect blocks of an inode, from debugfs."""
    out = run("debugfs", "-R", f"stat <{ino}>", image, text=True).stdout
    return {int(b) for b in re.findall(r"\((?:ETB\d+|IND|DIND|TIND)\):(\d+)", out)}


def _data_extents(mnt, name):
    """[(byte offset, length)] of a file's data on its device (FIEMAP)."""
    out = run("filefrag", "-v", "-b4096", mnt / name, text=True).stdout
    return [(int(phys) * BLOCK, (int(phys_end) - int(phys) + 1) * BLOCK)
            for phys, phys_end in re.findall(r"^\s*\d+:\s+\d+\.\.\s+\d+:\s+(\d+)\.\.\s*(\d+):",
                                             out, re.M)]


@pytest.mark.parametrize("case", sorted(MAP_EDITS))
def test_a_change_only_in_the_file_map_is_found(tmp_path, case):
    """B differs from A, for /f, only in one block of its map (an extent
    leaf, an indirect block) and what it maps: the record and every data
    block A had are the same bytes.  A diff that skipped a file on its
    record and data alone would miss the change."""
    mkfs, edit, block = MAP_EDITS[case]
    base, edited = tmp_path / "base.raw", tmp_path / "edited.raw"
    with open(base, "wb") as f:
        f.truncate(IMAGE_SIZE)
    run(mkfs, "-q", "-b", str(BLOCK), "-O", "^inline_data", base)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", "-o", "loop", base, mnt)
    try:
        ino = _fragmented_file(mnt, mkfs == "mkfs.ext4")
    finally:
        run("umount", mnt)
    run("cp", "--sparse=always", base, edited)
    run("mount", "-o", "loop", edited, mnt)
    try:
        run(*edit, "-o", str(block * BLOCK), "-l", str(BLOCK), mnt / "f")
    finally:
        run("umount", mnt)
    # The edit's new times (and i_blocks) are put back: the record is A's.
    start, length = _inode_record(base, ino)
    with open(base, "rb") as a, open(edited, "r+b") as b:
        a.seek(start)
        b.seek(start)
        b.write(a.read(length))
    changed = differing_ranges(base, edited, BLOCK)
    maps = _map_blocks(base, ino)
    assert len(maps) >= 2, maps
    assert any(s // BLOCK in maps for s, _ in changed), (maps, changed)
    with loop_mounted_ro(base, tmp_path / "a") as a:
        data = _data_extents(a, "f")
    assert len(data) > 4
    assert not any(s < d + n and d < s + length for s, length in changed for d, n in data), \
        "a data block of A changed: the case would not test the map"
    expected = kernel_diff(base, edited, tmp_path)
    assert expected == [(b"/f", "M", None)]
    # The changed set at the block's grain (a qcow2 layer's 64 KiB clusters
    # would also hold some of the file's data blocks, next to its map).
    with open(base, "rb") as fa, open(edited, "rb") as fb:
        fs_a, _ = open_guest_fs(_file_reader(fa), IMAGE_SIZE)
        fs_b, _ = open_guest_fs(_file_reader(fb), IMAGE_SIZE)
        found = diff_trees(fs_a, fs_b, RangeSet((s, s + n) for s, n in changed))
        assert found.stats["files_skipped"] > 0
        # A reader that does not promise every map block gets no shortcut.
        fs_a.exact_metadata_ranges = fs_b.exact_metadata_ranges = False
        in_full = diff_trees(fs_a, fs_b, RangeSet((s, s + n) for s, n in changed))
        assert in_full.stats["files_skipped"] == 0
    assert found.damaged == [] and in_full.damaged == []
    assert [(c.path, c.change, c.new_path) for c in found.changes] == expected
    assert in_full.changes == found.changes


def _file_reader(f):
    return lambda offset, length: os.pread(f.fileno(), length, offset)


def test_the_ext_readers_diff_calls_agree_with_the_interface(tmp_path):
    """``listdir_known`` lists as ``listdir`` does, told the types or not
    (a directory is checked all the same); ``layout`` is ``stat``'s type, ``metadata_ranges`` and
    ``runs``; the ranges hold the extent tree blocks debugfs names.  On
    an image with inline files, a deep extent tree, symlinks and devices."""
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    for i in range(40):
        (src / "d" / f"f{i}").write_bytes(os.urandom(i * 97))
    with open(src / "sparse", "wb") as f:
        for block in range(0, 1200, 2):             # 600 extents: a tree of two leaves
            f.seek(block * BLOCK)
            f.write(os.urandom(BLOCK))
    os.symlink("d/f1", src / "link")
    os.symlink("x" * 200, src / "long-link")
    os.mkfifo(src / "fifo")
    image = tmp_path / "fs.raw"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    # mkfs writes it; no kernel mounts it (inline_data, see _versions).
    run("mkfs.ext4", "-q", "-b", str(BLOCK), "-O", "inline_data", "-d", src, image)
    with open(image, "rb") as f:
        fs, _ = open_guest_fs(_file_reader(f), IMAGE_SIZE)
        fresh, _ = open_guest_fs(_file_reader(f), IMAGE_SIZE)
        types, todo = {fs.root: stat.S_IFDIR}, [fs.root]
        while todo:
            d = todo.pop()
            listing = fs.listdir(d)
            assert fs.listdir_known(d, None) == listing
            types.update((child, kind) for _, child, kind in listing)
            # Told the types, or that everything is a directory (which is
            # checked): the same answer, from a reader that cached nothing.
            assert fresh.listdir_known(d, types.get) == listing
            assert fresh.listdir_known(d, lambda ino: stat.S_IFDIR) == listing
            todo += [child for _, child, kind in listing if kind == stat.S_IFDIR]
        for ino, kind in types.items():
            assert fs.layout(ino) == (stat.S_IFMT(fs.stat(ino).mode), fs.metadata_ranges(ino),
                                      fs.runs(ino))
            assert kind == stat.S_IFMT(fs.stat(ino).mode)
        sparse = next(c for n, c, _ in fs.listdir(fs.root) if n == b"sparse")
        leaves = _map_blocks(image, sparse)
        assert len(leaves) >= 2
        assert {s // BLOCK for s, _ in fs.metadata_ranges(sparse)[1:]} == leaves
