"""Rows 15-16: the file trees of a snapshot (``snapshots/<snap>/sda.files/``)
against the kernel's ext4 on a loop mount of the same view.

Input (fixed seed): a 2 GiB ext4 made by ``mkfs.ext4 -d`` from ``small/``,
10,000 files of 100 B - 4 KiB in 500 directories (25 x 20, 20 files each),
and ``big/``, 1 GiB in files of 1-50 MiB; imported as a raw disk
without a partition table, so the snapshot shows ``sda.raw`` and
``sda.files/``.  (--quick: 2,000 small files, 128 MiB of big ones.)

Both sides read the same chain through the same snapfs mount: the
reference is ``mount -o loop,ro`` of the snapshot's ``sda.raw``.  Each run
mounts snapfs afresh (its own caches start empty), then, in alternating
order, each side runs:

* row 15: ``find`` over ``small/`` with caches dropped before (cold), then
  again (warm); seconds, target snapfs / loop <= 2;
* row 16: ``cp -r big/`` into /dev/shm (so the destination costs no disk
  I/O), cold then warm; MB/s, target snapfs / loop >= 0.5.
"""

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import GiB, MiB, ROOT, SEED, SNAPFS, SnapfsMount, drop_caches, median, ratio_row, run


def _build(work, quick):
    rnd = random.Random(SEED)
    top_dirs, sub_dirs, files = (10, 10, 20) if quick else (25, 20, 20)
    big_total = 128 * MiB if quick else GiB
    # The source tree lives in RAM only until mkfs has copied it.
    src = Path(tempfile.mkdtemp(prefix="snapfs-bench-trees-src-", dir="/dev/shm"))
    try:
        for t in range(top_dirs):
            for s in range(sub_dirs):
                d = src / "small" / f"t{t:02}" / f"s{s:02}"
                d.mkdir(parents=True)
                for f in range(files):
                    (d / f"f{f:02}").write_bytes(rnd.randbytes(rnd.randrange(100, 4096)))
        written, n = 0, 0
        while written < big_total:
            size = min(rnd.randrange(1, 51) * MiB, big_total - written)
            d = src / "big" / f"b{n % 4}"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"file{n:03}", "wb") as out:
                for at in range(0, size, 16 * MiB):
                    out.write(rnd.randbytes(min(16 * MiB, size - at)))
            written, n = written + size, n + 1
        image = work / "sda.raw"
        with open(image, "wb") as f:
            f.truncate((GiB // 2) if quick else 2 * GiB)
        run("mkfs.ext4", "-q", "-d", src, image)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    store = work / "store"
    run(*SNAPFS, "init", store, cwd=ROOT)
    run(*SNAPFS, "vm", "add", store, "vm", "--disk", f"sda={image}", "--move", cwd=ROOT)
    return store, top_dirs * sub_dirs * files, big_total


class LoopMount:
    """``mount -o ro`` of a view through a read-only loop device."""

    def __init__(self, view, mountpoint):
        self.view, self.mnt = view, Path(mountpoint)

    def __enter__(self):
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.dev = run("losetup", "-f", "--show", "-r", self.view).stdout.strip()
        try:
            run("mount", "-o", "ro", self.dev, self.mnt)
        except BaseException:
            run("losetup", "-d", self.dev)
            raise
        return self

    def __exit__(self, *exc):
        try:
            run("umount", self.mnt)
        finally:
            run("losetup", "-d", self.dev)


def _find(root):
    start = time.perf_counter()
    subprocess.run(["find", str(root)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _copy(root, total):
    """MB/s of ``cp -r`` of ``root`` into /dev/shm (the copy is removed)."""
    dest = Path(tempfile.mkdtemp(prefix="snapfs-bench-trees-cp-", dir="/dev/shm"))
    try:
        start = time.perf_counter()
        subprocess.run(["cp", "-r", str(root), str(dest)], check=True)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    return total / seconds / 1e6


def _one_side(root, total, out):
    drop_caches()
    out.setdefault("find_cold", []).append(_find(root / "small"))
    out.setdefault("find_warm", []).append(_find(root / "small"))
    drop_caches()
    out.setdefault("cp_cold", []).append(_copy(root / "big", total))
    out.setdefault("cp_warm", []).append(_copy(root / "big", total))


def _check_same(ours, loop, count):
    """Both sides list the same small tree (a bench of a wrong tree is void)."""
    def names(root):
        return sorted(os.path.relpath(os.path.join(d, f), root)
                      for d, _, fs in os.walk(root) for f in fs)
    a, b = names(ours / "small"), names(loop / "small")
    if a != b or len(a) != count:
        raise SystemExit(f"bench: trees: snapfs lists {len(a)} files, the loop mount {len(b)}")


def measure(work, quick, runs):
    work.mkdir(parents=True)
    print("bench: trees: building the ext4 image", file=sys.stderr)
    store, count, total = _build(work, quick)
    ours, loop = {}, {}
    for r in range(runs):
        with SnapfsMount(store, work / "mnt") as mount:
            snaps = mount.mnt / "vm" / "snapshots"
            if not os.listdir(snaps):
                os.mkdir(snaps / "s")
            snap = snaps / sorted(os.listdir(snaps))[0]
            files = snap / "sda.files"
            os.stat(files)          # the tree is opened, as the loop side is mounted
            with LoopMount(snap / "sda.raw", work / "loop") as lm:
                if r == 0:
                    _check_same(files, lm.mnt, count)
                sides = [(files, ours), (lm.mnt, loop)]
                for root, out in (sides if r % 2 == 0 else sides[::-1]):
                    _one_side(root, total, out)
    m = {k: median(v) for k, v in ours.items()}
    lo = {k: median(v) for k, v in loop.items()}
    name = "loop mount of the view"
    label = f"{count:,} files" if quick else "10,000 files"
    size = f"{total // MiB} MiB" if quick else "1 GiB"
    return [
        ratio_row("15", f"find over a tree of {label}, cold", "s", m["find_cold"],
                  lo["find_cold"], name, maximum=2),
        ratio_row("15", f"find over a tree of {label}, warm", "s", m["find_warm"],
                  lo["find_warm"], name, maximum=2),
        ratio_row("16", f"cp -r of a {size} tree to /dev/shm, cold", "MB/s", m["cp_cold"],
                  lo["cp_cold"], name, minimum=0.5),
        ratio_row("16", f"cp -r of a {size} tree to /dev/shm, warm", "MB/s", m["cp_warm"],
                  lo["cp_warm"], name, minimum=0.5),
    ]
