"""The files inside a snapshot's disks, as read-only trees.

Beside each partition view ``<disk>-partN.raw`` of a snapshot (or of
before-preview), the directory ``<disk>-partN/`` shows the filesystem
in it, read by a ``GuestFs`` (snapfs/guestfs); ``<disk>.files/`` does
the same for a disk without a partition table.  ``active/`` has none:
its bytes change under the parser.

Inode numbers: a tree's entries are ``tree id << 40 | guest inode``, so
hard links share an inode and the kernel's cache needs nothing from us to
keep them apart; the guest's root is the tree's directory node itself.
Everything is immutable (a snapshot never changes), so the kernel keeps
entries and attributes for IMMUTABLE_TIMEOUT.

Parsers keep a file position and caches: each tree's metadata requests
are serialised by its own lock.  File data is read through the file's
runs from the partition view, without the lock (and, when the chain has
it at hand, in the event loop: ``read_nowait``).

The kernel caches entries and attributes but asks again for every
directory listing (pyfuse3 cannot tell it to cache those), so a listing
is kept whole, entries and stats, and a listing kept is answered in the
event loop (``listdir(..., wait=False)``): a warm ``find`` costs the
daemon no thread and no parsing.  A directory of one block is listed in
the event loop the first time too: a few reads cost less than the hop
to a worker thread and back, which a cold ``find`` waits for once per
directory.  Extended attributes are kept too (``ls -l`` asks for them).
"""

from __future__ import annotations

import logging
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import NotFound, PermissionDenied, ReadOnly, SnapfsError
from ..guestfs.base import BudgetExceeded, FsDamaged, Unsupported
from ..guestfs.probe import open_guest_fs
from .nodes import IMMUTABLE_TIMEOUT

log = logging.getLogger(__name__)

GUEST_INODE_BITS = 40
GUEST_INODE_LIMIT = 1 << GUEST_INODE_BITS
STAT_CACHE = 65536          # Stats kept per tree (the kernel keeps its own copy)
# Trees whose caches are kept: a mount may show hundreds of snapshots'
# trees, and each one's caches (and its reader's) take tens of MiB full.
CACHED_TREES = 8
LISTING_CACHE = 1024        # directory listings (names) kept per tree
ENTRY_CACHE = 1 << 16       # entries of the listings kept with their stats, per tree
SMALL_DIRECTORY = 4096      # bytes: a directory listed in the event loop the first time too
RUNS_CACHE = 1024           # extent maps kept per tree
XATTR_CACHE = 4096          # files' extended attributes kept per tree


@dataclass(slots=True)
class GuestEntry:
    """A file or directory inside a tree: what the FUSE adapter needs of a
    Node, and the guest's own Stat."""
    inode: int
    tree: "FileTree"
    stat: object
    name: str = ""
    timeout: float = IMMUTABLE_TIMEOUT
    immutable: bool = True
    stale: bool = False
    control: None = None
    render: None = None
    view: None = None
    key: None = None
    shared: bool = False
    children: None = None
    attrs: object = None        # what the FUSE adapter made of it, kept with a listing

    @property
    def mode(self):
        return self.stat.mode

    @property
    def is_dir(self):
        return stat.S_ISDIR(self.stat.mode)

    @property
    def mtime_ns(self):
        return self.stat.mtime_ns

    @property
    def vm(self):
        return self.tree.top.vm

    @property
    def owner(self):
        return self.tree.top.owner


class _Lru(OrderedDict):
    """Values kept by ``key``, the least recently used dropped first once
    their ``weight`` (by default, one each) passes ``limit``."""

    def __init__(self, limit, weight=None):
        super().__init__()
        self.limit, self.weight, self.total = limit, weight, 0

    def get_or(self, key, make):
        try:
            self.move_to_end(key)
            return self[key]
        except KeyError:
            value = self[key] = make()
            self.total += self._weigh(value)
            while self.total > self.limit and len(self) > 1:
                self.total -= self._weigh(self.popitem(last=False)[1])
            return value

    def _weigh(self, value):
        return 1 if self.weight is None else self.weight(value)


class FileTree:
    """One filesystem shown under directory node ``top``."""

    def __init__(self, tree_id, fs, view, label):
        self.id = tree_id
        self.fs = fs
        self.view = view            # the PartitionView or DiskView it reads
        self.label = label
        self.top = None             # the directory Node, once attached
        self.error = None           # why every access fails, if it does
        # What was done to show it: a journal replayed in memory.
        self.note = fs.recovered if fs is not None else None
        self._lock = threading.Lock()
        self.used = lambda tree: None   # FileTrees.used, once registered
        self.drop_caches()

    def drop_caches(self):
        """Empty caches.  New ones, not cleared ones: no lock is needed, and
        a request in flight finishes with the old."""
        self._stats = _Lru(STAT_CACHE)
        self._listings = _Lru(LISTING_CACHE)
        self._entries = _Lru(ENTRY_CACHE, weight=lambda entries: max(1, len(entries)))
        self._runs = _Lru(RUNS_CACHE)
        self._xattrs = _Lru(XATTR_CACHE)
        if self.fs is not None:
            self.fs.drop_caches()

    # -- inode numbers -----------------------------------------------------------

    def fuse_inode(self, ino):
        if ino == self.fs.root:
            return self.top.inode
        if not 0 < ino < GUEST_INODE_LIMIT:
            raise FsDamaged(f"{self.label}: inode number {ino} is out of range")
        return self.id << GUEST_INODE_BITS | ino

    def guest_inode(self, inode):
        return self.fs.root if inode == self.top.inode else inode & (GUEST_INODE_LIMIT - 1)

    # -- metadata, under the lock ----------------------------------------------

    def _check(self):
        self.used(self)
        if self.top is None or self.top.stale:
            raise NotFound(f"{self.label} was removed")
        if self.error is not None:
            raise FsDamaged(f"{self.label}: {self.error}")

    def _at_hand(self):
        """Whether a request may be answered from the caches (else the
        waiting call says why not)."""
        self.used(self)
        return self.top is not None and not self.top.stale and self.error is None

    def stat(self, ino):
        self._check()
        with self._lock:
            return self._stats.get_or(ino, lambda: self.fs.stat(ino))

    def entry(self, inode, wait=True):
        """The GuestEntry of ``inode``; with ``wait=False``, None unless its
        stat is at hand and the lock free."""
        if wait:
            ino = self.guest_inode(inode)
            return GuestEntry(self.fuse_inode(ino), self, self.stat(ino))
        if not self._at_hand():
            return None
        ino = self.guest_inode(inode)
        if not self._lock.acquire(blocking=False):
            return None
        try:
            st = self._stats.get(ino)
        finally:
            self._lock.release()
        return None if st is None else GuestEntry(self.fuse_inode(ino), self, st)

    def root_stat(self):
        return self.stat(self.fs.root)

    def _listing(self, ino):
        self._check()
        with self._lock:
            return self._listings.get_or(ino, lambda: self._list(ino))

    def _list(self, ino):
        listing = {}
        for name, child, _ in self.fs.listdir(ino):
            listing[name] = child
        return listing

    def lookup(self, inode, name: bytes):
        child = self._listing(self.guest_inode(inode)).get(name)
        if child is None:
            raise NotFound(f"no entry {name!r}")
        return self._entry_of(child, name)

    def _entry_of(self, ino, name):
        entry = GuestEntry(self.fuse_inode(ino), self, self.stat(ino))
        entry.name = name.decode(errors="surrogateescape")
        return entry

    def listdir(self, inode, wait=True):
        """[(name bytes, GuestEntry)], kept and shared: not to be changed.
        An entry whose inode is damaged is left out (and logged): the rest
        of the directory still lists.  With ``wait=False``, None unless the
        listing is at hand and the lock free (the caller is the event loop)."""
        if not wait:
            if not self._at_hand():
                return None     # the waiting call raises
            ino = self.guest_inode(inode)
            if not self._lock.acquire(blocking=False):
                return None
            try:
                entries = self._entries.get(ino)
                if entries is not None:
                    self._entries.move_to_end(ino)
                    return entries
                st = self._stats.get(ino)
                if st is None or st.size > SMALL_DIRECTORY:
                    return None
                # A directory of one block: its entries and their inodes
                # are a few reads, cheaper than the thread hop (the kernel
                # waits for this answer before it asks for the next).
                listing = self._listings.get_or(ino, lambda: self._list(ino))
                return self._entries.get_or(ino, lambda: self._entries_of(listing))
            finally:
                self._lock.release()
        ino = self.guest_inode(inode)
        listing = self._listing(ino)
        with self._lock:
            return self._entries.get_or(ino, lambda: self._entries_of(listing))

    def _entries_of(self, listing):
        """The entries of a listing, with their stats (under the lock)."""
        out = []
        for name, ino in listing.items():
            try:
                st = self._stats.get_or(ino, lambda: self.fs.stat(ino))
                entry = GuestEntry(self.fuse_inode(ino), self, st)
            except BudgetExceeded:
                raise           # the request is over, and nothing is kept of it
            except FsDamaged as e:
                log.error("%s: entry %r left out of its directory: %s", self.label, name, e)
                continue
            entry.name = name.decode(errors="surrogateescape")
            out.append((name, entry))
        return out

    def readlink(self, inode):
        self._check()
        with self._lock:
            return self.fs.readlink(self.guest_inode(inode))

    def xattrs(self, inode, wait=True):
        """{name: value}, kept (``ls -l`` asks for two of every file it
        lists, and the kernel keeps none); with ``wait=False``, None unless
        at hand and the lock free."""
        if not wait:
            if not self._at_hand() or not self._lock.acquire(blocking=False):
                return None
            try:
                return self._xattrs.get(self.guest_inode(inode))
            finally:
                self._lock.release()
        self._check()
        ino = self.guest_inode(inode)
        with self._lock:
            return self._xattrs.get_or(ino, lambda: self.fs.xattrs(ino))

    def open(self, inode):
        """The file's bytes: ("inline", data) or ("runs", runs)."""
        ino = self.guest_inode(inode)
        st = self.stat(ino)
        if not stat.S_ISREG(st.mode):
            # Devices, fifos and sockets are shown, never opened: they
            # would be the host's.
            raise PermissionDenied(f"{self.label}: only regular files open")
        with self._lock:
            return self._runs.get_or(ino, lambda: self._file(ino))

    def _file(self, ino):
        inline = self.fs.inline_data(ino)
        if inline is not None:
            return "inline", inline
        return "runs", self.fs.runs(ino)

    # -- file data, without the lock ---------------------------------------------

    def read(self, file, offset, length, wait=True):
        """Bytes of an opened file; with ``wait=False``, None where the
        view would have to wait (see DiskView.read)."""
        kind, data = file
        if kind == "inline":
            return data[offset:offset + length]
        out, pos, end = [], 0, offset + length
        for start, run_len in data:
            if pos + run_len > offset and pos < end:
                lo, hi = max(offset, pos), min(end, pos + run_len)
                if start is None:
                    out.append(bytes(hi - lo))
                else:
                    piece = self.view.read(start + lo - pos, hi - lo, wait=wait)
                    if piece is None:
                        return None
                    if len(piece) != hi - lo:
                        raise FsDamaged(f"{self.label}: a file's extent ends past its partition")
                    out.append(piece)
            pos += run_len
            if pos >= end:
                break
        return b"".join(out)


class FileTrees:
    """Every tree of the mount, by id."""

    def __init__(self, cached=CACHED_TREES):
        self._trees = {}
        self._next_id = 1
        self._lock = threading.Lock()
        self._cached = cached
        self._recent = OrderedDict()    # tree id -> tree, most recently used last
        self._last = None               # the id last in _recent

    def used(self, tree):
        """``tree`` answers a request: it keeps its caches, and the tree
        used longest ago beyond the CACHED_TREES most recent lets go of its."""
        if self._last == tree.id:
            return                      # the common case: the same tree again
        recent = self._recent
        with self._lock:
            self._last = tree.id
            recent[tree.id] = tree
            recent.move_to_end(tree.id)
            dropped = [recent.popitem(last=False)[1] for _ in range(len(recent) - self._cached)]
        for old in dropped:
            old.drop_caches()

    def make(self, view, label):
        """A FileTree for ``view``, or None (logged) when it holds no
        filesystem snapfs reads.  A filesystem it reads but cannot show
        (damaged; a journal it cannot replay) still gets its tree, which
        answers EIO and says why (``error``, in control/status)."""
        fs, error = None, None
        try:
            fs, why = open_guest_fs(view.read, view.size)
        except FsDamaged as e:
            error = str(e)
        except SnapfsError as e:
            if not _known_kind(e):
                raise           # the view itself is broken: no tree
            error = str(e)
        if fs is None and error is None:
            log.info("%s: no file tree: %s", label, why)
            return None
        if error is not None:
            log.error("%s: its files cannot be shown: %s", label, error)
        with self._lock:
            tree = FileTree(self._next_id, fs, view, label)
            tree.used = self.used
            tree.error = error
            self._next_id += 1
            self._trees[tree.id] = tree
        return tree

    def of(self, inode):
        """The tree an inode above the Tree's own belongs to."""
        tree = self._trees.get(inode >> GUEST_INODE_BITS)
        if tree is None:
            raise NotFound(f"no inode {inode}")
        return tree

    def notes(self, vm):
        """What control/status says of ``vm``'s trees shown so far: those
        refused (EIO) and why, and those shown after a journal replay."""
        with self._lock:
            trees = [t for t in self._trees.values() if t.top is not None and t.top.vm is vm]
        said = []
        for tree in sorted(trees, key=lambda t: t.label):
            if tree.error is not None:
                said.append({"tree": tree.label, "refused": tree.error})
            elif tree.note is not None:
                said.append({"tree": tree.label, "shown": tree.note})
        return said

    def drop(self, tree):
        with self._lock:
            self._trees.pop(tree.id, None)
            self._recent.pop(tree.id, None)


def _known_kind(error):
    """Whether ``error`` comes from a guest filesystem's reader (it knows
    the format but cannot show it), not from the view below it."""
    return isinstance(error, Unsupported)


def is_guest_inode(inode):
    return inode >= GUEST_INODE_LIMIT


def refuse_change(node):
    """Everything in a tree is read-only."""
    if isinstance(node, GuestEntry):
        raise ReadOnly(f"{node.name or 'this file'}: the files of a snapshot never change")
    return node

