"""What a mount's daemon holds: its PID, open files, memory."""

import os
from pathlib import Path


def daemon_pid(store):
    """The PID of the daemon holding ``store``'s lock (its mount)."""
    text = (Path(store) / "lock").read_text()
    assert text.startswith("pid "), f"the store is not mounted: lock says {text!r}"
    return int(text.split()[1].rstrip(":"))


def open_files(pid):
    """{fd: target} of the process's open file descriptors."""
    out = {}
    base = Path(f"/proc/{pid}/fd")
    for entry in os.listdir(base):
        try:
            out[int(entry)] = os.readlink(base / entry)
        except FileNotFoundError:     # closed while listing
            continue
    return out


def deleted_files(pid, under):
    """Open files of the process that were deleted, under directory ``under``."""
    prefix = str(under)
    return sorted(t for t in open_files(pid).values()
                  if t.endswith(" (deleted)") and t.startswith(prefix))


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")
