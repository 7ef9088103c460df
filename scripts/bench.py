#!/usr/bin/env python3
"""Benchmark snapfs against QEMU's own tools, in the same run.

    .venv/bin/python scripts/bench.py [--quick] [--runs N] [--only GROUP,...] [--workdir DIR]

Builds fixed-seed inputs, runs snapfs and the reference side by side,
alternating which goes first run by run, and prints a table of medians and
the ratio snapfs/reference.  Machines here are noisy: only ratios from the
same run mean anything.  Needs root (mounts, drop_caches); for the reads
and writes groups, installs qemu-system-common (qemu-storage-daemon) if it
is missing; the live group needs what scripts/setup.sh installs for the
tests of running VMs (qemu-system-x86_64).

Groups and the measures in them (numbers follow the benchmark issue):
  reads   1 sequential read, cold and warm        vs  QSD FUSE export
          2 second read of a view                 vs  a flat raw file in the page cache
          3 random 4 KiB reads, cold and warm     vs  QSD FUSE export
  writes  4 sequential and random writes          vs  QSD writable FUSE export
  merges  5 delete a snapshot, similar layers     vs  qemu-img commit
          6 delete, cheaper direction <= 20 %     vs  qemu-img commit
  create  7 snapshot of a 4-disk VM via touch
  scale   8 mount start-up and RSS, 200 VMs x 20 snapshots, and after find
          9 RSS reading every view of a 1 TiB sparse 20-layer disk
  depth  10 newest view of a 200-deep chain: reads and time to first byte,
            and snapshot create (CLI)         vs  the same view as a 4-deep chain
  live   11 live snapshot of a booted 4-disk VM (CLI), with and without
            the guest agent, and how long the guest stays frozen
         12 live merge, QEMU running              vs  qemu-img commit, offline
  diff   13 snapfs diff of two snapshots 1 % apart on a 4 GiB ext4, warm
                                                  vs  a full walk of both trees reading
                                                      every file (what virt-diff does)
         14 the same, caches dropped before each run
  trees  15 find over a snapshot's file tree of 10,000 files, cold and warm
         16 cp -r of a 1 GiB tree out of a snapshot, cold and warm
                                                  vs  a loop mount of the same view
"""

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib.common import run  # noqa: E402

GROUPS = ("reads", "writes", "merges", "create", "scale", "depth", "live", "diff", "trees")
# Groups whose reference is qemu-storage-daemon.
QSD_GROUPS = {"reads", "writes"}


def ensure_tools():
    if shutil.which("qemu-storage-daemon") is None:
        print("bench: installing qemu-system-common (qemu-storage-daemon)", file=sys.stderr)
        run("apt-get", "install", "-y", "-qq", "qemu-system-common")


def format_value(value):
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"


def print_table(rows, args, elapsed):
    print(f"\nsnapfs benchmark: medians of {args.runs} alternating runs"
          f"{' (--quick)' if args.quick else ''}; {os.cpu_count()} cores; "
          f"{elapsed / 60:.1f} min\n")
    print("| # | measure | unit | snapfs | reference | ratio | target | met |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = "-" if r.reference is None else f"{format_value(r.reference)} ({r.reference_name})"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        met = "-" if r.met is None else "yes" if r.met else "NO"     # None: no target
        print(f"| {r.number} | {r.measure} | {r.unit} | {format_value(r.snapfs)} | {ref} | "
              f"{ratio} | {r.target} | {met} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller inputs and 3 runs: a smoke run of a minute or two")
    parser.add_argument("--runs", type=int, help="runs per side (default 5, quick 3)")
    parser.add_argument("--only", help=f"comma-separated groups to run ({','.join(GROUPS)})")
    parser.add_argument("--workdir", help="where to build inputs (kept; default: a temp dir, "
                                          "removed afterwards)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (FUSE mounts, drop_caches)")
    groups = args.only.split(",") if args.only else list(GROUPS)
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise SystemExit(f"bench: unknown group(s) {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(GROUPS)}")
    args.runs = args.runs or (3 if args.quick else 5)
    if QSD_GROUPS & set(groups):
        ensure_tools()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="snapfs-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    rows = []
    try:
        for group in groups:
            print(f"bench: {group} ...", file=sys.stderr)
            # What an earlier group wrote must not be written back during
            # this one's measures (it made fsync-bound measures 2x slower).
            os.sync()
            module = importlib.import_module(f"benchlib.{group}")
            rows += module.measure(work / group, args.quick, args.runs)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    rows.sort(key=lambda r: int(r.number))      # stable: a group's rows keep their order
    print_table(rows, args, time.monotonic() - start)


if __name__ == "__main__":
    main()
