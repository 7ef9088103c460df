"""A real ``qemu-system-x86_64`` for the tests of running VMs: CPUs stopped
(``-S``) unless a guest boots, no default devices, no display, TCG
(``/dev/kvm`` here is PVM, which can't be trusted), and always stopped by
its PID."""

import contextlib
import os
import signal
import subprocess
import time

from snapfs.errors import QemuError
from snapfs.qemu.qmp import QmpSession

QEMU = "qemu-system-x86_64"
BASE_ARGS = ["-nodefaults", "-display", "none", "-machine", "accel=tcg"]


@contextlib.contextmanager
def qemu_running(args, qmp, log, stopped=True):
    """Start QEMU with ``args`` (which put its QMP monitor on socket
    ``qmp``), its CPUs stopped unless not ``stopped``, wait until QMP
    answers, yield the Popen; stop it on exit: SIGTERM, SIGKILL after 5 s,
    then reap it.  ``log`` gets its stderr."""
    base = ["-S", *BASE_ARGS] if stopped else BASE_ARGS
    with open(log, "ab") as err:
        proc = subprocess.Popen([QEMU, *base, *map(str, args)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        _wait_for_qmp(proc, qmp, log)
        yield proc
    finally:
        stop(proc)


def stop(proc):
    """Stop QEMU ``proc`` by its PID and reap it (idempotent)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_for_qmp(proc, qmp, log, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"QEMU exited with {proc.returncode}: "
                                 f"{open(log, errors='replace').read().strip()}")
        try:
            with QmpSession(qmp, connect_timeout=1) as session:
                session.execute("query-status")
            return
        except QemuError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
