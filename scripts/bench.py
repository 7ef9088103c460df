#!/usr/bin/env python3
"""Benchmark snapfs against QEMU's own tools, in the same run.

    .venv/bin/python scripts/bench.py [--quick] [--runs N] [--workdir DIR]

Builds fixed-seed inputs (a chain of 4 qcow2 layers with a compressed base),
then alternates snapfs and the reference run by run and prints medians and
the ratio snapfs/reference.  Machines here are noisy: only ratios from the
same run mean anything.  Needs root (mounts, drop_caches) and installs
qemu-system-common (qemu-storage-daemon) if it is missing.

Measures so far (the numbers follow the benchmark issue):
  1  sequential read of a snapshot view, 1 MiB reads, cold and warm  vs  QSD FUSE export
  2  second read of the same view (page cache)                        vs  a flat raw file's
  3  random 4 KiB reads, cold and warm                                vs  QSD FUSE export
  7  create a snapshot of a 4-disk VM through touch                   (target: 20 ms median)
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SNAPFS = [sys.executable, "-m", "snapfs.cli"]
MiB = 1 << 20
SEED = 20261127


def run(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


def ensure_tools():
    if shutil.which("qemu-storage-daemon") is None:
        print("bench: installing qemu-system-common (qemu-storage-daemon)", file=sys.stderr)
        run("apt-get", "install", "-y", "-qq", "qemu-system-common")


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# -- inputs ----------------------------------------------------------------------

def build_chain(work, size):
    """layer0 (compressed base) <- layer1 <- layer2 <- layer3, 64 KiB clusters."""
    rng = random.Random(SEED)
    raw = work / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        # Half the disk holds data that compresses about 2:1, like a real OS disk.
        chunk = bytes(rng.getrandbits(8) for _ in range(64 * 1024)) + bytes(64 * 1024)
        for off in range(0, size // 2, len(chunk)):
            f.seek(off)
            f.write(chunk)
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


# -- the two sides ------------------------------------------------------------------

class SnapfsSide:
    name = "snapfs"

    def __init__(self, work, top):
        self.store, self.mnt = work / "store", work / "mnt"
        self.mnt.mkdir()
        run(*SNAPFS, "init", self.store)
        run(*SNAPFS, "vm", "add", self.store, "vm", "--disk", f"sda={top}")
        run(*SNAPFS, "mount", self.store, self.mnt)
        self.view = self.mnt / "vm" / "snapshots" / "layer2" / "sda.raw"

    def close(self):
        run(*SNAPFS, "umount", self.mnt)


class QsdSide:
    """qemu-storage-daemon exporting the same layer read-only over FUSE."""
    name = "QSD FUSE"

    def __init__(self, work, layer):
        self.view = work / "qsd.raw"
        self.view.touch()
        self.proc = subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file,filename={layer},read-only=on",
            "--blockdev", "driver=qcow2,node-name=qcow,file=file,read-only=on",
            "--export", f"type=fuse,id=exp,node-name=qcow,mountpoint={self.view}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while os.stat(self.view).st_size == 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench: qemu-storage-daemon failed: {self.proc.stderr.read()}")
            time.sleep(0.05)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


# -- measures -----------------------------------------------------------------------

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


def random_reads(path, count, size):
    """4 KiB reads per second at fixed-seed offsets."""
    rng = random.Random(SEED)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for off in offsets:
            os.pread(fd, 4096, off)
        return count / (time.perf_counter() - start)
    finally:
        os.close(fd)


def create_latency(work, runs):
    """Median ms of ``touch snapshots/NAME`` on a 4-disk VM."""
    store, mnt = work / "store4", work / "mnt4"
    mnt.mkdir()
    run(*SNAPFS, "init", store)
    run(*SNAPFS, "vm", "add", store, "four", *sum((["--disk", f"d{i}=1G"] for i in range(4)), []))
    run(*SNAPFS, "mount", store, mnt)
    try:
        times = []
        for i in range(runs):
            start = time.perf_counter()
            (mnt / "four" / "snapshots" / f"s{i}").touch()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)
    finally:
        run(*SNAPFS, "umount", mnt)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 MiB disk, 3 runs")
    parser.add_argument("--runs", type=int, help="runs per side (default 5, quick 3)")
    parser.add_argument("--workdir", help="where to build inputs (default: a temp dir)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (FUSE mounts, drop_caches)")
    ensure_tools()
    size = (256 if args.quick else 2048) * MiB
    runs = args.runs or (3 if args.quick else 5)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="snapfs-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench: building a 4-layer chain of {size // MiB} MiB in {work}", file=sys.stderr)
    layers = build_chain(work, size)
    flat = work / "flat.raw"
    run("qemu-img", "convert", "-O", "raw", layers[2], flat)
    results = {k: [] for k in ("seq_cold", "seq_warm", "rand_cold", "rand_warm", "flat_warm")}
    ref = {k: [] for k in ("seq_cold", "seq_warm", "rand_cold", "rand_warm")}
    sides = [SnapfsSide(work, layers[-1]), QsdSide(work, layers[2])]
    try:
        for r in range(runs):
            # Alternate which side goes first, run by run.
            for side in (sides if r % 2 == 0 else sides[::-1]):
                out = results if side is sides[0] else ref
                drop_caches()
                out["seq_cold"].append(sequential(side.view))
                out["seq_warm"].append(sequential(side.view))
                drop_caches()
                out["rand_cold"].append(random_reads(side.view, 2000, size))
                out["rand_warm"].append(random_reads(side.view, 2000, size))
            sequential(flat)
            results["flat_warm"].append(sequential(flat))
        create_ms = create_latency(work, 20 if args.quick else 50)
    finally:
        for side in sides:
            side.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    rmed = {k: statistics.median(v) for k, v in ref.items()}
    rows = [
        ("1 sequential read, cold (MB/s)", med["seq_cold"], rmed["seq_cold"], ">= 1.5"),
        ("1 sequential read, warm (MB/s)", med["seq_warm"], rmed["seq_warm"], ">= 1.5"),
        ("2 second read vs flat raw page cache (MB/s)", med["seq_warm"], med["flat_warm"], ">= 0.8"),
        ("3 random 4 KiB, cold (reads/s)", med["rand_cold"], rmed["rand_cold"], ">= 1.0"),
        ("3 random 4 KiB, warm (reads/s)", med["rand_warm"], rmed["rand_warm"], ">= 1.0"),
    ]
    print(f"\nmedians of {runs} alternating runs, {size // MiB} MiB virtual, 4 layers, "
          f"64 KiB clusters, compressed base; {os.cpu_count()} cores\n")
    print(f"| measure | snapfs | reference | ratio | target |\n|---|---|---|---|---|")
    for name, ours, theirs, target in rows:
        print(f"| {name} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f} | {target} |")
    print(f"| 7 create a snapshot of a 4-disk VM through touch (ms) | {create_ms:.1f} | - | - | <= 20 |")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
