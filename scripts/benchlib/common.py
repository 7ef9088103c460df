"""What every benchmark module shares: running commands, caches, mounts,
process memory, and the result rows that bench.py prints."""

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
SNAPFS = [sys.executable, "-m", "snapfs.cli"]
MiB = 1 << 20
GiB = 1 << 30
SEED = 20261127


def run(*cmd, **kw):
    """Run a command, failing loudly; returns the CompletedProcess."""
    try:
        return subprocess.run([str(c) for c in cmd], check=True, capture_output=True,
                              text=True, **kw)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"bench: {' '.join(map(str, cmd))} failed:\n{e.stderr}") from None


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def median(values):
    return statistics.median(values)


def timed(fn, *args):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


@dataclass
class Row:
    """One line of the results table.

    ``ratio`` is snapfs / reference when there is a reference; ``target``
    says which way is good, e.g. ">= 1.5" (a ratio) or "<= 20 ms" (a value).
    ``met`` is whether the target held in this run.
    """
    number: str
    measure: str
    unit: str
    snapfs: float
    reference: float | None
    reference_name: str
    target: str
    met: bool

    @property
    def ratio(self):
        return None if not self.reference else self.snapfs / self.reference


def ratio_row(number, measure, unit, ours, theirs, reference_name, minimum=None, maximum=None):
    """A row whose target is a ratio bound (snapfs / reference)."""
    r = ours / theirs
    if minimum is not None:
        return Row(number, measure, unit, ours, theirs, reference_name, f">= {minimum}", r >= minimum)
    return Row(number, measure, unit, ours, theirs, reference_name, f"<= {maximum}", r <= maximum)


def value_row(number, measure, unit, value, maximum):
    """A row with no reference: the value itself must stay <= ``maximum``."""
    return Row(number, measure, unit, value, None, "-", f"<= {maximum:g} {unit}", value <= maximum)


class SnapfsMount:
    """A store mounted with the snapfs CLI; unmounted on exit, even on error."""

    def __init__(self, store, mountpoint):
        self.store, self.mnt = Path(store), Path(mountpoint)

    def __enter__(self):
        self.mnt.mkdir(parents=True, exist_ok=True)
        run(*SNAPFS, "mount", self.store, self.mnt, cwd=ROOT)
        return self

    def __exit__(self, *exc):
        run(*SNAPFS, "umount", self.mnt, cwd=ROOT)

    def daemon_pid(self):
        """The mount daemon's pid, from the store's lock file ("pid N: ...")."""
        holder = (self.store / "lock").read_text().strip()
        return int(holder.split()[1].rstrip(":"))


def rss_bytes(pid, peak=False):
    """Resident set size of ``pid`` now (VmRSS) or at its peak (VmHWM)."""
    key = "VmHWM:" if peak else "VmRSS:"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"bench: no {key} for pid {pid}")
