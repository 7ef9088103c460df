"""Row 7: ``touch snapshots/NAME`` on a mounted 4-disk VM, timed from the
shell's point of view (the call returns once the snapshot exists)."""

import time

from .common import ROOT, SNAPFS, SnapfsMount, median, run, value_row


def measure(work, quick, runs):
    work.mkdir(parents=True)
    store = work / "store"
    run(*SNAPFS, "init", store, cwd=ROOT)
    run(*SNAPFS, "vm", "add", store, "four",
        *sum((["--disk", f"d{i}=10G"] for i in range(4)), []), cwd=ROOT)
    times = []
    with SnapfsMount(store, work / "mnt") as mount:
        snapshots = mount.mnt / "four" / "snapshots"
        for i in range(20 if quick else 50):
            start = time.perf_counter()
            (snapshots / f"s{i}").touch()
            times.append((time.perf_counter() - start) * 1000)
    return [value_row("7", "create a snapshot of a 4-disk VM through touch", "ms",
                      median(times), 20)]
