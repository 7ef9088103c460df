"""The QEMU that runs a VM now, if any: what an operation asks first.

A VM is *running* when it is attached (a record, ``attach.py``) and its
QMP socket answers.  A VM that is not attached, or whose QEMU is not
running (no socket, or a stale one that refuses), is offline, and
operations act on its files as they always did.  A running QEMU is
verified before anything is done with it (``verify.py``).
"""

import contextlib

from ..errors import QemuNotRunning
from .attach import read_record
from .qmp import QmpSession
from .verify import check_runs_active


@contextlib.contextmanager
def running_qemu(store, m):
    """A context that yields an open ``QmpSession`` to the QEMU that runs
    VM ``m`` (its manifest), verified to run the VM's active leaves, with
    the attached guest agent's socket (or None) as ``guest_agent``; or
    None if the VM is offline.  The record is read each time, so that a
    mount follows ``snapfs vm attach`` and ``detach`` without being told.
    Raises QemuMismatch (EBUSY) naming the differences, QemuTimeout
    (EBUSY), QemuError."""
    record = read_record(store.path, m.name)
    if record is None:
        yield None
        return
    session = QmpSession(record["qmp"])
    session.guest_agent = record.get("guest_agent")
    try:
        session.open()
    except QemuNotRunning:
        yield None
        return
    try:
        check_runs_active(store, m, session)
        yield session
    finally:
        session.close()
