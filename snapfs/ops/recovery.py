"""Finishing or rolling back what a crash interrupted, when the store is
opened by a writer (a mount, a CLI command that changes it, ``snapfs
check``).  What is done depends on the operation recorded in the VM's
manifest (ops/operations.py says which way each one goes)."""

import logging

from ..errors import QemuError
from ..qemu.agent import AgentError, GuestAgent
from ..qemu.attach import read_record
from ..qemu.live import connect, live_session
from ..qemu.snapshot import overlays_written, remove_overlays, switched_disks
from ..store.manifest import Snapshot
from ..store.scratch import default_scratch_dir, remove_leftover_overlays
from ..store.volume import VolumePool
from .finish import finish_delete, finish_deletions, finish_live_delete, live_cleanup, utc_now
from .merge import plan_merge

log = logging.getLogger(__name__)


def recover_vm(store, m, save=None, users=None):
    """Finish or roll back the operation recorded in ``m``.  Returns a line
    saying what was done, or None if nothing was pending."""
    op = m.operation
    if op is None:
        return None
    kind = op["op"]
    if kind == "create" and op.get("live") and "new" in op:
        return _recover_live_create(store, m, save)
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
        if op.get("live"):
            # QEMU's job list decides (ops/finish.py): a job still running
            # is followed to its end, a concluded one finished, a missing
            # one started again unless QEMU's graph already switched; with
            # QEMU gone, the delete finishes offline.
            finish_live_delete(store, m, plans, save=save, users=users)
            return f"{m.name}: finished an interrupted live delete of {op['snapshot']['name']}"
        finish_delete(store, m, plans, save=save, users=users)
        return f"{m.name}: finished an interrupted delete of {op['snapshot']['name']}"
    if kind == "delete" and op.get("live"):
        # Merged and switched; the merged-away files go once QEMU closed them.
        qmp = live_session(store, m)
        try:
            if not live_cleanup(store, m, qmp, save):
                raise QemuError(f"{m.name}: QEMU still has a merged-away volume open")
        finally:
            if qmp is not None:
                qmp.close()
        return f"{m.name}: finished an interrupted live delete"
    finish_deletions(store, m, save)
    return f"{m.name}: finished an interrupted {kind}"


def switch_to_live_overlays(m, save, consistency, frozen_seconds=None):
    """The manifest switch of a live create whose overlays QEMU writes: the
    snapshot recorded in the intent owns the old leaves, the overlays are
    active.  The record says how long the guest was frozen, if it was."""
    op = m.operation
    snap = op["snapshot"]
    old = snap["volumes"]
    for disk, vid in op["new"].items():
        m.volumes[vid] = {"disk": disk, "format": "qcow2", "parent": old[disk]}
    m.active.update(op["new"])          # a partial snapshot's other disks keep theirs
    created = Snapshot(snap["id"], snap["name"], snap["description"], snap["created"],
                       dict(old), consistency)
    m.snapshots.append(created)
    m.operation = None
    m.last_operation = {"op": "create", "snapshot": created.name, "live": True,
                        "consistency": consistency, "finished": utc_now()}
    if frozen_seconds is not None:
        m.last_operation["frozen_seconds"] = frozen_seconds
    save(m)
    return created


def _recover_live_create(store, m, save):
    """A live create that stopped before its manifest switch.  QEMU decides:

    - QEMU answers: it writes the new overlays (the transaction ran) ->
      roll forward; it writes the old leaves -> roll back, removing the
      nodes the create added to it.
    - QEMU is gone (or the VM was detached): if the create never got to
      the transaction (phase "prepare"), QEMU can't have switched -> roll
      back.  Else it may have switched and written: roll forward if any
      overlay maps a cluster on disk, or can't be read; roll back if all
      are empty, which reads the same bytes either way (an empty overlay
      shows its backing leaf, which QEMU no longer wrote after a switch).
    - QEMU doesn't answer in time: raise QemuTimeout (EBUSY), deciding
      nothing; the next writer asks again.

    A rolled-forward snapshot is "crash"-consistent: whether a freeze held
    through the switch was never recorded."""
    op = m.operation
    new = op["new"]
    save = save or store.save_vm
    record = read_record(store.path, m.name)
    forward = None
    if record is not None:
        qmp = connect(record)
        if qmp is not None:
            try:
                if op.get("live") == "switch":
                    _thaw(record.get("guest_agent"))
                switched = switched_disks(store, m, qmp, new)
                if switched and switched != set(new):
                    log.error("%s: QEMU switched only disks %s of a live create (a transaction "
                              "switches all or none); rolling forward", m.name, sorted(switched))
                forward = bool(switched)
                why = "QEMU writes the new overlays" if forward else "QEMU writes the old leaves"
                if not forward:
                    remove_overlays(qmp, new.values())
            finally:
                qmp.close()
    if forward is None:
        paths = [store.volume_path(m.name, vid) for vid in new.values()]
        if op.get("live") != "switch":
            forward, why = False, "QEMU is gone, and was not asked to switch"
        elif overlays_written(paths):
            forward, why = True, "QEMU is gone, and the new overlays hold its writes"
        else:
            forward, why = False, "QEMU is gone, and the new overlays are empty"
    if forward:
        switch_to_live_overlays(m, save, "crash")
        return f"{m.name}: rolled forward an interrupted live create ({why})"
    m.operation = {"op": "create", "delete": sorted(new.values())}
    finish_deletions(store, m, save)
    return f"{m.name}: rolled back an interrupted live create ({why})"


def _thaw(agent_path):
    """A crash inside the freeze window leaves the guest frozen: thaw it
    (a thawed guest ignores this)."""
    if not agent_path:
        return
    try:
        with GuestAgent(agent_path) as agent:
            agent.execute("guest-fsfreeze-thaw")
    except AgentError as e:
        log.warning("%s: could not thaw the guest after an interrupted live create: %s",
                    agent_path, e)


def recover(store, scratch_dirs=()):
    """Recover every VM of the store, remove what interrupted imports,
    clones and removals of VMs left in vms/ (hidden directories), and the
    throwaway overlays of dead daemons from the store's scratch directory
    and ``scratch_dirs``.
    Returns lines saying what was done.

    The manifests with nothing to recover stay with the store for one
    ``take_loaded`` each: a mount lists them next (Store.load_vms)."""
    done = store.remove_temporaries() + store.remove_staging_leftovers()
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
        try:
            line = recover_vm(store, m)
        except QemuError as e:
            # A live create or delete whose QEMU doesn't answer now (or
            # whose merge failed in QEMU): decided later,
            # by the first operation on the VM; the rest of the store opens.
            line = f"{name}: recovery deferred: {e}"
        if line:
            log.warning("%s", line)
            done.append(line)
    return done
