"""A live merge inside the QEMU that runs a VM: the QMP side of deleting a
snapshot of a running VM, one disk at a time.

Deleting snapshot S (its volume B, B's child C, C's child D if any) moves
data in the direction ops/merge.py chose:

- *commit*: ``block-commit`` of C into B.  When C is the leaf QEMU writes,
  it is an *active* commit: the job mirrors C's writes into B, goes
  ``ready``, and ``job-complete`` pivots the device onto B.  Otherwise it
  is an intermediate commit that ends by itself, and QEMU points D at B
  with the bare name given as ``backing-file`` (QEMU would otherwise write
  whatever name it opened B by).
- *stream*: ``block-stream`` of B's data into C, ``backing-file`` the bare
  name of B's parent (none when B is the base).

Jobs are made with auto-finalize and auto-dismiss off, so that a job's
outcome waits in QEMU's job list for whoever asks, however long snapfs
was gone; their id comes from the deleted snapshot and the disk
(``job_id``).  ``jobs.drive`` follows a job to its end.
"""

import json
import os

from ..errors import QemuError
from .verify import block_devices


def job_id(snapshot_id, disk_index):
    """QEMU job ids must be unique among its jobs; one per disk of a delete."""
    return f"snapfs-del-{snapshot_id.replace('-', '')[:12]}-{disk_index}"


def _plain(name):
    """The file under a ``json:{...}`` node name (see verify._plain)."""
    if name and name.startswith("json:"):
        try:
            spec = json.loads(name[5:])
            while isinstance(spec.get("file"), dict):
                spec = spec["file"]
            name = spec.get("filename", name)
        except (ValueError, AttributeError):
            pass
    return os.path.realpath(name) if name and name.startswith("/") else name


def format_nodes(qmp):
    """{real path: node name} of QEMU's qcow2/raw nodes (the images, not
    their protocol or filter nodes); QEMU names the nodes it opened from
    backing names itself (``#blockNNN``), which QMP commands accept."""
    nodes = {}
    for node in qmp.execute("query-named-block-nodes", {"flat": True}):
        if node.get("drv") in ("qcow2", "raw"):
            nodes.setdefault(_plain(node.get("file")), node["node-name"])
    return nodes


def open_paths(qmp):
    """Real paths of every file QEMU has a node on (any driver)."""
    return {_plain(node.get("file")) for node in
            qmp.execute("query-named-block-nodes", {"flat": True})}


def chain_paths(qmp):
    """Real paths of every image in the chains of QEMU's devices: what the
    guest reads.  A merged-away volume leaves them when QEMU's graph
    switches, though a node the monitor owns stays open until deleted."""
    paths = set()
    for dev in qmp.execute("query-block"):
        image = (dev.get("inserted") or {}).get("image")
        while image:
            paths.add(_plain(image.get("filename")))
            image = image.get("backing-image")
    return paths


def release(qmp, paths):
    """``blockdev-del`` the nodes on ``paths`` that the monitor owns: the
    ones ``-blockdev`` or a live create's ``blockdev-add`` made stay open
    after a merge dropped them from the chain, until deleted.  Nodes QEMU
    opened from backing names close by themselves, and QEMU refuses to
    delete a node still in use: both are left as they are."""
    for node in sorted(qmp.execute("query-named-block-nodes", {"flat": True}),
                       key=lambda n: n.get("drv") == "file"):   # format nodes first
        name = node["node-name"]
        if name.startswith("#") or _plain(node.get("file")) not in paths:
            continue
        try:
            qmp.execute("blockdev-del", {"node-name": name})
        except QemuError:
            pass   # in use, or gone with its format node


class LiveMerge:
    """One disk's merge: ``paths`` = {"b", "c", "d", "p", "leaf"} real
    paths (None when absent; "leaf" is the disk's active leaf, the top of
    its device in QEMU), ``names`` = their bare volume names."""

    def __init__(self, job, direction, paths, names):
        self.id, self.direction, self.paths, self.names = job, direction, paths, names

    @property
    def removed(self):
        """The volume the merge leaves unused: C for a commit, B for a stream."""
        return self.paths["c"] if self.direction == "commit" else self.paths["b"]

    def done_in_qemu(self, qmp):
        return self.removed not in chain_paths(qmp)

    def start(self, qmp):
        nodes = format_nodes(qmp)
        missing = [k for k in ("b", "c") if self.paths[k] not in nodes]
        if missing:
            raise QemuError(f"QEMU at {qmp.path} has no node on {self.paths[missing[0]]}")
        common = {"job-id": self.id, "auto-finalize": False, "auto-dismiss": False}
        if self.direction == "stream":
            args = dict(common, device=nodes[self.paths["c"]])
            if self.paths["p"]:
                # B's parent stays C's backing: named bare, as snapfs writes.
                args.update({"base-node": nodes[self.paths["p"]],
                             "backing-file": self.names["p"]})
            qmp.execute("block-stream", args)
            return
        root = self._device_root(qmp)
        args = dict(common, device=root, **{"top-node": nodes[self.paths["c"]],
                                            "base-node": nodes[self.paths["b"]]})
        if self.paths["d"]:
            # Intermediate commit: QEMU rewrites D's backing name.  (For an
            # active commit there is no overlay to rewrite, and QEMU
            # refuses backing-file.)
            args["backing-file"] = self.names["b"]
        qmp.execute("block-commit", args)

    def _device_root(self, qmp):
        top = self.paths["leaf"]
        for _, path, node in block_devices(qmp):
            if path == top:
                return node
        raise QemuError(f"QEMU at {qmp.path} has no device on {top}")
