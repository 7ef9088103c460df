"""Acceptance: a model-based test of snapshots of a VM running in QEMU.

A hypothesis state machine drives one VM (two disks, 4 MiB and 2 MiB)
running in a real QEMU (TCG, CPUs stopped: ``tests/support/live_vm.py``),
attached to its store.  The guest writes through QEMU's own qemu-io on the
guest devices (HMP): fill patterns and zero writes (with and without
unmap), anywhere and across the 64 KiB cluster boundaries, with and without
a flush.  Interleaved with them:

- live creates: ``snapfs snapshot create``, ``touch`` and ``mkdir`` in
  VM/snapshots, control/create (each followed by up to three guest writes
  into the new leaves, so that layers differ and merges go both ways);
- live deletes (a merge inside QEMU: block-commit, active or not, or
  block-stream): ``snapfs snapshot delete``, control/delete, ``rmdir``
  with guest writes at once while its merge runs, and ``rmdir`` followed
  at once by another operation (mkdir, touch, control/create, rmdir,
  control/delete, mv: queued or waiting behind the merge), by an unmount
  (the daemon finishes the merge first) or by QEMU stopped 0 to 50 ms
  after rmdir's answer (the merge finishes in QEMU or offline, whenever
  QEMU went; QEMU then starts again on the new leaves);
- renames (``mv``, ``snapfs snapshot rename``) and refusals: a delete of
  an unknown name (ENOENT), a preview while QEMU runs (EBUSY);
- mount and unmount (the CLI's writer lock needs the store unmounted),
  and, unmounted, QEMU stopped and started again from ``vm qemu-args``.

A plain-Python model (the guest's bytes, and a copy of them per snapshot,
taken when the snapshot was made) predicts every outcome, refusals
included, and after each step:

- the manifest has no operation left, and lists the model's snapshots, in
  order, each "crash"-consistent;
- QEMU still runs, its devices write the manifest's active leaves, it runs
  no job, and it has no node on a file the manifest does not name;
- the VM's directory holds manifest.json and the manifest's volumes, one
  per disk for each snapshot and for the active state, nothing else;
- mounted: the snapshots directory lists the model's snapshots (and
  ``latest``), each ``snapshots/NAME/DISK.raw`` reads as the model took
  it, control/status is idle; preview of a snapshot and opening an active
  view are refused with EBUSY while QEMU runs.  Unmounted: after anything
  that changed the volumes, ``qemu-img convert`` of every snapshot reads
  as the model.

At the end of each example QEMU is stopped (by its PID), the mount's
active views (opened only now) read what QEMU left, the store is
unmounted, and then ``qemu-img convert`` of every snapshot and of the
active leaves reads as the model, every volume is ``qemu-img check``-clean
with bare backing names, and ``snapfs check`` passes.

QEMU serves one QMP client at a time, and snapfs holds QEMU's monitor for
the whole of a live merge: a guest write asked while an rmdir's merge runs
waits for it (this test's sessions wait up to QMP_WAIT seconds to be
served).  Either way it lands in the active state, which is all the model
says.  What the model cannot predict is left out: a mkdir queued behind a
merge is made when its turn comes, and guest writes that QEMU takes
meanwhile are in it (snapfs can hold the mount's own writes, not the
guest's), so every create waits until the VM is idle.

Deterministic: ``derandomize`` (no example database), a fixed number of
examples and steps (hypothesis also starts a few examples that it drops
early).  Runtime: about 3 s per example (QEMU, mount, up to 20 steps,
final checks) on 2 cores: the default 30 examples take about 1.5 minutes
on idle cores, 2 to 3 when other tests share them.  SNAPFS_LIVE_MODEL_EXAMPLES=N overrides the count; the
"thorough" profile (SNAPFS_TEST_PROFILE) runs ten times as many.  A
failed example's directory (store, store/snapfs.log, the QEMU log) is
kept and listed in the printed stats.
"""

import contextlib
import errno
import functools
import json
import os
import random
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule,
    run_state_machine_as_test,
)

from snapfs.qemu.merge import open_paths
from snapfs.qemu.qmp import QmpSession
from tests.support.live_vm import LiveVm
from tests.support.model_checks import (
    attempt as _attempt, check_bytes as _check_bytes, read_file as _read_file,
    touch as _touch,
)
from tests.support.mounting import mounted, snapfs, snapfs_mounts

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE")]

MiB = 1 << 20
CLUSTER = 64 << 10
DISKS = {"sda": 4 * MiB, "data": 2 * MiB}
MAX_WRITE = 256 << 10
NAMES = ("a", "b", "c", "d", "e")        # few, so that names collide
DESCRIPTIONS = ("", "nightly")
VM = "vm"

STEPS = 20
PHASE = 3              # steps at least between a mount and an unmount
EXAMPLES = int(os.environ.get("SNAPFS_LIVE_MODEL_EXAMPLES", 0)) or \
    (300 if os.environ.get("SNAPFS_TEST_PROFILE") == "thorough" else 30)
QMP_WAIT = 30.0        # seconds a guest write waits for QEMU's monitor (a merge holds it)
IDLE_WAIT = 60.0       # seconds an rmdir's merge may take

PART_RE = re.compile(r"-part\d+\.raw$")     # partition views, if a pattern looks like an MBR


# -- helpers -------------------------------------------------------------------

def _cli(expected, what, *args):
    """``snapfs ARGS``: it must succeed if ``expected`` is None, else fail
    with an error message containing ``expected``."""
    r = snapfs(*args, check=False)
    if expected is None:
        assert r.returncode == 0, f"{what}: failed ({r.returncode}): {r.stderr}"
    else:
        assert r.returncode == 1 and expected in r.stderr, \
            f"{what}: expected an error with {expected!r}, got {r.returncode}: {r.stderr}"
    return r


def _control(vm_dir, command, text):
    """``echo TEXT > VM/control/COMMAND``: one command per write."""
    fd = os.open(vm_dir / "control" / command, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode() + b"\n")
    finally:
        os.close(fd)


class Vm(LiveVm):
    """LiveVm whose guest writes wait for QEMU's monitor while a live merge
    holds it, and that can write zeros too."""

    def hmp(self, command):
        with QmpSession(self.qmp, connect_timeout=QMP_WAIT) as q:
            return q.execute("human-monitor-command", {"command-line": command})

    def write_zeros(self, disk, offset, length, unmap, flush):
        """``write -z`` (``-u``: QEMU may drop the clusters, reading zeros)."""
        self.io(disk, f"write -z {'-u ' if unmap else ''}{offset} {length}")
        self.model[disk][offset:offset + length] = bytes(length)
        if flush:
            self.io(disk, "flush")


def _tracked(fn):
    """Note the step; if it raises, add the steps so far to the error (a
    flaky failure gets no "Steps leading up to this error" from hypothesis)
    and mark the machine failed, so that teardown only stops QEMU and
    unmounts (its checks would hide the real failure)."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if fn.__name__ != "model_holds":
            self._count("steps")
            arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            self.steps.append(f"{fn.__name__}({arguments})")
        try:
            with self._timed(fn.__name__):
                return fn(self, *args, **kwargs)
        except BaseException as e:
            if not self.failed:
                e.add_note("steps of this example (the last one failed or was followed by the "
                           "failing check):\n  " + "\n  ".join(self.steps))
            self.failed = True
            raise
    return wrapper


offsets = st.integers(0, max(DISKS.values()) - 1)
lengths = st.one_of(st.integers(1, 4096), st.integers(1, MAX_WRITE))
# At, just before and just after a cluster boundary (or the end of a disk).
boundary_offsets = st.tuples(st.integers(0, max(DISKS.values()) // CLUSTER),
                             st.integers(-3, 3)).map(lambda t: max(0, t[0] * CLUSTER + t[1]))
boundary_lengths = st.one_of(st.sampled_from([1, 512, CLUSTER, 2 * CLUSTER, MAX_WRITE]),
                             st.tuples(st.integers(1, 4), st.integers(-3, 3))
                               .map(lambda t: t[0] * CLUSTER + t[1]))
kinds = st.sampled_from(["fill", "fill", "zero", "zero-unmap"])
patterns = st.integers(0, 255)


def _random_write(seed):
    """A write spread evenly over a disk (hypothesis favours small numbers)."""
    rng = random.Random(seed)
    disk = rng.choice(sorted(DISKS))
    offset = rng.randrange(DISKS[disk])
    kind = rng.choice(["fill", "fill", "zero", "zero-unmap"])
    return disk, offset, rng.randint(1, MAX_WRITE), kind, rng.randrange(256), rng.random() < 0.3


# (disk, offset, length, kind, pattern, flush)
writes = st.one_of(st.tuples(st.sampled_from(sorted(DISKS)), offsets, lengths, kinds, patterns,
                             st.booleans()),
                   st.integers(0, 2 ** 32 - 1).map(_random_write))
then_writes = st.lists(writes, max_size=3)
picks = st.integers(0, len(NAMES) - 1)       # an existing snapshot: picks % len(order)


# -- the state machine -----------------------------------------------------------

class LiveModel(RuleBasedStateMachine):
    base = None          # a directory for the examples; set by the test
    stats = None         # counters; set by the test

    def __init__(self):
        super().__init__()
        self.failed = False
        self.steps = []
        self.stats = self.stats if self.stats is not None else {}
        self.work = Path(tempfile.mkdtemp(prefix="live-", dir=self.base))
        self.store = self.work / "store"
        self.snaps = {}          # name -> {disk: bytes}, as the guest had written then
        self.order = []          # snapshot names, oldest first
        self.mnt = None
        self.dirty = True        # volumes changed since qemu-img last read them
        self.newest = False      # the snapshot being deleted was the newest
        self.toggled = 0         # the step that mounted or unmounted last
        self._qemu = contextlib.ExitStack()
        self._mount = None
        try:
            with self._timed("setup"):
                shutil.copytree(self.template(), self.store)
                self.vm = Vm(self.store, VM, self.work, DISKS)
                self.proc = self._qemu.enter_context(self.vm.running())
                self._mount_store()
        except BaseException:
            # hypothesis calls teardown() only for a machine it got.
            self._stop()
            raise
        self._count("examples")

    @classmethod
    def template(cls):
        """A store with VM ``vm`` and its blank disks, made once per run and
        copied for every example."""
        path = Path(cls.base) / "template"
        if not path.exists():
            snapfs("init", path)
            snapfs("vm", "add", path, VM,
                   *[a for d, size in DISKS.items() for a in ("--disk", f"{d}={size // MiB}M")])
        return path

    def _count(self, what):
        self.stats[what] = self.stats.get(what, 0) + 1

    @contextlib.contextmanager
    def _timed(self, phase):
        started = time.monotonic()
        try:
            yield
        finally:
            times = self.stats.setdefault("seconds", {})
            times[phase] = round(times.get(phase, 0) + time.monotonic() - started, 2)

    @property
    def vm_dir(self):
        return self.mnt / VM

    # -- mounting --

    def _mount_store(self):
        self._mount = mounted(self.store, self.work / "mnt")
        self.mnt = self._mount.__enter__()

    def _unmount(self):
        mount, self._mount, self.mnt = self._mount, None, None
        if mount is not None:
            mount.__exit__(None, None, None)

    def _stop(self):
        """Stop QEMU by its PID and unmount, whatever fails."""
        try:
            self._qemu.close()
        finally:
            self._unmount()

    # Mounted and unmounted phases last PHASE steps at least.

    @precondition(lambda self: self.mnt is not None and len(self.steps) >= self.toggled + PHASE)
    @rule()
    @_tracked
    def unmount(self):
        self._unmount()
        self.toggled = len(self.steps)
        self._count("unmount")

    @precondition(lambda self: self.mnt is None and len(self.steps) >= self.toggled + PHASE)
    @rule()
    @_tracked
    def mount(self):
        self._mount_store()
        self.toggled = len(self.steps)
        self._count("mount")

    @precondition(lambda self: self.mnt is None)
    @rule()
    @_tracked
    def restart_qemu(self):
        """QEMU stops (it flushes) and starts again on what ``vm qemu-args``
        says now: the chains live operations left open in a fresh QEMU."""
        self._qemu.close()
        self._start_qemu()

    def _start_qemu(self):
        self._qemu = contextlib.ExitStack()
        self.proc = self._qemu.enter_context(self.vm.running())
        self._count("QEMU started again")

    # -- guest writes --

    @rule(batch=st.lists(writes, min_size=1, max_size=4))
    @_tracked
    def guest_writes(self, batch):
        for write in batch:
            self._write(*write)

    @rule(disk=st.sampled_from(sorted(DISKS)), offset=boundary_offsets, length=boundary_lengths,
          kind=kinds, pattern=patterns, flush=st.booleans())
    @_tracked
    def guest_write_at_cluster_boundary(self, disk, offset, length, kind, pattern, flush):
        self._write(disk, offset, length, kind, pattern, flush)

    def _write(self, disk, offset, length, kind, pattern, flush):
        size = DISKS[disk]
        offset = min(offset, size - 1)
        length = min(length, size - offset)
        if kind == "fill":
            self.vm.write(disk, pattern, offset, length, flush=flush)
        else:
            self.vm.write_zeros(disk, offset, length, unmap=kind == "zero-unmap", flush=flush)
        self._count("write")

    # -- creates --

    @initialize(count=st.integers(0, 3), layers=st.lists(st.lists(writes, max_size=3),
                                                         min_size=3, max_size=3))
    @_tracked
    def some_snapshots(self, count, layers):
        """Most examples start with a few snapshots; each layer gets writes."""
        for i, how in enumerate(["mkdir", "control", "touch"][:count]):
            for write in layers[i]:
                self._write(*write)
            self._create(NAMES[i], how)

    # Each create is followed by ``then``, guest writes into the new
    # leaves, so that layers differ and deletes merge in both directions.

    @precondition(lambda self: self.mnt is None)
    @rule(name=st.sampled_from(NAMES), then=then_writes)
    @_tracked
    def create_by_cli(self, name, then):
        self._create(name, "cli", then=then)

    @precondition(lambda self: self.mnt is not None)
    @rule(name=st.sampled_from(NAMES), exclusive=st.booleans(), then=then_writes)
    @_tracked
    def create_by_touch(self, name, exclusive, then):
        self._create(name, "touch-excl" if exclusive else "touch", then=then)

    @precondition(lambda self: self.mnt is not None)
    @rule(name=st.sampled_from(NAMES), then=then_writes)
    @_tracked
    def create_by_mkdir(self, name, then):
        self._create(name, "mkdir", then=then)

    @precondition(lambda self: self.mnt is not None)
    @rule(name=st.sampled_from(NAMES), description=st.sampled_from(DESCRIPTIONS),
          then=then_writes)
    @_tracked
    def create_by_control(self, name, description, then):
        self._create(name, "control", description, then)

    def _create(self, name, how, description="", then=()):
        exists = name in self.snaps
        if how == "cli":
            _cli("already has a snapshot" if exists else None, f"snapshot create {name}",
                 "snapshot", "create", self.store, VM, name)
        elif how == "control":
            text = f"{name} {description}" if description else name
            _attempt(errno.EEXIST if exists else None,
                     lambda: _control(self.vm_dir, "create", text), f"control/create {text!r}")
        else:
            # The kernel looks the name up before it asks snapfs.
            path = self.vm_dir / "snapshots" / name
            if how == "mkdir":
                action, expected = (lambda: os.mkdir(path)), errno.EEXIST
            else:
                action = lambda: _touch(path, exclusive=how == "touch-excl")  # noqa: E731
                expected = errno.EISDIR if how == "touch" else errno.EEXIST
            _attempt(expected if exists else None, action, f"{how} snapshots/{name}")
        if not exists:
            self.snaps[name] = self.vm.snapshot_model()
            self.order.append(name)
            self.dirty = True
        self._count(f"create by {how}" if not exists else "create refused")
        for write in then:
            self._write(*write)

    # -- deletes --

    @precondition(lambda self: self.mnt is None and self.order)
    @rule(pick=picks)
    @_tracked
    def delete_by_cli(self, pick):
        name = self._forget(pick)
        _cli(None, f"snapshot delete {name}", "snapshot", "delete", self.store, VM, name)
        self._merged(name)

    @precondition(lambda self: self.mnt is not None and self.order)
    @rule(pick=picks)
    @_tracked
    def delete_by_control(self, pick):
        """control/delete answers once the merge is done."""
        name = self._forget(pick)
        _control(self.vm_dir, "delete", name)
        self._merged(name)

    @precondition(lambda self: self.mnt is not None and self.order)
    @rule(pick=picks, then=then_writes)
    @_tracked
    def delete_by_rmdir(self, pick, then):
        """rmdir answers once the delete is recorded; the merge goes on in
        the background.  The guest writes ``then`` at once (each waits
        while snapfs holds QEMU's monitor), then the VM goes idle."""
        name = self._forget(pick)
        os.rmdir(self.vm_dir / "snapshots" / name)
        for write in then:
            self._write(*write)
            self._count("write right after rmdir")
        self._wait_idle()
        self._merged(name)

    @precondition(lambda self: self.order)
    @rule(pick=picks, how=st.sampled_from(["delete", "preview"]))
    @_tracked
    def refused(self, pick, how):
        """A delete of a name that is no snapshot (ENOENT), a preview while
        QEMU runs (EBUSY; the invariant tries one through the mount)."""
        name = self.order[pick % len(self.order)]
        if how == "delete":
            name += "x"
        if self.mnt is None:
            _cli("has no snapshot named" if how == "delete" else "needs it stopped",
                 f"snapshot {how} {name}", "snapshot", how, self.store, VM, name)
        elif how == "delete":
            _attempt(errno.ENOENT, lambda: os.rmdir(self.vm_dir / "snapshots" / name),
                     f"rmdir {name}")
            _attempt(errno.ENOENT, lambda: _control(self.vm_dir, "delete", name),
                     f"control/delete {name}")
        else:
            _attempt(errno.EBUSY, lambda: _control(self.vm_dir, "preview", name),
                     f"control/preview {name}")
        self._count(f"{how} refused")

    @precondition(lambda self: self.mnt is not None and self.order)
    @rule(pick=picks, then=st.sampled_from(["mkdir", "touch", "control", "rmdir",
                                            "control delete", "mv", "unmount"]),
          other=st.sampled_from(NAMES), new=st.sampled_from(NAMES))
    @_tracked
    def rmdir_then_at_once(self, pick, then, other, new):
        """rmdir, and without waiting for its merge in QEMU: another
        operation (it waits for the merge or is queued behind it: the model
        is the same as one after the other), or an unmount (the daemon
        finishes the merge first).  No guest write until the VM is idle
        again: a queued create is made only then."""
        name = self._forget(pick)
        os.rmdir(self.vm_dir / "snapshots" / name)
        status = json.loads(_read_file(self.vm_dir / "control" / "status"))
        if status["state"] == "running":
            self._count("... while the merge still ran")
        if then in ("mkdir", "touch", "control"):
            self._create(other, then)
        elif then in ("rmdir", "control delete"):
            self._delete_at_once(other, then)
        elif then == "mv":
            self._rename(other, new)
        else:
            self._unmount()
            self.toggled = len(self.steps)
            operation = self.vm.manifest()["operation"]
            assert operation is None, f"unmounted during a merge: {operation}"
        if self.mnt is not None:
            self._wait_idle()
        self._count(f"rmdir, then {then}")

    @precondition(lambda self: self.mnt is not None and self.order)
    @rule(pick=picks, pause=st.sampled_from([0, 0.002, 0.005, 0.01, 0.02, 0.05]))
    @_tracked
    def rmdir_then_stop_qemu(self, pick, pause):
        """rmdir, and QEMU stopped (SIGTERM) ``pause`` seconds after its
        answer: before, while or after snapfs connects for the merge.
        Whatever QEMU did, the merge finishes offline (or in QEMU), and QEMU
        starts again on the new leaves."""
        name = self._forget(pick)
        os.rmdir(self.vm_dir / "snapshots" / name)
        time.sleep(pause)
        with self._timed("stop QEMU"):
            self._qemu.close()
        self._wait_idle()
        last = self.vm.manifest()["last_operation"]
        assert last["op"] == "delete" and last["snapshot"] == name, last
        self._count("rmdir, then QEMU stopped: " +
                    ("merged in QEMU" if last.get("live") else "finished offline"))
        self._start_qemu()

    def _delete_at_once(self, name, how):
        known = name in self.snaps
        if how == "rmdir":
            action = lambda: os.rmdir(self.vm_dir / "snapshots" / name)  # noqa: E731
        else:
            action = lambda: _control(self.vm_dir, "delete", name)  # noqa: E731
        _attempt(None if known else errno.ENOENT, action, f"{how} {name}")
        if known:
            del self.snaps[name]
            self.order.remove(name)
        self._count("delete" if known else "delete refused")

    def _forget(self, pick):
        name = self.order[pick % len(self.order)]
        self.newest = name == self.order[-1]
        del self.snaps[name]
        self.order.remove(name)
        self.dirty = True
        return name

    def _merged(self, name):
        last = self.vm.manifest()["last_operation"]
        assert last["op"] == "delete" and last["snapshot"] == name and last.get("live"), last
        for disk in DISKS:
            direction = last["disks"][disk]["direction"]
            self._count(f"live {direction}" + (" of the newest" if self.newest else ""))

    def _wait_idle(self):
        """The manifest has no operation, and the mount runs none."""
        deadline = time.monotonic() + IDLE_WAIT
        while True:
            status = json.loads(_read_file(self.vm_dir / "control" / "status"))
            operation = self.vm.manifest()["operation"]
            if operation is None and status["state"] != "running":
                return
            assert time.monotonic() < deadline, f"still busy after {IDLE_WAIT}s: {status}"
            time.sleep(0.02)

    # -- renames, refusals --

    @precondition(lambda self: self.order)
    @rule(pick=picks, new=st.sampled_from(NAMES))
    @_tracked
    def rename(self, pick, new):
        self._rename(self.order[pick % len(self.order)], new)

    def _rename(self, old, new):
        if old not in self.snaps:
            expected = errno.ENOENT
        elif old != new and new in self.snaps:
            expected = errno.EEXIST
        else:
            expected = None      # to itself: a no-op
        if self.mnt is None:
            message = {errno.ENOENT: "has no snapshot named",
                       errno.EEXIST: "already has a snapshot"}.get(expected)
            _cli(message, f"snapshot rename {old} {new}",
                 "snapshot", "rename", self.store, VM, old, new)
        else:
            snapshots = self.vm_dir / "snapshots"
            _attempt(expected, lambda: os.rename(snapshots / old, snapshots / new),
                     f"mv {old} {new}")
        if expected is None and old != new:
            self.snaps[new] = self.snaps.pop(old)
            self.order[self.order.index(old)] = new
        self._count("rename" if expected is None else "rename refused")

    # -- what must hold after every step --

    @invariant()
    @_tracked
    def model_holds(self):
        m = self.vm.manifest()
        assert m["operation"] is None, m["operation"]
        assert [s["name"] for s in m["snapshots"]] == self.order, \
            f"the manifest has {[s['name'] for s in m['snapshots']]}, the model {self.order}"
        assert {s["consistency"] for s in m["snapshots"]} <= {"crash"}, m["snapshots"]
        assert m["preview"] is None

        assert self.proc.poll() is None, f"QEMU exited with {self.proc.returncode}"
        assert self.vm.tops() == {d: str(self.vm.dir / v) for d, v in m["active"].items()}, \
            "QEMU's devices write other files than the manifest's active leaves"
        with QmpSession(self.vm.qmp) as q:
            jobs = q.execute("query-jobs")
            held = {p for p in open_paths(q) if p and p.startswith(str(self.vm.dir))}
        assert jobs == [], jobs
        assert held <= {str(self.vm.dir / v) for v in m["volumes"]}, \
            f"QEMU holds files the manifest does not name: {held}"

        files = {p.name for p in self.vm.dir.iterdir() if p.name != "manifest.json"}
        assert files == set(m["volumes"]), files ^ set(m["volumes"])
        assert len(files) == (len(self.order) + 1) * len(DISKS), sorted(files)

        if self.mnt is not None:
            self._check_mount()
        elif self.dirty:
            # QEMU opened the snapshots' volumes read-only: qemu-img reads them.
            with self._timed("qemu-img convert while QEMU runs"):
                for snap in m["snapshots"]:
                    for disk, vid in snap["volumes"].items():
                        _check_bytes(self.vm.view(vid), self.snaps[snap["name"]][disk],
                                     f"qemu-img convert of snapshot {snap['name']} {disk}")
        self.dirty = False

    def _check_mount(self):
        snapshots = self.vm_dir / "snapshots"
        listed = sorted(os.listdir(snapshots))
        want = sorted(self.order + (["latest"] if self.order else []))
        assert listed == want, f"snapshots/ lists {listed}, the model has {want}"
        if self.order:
            assert os.readlink(snapshots / "latest") == self.order[-1], "snapshots/latest"
        for name in self.order:
            sdir = snapshots / name
            assert stat.S_ISDIR(os.stat(sdir).st_mode), f"snapshots/{name} is not a directory"
            assert sorted(n for n in os.listdir(sdir) if not PART_RE.search(n)) == \
                sorted([f"{d}.raw" for d in DISKS] + ["snapshot.json"])
            doc = json.loads(_read_file(sdir / "snapshot.json"))
            assert doc["name"] == name and doc["consistency"] == "crash", doc
            for disk in DISKS:
                _check_bytes(_read_file(sdir / f"{disk}.raw"), self.snaps[name][disk],
                             f"snapshots/{name}/{disk}.raw")
        status = json.loads(_read_file(self.vm_dir / "control" / "status"))
        assert status["state"] == "idle" and status["snapshots"] == self.order, status
        # While QEMU runs: no preview, and the active leaves are QEMU's.
        if self.order:
            name = self.order[len(self.steps) % len(self.order)]
            _attempt(errno.EBUSY, lambda: _control(self.vm_dir, "preview", name),
                     f"control/preview {name}")
        for disk in DISKS:
            active = self.vm_dir / "active" / f"{disk}.raw"
            _attempt(errno.EBUSY, lambda: open(active, "rb").close(), f"open active/{disk}.raw")

    # -- the end --

    def teardown(self):
        try:
            try:
                with self._timed("stop QEMU"):
                    self._qemu.close()
                if self.mnt is not None and not self.failed:
                    # QEMU is gone: the mount serves the leaves it left.
                    for disk in DISKS:
                        _check_bytes(_read_file(self.vm_dir / "active" / f"{disk}.raw"),
                                     bytes(self.vm.model[disk]),
                                     f"active/{disk}.raw after QEMU stopped")
            finally:
                with self._timed("unmount"):
                    self._stop()
            if not self.failed:
                with self._timed("final checks"):
                    self.final_checks()
        except BaseException:
            self.failed = True
            raise
        finally:
            if not self.failed:
                shutil.rmtree(self.work, ignore_errors=True)
            else:
                self.stats.setdefault("kept", []).append(str(self.work))

    def final_checks(self):
        m = self.vm.manifest()
        assert [s["name"] for s in m["snapshots"]] == self.order
        for snap in m["snapshots"]:
            for disk, vid in snap["volumes"].items():
                _check_bytes(self.vm.view(vid), self.snaps[snap["name"]][disk],
                             f"qemu-img convert of snapshot {snap['name']} {disk}")
        for disk, vid in m["active"].items():
            _check_bytes(self.vm.view(vid), bytes(self.vm.model[disk]),
                         f"qemu-img convert of the active {disk}")
        self.vm.check_volumes()
        result = snapfs("check", self.store, check=False)
        assert result.returncode == 0, f"snapfs check failed:\n{result.stdout}{result.stderr}"
        self._count("final checks")


def _leftovers(base):
    """QEMUs and mounts of this test still there (there must be none)."""
    qemus = subprocess.run(["pgrep", "-a", "qemu-system"], capture_output=True,
                           text=True).stdout.splitlines()
    return ([q for q in qemus if str(base) in q]
            + [m for m in snapfs_mounts() if m.startswith(str(base))])


def test_live_model(tmp_path, run_dir):
    stats = {}
    LiveModel.base = tmp_path
    LiveModel.stats = stats
    started = time.monotonic()
    try:
        run_state_machine_as_test(LiveModel, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, derandomize=True, database=None,
            deadline=None, suppress_health_check=list(HealthCheck)))
    finally:
        print(f"\nlive model: {time.monotonic() - started:.1f}s, {stats}")
    assert not _leftovers(tmp_path)
