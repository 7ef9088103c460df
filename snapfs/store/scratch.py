"""Scratch files: where the throwaway overlays of snapshot views live.

A snapshot view opened for writing gets a private overlay (snapfs/fs/
overlays.py).  Its bytes go to a sparse file in a scratch directory, by
default ``STORE/scratch``, never to memory.  The file has no name while it
is in use: it is made with O_TMPFILE, or created and unlinked at once where
the filesystem lacks O_TMPFILE.  So a daemon that dies leaves nothing
behind, except in that one window of the fallback, where a named file
``overlay-<pid>-<uuid>`` remains.  Mounting and ``snapfs check`` remove
those whose process is gone.
"""

import errno
import os
import re
import uuid

from . import manifest as M
from .processes import alive

SCRATCH = "scratch"
OVERLAY_PREFIX = "overlay-"
LEFTOVER_OVERLAY = "throwaway overlay left by a daemon that died"
_OVERLAY_NAME = re.compile(re.escape(OVERLAY_PREFIX) + r"(\d+)-[0-9a-f-]{36}\Z")


def default_scratch_dir(store):
    return os.path.join(store.path, SCRATCH)


def open_overlay_file(directory):
    """A new empty file in ``directory`` that no one else can reach and
    that vanishes when its descriptor is closed.  Raises OSError."""
    _ensure_directory(directory)
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, M.FILE_MODE)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    path = os.path.join(directory, f"{OVERLAY_PREFIX}{os.getpid()}-{uuid.uuid4()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, M.FILE_MODE)
    os.unlink(path)
    return fd


def _ensure_directory(directory):
    try:
        os.mkdir(directory, M.DIR_MODE)
    except FileExistsError:
        pass


def leftover_overlays(directory):
    """Paths of named overlay files whose daemon is gone."""
    try:
        names = os.listdir(directory)
    except OSError:        # none yet; one we cannot read fails at the first overlay
        return []
    found = []
    for name in sorted(names):
        match = _OVERLAY_NAME.match(name)
        # The pid may have been reused since: then the file waits for
        # that process to end too, which is only later, never wrong.
        pid = int(match.group(1)) if match else None
        if match and pid != os.getpid() and not alive(pid):
            found.append(os.path.join(directory, name))
    return found


def remove_leftover_overlays(directory):
    """Remove them; a line for each."""
    done = []
    for path in leftover_overlays(directory):
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        done.append(f"removed {path} ({LEFTOVER_OVERLAY})")
    return done
