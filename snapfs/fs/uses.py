"""What a mount's open files need kept still while an operation runs.

``MountUsers`` answers VmOperations' questions (snapfs.ops.users.Users)
for one VM of a mount:

- which of its views are open: a snapshot is not deleted, and a preview
  is not committed or undone, while views whose bytes that would change are
  open (EBUSY, as ZFS refuses to destroy a busy snapshot); the leaf is not
  switched under an active view open for writing (a mounted filesystem);
- which active disks an operation holds: writes to a disk wait while an
  operation merges into or switches its leaf, and only that disk's.

Limitations: FUSE sends RELEASE after close() has returned, so a view
closed just before an operation may still count as open; the operation
waits up to RELEASE_GRACE seconds for such releases before refusing.
"""

import contextlib
import time

from ..errors import Busy
from ..ops.users import is_active_write

# Seconds an operation waits for releases in flight (see above): a script's
# `cat view; rmdir snapshot` must not fail because the kernel was slow.
RELEASE_GRACE = 2.0


def open_use(vm, use):
    """Count an open of ``use`` (Handle.use).  Raises Busy if an operation
    has claimed it (it is deleting or switching what the file shows)."""
    with vm.uses_changed:
        if use in vm.claimed:
            raise Busy(f"VM {vm.name}: an operation is changing this file; try again")
        vm.open_views[use] = vm.open_views.get(use, 0) + 1


def close_use(vm, use):
    with vm.uses_changed:
        left = vm.open_views.get(use, 0) - 1
        if left > 0:
            vm.open_views[use] = left
        else:
            vm.open_views.pop(use, None)
        vm.uses_changed.notify_all()


class MountUsers:
    """The users of VM ``vm`` (a VmState) in a mount.  ``writing(ids)``
    is called with volume ids an operation is about to write itself."""

    def __init__(self, vm, writing=None):
        self.vm = vm
        self._writing = writing

    def refuse_if_open(self, uses, what):
        vm = self.vm
        uses = list(uses)
        deadline = time.monotonic() + RELEASE_GRACE
        with vm.uses_changed:
            while True:
                busy = [u for u in uses if vm.open_views.get(u)]
                if not busy:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Busy(f"VM {vm.name}: {what} would change files that are open "
                               f"({', '.join(_describe(vm, u) for u in busy)}); close them "
                               f"(umount, losetup -d) and try again")
                vm.uses_changed.wait(left)
            vm.claimed.update(uses)

    def release_claims(self):
        """The operation ended: what it claimed may be opened again."""
        with self.vm.uses_changed:
            self.vm.claimed.clear()

    @contextlib.contextmanager
    def hold(self, disks):
        slots = [self.vm.active[d] for d in sorted(disks) if d in self.vm.active]
        with contextlib.ExitStack() as stack:
            for slot in slots:
                stack.enter_context(slot.lock)
                slot.disk.flush()
            yield

    def writing(self, volume_ids):
        if self._writing is not None:
            self._writing(volume_ids)


def _describe(vm, use):
    if use[0] == "snapshot":
        snap = next((s for s in vm.manifest.snapshots if s.id == use[1]), None)
        return f"views of snapshot {snap.name if snap else use[1]}"
    if is_active_write(use):
        return f"active/{use[1]}.raw open for writing"
    return "before-preview views"
