"""The CLI under a given umask, and the store entries that are not private."""

import os
import stat
import subprocess

from tests.support.mounting import SNAPFS


def cli(umask, *args, ok=True):
    """The CLI as a user with ``umask`` runs it (the child's umask only:
    the test process keeps its own).  Fails loudly unless it exits 0."""
    r = subprocess.run(SNAPFS + [str(a) for a in args], capture_output=True, text=True,
                       umask=umask)
    if ok:
        assert r.returncode == 0, f"snapfs {' '.join(map(str, args))}: {r.stderr}"
    return r


def loose_modes(root):
    """[(path, mode)] of every file and directory under ``root`` (itself
    included) that is not 0600 / 0700, and the number of entries seen."""
    bad, seen = [], 0
    for directory, dirs, files in os.walk(root):
        for path, want in [(directory, 0o700)] + [(os.path.join(directory, f), 0o600)
                                                  for f in files]:
            seen += 1
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode != want:
                bad.append((path, oct(mode)))
    return bad, seen
