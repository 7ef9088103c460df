"""Finishing or rolling back what a crash interrupted, when the store is
opened by a writer (a mount, a CLI command that changes it, ``snapfs
check``).  What is done depends on the operation recorded in the VM's
manifest (ops/operations.py says which way each one goes)."""

import logging

from ..store.scratch import default_scratch_dir, remove_leftover_overlays
from ..store.volume import VolumePool
from .finish import finish_delete, finish_deletions
from .merge import plan_merge

log = logging.getLogger(__name__)


def recover_vm(store, m, save=None, users=None):
    """Finish or roll back the operation recorded in ``m``.  Returns a line
    saying what was done, or None if nothing was pending."""
    op = m.operation
    if op is None:
        return None
    kind = op["op"]
    if kind in ("create", "preview") and "new" in op:
        # Rolled back: the manifest never switched to the new overlays.
        for vid in op["new"].values():
            m.volumes.pop(vid, None)
        m.operation = {"op": kind, "delete": sorted(op["new"].values())}
        finish_deletions(store, m, save)
        return f"{m.name}: rolled back an interrupted {kind}"
    if kind == "delete" and op.get("phase") == "merge":
        # The data move is idempotent: plan it again in the recorded
        # direction (the copy lists shrink by what already moved) and finish.
        pool = VolumePool()
        try:
            plans = [plan_merge(store, m, disk, p["b"], pool, direction=p["direction"])
                     for disk, p in op["disks"].items()]
        finally:
            pool.close()
        for plan in plans:
            plan.bytes = op["disks"][plan.disk]["bytes"]
        finish_delete(store, m, plans, save=save, users=users)
        return f"{m.name}: finished an interrupted delete of {op['snapshot']['name']}"
    finish_deletions(store, m, save)
    return f"{m.name}: finished an interrupted {kind}"


def recover(store, scratch_dirs=()):
    """Recover every VM of the store, and remove the throwaway overlays of
    dead daemons from the store's scratch directory and ``scratch_dirs``.
    Returns lines saying what was done.

    The manifests with nothing to recover stay with the store for one
    ``take_loaded`` each: a mount lists them next (Store.load_vms)."""
    done = store.remove_temporaries()
    for directory in dict.fromkeys([default_scratch_dir(store), *scratch_dirs]):
        done += remove_leftover_overlays(directory)
    for line in done:
        log.warning("%s", line)
    for name, m in store.load_vms(keep=True):
        if isinstance(m, Exception):   # reported by check; nothing to recover
            continue
        if m.operation is None:
            continue
        store.forget_loaded(name)      # recover_vm changes it
        line = recover_vm(store, m)
        if line:
            log.warning("%s", line)
            done.append(line)
    return done
