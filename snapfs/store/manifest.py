"""A VM's manifest: its disks, volumes, snapshots and active leaves.

Stored as ``vms/<vm>/manifest.json`` and replaced atomically (temp file,
fsync, rename, fsync of the directory).  The manifest is the only source of
truth: a volume file that it does not name is a leftover.

Schema (version 1)::

    {"format": "snapfs-vm", "version": 1, "name": "web", "id": UUID,
     "created": ISO-8601,
     "disks": ["sda", ...],          # every disk, in the VM's order
     "kinds": {disk: {"kind": "lun", "device": "/dev/..."}
                   | {"kind": "shareable", "id": UUID}},
                           # the disks no snapshot holds (DESIGN.md section 1): a direct
                           # LUN, used in place, and a shareable disk, one raw volume
                           # STORE/shared/<id> that several VMs attach; missing: none.
                           # Every other disk is layered, and only those appear below.
     "volumes": {UUID: {"disk": "sda", "format": "qcow2"|"raw", "parent": UUID|null}},
     "snapshots": [{"id", "name", "description", "created", "volumes": {disk: UUID},
                           # volumes: the layered disks it holds (all, or those chosen)
                    "consistency": "offline" | "crash" | "frozen"}],
                           # consistency: taken with the VM stopped, live without a
                           # guest freeze, or live with it frozen through the agent;
                           # "offline" when missing (manifests from before live create)
     "active": {disk: UUID},
     "preview": null | {"snapshot": UUID, "before": {disk: UUID},
                        "disks": {disk: UUID}},
                           # while a preview is open: the previewed snapshot and
                           # the previous active leaves ("before preview"); a
                           # custom preview's disks from other snapshots ("disks")
     "operation": null | {"op": ..., ...},
                           # an operation in progress, for recovery (ops/recovery.py);
                           # a live create: {"op": "create", "new": {disk: UUID},
                           #   "live": "prepare" | "switch", "snapshot": {...}}
                           # a delete: {"op": "delete", "phase": "merge", "snapshot": {...},
                           #   "disks": {disk: plan}}; of a running VM (a live merge) also
                           #   "live": {disk: {"job": QEMU job id, "step": "planned" |
                           #   "started" | "ready" | "completing" | "concluded" |
                           #   "finalized"}}, the last step recorded before it was taken;
                           #   then {"op": "delete", "phase": "cleanup", "delete": [UUID],
                           #   "live": true} until QEMU has closed those files
     "last_operation": null | {...}}
                           # what the last finished operation did (merge direction, bytes)
"""

import json
import os
import uuid
from dataclasses import dataclass, field

from ..errors import StoreError
from .chain import MAX_CHAIN_DEPTH
from .names import check_disk_name, check_name, check_snapshot_name

FORMAT = "snapfs-vm"
CONSISTENCIES = ("offline", "crash", "frozen")
LUN, SHAREABLE = "lun", "shareable"
VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Snapshot:
    id: str
    name: str
    description: str
    created: str
    volumes: dict
    consistency: str = "offline"

    def to_json(self):
        return {"id": self.id, "name": self.name, "description": self.description,
                "created": self.created, "volumes": dict(self.volumes),
                "consistency": self.consistency}


@dataclass
class Manifest:
    """``disks`` are the layered disks, the ones snapshots hold; ``special``
    maps each other disk (a LUN or a shareable disk) to its kind record,
    and ``order`` lists every disk in the VM's order (None: ``disks``)."""

    name: str
    id: str
    created: str
    disks: list
    volumes: dict
    snapshots: list
    active: dict
    preview: dict | None = None
    operation: dict | None = None
    last_operation: dict | None = None
    path: str | None = field(default=None, compare=False)
    special: dict = field(default_factory=dict)
    order: list | None = None

    # -- queries ----------------------------------------------------------

    @property
    def all_disks(self):
        """Every disk of the VM, layered or not, in its order."""
        return list(self.order) if self.order is not None else list(self.disks)

    def shared_ids(self):
        """Ids of the shareable disks this VM attaches."""
        return {k["id"] for k in self.special.values() if k["kind"] == SHAREABLE}

    def excluded(self, snap):
        """{disk: why} of the disks snapshot ``snap`` does not hold."""
        out = {}
        for disk in self.all_disks:
            if disk in self.special:
                out[disk] = self.special[disk]["kind"]
            elif disk not in snap.volumes:
                out[disk] = "not selected"
        return out

    def snapshot(self, name):
        for snap in self.snapshots:
            if snap.name == name:
                return snap
        return None

    def children(self, volume_id):
        return sorted(v for v, info in self.volumes.items() if info["parent"] == volume_id)

    def used_volumes(self):
        """Every volume some snapshot, active leaf or before-preview leaf needs."""
        tops = list(self.active.values())
        tops += [v for s in self.snapshots for v in s.volumes.values()]
        if self.preview:
            tops += list(self.preview["before"].values())
        used = set()
        for vid in tops:
            used.update(self.chain(vid))
        return used

    def chains(self, volume_ids):
        """{volume id: its chain as a tuple} for ``volume_ids``, as ``chain``
        gives it, with each step taken once: calling ``chain`` for each of N
        snapshots would walk N chains.  Raises StoreError like ``chain``."""
        out = {}
        for vid in volume_ids:
            path, current = [], vid
            while current is not None and current not in out:
                if current in path or len(path) >= MAX_CHAIN_DEPTH:
                    raise StoreError(f"{self.path}: volume chain of {vid} loops or is too deep")
                vol = self.volumes.get(current)
                if vol is None:
                    raise StoreError(f"{self.path}: unknown volume {current}")
                path.append(current)
                current = vol["parent"]
            chain = () if current is None else out[current]
            for v in reversed(path):
                chain += (v,)
                if len(chain) > MAX_CHAIN_DEPTH:
                    raise StoreError(f"{self.path}: volume chain of {vid} loops or is too deep")
                out[v] = chain
        return {vid: out[vid] for vid in volume_ids}

    def chain(self, volume_id):
        """Volume ids from the base up to ``volume_id``."""
        return list(self.chains([volume_id])[volume_id])

    # -- (de)serialisation ------------------------------------------------

    def to_json(self):
        return {
            "format": FORMAT, "version": VERSION, "name": self.name, "id": self.id,
            "created": self.created, "disks": self.all_disks,
            **({"kinds": self.special} if self.special else {}),
            "volumes": self.volumes,
            "snapshots": [s.to_json() for s in self.snapshots],
            "active": self.active, "preview": self.preview, "operation": self.operation,
            "last_operation": self.last_operation,
        }

    @classmethod
    def from_json(cls, data, path):
        """Parse and validate.  Raises StoreError naming the file."""
        try:
            if data.get("format") != FORMAT or data.get("version") != VERSION:
                raise ValueError("not a snapfs VM manifest of a known version")
            order = [check_disk_name(d) for d in data["disks"]]
            if len(set(order)) != len(order):
                raise ValueError("duplicate disk names")
            special = _check_kinds(data.get("kinds") or {}, order)
            disks = [d for d in order if d not in special]
            volumes = {}
            for vid, vol in data["volumes"].items():
                uuid.UUID(vid)
                if vol["disk"] not in disks or vol["format"] not in ("raw", "qcow2"):
                    raise ValueError(f"volume {vid} has a bad disk or format")
                if vol["parent"] is not None and vol["parent"] not in data["volumes"]:
                    raise ValueError(f"volume {vid} has an unknown parent")
                volumes[vid] = {"disk": vol["disk"], "format": vol["format"],
                                "parent": vol["parent"]}
            snapshots = []
            for s in data["snapshots"]:
                snapshots.append(Snapshot(str(uuid.UUID(s["id"])), check_snapshot_name(s["name"]),
                                          str(s.get("description", "")), str(s["created"]),
                                          _check_disk_map(s["volumes"], disks, volumes,
                                                          subset=True),
                                          _check_consistency(s.get("consistency", "offline"))))
            if len({s.name for s in snapshots}) != len(snapshots):
                raise ValueError("duplicate snapshot names")
            m = cls(name=check_name(data["name"], "VM name"), id=str(uuid.UUID(data["id"])),
                    created=str(data["created"]), disks=disks, volumes=volumes,
                    snapshots=snapshots, active=_check_disk_map(data["active"], disks, volumes),
                    preview=data.get("preview"), operation=data.get("operation"),
                    last_operation=data.get("last_operation"), path=str(path),
                    special=special, order=order if special else None)
            if m.preview is not None:
                _check_disk_map(m.preview["before"], disks, volumes)
                if not any(s.id == m.preview["snapshot"] for s in snapshots):
                    raise ValueError("the previewed snapshot does not exist")
                # A custom preview: {disk: id of the snapshot it came from}.
                for disk, sid in (m.preview.get("disks") or {}).items():
                    if disk not in disks or not any(s.id == sid for s in snapshots):
                        raise ValueError(f"the custom preview of disk {disk!r} is unknown")
            if m.operation is not None and not isinstance(m.operation.get("op"), str):
                raise ValueError("malformed operation record")
            for disk in disks:
                m.chain(m.active[disk])
        except StoreError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreError(f"{path}: invalid manifest: {e}") from None
        return m


def _check_consistency(value):
    if value not in CONSISTENCIES:
        raise ValueError(f"unknown snapshot consistency {value!r}")
    return value


def _check_kinds(kinds, order):
    """The kind records of the disks that are not layered."""
    out = {}
    for disk, kind in kinds.items():
        if disk not in order:
            raise ValueError(f"kind of unknown disk {disk!r}")
        if kind.get("kind") == LUN:
            device = kind["device"]
            if not isinstance(device, str) or not device.startswith("/"):
                raise ValueError(f"LUN {disk} has no absolute device path")
            out[disk] = {"kind": LUN, "device": device}
        elif kind.get("kind") == SHAREABLE:
            out[disk] = {"kind": SHAREABLE, "id": str(uuid.UUID(kind["id"]))}
        else:
            raise ValueError(f"disk {disk} has an unknown kind {kind.get('kind')!r}")
    return out


def _check_disk_map(mapping, disks, volumes, subset=False):
    """A snapshot holds some layered disks (``subset``: at least one); the
    active state and before-preview hold them all."""
    if set(mapping) != set(disks) and not (subset and mapping and set(mapping) <= set(disks)):
        raise ValueError("a snapshot or the active state does not cover the layered disks")
    for disk, vid in mapping.items():
        if vid not in volumes or volumes[vid]["disk"] != disk:
            raise ValueError(f"disk {disk} refers to unknown volume {vid}")
    return dict(mapping)


def load(path):
    try:
        with open(path, "rb") as f:
            return load_file(f, path)
    except FileNotFoundError:
        raise StoreError(f"{path}: manifest is missing") from None
    except OSError as e:
        raise StoreError(f"{path}: unreadable manifest: {e}") from None


def load_file(f, path):
    """The manifest in the open binary file ``f`` (named ``path``)."""
    try:
        data = json.load(f)
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path}: invalid manifest")
    return Manifest.from_json(data, path)


def save(manifest, path):
    """Replace the manifest at ``path`` atomically and durably.

    The new manifest is written to a temp file that is renamed over the
    old one; if anything fails before the rename, the temp file is removed
    and the old manifest stays.  Raises OSError."""
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, TEMPORARY)
    # No indent: json encodes in C only without one, 3-4x faster for a VM
    # with many snapshots, and each snapshot operation saves twice.
    data = json.dumps(manifest.to_json(), sort_keys=True).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            # O_CREAT's mode passes through the umask, which may take bits
            # from the owner too; an old temp file keeps its mode.
            os.fchmod(fd, FILE_MODE)
            # A write to a filling disk may stop short without an error: a
            # manifest renamed in with its tail missing would be unreadable.
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(directory)
    manifest.path = str(path)


def fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- privacy of the store's files ----------------------------------------------

# Every file snapfs creates in a store is its owner's only, as libvirt keeps
# its images: a volume is a whole VM disk, readable with qemu-img by anyone
# who can open it, however private the mount is.  Explicit modes, then
# fchmod/chmod, because the umask applies to the mode given at creation.
FILE_MODE = 0o600
DIR_MODE = 0o700

# The temp file ``save`` renames over the manifest.  It is never the truth:
# a leftover (from a kill between write and rename) is only removed.
TEMPORARY = f".{MANIFEST}.tmp"


def private_dir(path):
    """Create the directory ``path``, mode 0700 whatever the umask.
    Raises FileExistsError if it exists, OSError."""
    os.mkdir(path, DIR_MODE)
    os.chmod(path, DIR_MODE)


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:      # gone already, or the error being raised says more
        pass
