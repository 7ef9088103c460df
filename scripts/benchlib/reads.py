"""Rows 1-3: reading snapshot views, against QEMU's FUSE export.

Input: a chain of 4 qcow2 layers (64 KiB clusters; a compressed base whose
first half holds data, compressed about 2:1; the upper layers write 24
fixed-seed ranges each), 2 GiB virtual (256 MiB with --quick).  The snapfs side
reads snapshot ``layer2`` of the imported chain; qemu-storage-daemon
exports ``layer2.qcow2`` read-only over FUSE, as shipped (its readahead is
the kernel's default).  The page-cache ceiling is a flat raw copy of the
same view on the host filesystem.

A minimal pyfuse3 passthrough of that flat copy (passthrough.py), with the
same readahead as snapfs, is measured too and printed as notes: it shows
what the kernel's FUSE path and pyfuse3 cost before snapfs does anything.
"""

import os
import random
import subprocess
import sys
import time
from pathlib import Path

from .common import (MiB, ROOT, SEED, SNAPFS, SnapfsMount, drop_caches, median, ratio_row, run)

RANDOM_READS = 2000


def build_chain(work, size):
    """layer0 (compressed base) <- layer1 <- layer2 <- layer3, 64 KiB clusters."""
    rng = random.Random(SEED)
    raw = work / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        # Half the disk holds data that compresses about 2:1 (each 64 KiB
        # cluster half random, half zeros); the other half is empty.
        for off in range(0, size // 2, 4 * MiB):
            f.seek(off)
            f.write(b"".join(rng.randbytes(32 * 1024) + bytes(32 * 1024) for _ in range(64)))
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=65536", raw,
        work / "layer0.qcow2")
    raw.unlink()
    for i in range(1, 4):
        run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=65536",
            "-b", f"layer{i - 1}.qcow2", "-F", "qcow2", f"layer{i}.qcow2", str(size), cwd=work)
        ops = []
        for _ in range(24):
            length = rng.choice([64 * 1024, 1 * MiB, 4 * MiB])
            off = rng.randrange(0, size - length) // 65536 * 65536
            ops += ["-c", f"write -P {i * 17} {off} {length}"]
        run("qemu-io", "-f", "qcow2", *ops, work / f"layer{i}.qcow2")
    return [work / f"layer{i}.qcow2" for i in range(4)]


def set_readahead(path, kb):
    dev = os.stat(path).st_dev
    Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").write_text(f"{kb}\n")


def wait_for_size(path, proc, what):
    deadline = time.monotonic() + 10
    while not os.path.exists(path) or os.stat(path).st_size == 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"bench: {what} did not start: {proc.stderr.read()}")
        time.sleep(0.05)


class Qsd:
    """qemu-storage-daemon exporting one qcow2 layer over FUSE."""

    def __init__(self, work, layer, writable=False, name="qsd.raw"):
        self.view = work / name
        self.view.touch()
        ro = "off" if writable else "on"
        self.proc = subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file,filename={layer},read-only={ro}",
            "--blockdev", f"driver=qcow2,node-name=qcow,file=file,read-only={ro}",
            "--export", f"type=fuse,id=exp,node-name=qcow,mountpoint={self.view},"
                        f"writable={'on' if writable else 'off'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for_size(self.view, self.proc, "qemu-storage-daemon")

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Passthrough:
    def __init__(self, work, source, readahead_kb):
        self.mnt = work / "passthrough"
        self.mnt.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("passthrough.py")), str(source),
             str(self.mnt)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.view = self.mnt / "file"
        wait_for_size(self.view, self.proc, "the passthrough")
        set_readahead(self.mnt, readahead_kb)

    def close(self):
        run("fusermount3", "-u", self.mnt)
        self.proc.wait(timeout=30)


def sequential(path, block=MiB):
    """MB/s of one sequential pass with ``block``-sized reads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        total, start = 0, time.perf_counter()
        while data := os.read(fd, block):
            total += len(data)
        return total / (time.perf_counter() - start) / 1e6
    finally:
        os.close(fd)


def random_reads(path, size):
    """4 KiB reads per second at fixed-seed offsets."""
    rng = random.Random(SEED)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(RANDOM_READS)]
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for off in offsets:
            os.pread(fd, 4096, off)
        return len(offsets) / (time.perf_counter() - start)
    finally:
        os.close(fd)


def one_side(view, size, out):
    drop_caches()
    out.setdefault("seq_cold", []).append(sequential(view))
    out.setdefault("seq_warm", []).append(sequential(view))
    drop_caches()
    out.setdefault("rand_cold", []).append(random_reads(view, size))
    out.setdefault("rand_warm", []).append(random_reads(view, size))


def measure(work, quick, runs):
    from snapfs.fs.mount import READ_AHEAD_KB
    work.mkdir(parents=True)
    size = (256 if quick else 2048) * MiB
    print(f"bench: reads: building a 4-layer chain of {size // MiB} MiB", file=sys.stderr)
    layers = build_chain(work, size)
    flat = work / "flat.raw"
    run("qemu-img", "convert", "-O", "raw", layers[2], flat)
    store = work / "store"
    run(*SNAPFS, "init", store, cwd=ROOT)
    run(*SNAPFS, "vm", "add", store, "vm", "--disk", f"sda={layers[-1]}", cwd=ROOT)
    ours, qsd, flat_r, passthrough = {}, {}, {}, {}
    with SnapfsMount(store, work / "mnt") as mount:
        view = mount.mnt / "vm" / "snapshots" / "layer2" / "sda.raw"
        sides = [Qsd(work, layers[2])]
        try:
            sides.append(Passthrough(work, flat, READ_AHEAD_KB))
            for r in range(runs):
                order = [(view, ours), (sides[0].view, qsd)]
                for path, out in (order if r % 2 == 0 else order[::-1]):
                    one_side(path, size, out)
                # Second reads: cold read first, then the measured one.
                for path, out in ((flat, flat_r), (sides[1].view, passthrough)):
                    drop_caches()
                    sequential(path)
                    out.setdefault("seq_warm", []).append(sequential(path))
                    drop_caches()
                    out.setdefault("seq_cold", []).append(sequential(path))
                    drop_caches()
                    out.setdefault("rand_cold", []).append(random_reads(path, size))
                drop_caches()
                sequential(view)
                ours.setdefault("second", []).append(sequential(view))
        finally:
            for side in sides:
                side.close()
    m = {k: median(v) for k, v in ours.items()}
    q = {k: median(v) for k, v in qsd.items()}
    f = {k: median(v) for k, v in flat_r.items()}
    p = {k: median(v) for k, v in passthrough.items()}
    print(f"bench: reads: notes (medians): minimal pyfuse3 passthrough of the flat copy: "
          f"sequential cold {p['seq_cold']:,.0f} MB/s, second read {p['seq_warm']:,.0f} MB/s, "
          f"random 4 KiB cold {p['rand_cold']:,.0f}/s; flat copy on the host filesystem: "
          f"cold {f['seq_cold']:,.0f} MB/s, random cold {f['rand_cold']:,.0f}/s", file=sys.stderr)
    qsd_name = "QSD FUSE export"
    return [
        ratio_row("1", "sequential read of a snapshot view, cold, 1 MiB reads", "MB/s",
                  m["seq_cold"], q["seq_cold"], qsd_name, minimum=1.5),
        ratio_row("1", "sequential read of a snapshot view, warm, 1 MiB reads", "MB/s",
                  m["seq_warm"], q["seq_warm"], qsd_name, minimum=1.5),
        ratio_row("2", "second read of the same view", "MB/s", m["second"], f["seq_warm"],
                  "flat raw file, page cache", minimum=0.8),
        ratio_row("3", "random 4 KiB reads, cold", "reads/s", m["rand_cold"], q["rand_cold"],
                  qsd_name, minimum=1.0),
        ratio_row("3", "random 4 KiB reads, warm", "reads/s", m["rand_warm"], q["rand_warm"],
                  qsd_name, minimum=1.0),
    ]
