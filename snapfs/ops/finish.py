"""The steps that finish an operation once its intent is recorded: the
files a manifest switch dropped are deleted, and a delete moves its data,
relinks, switches the manifest and cleans up (DESIGN.md section 4).  Each
step can run again after a crash; ``ops/recovery.py`` runs them then."""

import contextlib
import logging
import os
from datetime import datetime, timezone

from ..qcow2.create import set_backing
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


def finish_delete(store, m, plans, progress=None, save=None, users=None):
    """Steps 2-5 of a delete; safe to run again after a crash at any point.
    Each disk is held (``Users.hold``) from its merge to the end: its
    active leaf is merged into or relinked, and must not be written until
    the mount follows the new manifest.  The other disks stay writable
    until their turn."""
    users = users or Users()
    with contextlib.ExitStack() as held:
        _merge_and_switch(store, m, plans, progress, save, users, held)
    finish_deletions(store, m, save)        # step 5
    log.info("deleted snapshot %s of %s: %s", m.last_operation["snapshot"], m.name,
             m.last_operation["disks"])
    return m.last_operation


def _merge_and_switch(store, m, plans, progress, save, users, held):
    total = sum(p.bytes for p in plans)
    moved_before = 0
    for i, plan in enumerate(plans):
        held.enter_context(users.hold([plan.disk]))
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
    m.operation = {"op": "delete", "phase": "cleanup", "delete": sorted(doomed)}
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
