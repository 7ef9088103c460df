"""Rows 13-14: ``snapfs diff`` of two snapshots that differ by about 1 % of a
4 GiB ext4 filesystem, against a full comparison of the two trees.

Input (fixed seed): a sparse 4 GiB ext4 made by ``mkfs.ext4 -d`` from 100
directories of 100 small files (1-8 KiB) and 8 files of 128 MiB (about
1.04 GiB of content), imported as a raw base (snapshot ``base``).  Through
the mount, the active view is loop-mounted and edited: 40 MiB written over
the big files in 1 MiB pieces, 200 small files rewritten, 50 added, 50
removed, a directory renamed; then ``touch snapshots/after``.  (--quick:
1 GiB, 20 x 100 files, 4 x 64 MiB, 10 MiB written.)

Both sides run in this process on the same store, alternating, warm
(row 13: the layer files in the page cache) and cold (row 14: caches
dropped before each run):

* snapfs: ``ops.diff.diff_vm(store, VM, "base", "after")``;
* reference: what virt-diff does, through the same GuestFs readers: walk
  both trees, stat every inode, read every file's content in full (and
  its xattrs, link target), then compare the two.

The two must name the same changed paths (the reference knows no renames,
so it is compared by path: R counts as - and +).
"""

import hashlib
import os
import random
import stat as S

from .common import (GiB, MiB, ROOT, SEED, SNAPFS, SnapfsMount, drop_caches, median,
                     ratio_row, run, timed)

CHUNK = 1 << 20


def _build(work, quick):
    rnd = random.Random(SEED)
    src = work / "src"
    dirs, files, big_count, big_size = (20, 100, 4, 64 * MiB) if quick else (100, 100, 8, 128 * MiB)
    for d in range(dirs):
        (src / f"d{d:03}").mkdir(parents=True)
        for f in range(files):
            (src / f"d{d:03}" / f"f{f:03}").write_bytes(rnd.randbytes(rnd.randrange(1024, 8192)))
    (src / "big").mkdir()
    for b in range(big_count):
        with open(src / "big" / f"b{b}", "wb") as out:
            for _ in range(big_size // (16 * MiB)):
                out.write(rnd.randbytes(16 * MiB))
    image = work / "base.raw"      # imported as snapshot "base"
    with open(image, "wb") as f:
        f.truncate(GiB if quick else 4 * GiB)
    run("mkfs.ext4", "-q", "-d", src, image)
    run("rm", "-rf", src)
    store = work / "store"
    run(*SNAPFS, "init", store, cwd=ROOT)
    run(*SNAPFS, "vm", "add", store, "vm", "--disk", f"sda={image}", "--move", cwd=ROOT)
    with SnapfsMount(store, work / "mnt") as mount:
        vm = mount.mnt / "vm"
        edit = work / "edit"
        edit.mkdir()
        loop = run("losetup", "-f", "--show", vm / "active" / "sda.raw").stdout.strip()
        try:
            run("mount", loop, edit)
            try:
                _edit(edit, rnd, dirs, files, big_count, big_size, 10 * MiB if quick else 40 * MiB)
            finally:
                run("umount", edit)
        finally:
            run("losetup", "-d", loop)
        (vm / "snapshots" / "after").touch()
    return store


def _edit(root, rnd, dirs, files, big_count, big_size, written):
    for _ in range(written // MiB):
        with open(root / "big" / f"b{rnd.randrange(big_count)}", "r+b") as f:
            f.seek(rnd.randrange(0, big_size - MiB))
            f.write(rnd.randbytes(MiB))
    for _ in range(200):
        path = root / f"d{rnd.randrange(dirs):03}" / f"f{rnd.randrange(files):03}"
        path.write_bytes(rnd.randbytes(rnd.randrange(1024, 8192)))
    for i in range(50):
        (root / f"d{rnd.randrange(dirs):03}" / f"new{i}").write_bytes(rnd.randbytes(4096))
    removed = set()
    while len(removed) < 50:
        path = root / f"d{rnd.randrange(dirs):03}" / f"f{rnd.randrange(files):03}"
        if path not in removed:
            removed.add(path)
            path.unlink()
    os.rename(root / "d001", root / "d001-renamed")
    run("sync", "-f", root)         # this filesystem only


# -- the reference: a full comparison -----------------------------------------

def _full_tree(fs):
    """{path: everything the rules compare} of every name, reading all."""
    out, todo, seen = {}, [(fs.root, b"")], set()
    while todo:
        ino, path = todo.pop()
        if ino in seen:
            continue
        seen.add(ino)
        for name, child, _ in fs.listdir(ino):
            st = fs.stat(child)
            key = [child, st.generation, st.mode, st.uid, st.gid, st.size, st.mtime_ns, st.rdev,
                   sorted(fs.xattrs(child).items())]
            if S.S_ISLNK(st.mode):
                key.append(fs.readlink(child))
            elif S.S_ISREG(st.mode):
                key.append(_digest(fs, child, st.size))
            out[path + b"/" + name] = key
            if st.is_dir:
                todo.append((child, path + b"/" + name))
    return out


def _digest(fs, ino, size):
    inline = fs.inline_data(ino)
    if inline is not None:
        return hashlib.sha256(inline).digest()
    runs, h = fs.runs(ino), hashlib.sha256()
    for at in range(0, size, CHUNK):
        h.update(fs.read_file(runs, at, min(CHUNK, size - at)))
    return h.digest()


def full_compare(store, vm, a, b):
    """Changed paths by a full walk of both trees: {path: "+" | "-" | "M"}."""
    from snapfs.guestfs.probe import open_guest_fs
    from snapfs.store.chain import Chain
    from snapfs.store.volume import VolumePool
    m = store.load_vm(vm)
    pool = VolumePool()
    try:
        trees = []
        for name in (a, b):
            chain = Chain(pool, store.chain_refs(m, m.snapshot(name).volumes["sda"]))
            fs, why = open_guest_fs(chain.read, chain.size)
            if fs is None:
                raise SystemExit(f"bench: {why}")
            trees.append(_full_tree(fs))
    finally:
        pool.close()
    ta, tb = trees
    out = {p: "-" for p in ta.keys() - tb.keys()}
    out.update((p, "+") for p in tb.keys() - ta.keys())
    out.update((p, "M") for p in ta.keys() & tb.keys() if ta[p] != tb[p])
    return out


def _snapfs_paths(disks):
    out = {}
    for disk in disks:
        for view in disk.views:
            for c in view.changes:
                if c.change == "R":
                    out[c.path], out[c.new_path] = "-", "+"
                elif c.path != b"/":
                    out[c.path] = c.change
    return out


def _timed_runs(store, runs, cold):
    """([snapfs seconds], [reference seconds], snapfs paths, reference paths, stats)."""
    from snapfs.ops.diff import diff_vm
    ours, theirs = [], []
    found = reference = stats = None
    for i in range(runs):
        order = ["snapfs", "full"] if i % 2 == 0 else ["full", "snapfs"]
        for side in order:
            if cold:
                drop_caches()
            if side == "snapfs":
                seconds, disks = timed(diff_vm, store, "vm", "base", "after")
                stats, found = disks[0].views[0].stats, _snapfs_paths(disks)
                ours.append(seconds)
            else:
                seconds, reference = timed(full_compare, store, "vm", "base", "after")
                theirs.append(seconds)
    return ours, theirs, found, reference, stats


def measure(work, quick, runs):
    from snapfs.store.store import Store
    work.mkdir(parents=True)
    store = Store.open(_build(work, quick))
    rows = []
    label = "1 GiB" if quick else "4 GiB"
    for number, cold in (("13", False), ("14", True)):
        ours, theirs, found, reference, stats = _timed_runs(store, runs, cold)
        # A renamed directory's children: one R to snapfs, - and + by path.
        moved = (b"/d001/", b"/d001-renamed/", b"/d001", b"/d001-renamed")
        if {p: c for p, c in reference.items() if not p.startswith(moved)} != \
                {p: c for p, c in found.items() if not p.startswith(moved)}:
            raise SystemExit("bench: snapfs diff and the full comparison disagree")
        print(f"bench: diff ({'cold' if cold else 'warm'}): {stats}", flush=True)
        rows.append(ratio_row(number, f"diff of two snapshots 1 % apart, {label} ext4 "
                              f"({'cold' if cold else 'warm'} cache)", "s", median(ours),
                              median(theirs), "full tree walk + compare", maximum=0.2))
    return rows
