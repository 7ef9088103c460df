"""snapshot.json: a snapshot's record and the chains of its disks."""

import json
import os

from ..errors import NotFound


class SnapshotJson:
    """``render`` of snapshot.json: the snapshot's record as it is now (its
    name can change), with its volumes.  Its size is kept until the VM's
    manifest changes: every stat of the file asks for it."""

    __slots__ = ("vm", "snapshot_id", "views", "_size")

    def __init__(self, vm, snapshot_id, views):
        self.vm, self.snapshot_id, self.views = vm, snapshot_id, views
        self._size = (None, 0)     # (the manifest it was measured on, bytes)

    def __call__(self):
        manifest = self.vm.manifest
        data = self._make(manifest)
        self._size = (manifest, len(data))
        return data

    def size(self):
        manifest, size = self._size
        return size if manifest is self.vm.manifest else len(self())

    def _make(self, manifest):
        snap = next((s for s in manifest.snapshots if s.id == self.snapshot_id), None)
        if snap is None:
            raise NotFound("the snapshot was deleted")
        doc = snap.to_json()
        doc["excluded"] = manifest.excluded(snap)
        doc["volumes"] = {
            disk: {"volume": os.path.basename(view.refs[-1].path),
                   "chain": [os.path.basename(r.path) for r in view.refs], "size": view.size}
            for disk, view in self.views.items()}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
