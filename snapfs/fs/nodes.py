"""The nodes of the mounted namespace, open files, and per-VM state: plain
data that snapfs.vfs serves and snapfs.listings fills in."""

import stat
import threading
from dataclasses import dataclass, field

from .queue import OpQueue, WriteGate

ROOT_INODE = 1
# Snapshot contents never change; entries that do are invalidated.
IMMUTABLE_TIMEOUT = 3600.0
# Directories and links whose target changes with layer operations.
MUTABLE_TIMEOUT = 1.0

DIR_MODE = stat.S_IFDIR | 0o555
SNAPSHOTS_DIR_MODE = stat.S_IFDIR | 0o755    # the owner may mkdir, rmdir, mv
VIEW_MODE = stat.S_IFREG | 0o440
# Snapshot disks: the owner may open them for writing, into a throwaway
# overlay (fs/overlays.py); the snapshot itself never changes.
DISK_VIEW_MODE = stat.S_IFREG | 0o640
ACTIVE_MODE = stat.S_IFREG | 0o660
CONTROL_MODE = stat.S_IFREG | 0o220
STATUS_MODE = stat.S_IFREG | 0o440
LINK_MODE = stat.S_IFLNK | 0o777

CONTROL_COMMANDS = ("create", "delete", "preview", "commit", "undo", "clone")


@dataclass(slots=True)     # a mount of many VMs holds ~100 nodes per VM
class Node:
    inode: int
    name: str
    parent: int
    mode: int
    mtime_ns: int
    timeout: float = IMMUTABLE_TIMEOUT
    immutable: bool = True
    children: dict | None = None          # name -> inode, once listed
    lister: object = None                 # () -> list of node specs
    view: object = None                   # DiskView, PartitionView, ActiveSlot or bytes
    target: str | None = None             # symlink target
    control: str | None = None            # control file command, or "status"
    render: object = None                 # snapshot.json: () -> bytes, made at open; .size()
    vm: object = None                     # VmState of the VM this node belongs to
    key: object = None                    # what it shows, to keep it across refreshes
    size: int = 0
    # Whose bytes a view shows, for the operations that must not change
    # them while they are open: ("snapshot", id) or ("before-preview",).
    owner: tuple | None = None
    stale: bool = False                   # left the tree: opens fail, views let go
    # A shareable disk or a LUN: others change its bytes (other VMs, QEMU,
    # the host), so it bypasses the page cache.
    shared: bool = False
    # The directory of a filesystem's files (fs/filetree.py): its FileTree.
    filetree: object = None

    @property
    def is_dir(self):
        return stat.S_ISDIR(self.mode)


@dataclass
class Handle:
    """An open file."""
    node: Node
    data: bytes | None = None             # control/status as of open()
    wrote: bool = False
    # What this open keeps from changing (VmState.open_views), if anything.
    use: tuple | None = None
    # Control files: bytes of a command line not complete yet, and the
    # error that ended this open's commands (every later write gets it).
    pending: bytearray = field(default_factory=bytearray)
    error: Exception | None = None
    # ``touch snapshots/NAME``: the snapshot is made when the file is
    # closed without a write (a write means ``cp`` or ``>``: refused).
    creating: str | None = None
    # A snapshot view opened for writing: its private throwaway overlay
    # (fs/overlays.py), which its reads and writes go through.
    overlay: object = None
    # An active view: its ActiveSlot, told when the file is released.
    active: object = None
    # A file in a tree (fs/filetree.py): its bytes, as FileTree.open gave them.
    guest: object = None


@dataclass
class VmState:
    name: str
    manifest: object
    inode: int = 0
    # Held while an operation holds the VM; taken and let go only by
    # ``queue`` (fs/queue.py), which orders the operations asked meanwhile.
    op_lock: threading.Lock = field(default_factory=threading.Lock)
    running: dict | None = None
    queue: OpQueue = field(init=False)
    # Closed while a queued mkdir waits: writes to the active views wait.
    write_gate: WriteGate = field(default_factory=WriteGate)
    last_error: dict | None = None
    stale_pages: bool = False        # the active leaves changed under the page cache
    active: dict = field(default_factory=dict)    # disk -> ActiveSlot
    # Open files that an operation must not change under their readers:
    # ("snapshot", id), ("before-preview",) and ("active-write", disk) ->
    # number of opens; guarded by ``uses_changed``, notified at each release.
    open_views: dict = field(default_factory=dict)
    uses_changed: threading.Condition = field(default_factory=threading.Condition)
    # Uses an operation has claimed (it is removing or switching them):
    # new opens of those are refused until the operation ends.
    claimed: set = field(default_factory=set)
    # snapshot id -> {disk: DiskView}: the views of snapshots listed so
    # far, retargeted when a merge changes their chain (same bytes).
    snapshot_views: dict = field(default_factory=dict)
    # volume id -> VolumeRef, shared by every chain of the VM (a VM of 20
    # snapshots has ~200 chain entries; a volume's path and format never change)
    refs: dict = field(default_factory=dict)
    # top volume path -> KnownTable of the chain it tops (see
    # snapfs/fs/partition_reuse.py); dropped when the manifest changes, as a
    # merge rewrites volumes
    partitions: dict = field(default_factory=dict)

    def __post_init__(self):
        self.queue = OpQueue(self.op_lock)
