"""Named crash points for the fault-injection tests.

Every durable step of an operation calls ``crashpoint(name)``.  Normally
that does nothing.  With ``SNAPFS_CRASH_AT=N`` in the environment the
process kills itself (SIGKILL, no cleanup) at the N-th crash point it
reaches; with ``SNAPFS_CRASH_TRACE=FILE`` it appends each name reached to
FILE, so a test can count the points of an operation and kill it at each.
"""

import os
import signal

_count = 0


def crashpoint(name):
    global _count
    trace = os.environ.get("SNAPFS_CRASH_TRACE")
    target = os.environ.get("SNAPFS_CRASH_AT")
    if not trace and not target:
        return
    _count += 1
    if trace:
        with open(trace, "a") as f:
            f.write(f"{_count} {name}\n")
    if target and _count == int(target):
        os.kill(os.getpid(), signal.SIGKILL)
