"""Throwaway overlays: the private writes of a snapshot view opened for
writing (DESIGN.md section 2).

A snapshot never changes.  But the journal of a crash-consistent snapshot
must be replayed before its filesystem mounts, and the kernel replays only
onto a writable device.  So, as libguestfs does under every read-only
drive, each writable open of a snapshot view gets its own overlay: writes
land in it, reads through that open see them, every other reader sees the
snapshot, and the overlay is gone when the file is released.

The overlay's bytes live in a sparse scratch file (snapfs/store/scratch.py),
never in memory.  In memory is only the map of what was written: sorted,
merged block extents, 16 bytes per run of written blocks.  Writes are
tracked in 4 KiB blocks; a write that covers part of a block not written
before first copies the rest of that block from the snapshot, so a block
is either wholly the snapshot's or wholly the overlay's.

``Scratch`` bounds what all overlays of a mount may hold together: past
the limit a write fails with ENOSPC, as a full disk would.
"""

import bisect
import logging
import os
import shutil
import threading
from array import array

from ..errors import NoSpace
from ..store.scratch import open_overlay_file

log = logging.getLogger(__name__)

BLOCK = 4096
# Without -o scratch_limit: at most this much, and never more than half
# of the scratch filesystem's free space when the mount starts.  A journal
# replay writes at most the journal (128 MiB for a large ext4) plus the
# blocks it checkpoints.
DEFAULT_LIMIT = 8 << 30


def default_limit(directory):
    try:
        free = shutil.disk_usage(_existing(directory)).free
    except OSError:
        return DEFAULT_LIMIT
    return min(DEFAULT_LIMIT, free // 2)


def _existing(directory):
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    return directory


class Scratch:
    """The scratch directory and the space its overlays may take."""

    def __init__(self, directory, limit=None):
        self.directory = directory
        self.limit = default_limit(directory) if limit is None else limit
        self.used = 0                  # bytes of written blocks, all overlays
        self._open = {}                # Overlay -> what it overlays, for status
        self._lock = threading.Lock()

    def open(self, base, label, owner=None):
        """A new overlay over ``base`` (``.size``, ``.read(offset, length)``).
        ``label`` names the view in control/status; ``owner`` is what
        status groups by (the VM).  Raises OSError."""
        overlay = Overlay(self, base, open_overlay_file(self.directory))
        with self._lock:
            self._open[overlay] = (owner, label)
        return overlay

    def overlays(self, owner):
        """[(label, bytes written)] of ``owner``'s open overlays."""
        with self._lock:
            return [(label, overlay.bytes) for overlay, (o, label) in self._open.items()
                    if o is owner]

    def _reserve(self, nbytes):
        with self._lock:
            if self.used + nbytes > self.limit:
                raise NoSpace(f"throwaway overlays hold {self.used} bytes of the scratch "
                              f"limit of {self.limit} (-o scratch_limit)")
            self.used += nbytes

    def _give_back(self, nbytes):
        with self._lock:
            self.used -= nbytes

    def _closed(self, overlay):
        with self._lock:
            self._open.pop(overlay, None)


class Overlay:
    """One open file's private writes over an immutable view."""

    def __init__(self, scratch, base, fd):
        self.scratch = scratch
        self.base = base
        self.size = base.size
        self.bytes = 0
        self._fd = fd
        self._written = Extents()
        self._lock = threading.Lock()

    def read(self, offset, length):
        if offset >= self.size:
            return b""
        end = min(offset + length, self.size)
        with self._lock:
            runs = list(self._written.runs(offset, end)) if self._written else None
        if not runs:
            return self.base.read(offset, end - offset)
        parts = []
        for start, stop, written in runs:
            if written:
                data = os.pread(self._fd, stop - start, start)
                # A written block past the file's end cannot be: the block
                # was written whole.  Pad defensively rather than return short.
                parts.append(data.ljust(stop - start, b"\0"))
            else:
                parts.append(self.base.read(start, stop - start))
        return b"".join(parts)

    def write(self, offset, data):
        end = offset + len(data)
        if end > self.size:
            raise NoSpace("write past the end of the view")
        if not data:
            return 0
        first = offset - offset % BLOCK
        last = -(-end // BLOCK) * BLOCK
        with self._lock:
            head = b""
            if offset != first and not self._written.covers(first):
                head = self.base.read(first, offset - first)
            tail = b""
            if end % BLOCK and end < self.size and not self._written.covers(end - end % BLOCK):
                tail = self.base.read(end, min(last, self.size) - end)
            new = self._written.uncovered(first, last)
            self.scratch._reserve(new)
            try:
                _pwrite_all(self._fd, head + data + tail, offset - len(head))
            except OSError as e:
                self.scratch._give_back(new)
                raise NoSpace(f"scratch file: {e.strerror}") from None
            self._written.add(first, last)
            self.bytes += new
        return len(data)

    def close(self):
        with self._lock:
            fd, self._fd = self._fd, -1
            released, self.bytes = self.bytes, 0
        if fd >= 0:
            os.close(fd)
            self.scratch._give_back(released)
            self.scratch._closed(self)


def _pwrite_all(fd, data, offset):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class Extents:
    """Disjoint, sorted, merged [start, end) byte ranges."""

    def __init__(self):
        self.starts = array("q")
        self.ends = array("q")

    def __len__(self):
        return len(self.starts)

    def covers(self, offset):
        i = bisect.bisect_right(self.starts, offset) - 1
        return i >= 0 and offset < self.ends[i]

    def uncovered(self, start, end):
        """How many bytes of [start, end) no range covers."""
        return sum(stop - s for s, stop, covered in self.runs(start, end) if not covered)

    def runs(self, start, end):
        """(start, stop, covered) pieces that tile [start, end)."""
        i = bisect.bisect_right(self.ends, start)
        pos = start
        while pos < end:
            if i < len(self.starts) and self.starts[i] <= pos:
                stop = min(self.ends[i], end)
                yield pos, stop, True
                i += 1
            else:
                stop = min(self.starts[i], end) if i < len(self.starts) else end
                yield pos, stop, False
            pos = stop

    def add(self, start, end):
        # Ranges that overlap or touch [start, end) merge with it.
        i = bisect.bisect_left(self.ends, start)
        j = bisect.bisect_right(self.starts, end)
        if i < j:
            start = min(start, self.starts[i])
            end = max(end, self.ends[j - 1])
        self.starts[i:j] = array("q", [start])
        self.ends[i:j] = array("q", [end])
