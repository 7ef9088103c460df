"""Mounts made by mount(8) itself (``mount -t fuse.snapfs``, fstab), as
at boot: mount(8) runs mount.fuse3, which runs ``snapfs STORE MNT -o ...``
found on the shell's default search path."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.mounting import force_unmount, snapfs_mounts, wait_for
from tests.support.users import alive

# mount(8) removes PATH from the environment; mount.fuse3 runs the
# filesystem through /bin/sh -c, and dash then searches its default path.
MOUNT_FUSE3_PATH = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
LINK = Path("/usr/local/bin/snapfs")


def our_snapfs():
    """The project's console script (not resolved: its shebang names the venv)."""
    return Path(sys.executable).with_name("snapfs")


@contextlib.contextmanager
def snapfs_on_mount_path():
    """Make mount.fuse3 find this project's ``snapfs``: a symlink in
    /usr/local/bin, removed afterwards, even on failure.  One that was there
    before is left alone; another snapfs first on the path skips the test."""
    ours = our_snapfs()
    found = next((Path(d) / "snapfs" for d in MOUNT_FUSE3_PATH
                  if os.path.lexists(Path(d) / "snapfs")), None)
    if found is not None:
        if found.resolve() != ours.resolve():
            pytest.skip(f"{found} is another snapfs, which mount.fuse3 would run")
        yield
        return
    LINK.symlink_to(ours)
    try:
        yield
    finally:
        if LINK.is_symlink() and os.readlink(LINK) == str(ours):
            LINK.unlink()


def daemon_pid(store):
    """The pid of the process holding the store's writer lock, or None."""
    try:
        holder = (Path(store) / "lock").read_text()
    except FileNotFoundError:
        return None
    if not holder.startswith("pid "):
        return None
    return int(holder.split()[1].rstrip(":"))


def run(*argv):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C"})


@contextlib.contextmanager
def system_mounted(store, mountpoint, *mount_argv):
    """Run ``mount *mount_argv`` (it must mount ``store`` at ``mountpoint``);
    yield the daemon's pid; always unmount and wait for the daemon to end."""
    mountpoint = Path(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    r = run("mount", *mount_argv)
    assert r.returncode == 0, f"mount {' '.join(map(str, mount_argv))}: {r.stderr}"
    pid = None
    try:
        assert str(mountpoint) in snapfs_mounts()
        pid = daemon_pid(store)
        assert pid is not None and alive(pid)
        yield pid
    finally:
        if str(mountpoint) in snapfs_mounts():
            if run("umount", mountpoint).returncode != 0:
                force_unmount(mountpoint)
        if pid is not None:
            wait_for(lambda: not alive(pid))
        assert str(mountpoint) not in snapfs_mounts()
