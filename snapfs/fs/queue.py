"""Each VM's snapshot operations: one at a time, in the order they were
asked (DESIGN.md section 1: "An operation asked while a merge of the same
VM runs waits for it instead of failing").

An operation *holds* its VM while it runs (``VmState.op_lock`` is held
then, and only then); a delete holds it until its merge, which goes on
after rmdir was answered, is done.  What is asked meanwhile joins the VM's
queue, first come first served:

- Control-file commands and the creation of ``touch snapshots/NAME`` (at
  close) *wait*: the request's thread sleeps until every operation asked
  before it has run, then runs its own and answers with its errno.  They
  hold no directory lock in the kernel, so waiting stalls nobody else.
- mkdir, rmdir and mv are *queued*: the kernel holds the snapshots
  directory's lock while they are in the daemon, and every lookup and
  listing there would stall behind a wait.  They are checked at once
  against what the VM will look like once the queue has run
  (``Projection``), answered, and run later by the thread that holds the
  VM when their turn comes (``OpQueue.hand_over``); a failure then is
  logged and shown in control/status's ``last_error``.

The queue lives in the daemon's memory: a queued operation that has not
started is lost if the daemon is killed (its request was answered).  An
unmount runs it first (Vfs.close).
"""

import collections
import threading
from dataclasses import dataclass, field

from ..errors import AlreadyExists, Busy, ChainTooDeep, NotFound
from ..ops.finish import utc_now
from ..ops.users import snapshot_use
from ..store.chain import MAX_CHAIN_DEPTH
from ..store.inuse import held_by_qemu
from ..store.names import check_snapshot_name


@dataclass(eq=False)
class Job:
    """One operation asked of a VM."""
    op: str                       # create, delete, rename, preview, commit, undo, clone
    snapshot: str | None = None   # the snapshot it names (create: the new one)
    target: str | None = None     # rename: the new name; clone: the new VM
    asked_by: str | None = None   # "mkdir", "rmdir", "mv", "touch", "control/delete"...
    # Queued jobs: runs the operation in the thread that holds the VM
    # (never raises: failures are logged and shown).  None: a request
    # waits for its turn and runs it itself.
    run: object = None
    asked: str = field(default_factory=utc_now)

    @property
    def queued(self):
        return self.run is not None

    def describe(self):
        doc = {"op": self.op, "snapshot": self.snapshot, "asked_by": self.asked_by,
               "asked": self.asked, "answered": self.queued}
        if self.target is not None:
            doc["to"] = self.target
        return doc


class OpQueue:
    """Who holds VM's operations now, and who comes next.  ``lock`` is the
    VM's op_lock: held while a job holds the VM."""

    def __init__(self, lock):
        self._lock = lock
        self._changed = threading.Condition()
        self._jobs = collections.deque()     # asked, not started
        self._holder = None                  # the job that holds the VM

    @property
    def busy(self):
        return self._holder is not None or bool(self._jobs)

    def jobs(self):
        """(the job holding the VM or None, [the jobs after it, in order])"""
        with self._changed:
            return self._holder, list(self._jobs)

    def check(self, fn):
        """``fn([holder and jobs])``, with nothing added meanwhile."""
        with self._changed:
            return fn(self._pending())

    def wait_turn(self, job):
        """Join the queue, and return once ``job`` holds the VM."""
        with self._changed:
            self._jobs.append(job)
            try:
                while self._holder is not None or self._jobs[0] is not job:
                    self._changed.wait()
            except BaseException:
                self._jobs.remove(job)
                self._changed.notify_all()
                raise
            self._take(self._jobs.popleft())

    def offer(self, job, check):
        """A queued ``job``: if the VM is idle, it holds it now (True: the
        caller runs it).  Else ``check(pending jobs)`` may refuse it
        (raises); or it joins the queue (False)."""
        with self._changed:
            if self._holder is None and not self._jobs:
                self._take(job)
                return True
            check(self._pending())
            self._jobs.append(job)
            return False

    def hand_over(self):
        """The holder is done.  Returns the queued job that holds the VM now
        (the caller's thread runs it), or None: the VM is let go, and the
        request waiting first, if any, takes it."""
        with self._changed:
            if self._jobs and self._jobs[0].queued:
                self._holder = self._jobs.popleft()
                return self._holder
            self._holder = None
            self._lock.release()
            self._changed.notify_all()
            return None

    def _take(self, job):
        # Only the queue takes op_lock, and only when nobody holds the VM.
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("op_lock held outside the VM's queue")
        self._holder = job

    def _pending(self):
        return ([self._holder] if self._holder is not None else []) + list(self._jobs)


class WriteGate:
    """Holds writes to a VM's active views while a queued mkdir waits for
    its turn.  mkdir was answered at once, so its snapshot must hold the
    disks as they were then, not as they are when the merge before it
    ends: the writes issued after the answer wait, and land in the new
    leaves once the snapshot is made.  Each queued mkdir closes it once."""

    def __init__(self):
        self._held = 0
        self._changed = threading.Condition()

    @property
    def closed(self):
        return self._held > 0

    def close(self):
        with self._changed:
            self._held += 1

    def open(self):
        with self._changed:
            self._held -= 1
            if not self._held:
                self._changed.notify_all()

    def wait(self):
        with self._changed:
            while self._held:
                self._changed.wait()


class Projection:
    """A VM's snapshots once every job of ``jobs`` has run, each as if it
    succeeds.  A step is applied only where it still applies: the job that
    holds the VM may already show in the manifest.  The chain depth is
    followed through creates and deletes; after a preview it is unknown
    (None) and left to the operation's own check."""

    def __init__(self, manifest, jobs):
        m = manifest
        self.names = [s.name for s in m.snapshots]
        by_id = {s.id: s.name for s in m.snapshots}
        self.preview = by_id.get(m.preview["snapshot"]) if m.preview else None
        chains = [m.chain(v) for v in m.active.values()]
        self.depth = max((len(c) for c in chains), default=0)
        active = {v for c in chains for v in c}
        # Snapshots under the active leaves: deleting one makes chains shorter.
        self._under_active = {s.name for s in m.snapshots
                              if any(v in active for v in s.volumes.values())}
        self._depth_before_preview = self.depth
        for job in jobs:
            getattr(self, f"_{job.op}")(job)

    def _create(self, job):
        if job.snapshot in self.names:
            return
        if job.snapshot is not None:
            self.names.append(job.snapshot)
            self._under_active.add(job.snapshot)
        if self.depth is not None:
            self.depth += 1

    def _delete(self, job):
        if job.snapshot not in self.names:
            return
        self.names.remove(job.snapshot)
        if job.snapshot in self._under_active and self.depth is not None:
            self.depth -= 1

    def _rename(self, job):
        old, new = job.snapshot, job.target
        if old in self.names and new not in self.names:
            self.names[self.names.index(old)] = new
            if old in self._under_active:
                self._under_active.add(new)
            if self.preview == old:
                self.preview = new

    def _preview(self, job):
        if self.preview is None and job.snapshot in self.names:
            self.preview = job.snapshot
            self._depth_before_preview, self.depth = self.depth, None

    def _commit(self, job):
        if self.preview is not None:
            self.names = self.names[:self.names.index(self.preview) + 1]
            self.preview = None

    def _undo(self, job):
        if self.preview is not None:
            self.preview = None
            self.depth = self._depth_before_preview

    def _clone(self, job):
        """A clone only reads the VM: nothing changes."""


def refuse_queued(job, projection, vm=None, volume_path=None, attached=False):
    """Raise what ``job`` (create, delete or rename) would raise when it
    runs after the jobs of ``projection``: EINVAL, ENOENT, EEXIST, EBUSY
    (a preview open; with ``vm``, a view of the snapshot to delete open;
    with ``volume_path(vid)``, QEMU holding a volume it changes, unless the
    job is a create or delete of a VM ``attached`` to its QEMU: those run
    live), EMLINK.
    What can only be known when it runs (ENOSPC, a view opened after
    this) is left to the operation itself."""
    p = projection
    if job.op == "create":
        check_snapshot_name(job.snapshot)
        if p.preview is not None:
            raise Busy("a preview is open (or asked); commit or undo it first")
        if job.snapshot in p.names:
            raise AlreadyExists(f"a snapshot named {job.snapshot!r} exists or is being created")
        if p.depth is not None and p.depth + 1 > MAX_CHAIN_DEPTH:
            raise ChainTooDeep(f"a disk would have {p.depth + 1} layers, more than the "
                               f"{MAX_CHAIN_DEPTH} snapfs keeps; delete a snapshot first")
    elif job.op == "delete":
        if p.preview is not None:
            raise Busy("a preview is open (or asked); commit or undo it first")
        if job.snapshot not in p.names:
            raise NotFound(f"no snapshot named {job.snapshot!r} (or it is being deleted)")
    elif job.op == "rename":
        check_snapshot_name(job.target)
        if job.snapshot not in p.names:
            raise NotFound(f"no snapshot named {job.snapshot!r} (or it is being deleted)")
        if job.target != job.snapshot and job.target in p.names:
            raise AlreadyExists(f"a snapshot named {job.target!r} exists or is being created")
    if vm is not None:
        _refuse_if_busy_now(job, vm, volume_path, attached)


def _refuse_if_busy_now(job, vm, volume_path, attached):
    m = vm.manifest
    if job.op == "delete":
        snap = m.snapshot(job.snapshot)
        if snap is not None and vm.open_views.get(snapshot_use(snap.id)):
            raise Busy(f"VM {vm.name}: views of snapshot {job.snapshot} are open; close them "
                       f"(umount, losetup -d) and try again")
    if volume_path is None:
        return
    if job.op in ("create", "delete") and attached:
        # A create or delete of an attached VM runs live in its QEMU (a live
        # snapshot, a live merge), which holds the image locks; whether it
        # is the QEMU of these volumes is verified when the job runs.
        return
    for vid in _volumes_changed(job, m):
        if held_by_qemu(volume_path(vid)):
            raise Busy(f"volume {vid} of VM {vm.name} is in use by QEMU (it holds the image "
                       f"lock); stop the VM first")


def _volumes_changed(job, m):
    """The volumes ``job`` would write, as the manifest stands: a create
    snapshots the active leaves; a delete merges a snapshot's volumes with
    their children (and relinks the grandchildren)."""
    if job.op == "create":
        return set(m.active.values())
    if job.op != "delete" or m.snapshot(job.snapshot) is None:
        return set()
    out = set(m.snapshot(job.snapshot).volumes.values())
    for _ in range(2):
        out |= {v for v, info in m.volumes.items() if info.get("parent") in out}
    return out
