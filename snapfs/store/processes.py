"""Whether a process still runs: for the lock holder an unmount waits for,
and for the daemon a leftover scratch file belonged to."""

import os


def alive(pid):
    """True unless ``pid`` is gone.  A zombie counts as gone: its files are
    closed and its locks released; only its parent has yet to reap it.  A
    process of another user (EPERM) runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:        # not a pid this kernel can have
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False
