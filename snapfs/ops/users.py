"""What an operation tells those who use a VM's volumes while it runs.

Outside a mount nobody does (the CLI holds the store's lock): ``Users``
answers for nobody.  A mount answers for its open files and for the
writers to its active disks (snapfs/fs/uses.py).  ``changed_volumes`` says
which volume files a manifest switch may have changed, so that what was
read of the others stays valid.
"""

import contextlib


# What an operation may change under a reader, named for ``Users``.
def snapshot_use(snapshot_id):
    return ("snapshot", snapshot_id)


BEFORE_PREVIEW_USE = ("before-preview",)


def active_write_use(disk):
    return ("active-write", disk)


def is_active_write(use):
    """A writer to an active disk: only a writable open counts as one."""
    return use[0] == "active-write"


class Users:
    """Who else uses a VM's volumes while an operation runs.  Outside a
    mount nobody does (the CLI holds the store's lock): this class.  A
    mount answers for its open files and its writers to the active disks
    (snapfs/fs/uses.py)."""

    def refuse_if_open(self, uses, what):
        """Raise Busy if any of ``uses`` (see ``snapshot_use``...) is open;
        else keep them from being opened until the operation ends.
        ``what`` says what would change them, for the message."""

    def hold(self, disks):
        """A context in which nothing but the operation writes ``disks``
        (their active writers flushed and waiting)."""
        return contextlib.nullcontext()

    def writing(self, volume_ids):
        """The operation is about to write these volumes' files itself."""


def changed_volumes(old, new):
    """Ids of the volumes whose files may have changed between manifests
    ``old`` and ``new`` of one VM: the ones dropped, the active leaves of
    ``old`` (written until then), and the targets of a merge that moved
    on.  Every other volume's file, and what was read of it, stays valid."""
    changed = set(old.volumes) - set(new.volumes)
    changed.update(old.active.values())
    op = old.operation
    if op and op.get("op") == "delete" and op.get("phase") == "merge" and new.operation != op:
        for plan in op["disks"].values():
            changed.add(plan["b"] if plan["direction"] == "commit" else plan["c"])
    return changed
