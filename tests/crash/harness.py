"""Fault-injection harness: build stores, run the CLI with crash points
armed, and read every view of a VM with QEMU as the oracle.

A VM's *state* is what a user can observe: its snapshots (name and the
guest bytes of every disk, as a SHA-256), the active bytes of every disk,
and the open preview (which snapshot, and the bytes it keeps aside).  All
bytes come from ``qemu-img convert -O raw`` of the volume the manifest
names, never from snapfs's own reader, so the check is independent of the
code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import qemu

ROOT = Path(__file__).resolve().parents[2]
CLI = "snapfs.cli"
VM = "vm"

KiB = 1024
MiB = 1024 * KiB
DISK_SIZE = 4 * MiB
CLUSTER = 64 * KiB
QCOW2_MAGIC = b"QFI\xfb"

# The run that is killed, the recovery and the checks must each finish well
# within this; a hang is a bug too.
TIMEOUT = 120


# -- running the CLI -------------------------------------------------------------

def run_snapfs(*args, env=None, timeout=TIMEOUT):
    """Run ``snapfs ARGS`` as a user would; ``env`` adds to a clean copy of
    the environment (crash variables inherited from the caller are dropped)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_CRASH_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", CLI] + [str(a) for a in args],
                          capture_output=True, text=True, env=full, cwd=ROOT, timeout=timeout)


def ok(result, what=""):
    """Assert a CompletedProcess exited 0; return it."""
    assert result.returncode == 0, (
        f"{what or ' '.join(result.args[3:])} exited {result.returncode}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def trace_run(args, workdir):
    """Run the CLI once, uninterrupted, recording its crash points.
    Returns (CompletedProcess, [point name, ...] in order)."""
    trace = Path(workdir) / "crash-trace.txt"
    if trace.exists():
        trace.unlink()
    result = run_snapfs(*args, env={"SNAPFS_CRASH_TRACE": str(trace)})
    names = []
    if trace.exists():
        for i, line in enumerate(trace.read_text().splitlines(), 1):
            n, name = line.split(" ", 1)
            assert int(n) == i, f"crash trace out of order: {line!r} at line {i}"
            names.append(name)
    return result, names


def crash_run(args, n):
    """Run the CLI with ``SNAPFS_CRASH_AT=n``; it must die of SIGKILL."""
    result = run_snapfs(*args, env={"SNAPFS_CRASH_AT": str(n)})
    assert result.returncode == -9, (
        f"expected SIGKILL at crash point {n}, got exit {result.returncode}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result


# -- building images with QEMU ---------------------------------------------------

def _io_command(op):
    kind, offset, length, *pattern = op
    if kind == "write":
        return f"write -q -P {pattern[0]} {offset} {length}"
    if kind == "zero":
        return f"write -q -z {offset} {length}"
    raise ValueError(kind)


def build_qcow2_chain(directory, names, layers, base_raw=False):
    """Create ``names[i]`` in ``directory`` (the first one raw if
    ``base_raw``), each backed by the previous, and apply ``layers[i]`` (a
    list of ("write", offset, length, pattern) / ("zero", offset, length))
    to it.  Returns the top's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prev = None
    for i, (name, ops) in enumerate(zip(names, layers)):
        path = directory / name
        if i == 0 and base_raw:
            qemu.qemu_img("create", "-q", "-f", "raw", path, DISK_SIZE)
            fmt = "raw"
        else:
            args = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}"]
            if prev is not None:
                args += ["-b", prev[0], "-F", prev[1]]
            qemu.qemu_img(*args, path, DISK_SIZE, cwd=directory)
            fmt = "qcow2"
        if ops:
            qemu.qemu_io(path, *[_io_command(op) for op in ops], fmt=fmt, cwd=directory)
        prev = (name, fmt)
    return directory / names[-1]


# -- reading a VM ---------------------------------------------------------------

def vm_dir(store, vm=VM):
    return Path(store) / "vms" / vm


def manifest(store, vm=VM):
    return json.loads((vm_dir(store, vm) / "manifest.json").read_text())


# Bytes of every view seen, by hash, to say where two views differ.
_VIEWS = {}


def view_hash(store, m, vid, vm=VM):
    """SHA-256 of the guest bytes of volume ``vid``'s chain, read by QEMU."""
    path = vm_dir(store, vm) / vid
    data = qemu.to_raw(path, fmt=m["volumes"][vid]["format"])
    digest = hashlib.sha256(data).hexdigest()[:16]
    if len(_VIEWS) < 256:
        _VIEWS.setdefault(digest, data)
    return digest


def describe_difference(a, b):
    """Where two view hashes differ, if both views are known."""
    x, y = _VIEWS.get(a), _VIEWS.get(b)
    if x is None or y is None:
        return f"{a} != {b}"
    if len(x) != len(y):
        return f"sizes differ: {len(x)} != {len(y)}"
    bad = [off for off in range(0, len(x), CLUSTER) if x[off:off + CLUSTER] != y[off:off + CLUSTER]]
    return (f"{len(bad)} cluster(s) differ, first at {bad[0]:#x} "
            f"(got byte {x[bad[0]]:#x}..., expected {y[bad[0]]:#x}...)")


def vm_state(store, vm=VM):
    """What a user can observe of the VM, as plain data (see module doc)."""
    m = manifest(store, vm)
    by_id = {s["id"]: s["name"] for s in m["snapshots"]}
    state = {
        "snapshots": [[s["name"], {d: view_hash(store, m, v, vm) for d, v in sorted(s["volumes"].items())}]
                      for s in m["snapshots"]],
        "active": {d: view_hash(store, m, v, vm) for d, v in sorted(m["active"].items())},
        "preview": None,
    }
    if m["preview"]:
        state["preview"] = {"snapshot": by_id[m["preview"]["snapshot"]],
                            "before": {d: view_hash(store, m, v, vm)
                                       for d, v in sorted(m["preview"]["before"].items())}}
    return state


def state_differences(got, want):
    """Human-readable list of how ``got`` differs from ``want``."""
    out = []
    gn = [s[0] for s in got["snapshots"]]
    wn = [s[0] for s in want["snapshots"]]
    if gn != wn:
        out.append(f"snapshots are {gn}, expected {wn}")
    want_snaps = dict((n, v) for n, v in want["snapshots"])
    for name, views in got["snapshots"]:
        for disk, h in views.items():
            if name in want_snaps and want_snaps[name].get(disk) != h:
                out.append(f"snapshot {name} disk {disk}: "
                           f"{describe_difference(h, want_snaps[name][disk])}")
    for disk, h in got["active"].items():
        if want["active"].get(disk) != h:
            out.append(f"active disk {disk}: {describe_difference(h, want['active'][disk])}")
    if (got["preview"] is None) != (want["preview"] is None):
        out.append(f"preview is {got['preview']}, expected {want['preview']}")
    elif got["preview"]:
        if got["preview"]["snapshot"] != want["preview"]["snapshot"]:
            out.append(f"preview of {got['preview']['snapshot']}, "
                       f"expected {want['preview']['snapshot']}")
        for disk, h in got["preview"]["before"].items():
            if want["preview"]["before"].get(disk) != h:
                out.append(f"before-preview disk {disk}: "
                           f"{describe_difference(h, want['preview']['before'][disk])}")
    return out


# -- consistency of the files ------------------------------------------------------

def is_qcow2(path):
    with open(path, "rb") as f:
        return f.read(4) == QCOW2_MAGIC


def qemu_check_alone(path):
    """``qemu-img check`` of one file's own metadata, without opening its
    backing chain (a crash may have left a file whose backing is gone)."""
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": str(path)}})
    return qemu.check(f"json:{spec}")


def check_no_corruption(directory):
    """Every qcow2 file in ``directory``: no corruption, no check errors
    (leaked clusters are tolerated).  Returns {file: report} of the leaky."""
    leaky = {}
    problems = []
    for entry in sorted(os.listdir(directory)):
        path = Path(directory) / entry
        if not path.is_file() or not is_qcow2(path):
            continue
        report = qemu_check_alone(path)
        if report["returncode"] not in (0, 3) or report.get("corruptions", 0) \
                or report.get("check-errors", 0):
            problems.append(f"{entry}: {report}")
        elif report.get("leaks", 0):
            leaky[entry] = report["leaks"]
    assert not problems, "qemu-img check found corruption:\n" + "\n".join(problems)
    return leaky


def check_clean(store, vm=VM):
    """Files are exactly the manifest's volumes, and every qcow2 volume is
    clean (no leaks, no corruption).  Returns the manifest."""
    m = manifest(store, vm)
    assert m["operation"] is None, f"operation still pending: {m['operation']}"
    present = set(os.listdir(vm_dir(store, vm)))
    wanted = {"manifest.json"} | set(m["volumes"])
    assert present == wanted, (f"VM dir has orphans {sorted(present - wanted)} "
                               f"and misses {sorted(wanted - present)}")
    unclean = []
    for vid, info in sorted(m["volumes"].items()):
        if info["format"] == "qcow2":
            report = qemu_check_alone(vm_dir(store, vm) / vid)
            if not qemu.is_clean(report):
                unclean.append(f"{vid}: {report}")
    assert not unclean, "qemu-img check is not clean:\n" + "\n".join(unclean)
    return m


# -- operation cases ---------------------------------------------------------------

@dataclass
class OpCase:
    """One operation to kill at each of its crash points.

    ``store`` names the pristine store it runs on; ``args`` follow
    ``snapfs snapshot OP STORE VM``; ``predict(before)`` is the state after
    a successful run; from the first crash point named ``point_of_no_return``
    on, recovery must roll forward (before it, back); ``directions`` is the
    merge direction expected per disk (deletes only)."""
    id: str
    store: str
    op: str
    args: tuple
    predict: object
    point_of_no_return: str | None
    directions: dict | None = None

    def cli(self, store):
        return ("snapshot", self.op, store, VM, *self.args)


@dataclass
class Outcome:
    """What exercising one case covered, for the summary."""
    case: str
    points: list = field(default_factory=list)          # names, in order
    rolled_back: int = 0
    rolled_forward: int = 0
    leaky_before_repair: int = 0                        # files, per qemu-img check
    leaky_for_snapfs: int = 0                           # files, per snapfs check
    merge_points: Counter = field(default_factory=Counter)   # direction -> points killed in

    def line(self):
        names = Counter(self.points)
        detail = ", ".join(f"{k} x{v}" for k, v in names.items())
        merge = ""
        if self.merge_points:
            merge = ", merge points killed: " + ", ".join(
                f"{d} {n}" for d, n in sorted(self.merge_points.items()))
        return (f"crash-suite {self.case}: {len(self.points)} crash points exercised "
                f"({detail}); recovered back {self.rolled_back}, forward {self.rolled_forward}"
                f"{merge}; files with leaked clusters after the kill: "
                f"{self.leaky_before_repair} per qemu-img, {self.leaky_for_snapfs} per snapfs check")


def merge_phase(points, n, disks, directions):
    """Direction of the disk whose merge crash point ``n`` (1-based) is in,
    or None: plans run in disk order, each ending with 'delete:moved'."""
    if points[n - 1] not in ("delete:copy", "delete:moved") \
            and not points[n - 1].startswith("write:"):
        return None
    disk_index = points[:n - 1].count("delete:moved")
    return directions[disks[disk_index]]


def sparse_copy(src, dst):
    """copytree's copy_function, keeping holes: shutil's copy fills them,
    and a raw base whose holes became data merges in another direction."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:      # ENXIO: only a hole remains
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            while start < end:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), end - start, start, start)
                if n == 0:
                    break
                start += n
            pos = end
        os.ftruncate(fout.fileno(), size)
    shutil.copystat(src, dst)
    return dst


def copy_store(src, dst):
    """A fresh copy of a store (symlinks kept as links, holes as holes)."""
    if Path(dst).exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True, copy_function=sparse_copy)
    return Path(dst)


# Outcome of every case exercised in this session, by case id (the summary
# and the both-directions check read it).
RESULTS = {}
# Summary lines of the kills of recovery itself.
RECOVERY_LINES = []
