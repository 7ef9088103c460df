"""The QEMU that runs a VM now, if any: what an operation asks first.

A VM is *running* when it is attached (a record, ``attach.py``) and its
QMP socket answers.  A VM that is not attached, or whose QEMU is not
running (no socket, or a stale one that refuses), is offline, and
operations act on its files as they always did.  A running QEMU is
verified before anything is done with it (``verify.py``).
"""

import contextlib
import time

from ..errors import QemuError, QemuNotRunning, QemuTimeout
from .attach import read_record
from .qmp import QmpSession
from .verify import check_runs_active

EXIT_WAIT = 2.0      # seconds a QEMU that hangs up on a new client gets to be gone
EXIT_POLL = 0.05


def connect(record):
    """An open, unverified ``QmpSession`` to the QEMU of attach record
    ``record`` (its guest agent's socket, or None, as ``guest_agent``), or
    None if that QEMU is not running.  Raises QemuTimeout, QemuError.

    A QEMU that hangs up before its greeting is exiting (one that serves
    another client keeps a new one waiting: QemuTimeout): it is asked
    again until it is gone (None), for at most EXIT_WAIT seconds."""
    deadline = time.monotonic() + EXIT_WAIT
    while True:
        session = QmpSession(record["qmp"])
        session.guest_agent = record.get("guest_agent")
        try:
            session.open()
        except QemuNotRunning:
            return None
        except QemuTimeout:
            raise
        except QemuError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(EXIT_POLL)
            continue
        return session


def live_session(store, m):
    """``connect`` to the QEMU VM ``m`` is attached to, unverified (in
    recovery, or mid-merge, its devices may already sit on other volumes),
    or None if the VM is not attached or its QEMU is not running."""
    record = read_record(store.path, m.name)
    return None if record is None else connect(record)


@contextlib.contextmanager
def running_qemu(store, m):
    """A context that yields an open ``QmpSession`` to the QEMU that runs
    VM ``m`` (its manifest), verified to run the VM's active leaves, with
    the attached guest agent's socket (or None) as ``guest_agent``; or
    None if the VM is offline.  The record is read each time, so that a
    mount follows ``snapfs vm attach`` and ``detach`` without being told.
    Raises QemuMismatch (EBUSY) naming the differences, QemuTimeout
    (EBUSY), QemuError."""
    session = live_session(store, m)
    if session is None:
        yield None
        return
    try:
        check_runs_active(store, m, session)
        yield session
    finally:
        session.close()
