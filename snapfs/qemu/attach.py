"""Which QEMU runs a VM: host-local attach records.

``snapfs vm attach`` writes one small JSON file per VM::

    /run/snapfs/<store key>/<vm>.json
    {"vm": NAME, "store": REAL PATH, "qmp": ABS PATH, "guest_agent": ABS PATH | null,
     "attached": UTC TIME}

They are not kept in the store: a QMP socket is this host's state, and a
store may be shared by several hosts (DESIGN.md section 3), each running
its own QEMUs.  The store key is the first 16 hex digits of the SHA-256 of
the store's real path, so the same store reached through a symlink or a
relative path finds the same records.  ``/run`` is a tmpfs: the records go
with a reboot, as do the QEMUs they point at.

The base directory is ``$SNAPFS_RUN_DIR`` if set (the tests use it), else
``/run/snapfs`` for root and ``$XDG_RUNTIME_DIR/snapfs`` for other users
(who cannot write ``/run``).  Directories are 0700 and records 0600
whatever the umask: a record says where a VM's monitor is.  A record is
replaced atomically (a temp file, fsync, rename), so a mount that reads it
before an operation sees the old one or the new one, never half.
"""

import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone

from ..errors import NotFound, StoreError

RUN_DIR_ENV = "SNAPFS_RUN_DIR"
DEFAULT_RUN_DIR = "/run/snapfs"
DIR_MODE = 0o700
FILE_MODE = 0o600
_SUFFIX = ".json"
_NAME_MAX = 255


def run_dir():
    """The base directory of every store's records on this host."""
    override = os.environ.get(RUN_DIR_ENV)
    if override:
        return os.path.abspath(override)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() != 0 and runtime:
        return os.path.join(runtime, "snapfs")
    return DEFAULT_RUN_DIR


def store_key(store_path):
    return hashlib.sha256(os.fsencode(os.path.realpath(store_path))).hexdigest()[:16]


def records_dir(store_path):
    return os.path.join(run_dir(), store_key(store_path))


def record_path(store_path, vm):
    """``<vm>.json``; a VM name too long for that (names may have 255 bytes)
    gets a name made of its hash instead."""
    name = vm + _SUFFIX
    if len(os.fsencode(name)) > _NAME_MAX:
        name = "vm-" + hashlib.sha256(os.fsencode(vm)).hexdigest() + _SUFFIX
    return os.path.join(records_dir(store_path), name)


def utc_now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_record(store_path, vm, qmp, guest_agent=None):
    """Record (or replace) how to reach the QEMU that runs ``vm``.  Returns
    the record.  Raises OSError."""
    record = {"vm": vm, "store": os.path.realpath(store_path), "qmp": os.path.abspath(qmp),
              "guest_agent": os.path.abspath(guest_agent) if guest_agent else None,
              "attached": utc_now()}
    directory = records_dir(store_path)
    _private_dirs(directory)
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
    try:
        try:
            os.fchmod(fd, FILE_MODE)     # mkstemp makes 0600; said once more, on purpose
            os.write(fd, (json.dumps(record, indent=2) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, record_path(store_path, vm))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return record


def read_record(store_path, vm):
    """The VM's record, or None if it is not attached.  Raises StoreError
    for a record that is not one (hand-edited, or from another version)."""
    path = record_path(store_path, vm)
    try:
        with open(path, "rb") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable attach record of VM {vm}: {e}") from None
    if not isinstance(record, dict) or not isinstance(record.get("qmp"), str) \
            or not isinstance(record.get("guest_agent"), (str, type(None))):
        raise StoreError(f"{path}: invalid attach record of VM {vm}; "
                         f"run 'snapfs vm attach' again")
    return record


def remove_record(store_path, vm, missing_ok=False):
    """Forget the VM's record.  Raises NotFound if there is none (unless
    ``missing_ok``)."""
    try:
        os.unlink(record_path(store_path, vm))
    except FileNotFoundError:
        if not missing_ok:
            raise NotFound(f"VM {vm} is not attached to a QEMU") from None


def _private_dirs(directory):
    """Make ``directory`` and its missing parents, 0700 each, whatever the
    umask.  An existing base (``/run/snapfs``) is left as its owner set it."""
    missing = []
    d = directory
    while not os.path.isdir(d):
        missing.append(d)
        d = os.path.dirname(d)
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue           # made meanwhile by another snapfs
        os.chmod(d, DIR_MODE)
