"""Snapshot operations on one VM, each atomic across all of its disks.

Every operation records its intent in the manifest before it changes any
volume, and ``recover()`` finishes or rolls back whatever a crash
interrupted (DESIGN.md section 4):

- create / preview: the new overlays are listed first, then written; a
  crash before the final manifest switch rolls back (the files go).
- commit / undo: one manifest switch decides; the files it drops are
  listed in the same write and deleted after (rolled forward).
- delete: the snapshot leaves the namespace with the merge plan recorded;
  the data move and relink are idempotent, so recovery rolls forward.
- rename: one manifest write.
- clone: only reads this VM; the new VM is assembled in a hidden directory
  and renamed into place whole (ops/clone.py).

The caller holds the store's writer lock.  Errors carry their errno:
ENOENT unknown snapshot, EEXIST name taken, EINVAL bad name or no preview,
EBUSY a preview is open or QEMU holds a volume, ENOSPC not enough space.

A VM attached to a QEMU that is running (snapfs/qemu/live.py) is checked
first: its QEMU must run the active leaves.  Then create runs live
(``_create_live``) and delete merges inside QEMU (``finish_live_delete``,
ops/finish.py and snapfs/qemu/merge.py: block-commit or block-stream, each
job step recorded in the intent before it is taken); preview, commit and
undo stay refused, as in RHV.

Live create, in this order (each step a crash point):

1. record the intent: the new overlays, the snapshot, phase "prepare";
2. make and fsync the overlays (as offline);
3. ``blockdev-add`` them (snapfs/qemu/snapshot.py);
4. record phase "switch": from here QEMU may write the overlays;
5. freeze the guest (if an agent is attached; bounded, always thawed),
   one QMP ``transaction`` switches every disk, thaw;
6. switch the manifest: the snapshot owns the old leaves.

Recovery rolls back before the transaction and forward after it, asking
QEMU which leaves it writes (ops/recovery.py says what it does when QEMU is
gone).
"""

import logging
import os
import uuid
from datetime import datetime, timezone

from ..errors import AlreadyExists, Busy, ChainTooDeep, InvalidArgument, NotFound, QemuError
from ..qcow2.create import create_image
from ..qemu.agent import frozen_guest
from ..qemu.live import running_qemu
from ..qemu.merge import job_id
from ..qemu.snapshot import add_overlays, device_tops, remove_overlays, switch, switched_disks
from ..store.chain import MAX_CHAIN_DEPTH
from ..store.faults import crashpoint
from ..store.inuse import held_by_qemu
from ..store.manifest import Snapshot, fsync_dir
from ..store.names import check_description, check_snapshot_name
from ..store.volume import VolumePool, open_volume
from .clone import clone_vm
from .finish import finish_delete, finish_deletions, finish_live_delete, utc_now
from .merge import check_space, plan_merge
from .recovery import recover_vm, switch_to_live_overlays
from .users import BEFORE_PREVIEW_USE, Users, active_write_use, snapshot_use

log = logging.getLogger(__name__)


def default_snapshot_name():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")


def check_depth(m, parents):
    """Refuse, before anything is written, a layer on ``parents`` (disk ->
    volume) that would make a chain deeper than the store keeps: every
    load of the VM would fail after it."""
    for disk in parents:
        depth = len(m.chain(parents[disk])) + 1
        if depth > MAX_CHAIN_DEPTH:
            raise ChainTooDeep(f"VM {m.name}: disk {disk} would have {depth} layers, more than "
                               f"the {MAX_CHAIN_DEPTH} snapfs keeps; delete a snapshot first")


def refuse_create(m, name, description="", disks=None):
    """Raise what creating snapshot ``name`` of the VM of manifest ``m``
    (of ``disks``, or all its layered disks) would raise (EINVAL, EEXIST,
    EBUSY, EMLINK), writing nothing."""
    check_snapshot_name(name)
    check_description(description)
    chosen = chosen_disks(m, disks)
    if m.preview:
        raise Busy(f"VM {m.name} has a preview open; commit or undo it first")
    if m.snapshot(name):
        raise AlreadyExists(f"VM {m.name} already has a snapshot named {name!r}")
    check_depth(m, {d: m.active[d] for d in chosen})


def chosen_disks(m, disks=None):
    """The layered disks a snapshot of ``m`` holds: ``disks`` (RHV's "disks
    to include"), in the VM's order, or all.  Raises InvalidArgument for a
    LUN or shareable disk (never snapshotted), an unknown disk, or none."""
    if disks is None:
        if not m.disks:
            raise InvalidArgument(f"VM {m.name} has no disk that snapshots hold (its disks are "
                                  f"direct LUNs or shareable)")
        return list(m.disks)
    disks = list(disks)
    for disk in disks:
        if disk in m.special:
            raise InvalidArgument(f"VM {m.name}: disk {disk} is a "
                                  f"{'direct LUN' if m.special[disk]['kind'] == 'lun' else 'shareable disk'}"
                                  f", which snapshots never hold")
        if disk not in m.disks:
            raise InvalidArgument(f"VM {m.name} has no disk {disk!r}")
    if not disks:
        raise InvalidArgument(f"VM {m.name}: a snapshot must hold at least one disk")
    return [d for d in m.disks if d in disks]


class VmOperations:
    """Operations on VM ``vm`` of ``store``.  ``progress(done, total)`` is
    called while a merge moves data; ``on_saved(manifest)`` after every
    manifest switch, before any file the switch dropped is deleted (a mount
    follows the new manifest at once)."""

    def __init__(self, store, vm, progress=None, on_saved=None, users=None):
        self.store = store
        self.vm = vm
        self.progress = progress
        self.on_saved = on_saved
        self.users = users or Users()

    # -- helpers ------------------------------------------------------------

    def _load(self):
        m = self.store.load_vm(self.vm)
        if m.operation is not None:
            with self.users.hold(m.disks):
                recover_vm(self.store, m, self._save, self.users)
            m = self.store.load_vm(self.vm)
        return m

    def _path(self, vid):
        return self.store.volume_path(self.vm, vid)

    def _save(self, m):
        self.store.save_vm(m)
        if self.on_saved is not None:
            self.on_saved(m)

    def _refuse_if_in_use(self, m, vids):
        for vid in vids:
            if held_by_qemu(self._path(vid)):
                raise Busy(f"volume {vid} of VM {self.vm} is in use by QEMU "
                           f"(it holds the image lock); stop the VM first")

    def _refuse_if_running(self, m, what):
        """If the VM runs in an attached QEMU: verify that QEMU runs the
        active leaves (else EBUSY naming the differences), then refuse
        ``what``, an operation that needs the VM stopped (preview, commit,
        undo), as RHV does."""
        with running_qemu(self.store, m) as qemu:
            if qemu is None:
                return
            raise Busy(f"VM {self.vm} runs in QEMU (attached): {what} needs it stopped, "
                       f"as in RHV; stop the VM first")

    def _runs_live(self, m):
        """Does the VM run in an attached QEMU, verified to run its active
        leaves (else EBUSY naming the differences)?"""
        with running_qemu(self.store, m) as qemu:
            return qemu is not None

    def _snapshot(self, m, name):
        snap = m.snapshot(name)
        if snap is None:
            raise NotFound(f"VM {self.vm} has no snapshot named {name!r}")
        return snap

    def _volume_size(self, m, vid):
        vol = open_volume(self._path(vid), m.volumes[vid]["format"])
        try:
            return vol.size
        finally:
            vol.close()

    def _new_overlays(self, m, parents, op):
        """Record, then create and fsync, one overlay on each of ``parents``
        ({disk: volume}); -> {disk: new volume}."""
        check_depth(m, parents)
        new = {disk: str(uuid.uuid4()) for disk in m.disks if disk in parents}
        m.operation = {"op": op, "new": new}
        self._save(m)
        crashpoint(f"{op}:recorded")
        for disk in new:
            parent = parents[disk]
            create_image(self._path(new[disk]), self._volume_size(m, parent),
                         backing=parent, backing_format=m.volumes[parent]["format"])
            crashpoint(f"{op}:overlay")
        fsync_dir(self.store.vm_dir(self.vm))
        for disk in new:
            m.volumes[new[disk]] = {"disk": disk, "format": "qcow2", "parent": parents[disk]}
        return new

    def _drop_volumes(self, m, op, doomed, last):
        """One manifest switch that forgets ``doomed``, then delete them."""
        for vid in doomed:
            del m.volumes[vid]
        m.operation = {"op": op, "delete": sorted(doomed)}
        m.last_operation = last
        self._save(m)
        crashpoint(f"{op}:switched")
        finish_deletions(self.store, m, self._save)

    # -- operations ---------------------------------------------------------

    def create(self, name=None, description="", disks=None):
        """Snapshot ``disks`` (default: every layered disk); a disk left out
        keeps its active leaf, with no new layer."""
        name = check_snapshot_name(name or default_snapshot_name())
        m = self._load()
        refuse_create(m, name, description, disks)
        chosen = chosen_disks(m, disks)
        with running_qemu(self.store, m) as qemu:
            if qemu is not None:
                with self.users.hold(chosen):
                    snap = self._create_live(m, name, description, qemu, chosen)
                crashpoint("create:done")
                return snap
        old = {disk: m.active[disk] for disk in chosen}
        self._refuse_if_in_use(m, old.values())
        with self.users.hold(chosen):
            for vid in old.values():
                _fsync_file(self._path(vid))     # what the snapshot freezes is on disk
            m.active.update(self._new_overlays(m, old, "create"))
            snap = Snapshot(str(uuid.uuid4()), name, description, utc_now(), old)
            m.snapshots.append(snap)
            m.operation = None
            m.last_operation = {"op": "create", "snapshot": name, "finished": utc_now()}
            self._save(m)
        crashpoint("create:done")
        return snap

    def _create_live(self, m, name, description, qemu, chosen):
        """Steps 1-6 of a live create of disks ``chosen`` (see the module's
        docstring)."""
        new = {disk: str(uuid.uuid4()) for disk in chosen}
        snap = Snapshot(str(uuid.uuid4()), name, description, utc_now(),
                        {disk: m.active[disk] for disk in chosen})
        m.operation = {"op": "create", "live": "prepare", "new": new, "snapshot": snap.to_json()}
        self._save(m)
        crashpoint("create:recorded")
        for disk in chosen:
            parent = m.active[disk]
            create_image(self._path(new[disk]), self._volume_size(m, parent),
                         backing=parent, backing_format=m.volumes[parent]["format"])
            crashpoint("create:overlay")
        fsync_dir(self.store.vm_dir(self.vm))
        try:
            tops = device_tops(self.store, m, qemu)
            add_overlays(qemu, {new[d]: self._path(new[d]) for d in chosen})
        except BaseException:
            self._roll_back_live(m, qemu, new, added=False)
            raise
        crashpoint("create:added")
        m.operation["live"] = "switch"
        self._save(m)
        crashpoint("create:switching")
        try:
            with frozen_guest(qemu.guest_agent) as freeze:
                switch(qemu, tops, new)
                freeze.switched()
        except QemuError as e:
            self._after_failed_switch(m, qemu, new, e)
            freeze.consistency = "crash"
        crashpoint("create:switched")
        snap = switch_to_live_overlays(m, self._save, freeze.consistency, freeze.frozen_seconds)
        log.info("VM %s: live snapshot %s taken (%s-consistent%s%s)", self.vm, name,
                 freeze.consistency, f": {freeze.reason}" if freeze.reason else "",
                 "" if freeze.frozen_seconds is None else
                 f"; the guest was frozen for {freeze.frozen_seconds:.3f} s")
        return snap

    def _after_failed_switch(self, m, qemu, new, error):
        """The transaction failed or its answer was lost: ask QEMU.  Returns
        if it switched after all (the create goes on); else rolls back and
        raises ``error``.  If QEMU can't be asked, the intent stays for
        recovery to decide."""
        try:
            switched = switched_disks(self.store, m, qemu, new)
        except QemuError:
            raise QemuError(f"VM {self.vm}: the live snapshot's switch failed ({error}), and "
                            f"QEMU can't say whether it switched; the next operation (or "
                            f"'snapfs check') decides") from None
        if switched:
            log.warning("VM %s: QEMU switched though the transaction reported %s", self.vm, error)
            return
        self._roll_back_live(m, qemu, new, added=True)
        raise error

    def _roll_back_live(self, m, qemu, new, added):
        """Undo a live create that QEMU did not switch to: its nodes, the
        overlays, the intent."""
        if added:
            try:
                remove_overlays(qemu, new.values())
            except QemuError as e:
                log.error("VM %s: removing the nodes of a failed live snapshot: %s", self.vm, e)
        m.operation = {"op": "create", "delete": sorted(new.values())}
        finish_deletions(self.store, m, self._save)

    def rename(self, old, new):
        check_snapshot_name(new)
        m = self._load()
        snap = self._snapshot(m, old)
        if old == new:
            return snap
        if m.snapshot(new):
            raise AlreadyExists(f"VM {self.vm} already has a snapshot named {new!r}")
        snap.name = new
        m.last_operation = {"op": "rename", "snapshot": new, "from": old, "finished": utc_now()}
        self._save(m)
        crashpoint("rename:done")
        return snap

    def _refuse_if_writers(self, m, also=(), what="switching the active state"):
        """A leaf switched under a mounted filesystem corrupts it: refuse
        while an active view is open for writing (RHV wants the VM down)."""
        self.users.refuse_if_open([active_write_use(d) for d in m.disks] + list(also), what)

    def preview(self, name, disks=None):
        """Make snapshot ``name``'s state active (RHV's preview), keeping the
        current one as before-preview.  ``disks`` ({disk: other snapshot})
        takes those disks from other snapshots (RHV's custom preview).  A
        disk that the snapshot taken for it doesn't hold keeps its current
        state.  Every layered disk gets a new overlay, so that undo drops
        what the preview wrote."""
        m = self._load()
        if m.preview:
            raise Busy(f"VM {self.vm} already has a preview open")
        snap = self._snapshot(m, name)
        parents, custom = self._preview_sources(m, snap, disks or {})
        self._refuse_if_running(m, "previewing a snapshot")
        self._refuse_if_in_use(m, m.active.values())
        self._refuse_if_writers(m, what=f"previewing {name}")
        with self.users.hold(m.disks):
            before = dict(m.active)
            m.active = self._new_overlays(m, parents, "preview")
            m.preview = {"snapshot": snap.id, "before": before}
            if custom:
                m.preview["disks"] = custom
            m.operation = None
            m.last_operation = {"op": "preview", "snapshot": name, "finished": utc_now()}
            self._save(m)
        crashpoint("preview:done")

    def _preview_sources(self, m, snap, disks):
        """({disk: the volume its preview overlay goes on}, {disk: id of the
        other snapshot it comes from}) for a preview of ``snap`` with
        ``disks`` ({disk: other snapshot name}) taken from others."""
        parents = dict(m.active)
        parents.update(snap.volumes)
        custom = {}
        for disk, other_name in disks.items():
            if disk not in m.disks:
                chosen_disks(m, [disk])            # says why: a LUN, shareable, unknown
            other = self._snapshot(m, other_name)
            if disk not in other.volumes:
                raise InvalidArgument(f"VM {self.vm}: snapshot {other_name} does not hold "
                                      f"disk {disk}")
            parents[disk] = other.volumes[disk]
            custom[disk] = other.id
        return parents, custom

    def commit(self):
        """Keep the preview: snapshots newer than it and the old leaves go."""
        m = self._load()
        if not m.preview:
            raise InvalidArgument(f"VM {self.vm} has no preview open")
        self._refuse_if_running(m, "committing a preview")
        self._refuse_if_in_use(m, list(m.active.values()) + list(m.preview["before"].values()))
        index = next(i for i, s in enumerate(m.snapshots) if s.id == m.preview["snapshot"])
        name = m.snapshots[index].name
        newer = m.snapshots[index + 1:]
        kept = m.snapshots[:index + 1]
        cut = _cut_branches(m, kept)
        gone = newer + [s for s in kept if s.volumes.keys() <= cut.get(s.id, set())]
        self._refuse_if_writers(m, [BEFORE_PREVIEW_USE] + [snapshot_use(s.id) for s in newer]
                                + [snapshot_use(sid) for sid in cut],
                                what="committing the preview")
        for snap in kept:
            for disk in cut.get(snap.id, ()):
                del snap.volumes[disk]
        m.snapshots = [s for s in kept if s.volumes]
        m.preview = None
        doomed = set(m.volumes) - m.used_volumes()
        record = {"op": "commit", "snapshot": name, "deleted_snapshots": [s.name for s in gone],
                  "finished": utc_now()}
        if cut:
            record["disks_dropped"] = {s.name: sorted(cut[s.id]) for s in kept if s.id in cut}
        with self.users.hold(m.disks):
            self._drop_volumes(m, "commit", doomed, record)

    def undo(self):
        """End the preview: the previous active leaves are active again."""
        m = self._load()
        if not m.preview:
            raise InvalidArgument(f"VM {self.vm} has no preview open")
        self._refuse_if_running(m, "undoing a preview")
        self._refuse_if_in_use(m, m.active.values())
        # before-preview's bytes become active again, and change.
        self._refuse_if_writers(m, [BEFORE_PREVIEW_USE], what="undoing the preview")
        m.active = dict(m.preview["before"])
        m.preview = None
        doomed = set(m.volumes) - m.used_volumes()
        with self.users.hold(m.disks):
            self._drop_volumes(m, "undo", doomed, {"op": "undo", "finished": utc_now()})

    def clone(self, name, new_vm):
        """Clone snapshot ``name`` into a new VM ``new_vm`` (ops/clone.py).
        Returns its manifest.  This VM is only read: a clone is fine while
        a preview is open and while the VM runs in QEMU (a snapshot's
        volumes never change)."""
        return clone_vm(self.store, self._load(), name, new_vm, self.progress)

    def delete(self, name):
        """Merge the snapshot's volumes away; every other view is unchanged.
        Returns the record of what moved (direction and bytes per disk)."""
        return self.finish_delete(self.start_delete(name))

    def start_delete(self, name):
        """Step 1 of a delete: check everything that can refuse it (ENOENT,
        EBUSY, ENOSPC), then record it; the snapshot leaves the namespace.
        Returns what ``finish_delete`` needs."""
        m = self._load()
        if m.preview:
            raise Busy(f"VM {self.vm} has a preview open; commit or undo it first")
        snap = self._snapshot(m, name)
        live = self._runs_live(m)
        pool = VolumePool()
        try:
            plans = [plan_merge(self.store, m, disk, snap.volumes[disk], pool)
                     for disk in m.disks if disk in snap.volumes]     # all, or those held
        finally:
            pool.close()
        if not live:
            self._refuse_if_in_use(m, [v for p in plans for v in (p.b, p.c, p.d) if v])
        check_space(self.store.vm_dir(self.vm), plans)
        # Its views would change under their readers (a commit-direction
        # merge writes the deleted snapshot's own volume): refuse, as ZFS
        # refuses to destroy a busy snapshot.
        self.users.refuse_if_open([snapshot_use(snap.id)], f"deleting {name}")
        m.snapshots.remove(snap)
        m.operation = {"op": "delete", "phase": "merge", "snapshot": snap.to_json(),
                       "disks": {p.disk: p.to_json() for p in plans}}
        if live:
            # QEMU merges; each disk's job and the last step it reached.
            m.operation["live"] = {p.disk: {"job": job_id(snap.id, m.disks.index(p.disk)),
                                            "step": "planned"} for p in plans}
        self._save(m)
        crashpoint("delete:recorded")
        return m, plans

    def finish_delete(self, started):
        """Steps 2-5: move the data, relink, switch the manifest, clean up."""
        m, plans = started
        if m.operation.get("live"):
            return finish_live_delete(self.store, m, plans, self.progress, self._save,
                                      self.users)
        return finish_delete(self.store, m, plans, self.progress, self._save, self.users)


def _cut_branches(m, kept):
    """{snapshot id: disks it stops holding} when a custom preview is
    committed.  A disk previewed from an older snapshot OTHER grows from
    OTHER's volume, beside the layers that later snapshots hold of it;
    those later layers are given up, as RHV does, so that every disk stays
    one chain (a merge needs one child).  A kept snapshot whose disks are
    all given up goes too."""
    cut = {}
    for disk in (m.preview or {}).get("disks", {}):
        base = m.volumes[m.active[disk]]["parent"]      # OTHER's volume of the disk
        for snap in kept:
            vid = snap.volumes.get(disk)
            if vid is not None and vid != base and base in m.chain(vid):
                cut.setdefault(snap.id, set()).add(disk)
    return cut


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
