"""The disks that snapshots leave out (DESIGN.md section 1, the seed's rule:
"snapshots of disks marked shareable and of direct LUNs are not
supported, live or otherwise"):

- a *direct LUN* is a host block device, used in place: never copied,
  never layered.  Only a block device is accepted, at ``vm add`` and again
  at every open (the path could be replaced by something else later).
- a *shareable* disk is one raw volume in ``STORE/shared/``, which every
  VM that attaches it reads and writes in place.  It is imported from a
  raw image or a qcow2 image without backing file, stored raw (as oVirt
  requires of shareable disks: two writers of one qcow2 file would corrupt
  its tables), and kept until the last VM that uses it is removed.
"""

import os
import stat
import uuid

from ..errors import InvalidArgument, NotFound
from ..store import manifest as M
from ..store.chain import Chain, VolumeRef
from ..store.names import check_disk_name
from ..store.transfer import flatten_to_raw
from ..store.volume import VolumePool
from .discover import discover_chain


def check_block_device(path, what):
    """Raise InvalidArgument unless ``path`` is a block device."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise InvalidArgument(f"{what}: {path}: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise InvalidArgument(f"{what}: {path} is not a block device; a direct LUN must be one")


def parse_lun(spec):
    """'NAME=/dev/BLOCKDEV' -> (name, kind record)."""
    name, sep, device = spec.partition("=")
    if not sep or not device:
        raise InvalidArgument(f"invalid --lun {spec!r}: use NAME=/dev/BLOCKDEV")
    check_disk_name(name)
    device = os.path.abspath(device)
    check_block_device(device, f"--lun {name}")
    return name, {"kind": M.LUN, "device": device}


class SharedImport:
    """A shareable disk named by ``--shareable NAME[=SPEC]``: with a SPEC,
    an image to import as a new shared volume; without one, the store's
    existing shareable disk of that name."""

    def __init__(self, store, spec):
        self.store = store
        self.name, sep, path = spec.partition("=")
        check_disk_name(self.name)
        if sep and not path:
            raise InvalidArgument(f"invalid --shareable {spec!r}: use NAME=PATH or NAME")
        self.path = path or None
        if self.path is None:
            self.id = store.shareable_named(self.name)
            if not os.path.exists(store.shared_path(self.id)):
                raise NotFound(f"shareable disk {self.name}: {store.shared_path(self.id)} "
                               f"is missing")
            self.layer = None
            return
        self.id = str(uuid.uuid4())
        layers = discover_chain(self.path)
        if len(layers) != 1 or layers[0].internal_snapshots:
            raise InvalidArgument(f"--shareable {self.name}: {self.path} must be one raw image, "
                                  f"or a qcow2 image without backing file or internal snapshots")
        self.layer = layers[0]

    @property
    def record(self):
        return {"kind": M.SHAREABLE, "id": self.id}

    def create(self, progress=None):
        """Write the shared volume (imports only); returns its path, or None."""
        if self.layer is None:
            return None
        os.makedirs(self.store.shared_dir, M.DIR_MODE, exist_ok=True)
        target = self.store.shared_path(self.id)
        pool = VolumePool()
        try:
            chain = Chain(pool, [VolumeRef(self.layer.path, self.layer.format)])
            flatten_to_raw(chain, target, os.path.basename(self.path), progress)
        finally:
            pool.close()
        M.fsync_dir(self.store.shared_dir)
        return target
