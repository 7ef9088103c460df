"""Named crash points for the fault-injection tests.

Every durable step of an operation calls ``crashpoint(name)``.  Normally
that does nothing.  With ``SNAPFS_CRASH_AT=N`` in the environment the
process kills itself (SIGKILL, no cleanup) at the N-th crash point it
reaches; with ``SNAPFS_CRASH_TRACE=FILE`` it appends each name reached to
FILE, so a test can count the points of an operation and kill it at each.
With ``SNAPFS_PAUSE_AT=NAME`` and ``SNAPFS_PAUSE_FILE=FILE`` the first
point named NAME creates FILE and waits until the test removes it, so a
test can act while an operation is known to be in progress.
"""

import os
import signal
import time

_count = 0
_paused = False


def crashpoint(name):
    global _count
    _pause(name)
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


def _pause(name):
    global _paused
    if _paused or os.environ.get("SNAPFS_PAUSE_AT") != name:
        return
    _paused = True
    flag = os.environ["SNAPFS_PAUSE_FILE"]
    open(flag, "w").close()
    while os.path.exists(flag):
        time.sleep(0.01)
