"""The steps that finish an operation once its intent is recorded: the
files a manifest switch dropped are deleted, and a delete moves its data,
relinks, switches the manifest and cleans up (DESIGN.md section 4).  Each
step can run again after a crash; ``ops/recovery.py`` runs them then."""

import contextlib
import logging
import os
import time
from datetime import datetime, timezone

from ..errors import QemuError
from ..qcow2.create import set_backing
from ..qemu.live import live_session
from ..qemu.jobs import drive, jobs
from ..qemu.merge import LiveMerge, open_paths, release
from ..store.faults import crashpoint
from ..store.manifest import fsync_dir
from ..store.volume import VolumePool
from .merge import execute_merge, plan_merge
from .users import Users

log = logging.getLogger(__name__)


def utc_now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def finish_deletions(store, m, save=None):
    for vid in m.operation.get("delete", []):
        try:
            os.unlink(store.volume_path(m.name, vid))
        except FileNotFoundError:
            pass
        crashpoint(f"{m.operation['op']}:unlinked")
    fsync_dir(store.vm_dir(m.name))
    m.operation = None
    (save or store.save_vm)(m)


def finish_delete(store, m, plans, progress=None, save=None, users=None, moved=()):
    """Steps 2-5 of a delete; safe to run again after a crash at any point.
    The disks in ``moved`` have their data in place already (a live active
    commit that QEMU completed: B holds what C held, and C is stale), and
    skip the copy.
    Each disk is held (``Users.hold``) from its merge to the end: its
    active leaf is merged into or relinked, and must not be written until
    the mount follows the new manifest.  The other disks stay writable
    until their turn."""
    users = users or Users()
    with contextlib.ExitStack() as held:
        _merge_and_switch(store, m, plans, progress, save, users, held, moved)
    finish_deletions(store, m, save)        # step 5
    log.info("deleted snapshot %s of %s: %s", m.last_operation["snapshot"], m.name,
             m.last_operation["disks"])
    return m.last_operation


def _merge_and_switch(store, m, plans, progress, save, users, held, moved=()):
    total = sum(p.bytes for p in plans)
    moved_before = 0
    for i, plan in enumerate(plans):
        held.enter_context(users.hold([plan.disk]))
        if plan.disk in moved:
            moved_before += plan.bytes
            continue
        # The disk's active leaf may have been written since the plan was
        # made (a mount holds a disk only from its turn): plan again from
        # the files as they are now, in the recorded direction.
        plan = plans[i] = _replan(store, m, plan)
        users.writing([plan.b if plan.direction == "commit" else plan.c])
        report = (lambda done, base=moved_before: progress(base + done, total)) if progress else None
        execute_merge(store, m, plan, report)
        moved_before += plan.bytes
        crashpoint("delete:moved")
    for plan in plans:                       # step 3: relink
        if plan.direction == "commit":
            if plan.d:
                set_backing(store.volume_path(m.name, plan.d), plan.b, m.volumes[plan.b]["format"])
        else:
            parent = m.volumes[plan.b]["parent"]
            set_backing(store.volume_path(m.name, plan.c), parent,
                        m.volumes[parent]["format"] if parent else None)
        crashpoint("delete:relinked")
    switch_after_merge(store, m, plans, save)


def switch_after_merge(store, m, plans, save=None, live=False):
    """Step 4: the manifest follows the merged files, in one write."""
    doomed = []
    for plan in plans:                       # step 4: the manifest follows
        if plan.direction == "commit":
            # B takes over C's role: C's child, C's snapshot or the active state.
            if plan.d:
                m.volumes[plan.d]["parent"] = plan.b
            _replace_volume(m, plan.c, plan.b)
            doomed.append(plan.c)
        else:
            m.volumes[plan.c]["parent"] = m.volumes[plan.b]["parent"]
            doomed.append(plan.b)
    for vid in doomed:
        del m.volumes[vid]
    snapshot_name = m.operation["snapshot"]["name"]
    record = {"op": "delete", "snapshot": snapshot_name, "finished": utc_now(),
              "disks": {p.disk: {"direction": p.direction, "bytes": p.bytes} for p in plans}}
    if live:
        record["live"] = True
    m.operation = {"op": "delete", "phase": "cleanup", "delete": sorted(doomed)}
    if live:
        m.operation["live"] = True     # QEMU may still have them open: see live_cleanup
    m.last_operation = record
    (save or store.save_vm)(m)
    crashpoint("delete:switched")


def _replan(store, m, plan):
    pool = VolumePool()
    try:
        new = plan_merge(store, m, plan.disk, plan.b, pool, direction=plan.direction)
    finally:
        pool.close()
    # A merge that resumes finds less left to copy than it moved in all:
    # the record keeps the larger figure.
    new.bytes = max(new.bytes, plan.bytes)
    return new


def _replace_volume(m, old, new):
    for snap in m.snapshots:
        for disk, vid in snap.volumes.items():
            if vid == old:
                snap.volumes[disk] = new
    for disk, vid in m.active.items():
        if vid == old:
            m.active[disk] = new


# -- live delete: the merge runs inside the QEMU that runs the VM ---------------

# Steps after which an active commit's data is in B (QEMU's mirror reached
# sync and keeps the source drained until the pivot, which writes to B only).
_IN_B = ("concluded", "finalized")
CLOSE_WAIT = 2.0     # seconds QEMU gets to close a merged-away volume


def finish_live_delete(store, m, plans, progress=None, save=None, users=None):
    """Steps 2-5 of a delete whose intent says ``live``: QEMU merges (one
    job per disk, each step recorded first), the manifest switches, the
    merged-away files go once QEMU has closed them.  If QEMU is gone, or
    dies on the way, the delete finishes offline: QEMU's partial work is
    what the offline merge would have written, except that an active
    commit QEMU completed has its data in B already (``moved``)."""
    save = save or store.save_vm
    users = users or Users()
    qmp = live_session(store, m)
    try:
        if qmp is not None:
            try:
                with users.hold(m.disks):
                    _drive_all(store, m, plans, qmp, progress, save)
                    switch_after_merge(store, m, plans, save, live=True)
            except QemuError:
                qmp.close()
                qmp = live_session(store, m)
                if qmp is not None:
                    raise                 # QEMU runs: the intent stays for the next try
                log.warning("%s: QEMU went away during a live merge; finishing it offline",
                            m.name)
        if qmp is None and m.operation.get("phase") == "merge":
            moved = {p.disk for p in plans if p.direction == "commit" and not p.d
                     and m.operation["live"][p.disk]["step"] in _IN_B}
            return finish_delete(store, m, plans, progress, save, users, moved)
        try:
            live_cleanup(store, m, qmp, save)
        except QemuError:
            qmp.close()
            qmp = live_session(store, m)
            if qmp is not None:
                raise                     # QEMU runs: recovery unlinks once it closed them
            live_cleanup(store, m, None, save)   # QEMU went away: nothing holds them
    finally:
        if qmp is not None:
            qmp.close()
    log.info("deleted snapshot %s of %s live: %s", m.last_operation["snapshot"], m.name,
             m.last_operation["disks"])
    return m.last_operation


def _drive_all(store, m, plans, qmp, progress, save):
    total = sum(p.bytes for p in plans) or 1
    done_before = 0
    # Jobs QEMU has (after a crash) are taken to their end before anything
    # else is asked: QEMU 7.2 segfaults on query-named-block-nodes while a
    # stream job it finalized is not dismissed yet.  Then the disks go in
    # the VM's order, as the delete took them: one it never reached is not
    # started while the one it stopped at (and the error that stopped it)
    # waits.
    present = jobs(qmp)
    plans = sorted(plans, key=lambda p: (m.operation["live"][p.disk]["job"] not in present,
                                         m.disks.index(p.disk)))
    for plan in plans:
        state = m.operation["live"][plan.disk]

        def persist(step, state=state):
            # A job started again after a failure records nothing new: no
            # write, which a full store's filesystem would refuse (the
            # failure to report is QEMU's).
            if state["step"] != step:
                state["step"] = step
                save(m)
            crashpoint(f"delete:{step}")

        def report(done, of, base=done_before, share=plan.bytes):
            progress(base + done * share // max(of, 1), total)

        drive(qmp, _live_merge(store, m, plan, state["job"]), persist, state["step"],
              report if progress else None)
        done_before += plan.bytes


def _live_merge(store, m, plan, job):
    def real(vid):
        return os.path.realpath(store.volume_path(m.name, vid)) if vid else None
    parent = m.volumes[plan.b]["parent"]
    paths = {"b": real(plan.b), "c": real(plan.c), "d": real(plan.d), "p": real(parent),
             "leaf": real(m.active[plan.disk])}
    return LiveMerge(job, plan.direction, paths, {"b": plan.b, "p": parent})


def live_cleanup(store, m, qmp, save=None):
    """Step 5 of a live delete: unlink the merged-away volumes once QEMU has
    no node on them (it closes them when its graph switches; a file still
    open is waited for, then left to recovery, which asks again)."""
    paths = {os.path.realpath(store.volume_path(m.name, v)) for v in m.operation["delete"]}
    deadline = time.monotonic() + CLOSE_WAIT
    if qmp is not None:
        release(qmp, paths)
    while qmp is not None:
        still = paths & open_paths(qmp)
        if not still:
            break
        if time.monotonic() > deadline:
            log.warning("%s: QEMU still has %s open after a live merge; left for recovery "
                        "('snapfs check' or the next operation)", m.name, sorted(still))
            return False
        time.sleep(0.05)
    finish_deletions(store, m, save)
    return True
