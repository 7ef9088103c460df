"""Acceptance: a model-based test of the mounted namespace.

A hypothesis state machine drives one mounted VM (two blank disks of
different sizes) through random writes to the active disks and random
snapshot operations -- create (touch / mkdir / control/create, and partial
snapshots of some disks through control/create's JSON form), delete
(rmdir / control/delete), rename (mv), preview (plain, and custom: disks
taken from other snapshots), commit and undo -- all through the
filesystem, never the CLI.  A plain-Python model predicts the
outcome (including the errno of every refusal), and after each step every
view of the mount must read exactly the model's bytes.  At the end the
store is unmounted, every qcow2 volume must pass ``qemu-img check`` and
read (through ``qemu-img convert``) as the model says, ``snapfs check``
must pass, and a fresh mount must show the same state again.

Some steps are timed against snapfs's own asynchrony (a write at once
after an operation; reads while rmdir's merge runs in the background; an
operation at once after rmdir, which waits for the merge or is queued), so
a snapfs race can fail one run and pass the replay: hypothesis then
reports a FlakyFailure / FlakyStrategyDefinition, and the first traceback
in its report is the real failure (the failing step's arguments are in
the ``kwargs`` of the wrapper frame).  A failed example's work directory
(store, ``store/snapfs.log``) is kept and listed in the printed stats.

Runtime: about 3-4 s per example on 2 busy cores (mount, 25 steps,
qemu-img, snapfs check, remount), so the "ci" profile's 50 examples take
about 3 minutes.  SNAPFS_MODEL_EXAMPLES=N overrides the example count.
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
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule,
    run_state_machine_as_test,
)

from tests.support.model_checks import (
    attempt as _attempt, check_bytes as _check_bytes, read_file as _read_file,
    touch as _touch,
)
from tests.support.mounting import mounted, snapfs, snapfs_mounts
from tests.support.qemu import check, is_clean, to_raw

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE")

# Two disks of different sizes; sdb's size is not a multiple of the 64 KiB
# cluster, so its last cluster is partial.
DISKS = {"sda": 4 << 20, "sdb": 3000 << 10}
CLUSTER = 64 << 10
MAX_WRITE = 256 << 10
# A small alphabet, so that names collide often.
NAMES = ("a", "b", "c", "d", "e")
DESCRIPTIONS = ("", "nightly", "before the upgrade")

STEPS = 25
# Examples per run: the hypothesis profile's (50 in "ci").  Set
# SNAPFS_MODEL_EXAMPLES to override it.
EXAMPLES = os.environ.get("SNAPFS_MODEL_EXAMPLES")

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
PART_RE = re.compile(r"-part\d+\.raw$")     # partition views, if random data looks like an MBR


# -- helpers -------------------------------------------------------------------

def _disk_names(listing):
    return sorted(n for n in listing if not PART_RE.search(n))


def _control(mnt, command, text):
    """``echo TEXT > vm/control/COMMAND``: one command per write."""
    fd = os.open(mnt / "vm" / "control" / command, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode() + b"\n")
    finally:
        os.close(fd)


def _pattern(kind, seed, length):
    if kind == "zeros":
        return bytes(length)
    if kind == "fill":
        return bytes([seed % 255 + 1]) * length
    return random.Random(seed).randbytes(length)


def _tracked(fn):
    """Log the step; if it raises, note the steps so far on the error (a
    flaky failure gets no "Steps leading up to this error" from hypothesis)
    and mark the machine failed, so that teardown only unmounts (its final
    checks would hide the real failure)."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if fn.__name__ != "views_match_the_model":
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


offsets = st.integers(min_value=0, max_value=max(DISKS.values()) - 1)
lengths = st.one_of(st.integers(min_value=1, max_value=4096),
                    st.integers(min_value=1, max_value=MAX_WRITE))
# At, just before and just after a cluster boundary (or the end of the disk).
boundary_offsets = st.tuples(st.integers(0, max(DISKS.values()) // CLUSTER),
                             st.integers(-3, 3)).map(lambda t: max(0, t[0] * CLUSTER + t[1]))
boundary_lengths = st.one_of(st.sampled_from([1, 512, CLUSTER, 2 * CLUSTER, MAX_WRITE]),
                             st.tuples(st.integers(1, 4), st.integers(-3, 3))
                               .map(lambda t: t[0] * CLUSTER + t[1]))
patterns = st.sampled_from(["random", "zeros", "fill"])
seeds = st.integers(0, 2 ** 32 - 1)
# After an operation: None, or the seed of a write to the active disk made
# at once, before anything else looks at the mount (as a running VM would).
then_writes = st.one_of(st.none(), seeds)


# -- the state machine -----------------------------------------------------------

class SnapfsModel(RuleBasedStateMachine):
    base = None          # a directory for the examples' stores; set by the test
    stats = None         # counters, set by the test

    def __init__(self):
        super().__init__()
        self.failed = False
        self.steps = []
        self.mnt = None
        self.stats = self.stats if self.stats is not None else {}
        self.work = Path(tempfile.mkdtemp(prefix="model-", dir=self.base))
        self.store = self.work / "store"
        with self._timed("setup"):
            shutil.copytree(self.template(), self.store)
        # The model.
        self.active = {d: bytearray(size) for d, size in DISKS.items()}
        self.snaps = {}      # name -> {"data": {disk: bytes}, "description": str}
        self.order = []      # snapshot names, oldest first
        self.open_preview = None  # {"name": previewed snapshot, "before": {disk: bytes}}
        self._mount = mounted(self.store, self.work / "mnt")
        with self._timed("setup"):
            self.mnt = self._mount.__enter__()
        self._count("examples")

    @classmethod
    def template(cls):
        """A new store with VM ``vm`` and its blank disks, made once per
        test run and copied for every example."""
        path = Path(cls.base) / "template"
        if not path.exists():
            snapfs("init", path)
            snapfs("vm", "add", path, "vm",
                   *[a for d, size in DISKS.items() for a in ("--disk", f"{d}={size}")])
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
    def snapdir(self):
        return self.mnt / "vm" / "snapshots"

    def _copy_active(self):
        return {d: bytes(b) for d, b in self.active.items()}

    # -- writes to the active disks --

    # Two write rules (rules are drawn uniformly), so that writes are a
    # good share of the steps and snapshots differ.
    @rule(disk=st.sampled_from(sorted(DISKS)), offset=offsets, length=lengths, kind=patterns,
          seed=seeds)
    @_tracked
    def write(self, disk, offset, length, kind, seed):
        self._write(disk, offset, length, kind, seed)

    @rule(disk=st.sampled_from(sorted(DISKS)), offset=boundary_offsets, length=boundary_lengths,
          kind=patterns, seed=seeds)
    @_tracked
    def write_at_cluster_boundary(self, disk, offset, length, kind, seed):
        self._write(disk, offset, length, kind, seed)

    def _write_at_once(self, seed):
        if seed is None:
            return
        rng = random.Random(seed)
        disk = rng.choice(sorted(DISKS))
        offset = rng.randrange(DISKS[disk])
        self._write(disk, offset, rng.randint(1, MAX_WRITE), "random", seed)
        self._count("write right after an operation")

    def _write(self, disk, offset, length, kind, seed):
        size = DISKS[disk]
        offset = min(offset, size - 1)
        length = min(length, size - offset)
        data = _pattern(kind, seed, length)
        with open(self.mnt / "vm" / "active" / f"{disk}.raw", "r+b") as f:
            f.seek(offset)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.active[disk][offset:offset + length] = data
        self._count("write")

    # -- snapshot operations --
    #
    # Hypothesis's swarm testing switches whole rules off for an example,
    # so each way to create or delete is a rule of its own: one switched
    # off still leaves the others.

    @initialize(count=st.integers(0, 3), seed=seeds)
    @_tracked
    def some_snapshots(self, count, seed):
        """Start most examples with a few snapshots that differ."""
        rng = random.Random(seed)
        for name in rng.sample(NAMES, count):
            disk = rng.choice(sorted(DISKS))
            offset = rng.randrange(DISKS[disk])
            self._write(disk, offset, rng.randint(1, MAX_WRITE), "random", rng.randrange(2 ** 32))
            self._create(name, rng.choice(["touch-excl", "mkdir", "control"]), "", None)
            self.verify(self.mnt)

    @rule(name=st.sampled_from(NAMES), exclusive=st.booleans(), then_write=then_writes)
    @_tracked
    def create_by_touch(self, name, exclusive, then_write):
        self._create(name, "touch-excl" if exclusive else "touch", "", then_write)

    @rule(name=st.sampled_from(NAMES), then_write=then_writes)
    @_tracked
    def create_by_mkdir(self, name, then_write):
        self._create(name, "mkdir", "", then_write)

    @rule(name=st.sampled_from(NAMES), description=st.sampled_from(DESCRIPTIONS),
          then_write=then_writes)
    @_tracked
    def create_by_control(self, name, description, then_write):
        self._create(name, "control", description, then_write)

    @rule(name=st.sampled_from(NAMES), disks=st.sampled_from([["sda"], ["sdb"], ["sda", "sdb"]]),
          then_write=then_writes)
    @_tracked
    def create_partial(self, name, disks, then_write):
        """RHV's "disks to include": the JSON form of control/create."""
        self._create(name, "control-json", "", then_write, disks)

    def _create(self, name, how, description, then_write, disks=None):
        path = self.snapdir / name
        exists = name in self.snaps
        if how == "control-json":
            expected = errno.EBUSY if self.open_preview else errno.EEXIST if exists else None
            text = json.dumps({"name": name, "disks": disks})
            action = lambda: _control(self.mnt, "create", text)  # noqa: E731
        elif how == "control":
            # The operation itself decides: a preview is checked first.
            expected = errno.EBUSY if self.open_preview else errno.EEXIST if exists else None
            text = f"{name} {description}" if description else name
            action = lambda: _control(self.mnt, "create", text)  # noqa: E731
        else:
            # The kernel looks the name up before it asks snapfs.
            description = ""
            if exists:
                expected = errno.EISDIR if how == "touch" else errno.EEXIST
            else:
                expected = errno.EBUSY if self.open_preview else None
            if how == "mkdir":
                action = lambda: os.mkdir(path)  # noqa: E731
            else:
                action = lambda: _touch(path, exclusive=how == "touch-excl")  # noqa: E731
        _attempt(expected, action, f"create {name!r} by {how}")
        if expected is None:
            data = {d: b for d, b in self._copy_active().items() if disks is None or d in disks}
            self.snaps[name] = {"data": data, "description": description}
            self.order.append(name)
            self._write_at_once(then_write)
        what = "create" if disks is None or len(disks) == len(DISKS) else "partial create"
        self._count(what if expected is None else f"{what} refused")

    @rule(name=st.sampled_from(NAMES), then_write=then_writes)
    @_tracked
    def delete_by_rmdir(self, name, then_write):
        self._delete(name, "rmdir", then_write)

    @rule(name=st.sampled_from(NAMES), then_write=then_writes)
    @_tracked
    def delete_by_control(self, name, then_write):
        self._delete(name, "control", then_write)

    def _delete(self, name, how, then_write, wait=True):
        """Delete ``name``; True if it was deleted.  Unless ``wait``, what
        follows is asked while the merge may still run."""
        known = name in self.snaps
        if how == "control":
            expected = errno.EBUSY if self.open_preview else None if known else errno.ENOENT
            action = lambda: _control(self.mnt, "delete", name)  # noqa: E731
        else:
            expected = errno.ENOENT if not known else errno.EBUSY if self.open_preview else None
            action = lambda: os.rmdir(self.snapdir / name)  # noqa: E731
        _attempt(expected, action, f"delete {name!r} by {how}")
        if expected is None:
            del self.snaps[name]
            self.order.remove(name)
            # rmdir is answered once the delete is recorded; the merge goes
            # on in the background (control/status: "running").  Meanwhile
            # the snapshot is gone and every view reads as before; writes
            # wait for the merge, and so do other operations (or they are
            # queued: see delete_then_at_once).
            if wait:
                self._write_at_once(then_write)
                self.verify(self.mnt, running_ok=True)
                self._wait_until_idle()
        self._count("delete" if expected is None else "delete refused")
        return expected is None

    @precondition(lambda self: self.order and not self.open_preview)
    @rule(index=st.integers(0, len(NAMES) - 1),
          then=st.sampled_from(["mkdir", "touch", "touch-excl", "control create", "rmdir",
                                "control delete", "rename", "preview"]),
          other=st.sampled_from(NAMES), new=st.sampled_from(NAMES))
    @_tracked
    def rmdir_then_at_once(self, index, then, other, new):
        """rmdir of an existing snapshot and, without waiting for its
        merge, another operation (DESIGN.md section 1: it waits for the
        merge, or is queued behind it, instead of failing).  The model is
        the same as one after the other; once everything ran, the
        invariant checks every view."""
        assert self._delete(self.order[index % len(self.order)], "rmdir", None, wait=False)
        if then in ("mkdir", "touch", "touch-excl", "control create"):
            self._create(other, {"control create": "control"}.get(then, then), "", None)
        elif then in ("rmdir", "control delete"):
            self._delete(other, "rmdir" if then == "rmdir" else "control", None, wait=False)
        elif then == "rename":
            self._rename(other, new)
        else:
            self._preview(other, None)
        self._count(f"{then} right after rmdir")
        if json.loads(_read_file(self.mnt / "vm" / "control" / "status"))["state"] == "running":
            self._count("... while a merge or queued operation still ran")
        self._wait_until_idle()

    def _wait_until_idle(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while True:
            status = json.loads(_read_file(self.mnt / "vm" / "control" / "status"))
            if status["state"] != "running":
                return
            assert time.monotonic() < deadline, f"still running after {timeout}s: {status}"
            time.sleep(0.02)

    @rule(old=st.sampled_from(NAMES), new=st.sampled_from(NAMES))
    @_tracked
    def rename(self, old, new):
        self._rename(old, new)

    def _rename(self, old, new):
        if old not in self.snaps:
            expected = errno.ENOENT
        elif old != new and new in self.snaps:
            expected = errno.EEXIST
        else:
            expected = None      # renaming to itself is a no-op (the kernel's)
        _attempt(expected, lambda: os.rename(self.snapdir / old, self.snapdir / new),
                 f"rename {old!r} -> {new!r}")
        if expected is None and old != new:
            self.snaps[new] = self.snaps.pop(old)
            self.order[self.order.index(old)] = new
            if self.open_preview and self.open_preview["name"] == old:
                self.open_preview["name"] = new
            if self.open_preview:
                sources = self.open_preview["sources"]
                sources.update({d: new for d, o in sources.items() if o == old})
        self._count("rename" if expected is None else "rename refused")

    @rule(name=st.sampled_from(NAMES), then_write=then_writes)
    @_tracked
    def preview(self, name, then_write):
        self._preview(name, then_write)

    @precondition(lambda self: self.order)
    @rule(index=st.integers(0, len(NAMES) - 1), sources=st.dictionaries(
        st.sampled_from(sorted(DISKS)), st.integers(0, 9), min_size=1),
        then_write=then_writes)
    @_tracked
    def custom_preview(self, index, sources, then_write):
        """RHV's custom preview: some disks from other snapshots (mostly
        existing ones; 8 and 9 stand for a name that doesn't exist)."""
        name = self.order[index % len(self.order)]
        self._preview(name, then_write, {
            d: self.order[i % len(self.order)] if i < 8 else "missing" for d, i in sources.items()})

    def _preview(self, name, then_write, sources=None):
        if self.open_preview:
            expected = errno.EBUSY
        elif name not in self.snaps:
            expected = errno.ENOENT
        else:
            expected = None
            for d, other in (sources or {}).items():       # in the order given
                if other not in self.snaps:
                    expected = errno.ENOENT
                    break
                if d not in self.snaps[other]["data"]:
                    expected = errno.EINVAL                 # it does not hold the disk
                    break
        text = json.dumps({"snapshot": name, "disks": sources}) if sources else name
        _attempt(expected, lambda: _control(self.mnt, "preview", text), f"preview {text!r}")
        if expected is None:
            self.open_preview = {"name": name, "before": self._copy_active(),
                                 "sources": dict(sources or {})}
            # A disk the snapshot doesn't hold keeps its current state.
            for d, data in self.snaps[name]["data"].items():
                self.active[d] = bytearray(data)
            for d, other in (sources or {}).items():
                self.active[d] = bytearray(self.snaps[other]["data"][d])
            self._write_at_once(then_write)
        what = "custom preview" if sources else "preview"
        self._count(what if expected is None else f"{what} refused")

    @precondition(lambda self: self.open_preview is None)
    @rule(command=st.sampled_from(["commit", "undo"]), text=st.sampled_from(["", "yes"]))
    @_tracked
    def end_without_preview(self, command, text):
        # DESIGN.md does not name the errno for commit/undo without a
        # preview; snapfs answers EINVAL (operations.py).
        _attempt(errno.EINVAL, lambda: _control(self.mnt, command, text), command)
        self._count(f"{command} refused")

    @precondition(lambda self: self.open_preview is not None)
    @rule(text=st.sampled_from(["", "yes", "commit it"]), then_write=then_writes)
    @_tracked
    def commit(self, text, then_write):
        _attempt(None, lambda: _control(self.mnt, "commit", text), "commit")
        index = self.order.index(self.open_preview["name"])
        for name in self.order[index + 1:]:
            del self.snaps[name]
        del self.order[index + 1:]
        # A disk previewed from an older snapshot OTHER goes on from OTHER's
        # state: the kept snapshots after OTHER give that disk up (RHV),
        # and one left with no disk goes.
        for d, other in self.open_preview["sources"].items():
            if other in self.order:
                for name in self.order[self.order.index(other) + 1:]:
                    self.snaps[name]["data"].pop(d, None)
                    if not self.snaps[name]["data"]:
                        del self.snaps[name]
                        self._count("snapshot dropped by a custom commit")
                self.order = [n for n in self.order if n in self.snaps]
        self.open_preview = None
        self._write_at_once(then_write)
        self._count("commit")

    @precondition(lambda self: self.open_preview is not None)
    @rule(text=st.sampled_from(["", "undo"]), then_write=then_writes)
    @_tracked
    def undo(self, text, then_write):
        _attempt(None, lambda: _control(self.mnt, "undo", text), "undo")
        self.active = {d: bytearray(b) for d, b in self.open_preview["before"].items()}
        self.open_preview = None
        self._write_at_once(then_write)
        self._count("undo")

    # -- what must hold after every step --

    @invariant()
    @_tracked
    def views_match_the_model(self):
        self.verify(self.mnt)
        self.check_volume_files()

    def verify(self, mnt, running_ok=False):
        vm = mnt / "vm"
        want_top = ["active", "control", "snapshots"]
        if self.open_preview:
            want_top.append("before-preview")
        try:
            top = os.listdir(vm)
        except FileNotFoundError:
            if str(mnt) not in snapfs_mounts():
                # Not snapfs: tests/conftest.py's no_leftover_mounts, at the end
                # of any other pytest session on this machine, force-unmounts
                # every snapfs mount that session did not see at its start.
                raise AssertionError(f"{mnt} is no longer mounted (unmounted from outside?)")
            raise
        assert sorted(top) == sorted(want_top), "the VM directory"

        listed = sorted(os.listdir(vm / "snapshots"))
        want = sorted(self.order + (["latest"] if self.order else []))
        assert listed == want, f"snapshots/ lists {listed}, the model has {want}"
        if self.order:
            latest = vm / "snapshots" / "latest"
            assert stat.S_ISLNK(os.lstat(latest).st_mode)
            assert os.readlink(latest) == self.order[-1], "snapshots/latest"

        disk_files = sorted(f"{d}.raw" for d in DISKS)
        for name in self.order:
            sdir = vm / "snapshots" / name
            held = self.snaps[name]["data"]
            assert stat.S_ISDIR(os.stat(sdir).st_mode), f"snapshots/{name} is not a directory"
            assert _disk_names(os.listdir(sdir)) == sorted([f"{d}.raw" for d in held]
                                                           + ["snapshot.json"]), name
            doc = json.loads(_read_file(sdir / "snapshot.json"))
            assert doc["name"] == name, f"snapshots/{name}/snapshot.json names {doc['name']!r}"
            assert doc["description"] == self.snaps[name]["description"]
            assert doc["excluded"] == {d: "not selected" for d in DISKS if d not in held}, doc
            for d in held:
                self._check_view(sdir / f"{d}.raw", held[d], f"snapshots/{name}/{d}.raw")

        assert _disk_names(os.listdir(vm / "active")) == disk_files
        for d in DISKS:
            self._check_view(vm / "active" / f"{d}.raw", bytes(self.active[d]), f"active/{d}.raw")
        if self.open_preview:
            assert _disk_names(os.listdir(vm / "before-preview")) == disk_files
            for d in DISKS:
                self._check_view(vm / "before-preview" / f"{d}.raw",
                                 self.open_preview["before"][d], f"before-preview/{d}.raw")

        status = json.loads(_read_file(vm / "control" / "status"))
        want_state = "preview" if self.open_preview else "idle"
        assert status["state"] == want_state or running_ok and status["state"] == "running", status
        assert status["snapshots"] == self.order, status
        previewed = status["preview"]["snapshot"] if status["preview"] else None
        assert previewed == (self.open_preview["name"] if self.open_preview else None), status

    def _check_view(self, path, want, what):
        assert os.stat(path).st_size == len(want), f"{what}: size"
        _check_bytes(_read_file(path), want, what)

    def _volume_files(self):
        vm_dir = self.store / "vms" / "vm"
        return sorted(n for n in os.listdir(vm_dir) if UUID_RE.match(n))

    def check_volume_files(self):
        """Nothing leaks and nothing is lost: the files are the manifest's
        volumes, each on the chain of a snapshot, an active leaf or a
        before-preview leaf; and one volume per held disk of each snapshot,
        per disk for the active state and (while a preview is open) for
        before-preview, plus the layers that a snapshot not holding a disk
        left under the next preview."""
        m = json.loads((self.store / "vms" / "vm" / "manifest.json").read_text())
        files = self._volume_files()
        assert files == sorted(m["volumes"]), f"files {files} vs manifest {sorted(m['volumes'])}"
        tops = list(m["active"].values()) + [v for s in m["snapshots"]
                                             for v in s["volumes"].values()]
        tops += list(m["preview"]["before"].values()) if m["preview"] else []
        used = set()
        for vid in tops:
            while vid is not None and vid not in used:
                used.add(vid)
                vid = m["volumes"][vid]["parent"]
        assert used == set(m["volumes"]), f"unused volumes {set(m['volumes']) - used}"
        held = sum(len(self.snaps[n]["data"]) for n in self.order)
        least = held + len(DISKS) * (2 if self.open_preview else 1)
        assert len(files) >= least, f"{len(files)} volume files, at least {least} expected"

    # -- the end: the store as QEMU and `snapfs check` see it, and a remount --

    def teardown(self):
        try:
            if self.mnt is not None:
                self.mnt = None
                with self._timed("unmount"):
                    self._mount.__exit__(None, None, None)
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
                # Kept for a post-mortem (store/snapfs.log has the daemon's log).
                self.stats.setdefault("kept", []).append(str(self.work))

    def final_checks(self):
        vm_dir = self.store / "vms" / "vm"
        with self._timed("final: qemu-img check"):
            for name in self._volume_files():
                report = check(vm_dir / name)
                assert is_clean(report), f"qemu-img check {name}: {report}"
        with self._timed("final: snapfs check"):
            result = snapfs("check", self.store, check=False)
            assert result.returncode == 0, \
                f"snapfs check failed:\n{result.stdout}{result.stderr}"

        # QEMU reads every layer as the model says.
        with self._timed("final: qemu-img convert"):
            manifest = json.loads((vm_dir / "manifest.json").read_text())
            views = {f"active/{d}": (manifest["active"][d], bytes(self.active[d]))
                     for d in DISKS}
            for snap in manifest["snapshots"]:
                assert set(snap["volumes"]) == set(self.snaps[snap["name"]]["data"]), snap
                for d in snap["volumes"]:
                    views[f"snapshots/{snap['name']}/{d}"] = (
                        snap["volumes"][d], self.snaps[snap["name"]]["data"][d])
            if self.open_preview:
                for d in DISKS:
                    views[f"before-preview/{d}"] = (manifest["preview"]["before"][d],
                                                    self.open_preview["before"][d])
            for what, (vid, want) in views.items():
                _check_bytes(to_raw(vm_dir / vid), want, f"qemu-img convert of {what} ({vid})")

        # A fresh mount shows the same state.
        with self._timed("final: remount"):
            with mounted(self.store, self.work / "mnt2") as mnt:
                self.verify(mnt)
        self._count("final checks")


def test_model(tmp_path):
    stats = {}
    SnapfsModel.base = tmp_path
    SnapfsModel.stats = stats
    options = dict(stateful_step_count=STEPS)
    if EXAMPLES:
        options["max_examples"] = int(EXAMPLES)
    started = time.monotonic()
    try:
        run_state_machine_as_test(SnapfsModel, settings=settings(**options))
    finally:
        print(f"\nmodel: {time.monotonic() - started:.1f}s, {stats}")
