"""Row 4: writes through the active view, against QEMU's writable FUSE export.

Each run writes into a fresh, empty qcow2 disk (64 KiB clusters) on both
sides, so every write allocates, and ends with fsync(): a write counts
once it is durable.  Sequential: 1 MiB writes over the first 512 MiB
(128 MiB with --quick).  Random: 4 KiB writes at fixed-seed offsets, each
in a cluster of its own, so each one allocates a cluster and fills the
rest of it with zeros.
"""

import os
import random
import sys
import time

from .common import MiB, ROOT, SEED, SNAPFS, SnapfsMount, median, ratio_row, run
from .reads import Qsd

DISK = 2048 * MiB
RANDOM_WRITES = 2000


def sequential(path, total):
    block = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY)
    try:
        start = time.perf_counter()
        for off in range(0, total, MiB):
            os.pwrite(fd, block, off)
        os.fsync(fd)
        return total / (time.perf_counter() - start) / 1e6
    finally:
        os.close(fd)


def random_writes(path):
    rng = random.Random(SEED)
    clusters = rng.sample(range(DISK // 65536), RANDOM_WRITES)
    offsets = [c * 65536 + rng.randrange(16) * 4096 for c in clusters]
    block = os.urandom(4096)
    fd = os.open(path, os.O_WRONLY)
    try:
        start = time.perf_counter()
        for off in offsets:
            os.pwrite(fd, block, off)
        os.fsync(fd)
        return len(offsets) / (time.perf_counter() - start)
    finally:
        os.close(fd)


def measure(work, quick, runs):
    work.mkdir(parents=True)
    total = (128 if quick else 512) * MiB
    store = work / "store"
    run(*SNAPFS, "init", store, cwd=ROOT)
    # A fresh VM per run and per measure: every write allocates.
    for r in range(runs):
        for kind in ("seq", "rand"):
            run(*SNAPFS, "vm", "add", store, f"{kind}{r}", "--disk", f"sda={DISK}", cwd=ROOT)
    ours, qsd = {"seq": [], "rand": []}, {"seq": [], "rand": []}

    def qsd_side(kind, r):
        image = work / f"qsd-{kind}{r}.qcow2"
        run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=65536", image, str(DISK))
        side = Qsd(work, image, writable=True, name=f"qsd-{kind}{r}.raw")
        try:
            if kind == "seq":
                qsd["seq"].append(sequential(side.view, total))
            else:
                qsd["rand"].append(random_writes(side.view))
        finally:
            side.close()
        run("qemu-img", "check", image)
        image.unlink()

    with SnapfsMount(store, work / "mnt") as mount:
        for r in range(runs):
            def snapfs_side(kind):
                view = mount.mnt / f"{kind}{r}" / "active" / "sda.raw"
                if kind == "seq":
                    ours["seq"].append(sequential(view, total))
                else:
                    ours["rand"].append(random_writes(view))
            for kind in ("seq", "rand"):
                order = [lambda: snapfs_side(kind), lambda: qsd_side(kind, r)]
                for side in (order if r % 2 == 0 else order[::-1]):
                    side()
    # Every image snapfs wrote must be clean (all of them are qcow2 here).
    leaves = [p for p in (store / "vms").glob("*/*") if p.name != "manifest.json"]
    if len(leaves) != 2 * runs:
        raise SystemExit(f"bench: writes: expected {2 * runs} volumes, found {len(leaves)}")
    for leaf in leaves:
        run("qemu-img", "check", "-f", "qcow2", leaf)
    print(f"bench: writes: snapfs {ours}, QSD {qsd}", file=sys.stderr)
    name = "QSD writable FUSE export"
    return [
        ratio_row("4", f"sequential 1 MiB writes, {total // MiB} MiB + fsync, active view",
                  "MB/s", median(ours["seq"]), median(qsd["seq"]), name, minimum=1.0),
        ratio_row("4", f"random 4 KiB writes, {RANDOM_WRITES} + fsync, active view",
                  "writes/s", median(ours["rand"]), median(qsd["rand"]), name, minimum=1.0),
    ]
