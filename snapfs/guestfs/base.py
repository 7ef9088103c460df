"""What every guest filesystem reader offers, whatever parser is behind it.

A ``GuestFs`` reads one filesystem (a partition view, or a whole disk
without a partition table) through ``read(offset, length)`` and answers
in the filesystem's own inode numbers.  The filesystem is untrusted input
(DESIGN.md section 5): a parser's every failure on it, whatever the
exception, becomes ``FsDamaged`` (EIO) for the one request, and each
request's work is bounded (``Budget``): bytes read, and time.

A file's bytes are found through ``runs``, its extent map as byte ranges
of the view, so file reads go through the same chain (and the same page
cache of the host) as the raw views, and ``snapfs diff`` can tell from
the qcow2 maps alone whether they may have changed.
"""

from __future__ import annotations

import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import SnapfsError

Reader = Callable[[int, int], bytes]

# Bounds on what one request may make a parser do on a hostile filesystem.
MAX_DIR_ENTRIES = 100_000        # entries of one directory
MAX_LINK_BYTES = 4096            # a symlink target (PATH_MAX)
MAX_XATTR_BYTES = 1 << 20        # all extended attributes of one file
MAX_RUNS = 1 << 20               # extents of one file
REQUEST_BYTES = 256 << 20        # metadata read for one request
REQUEST_SECONDS = 30.0           # time for one request


class FsDamaged(SnapfsError):
    """The guest filesystem is damaged (or hostile) where a request read it."""


class BudgetExceeded(FsDamaged):
    """One request did more work than its ``Budget`` allows.  A reader that
    carries on past a damaged entry (one bad inode in a directory) must
    let this one through: the whole request is over."""


class Unsupported(SnapfsError):
    """No reader serves this filesystem (or this feature of it)."""


@dataclass(frozen=True, slots=True)
class Stat:
    ino: int
    mode: int               # st_mode, type bits included
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0           # major/minor of a device node (os.makedev)
    generation: int = 0     # tells a reused inode number apart, where the format has one

    @property
    def is_dir(self):
        return stat.S_ISDIR(self.mode)


class Budget:
    """The work one request may do: ``charge`` is called with every read of
    the view; past the bytes or the deadline the request fails with
    FsDamaged instead of hanging on a crafted filesystem (a directory of
    millions of empty blocks, an extent tree that points at itself)."""

    def __init__(self, max_bytes=None, seconds=None):
        # The module's limits are read now, not when this was defined, so
        # that a test (or a caller) can tighten them.
        self.left = REQUEST_BYTES if max_bytes is None else max_bytes
        self.deadline = time.monotonic() + (REQUEST_SECONDS if seconds is None else seconds)

    def charge(self, nbytes):
        self.left -= nbytes
        if self.left < 0:
            raise BudgetExceeded("the filesystem made one request read too much; damaged?")
        if time.monotonic() > self.deadline:
            raise BudgetExceeded("the filesystem made one request take too long; damaged?")


class BudgetedReader:
    """A ``Reader`` that charges the budget of the request in progress on
    this thread (none outside a request: opening the filesystem, or
    reading a file's data, which its runs bound already)."""

    def __init__(self, read: Reader):
        self._read = read
        self._local = threading.local()

    def __call__(self, offset, length):
        budget = getattr(self._local, "budget", None)
        if budget is not None:
            budget.charge(length)
        return self._read(offset, length)

    def request(self, budget):
        return _Request(self._local, budget)


class _Request:
    def __init__(self, local, budget):
        self.local, self.budget = local, budget

    def __enter__(self):
        self.outer = getattr(self.local, "budget", None)
        self.local.budget = self.budget if self.outer is None else self.outer
        return self.budget

    def __exit__(self, *exc):
        self.local.budget = self.outer


class ReaderFile:
    """A read-only file object over a ``Reader``, for parsers that want one
    (seek, read, tell).  Reads past ``size`` are short, as for a file."""

    def __init__(self, read: Reader, size: int):
        self._read, self.size, self._pos = read, size, 0

    def seek(self, offset, whence=0):
        if whence == 1:
            offset += self._pos
        elif whence == 2:
            offset += self.size
        if offset < 0:
            raise FsDamaged("a seek before the start of the filesystem")
        self._pos = offset
        return offset

    def tell(self):
        return self._pos

    def read(self, length=-1):
        if length is None or length < 0:
            length = self.size - self._pos
        length = max(0, min(length, self.size - self._pos))
        data = self._read(self._pos, length) if length else b""
        self._pos += len(data)
        return data

    def readinto(self, buf):
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def seekable(self):
        return True

    def readable(self):
        return True


class GuestFs:
    """A read-only filesystem in a byte view.  Subclasses implement the
    ``_`` methods with a parser; the public ones add the bounds and turn
    every parser failure into FsDamaged.

    Names are ``bytes`` as stored; inode numbers are the filesystem's own
    (stable across snapshots, which ``snapfs diff`` relies on)."""

    kind = "?"              # "ext4", "xfs", "vfat", "ntfs"
    root = 0                # the root directory's inode number
    recovered = None        # what was done to show it (a journal replayed), for the user
    # True when ``metadata_ranges``, if not empty, names every byte range of
    # the inode's record and maps; ``snapfs diff`` compares every file in
    # full on a reader that cannot promise it.
    exact_metadata_ranges = False

    def __init__(self, read: Reader, size: int):
        self.reader = BudgetedReader(read)
        self.size = size

    def drop_caches(self):
        """Let go of what the reader keeps to answer faster (a mount keeps
        only its most recently used trees' caches)."""

    # -- the public, bounded interface ------------------------------------

    def stat(self, ino) -> Stat:
        return self._bounded(self._stat, ino)

    def listdir(self, ino) -> list[tuple[bytes, int, int]]:
        """[(name, ino, S_IFMT type bits or 0 if unknown)], without . and ..

        Names no kernel would give (empty, ".", "..", with a "/" or a NUL)
        are left out, whatever the reader found.  Readers cap the entries
        while they read them; this is the last guard."""
        entries = self._bounded(self._listdir, ino)
        if len(entries) > MAX_DIR_ENTRIES:
            raise FsDamaged(f"directory {ino} has over {MAX_DIR_ENTRIES} entries; damaged?")
        return [entry for entry in entries if _valid_name(entry[0])]

    def readlink(self, ino) -> bytes:
        target = self._bounded(self._readlink, ino)
        if len(target) > MAX_LINK_BYTES or b"\0" in target:
            raise FsDamaged(f"symlink {ino} has a target no kernel would store")
        return target

    def xattrs(self, ino) -> dict[bytes, bytes]:
        found = self._bounded(self._xattrs, ino)
        if sum(len(k) + len(v) for k, v in found.items()) > MAX_XATTR_BYTES:
            raise FsDamaged(f"inode {ino} has over {MAX_XATTR_BYTES} bytes of attributes")
        return found

    def runs(self, ino) -> list[tuple[int | None, int]] | None:
        """The file's bytes as [(offset in the view or None for zeros,
        length)], covering exactly its size; None when they live in the
        inode (see ``inline_data``).  Cached by the caller."""
        runs = self._bounded(self._runs, ino)
        if runs is None:
            return None
        if len(runs) > MAX_RUNS:
            raise FsDamaged(f"inode {ino} has over {MAX_RUNS} extents; damaged?")
        size, total = self.stat(ino).size, 0
        for start, length in runs:
            if length < 0 or (start is not None and (start < 0 or start + length > self.size)):
                raise FsDamaged(f"inode {ino} has an extent outside the filesystem")
            total += length
        if total != size:
            raise FsDamaged(f"the extents of inode {ino} cover {total} bytes, not {size}")
        return runs

    def inline_data(self, ino) -> bytes | None:
        """The file's bytes when they live in its inode (no runs), else None."""
        return self._bounded(self._inline_data, ino)

    def metadata_ranges(self, ino) -> list[tuple[int, int]]:
        """Byte ranges of the view that hold this inode's own record and its
        maps (for ``snapfs diff``: if none of them, and none of its runs,
        changed, neither did the file).  Empty if the format cannot say."""
        return self._bounded(self._metadata_ranges, ino)

    def read_file(self, runs, offset, length) -> bytes:
        """Bytes [offset, offset+length) of a file with ``runs``."""
        out, pos = [], 0
        end = offset + length
        for start, run_len in runs:
            if pos + run_len > offset and pos < end:
                lo, hi = max(offset, pos), min(end, pos + run_len)
                if start is None:
                    out.append(bytes(hi - lo))
                else:
                    data = self.reader(start + lo - pos, hi - lo)
                    if len(data) != hi - lo:
                        raise FsDamaged("a file's extent ends past the end of the view")
                    out.append(data)
            pos += run_len
            if pos >= end:
                break
        return b"".join(out)

    def _bounded(self, fn, *args):
        with self.reader.request(Budget()):
            try:
                return fn(*args)
            except SnapfsError:
                raise
            except (MemoryError, RecursionError) as e:
                raise FsDamaged(f"{self.kind}: {type(e).__name__} on a damaged filesystem") from None
            except Exception as e:
                # A parser meets a hostile filesystem in every way it can
                # fail; each is this request's EIO, never the mount's end.
                raise FsDamaged(f"{self.kind}: {type(e).__name__}: {e}") from None

    # -- what a parser provides --------------------------------------------

    def _stat(self, ino) -> Stat:
        raise NotImplementedError

    def _listdir(self, ino):
        raise NotImplementedError

    def _readlink(self, ino) -> bytes:
        raise NotImplementedError

    def _xattrs(self, ino) -> dict[bytes, bytes]:
        return {}

    def _runs(self, ino):
        raise NotImplementedError

    def _inline_data(self, ino):
        return None

    def _metadata_ranges(self, ino):
        return []


def _valid_name(name):
    return bool(name) and name not in (b".", b"..") and b"/" not in name and b"\0" not in name
