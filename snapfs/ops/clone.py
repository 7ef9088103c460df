"""Clone a VM from one of its snapshots (DESIGN.md section 1: "Clone VM from
snapshot makes a new, independent VM whose disks hold that snapshot's
state").

The new VM gets one volume per layered disk the snapshot holds: a qcow2
image with no backing file that holds the snapshot's view of the disk,
collapsed from its chain.  Clusters that read as zeros stay unallocated
(holes of a raw base are not even read), so the volume is sparse.  The new
VM has no snapshots and shares no volume file with the source: deletes,
merges and writes in either VM never touch the other.  Its volumes are
standard layered disks: it can be snapshotted like any VM.

- A shareable disk is attached as it is: the same ``STORE/shared/<id>``,
  from then on used by both VMs (it was never part of a snapshot).
- A direct LUN is left out (a host device used in place: two VMs writing
  it would corrupt each other's data), and so is a layered disk that a
  partial snapshot does not hold.  Each is logged (a warning: the CLI
  prints it) and recorded in the new VM's ``last_operation``.

The steps, each durable one followed by a crash point (``SNAPFS_CRASH_AT``):

1. check everything that can refuse, writing nothing: ENOENT (no such
   snapshot), EEXIST (the new name is taken), EINVAL (invalid name),
   ENOSPC (the worst case does not fit);
2. make a hidden staging directory ``STORE/vms/.clone-<uuid>``
   (``clone:staged``);
3. per disk, write its volume there (``clone:copy`` after each piece) and
   fsync it (``clone:volume``);
4. write the new manifest there (``clone:manifest``);
5. rename the directory to ``STORE/vms/<new>`` and fsync ``vms/``
   (``clone:done``).

Until step 5 the new VM does not exist, and the source VM is only ever
read: an error removes the staging directory, and a crash leaves at most
that hidden directory, which the next writer's recovery (or ``snapfs check
--repair``) removes.  The snapshot's volumes never change while they are
read: the caller holds the store's lock (CLI) or the source VM's turn
(mount), so no merge of the source runs meanwhile, and a running QEMU
writes only the active leaves.

Limitation: a new volume's virtual size is a multiple of 512 bytes (as
``create_image`` makes them): a snapshot of an odd virtual size, which
qemu-img never makes, gives a volume a little larger, reading zeros past
the snapshot's end.
"""

import errno
import logging
import os
import shutil
import uuid

from ..errors import AlreadyExists, NoSpace, NotFound, StoreError
from ..qcow2.create import DEFAULT_CLUSTER_BITS, create_image
from ..qcow2.mapping import ZERO
from ..qcow2.writer import Qcow2Writer
from ..store import manifest as M
from ..store.chain import Chain
from ..store.faults import crashpoint
from ..store.names import check_name
from ..store.volume import VolumePool
from .finish import utc_now
from .merge import own_ranges, subtract

log = logging.getLogger(__name__)

CLUSTER = 1 << DEFAULT_CLUSTER_BITS
# Data is read from the chain and written to the new volume in pieces of at
# most this size: large enough for sequential I/O, small enough to report
# progress and keep memory flat.
COPY_CHUNK = 4 << 20
# On top of the data and the tables counted: headers and what is not
# counted exactly.
SPACE_SLACK = 4 << 20

LEFT_OUT_LUN = "direct LUN"
LEFT_OUT_NOT_HELD = "not in the snapshot"


def clone_vm(store, m, snapshot_name, new_name, progress=None):
    """Clone snapshot ``snapshot_name`` of the VM of manifest ``m`` into a
    new VM ``new_name`` of ``store``.  ``progress(done, total)`` is called
    as data is copied (bytes).  Returns the new VM's manifest; its
    ``last_operation`` says where it came from and which disks were left
    out (``left_out``: {disk: why}).

    Raises InvalidName (EINVAL), NotFound (ENOENT: no such snapshot),
    AlreadyExists (EEXIST: a VM of that name exists or appeared
    meanwhile), NoSpace (ENOSPC, nothing written), ImageError, StoreError,
    OSError.  Only a crash can leave anything behind (see the module)."""
    check_name(new_name, "VM name")
    snap = m.snapshot(snapshot_name)
    if snap is None:
        raise NotFound(f"VM {m.name} has no snapshot named {snapshot_name!r}")
    _refuse_taken(store, new_name)
    left_out = {}
    for disk in m.all_disks:
        kind = m.special.get(disk, {}).get("kind")
        if kind == M.LUN:
            left_out[disk] = LEFT_OUT_LUN
        elif kind is None and disk not in snap.volumes:
            left_out[disk] = LEFT_OUT_NOT_HELD
    shared = {d: dict(k) for d, k in m.special.items() if k["kind"] == M.SHAREABLE}
    for disk, kind in shared.items():
        if not os.path.exists(store.shared_path(kind["id"])):
            raise StoreError(f"VM {m.name}: its shareable disk {disk} "
                             f"({store.shared_path(kind['id'])}) is missing")
    layered = [d for d in m.disks if d in snap.volumes]
    pool = VolumePool()
    staging = None
    try:
        plans = []
        for disk in layered:
            refs = store.chain_refs(m, snap.volumes[disk])
            chain = Chain(pool, refs)
            plans.append((disk, chain, _data_ranges(pool, refs, chain)))
        _check_space(store.vms_dir, plans, snapshot_name)
        total = sum(e - s for *_, ranges in plans for s, e in ranges)
        done = 0

        def report(n):
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        if progress is not None:
            progress(0, total)
        staging = store.staging_dir("clone")
        crashpoint("clone:staged")
        volumes, active = {}, {}
        for disk, chain, ranges in plans:
            vid = str(uuid.uuid4())
            _collapse(chain, ranges, os.path.join(staging, vid), report)
            crashpoint("clone:volume")
            volumes[vid] = {"disk": disk, "format": "qcow2", "parent": None}
            active[disk] = vid
        M.fsync_dir(staging)
        order = [d for d in m.all_disks if d not in left_out]
        record = {"op": "clone", "from": {"vm": m.name, "snapshot": snap.name,
                                          "snapshot_id": snap.id,
                                          "consistency": snap.consistency},
                  "left_out": left_out, "bytes": total, "finished": utc_now()}
        clone = M.Manifest(name=new_name, id=str(uuid.uuid4()), created=utc_now(),
                           disks=layered, volumes=volumes, snapshots=[], active=active,
                           special=shared, order=order if shared else None,
                           last_operation=record)
        M.save(clone, os.path.join(staging, M.MANIFEST))
        crashpoint("clone:manifest")
        target = store.install_vm(staging, new_name)
        staging = None
        clone.path = os.path.join(target, M.MANIFEST)
    except BaseException as e:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, NoSpace) or isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise NoSpace(f"{store.vms_dir}: no space left while cloning snapshot "
                          f"{snapshot_name} of {m.name}; nothing was changed") from None
        raise
    finally:
        pool.close()
    crashpoint("clone:done")
    for disk, why in left_out.items():
        if why == LEFT_OUT_LUN:
            log.warning("clone %s of VM %s: direct LUN %s (%s) left out: a host device is "
                        "used in place, never copied", new_name, m.name, disk,
                        m.special[disk]["device"])
        else:
            log.warning("clone %s of VM %s: disk %s left out: snapshot %s does not hold it",
                        new_name, m.name, disk, snap.name)
    log.info("VM %s cloned from snapshot %s of VM %s: disks %s%s", new_name, snap.name, m.name,
             ", ".join(layered), "".join(f", shareable {d}" for d in shared))
    return clone


def _refuse_taken(store, name):
    if os.path.lexists(store.vm_dir(name)):
        raise AlreadyExists(f"VM {name!r} already exists in {store.path}")


def _data_ranges(pool, refs, chain):
    """Sorted, disjoint [start, end) ranges of the chain's view that may
    hold data, widened to whole clusters of the new volume.  Holes of a
    raw volume are not data (they read as zeros, and nothing lies beneath
    a raw base)."""
    holes = {}
    for ref in refs:
        if ref.format == "raw":
            holes[ref.path] = [r for r in own_ranges(pool, ref).items if r[2] == ZERO]
    out = []
    for start, length, kind, path in chain.extents():
        if kind == ZERO:
            continue
        pieces = [(start, start + length, kind)]
        if holes.get(path):
            pieces = subtract(pieces, holes[path])
        for s, e, _ in pieces:
            lo = s - s % CLUSTER
            hi = min(-(-e // CLUSTER) * CLUSTER, chain.size)
            if out and lo <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], hi))
            else:
                out.append((lo, hi))
    return out


def space_needed(size, ranges):
    """Worst case of one new volume: its data, an L2 table per data
    cluster (at most one per 512 MiB of guest range), refcount blocks."""
    data = sum(e - s for s, e in ranges)
    clusters = -(-data // CLUSTER)
    l2_span = CLUSTER * (CLUSTER // 8)
    tables = min(clusters, -(-size // l2_span))
    refblocks = -(-(clusters + tables + 4) // (CLUSTER * 8 // 16)) + 1
    return data + (tables + refblocks + 4) * CLUSTER


def _check_space(directory, plans, snapshot_name):
    need = sum(space_needed(chain.size, ranges) for _, chain, ranges in plans) + SPACE_SLACK
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise NoSpace(f"cloning snapshot {snapshot_name} needs up to {need >> 20} MiB free in "
                      f"{directory}, only {free >> 20} MiB available; nothing was changed")


def _collapse(chain, ranges, path, report):
    """Write the view of ``chain`` to the new qcow2 volume ``path`` (no
    backing file), reading only ``ranges``; all-zero clusters stay
    unallocated.  Then fsync it.  Raises NoSpace, ImageError, OSError."""
    create_image(path, chain.size)
    writer = Qcow2Writer(path, write_back=True)
    try:
        for start, end in ranges:
            for at in range(start, end, COPY_CHUNK):
                n = min(COPY_CHUNK, end - at)
                writer.write(at, chain.read(at, n))
                report(n)
                crashpoint("clone:copy")
        writer.flush()
    except BaseException:
        try:
            writer.close()
        except Exception:     # the file goes with the staging directory
            pass
        raise
    writer.close()
