"""A real GlusterFS volume for the tests of stores shared by hosts.

``gluster_volume(workdir)`` starts a glusterd of its own (its state in
``workdir``, not /var/lib/glusterd), makes a one-brick volume with a short
``network.ping-timeout``, and yields a ``Volume`` whose ``mount(path)``
starts a client (a ``glusterfs`` process: one per mount, each standing in
for a host).  Everything it started is stopped by PID in teardown, clients
first, even when the test failed.
"""

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

from .users import stop_processes

PING_TIMEOUT = 5            # seconds before a client's locks are given up
VOLUME = "snapfs-test"


def _run(*argv, check=True):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=check)


def _gluster(*args, check=True):
    return _run("gluster", "--mode=script", *args, check=check)


def _read_pid(path, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(Path(path).read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError(f"no pid in {path}")


def stop_pid(pid):
    """SIGTERM, then SIGKILL if it is still there (users.stop_processes)."""
    stop_processes([pid], wait=10.0)


class Volume:
    def __init__(self, workdir, host):
        self.workdir, self.host = Path(workdir), host
        self.clients = {}           # mount point -> pid

    def mount(self, mountpoint):
        """A client mount of the volume at ``mountpoint``; returns its pid."""
        mountpoint = Path(mountpoint)
        mountpoint.mkdir(parents=True, exist_ok=True)
        pid_file = self.workdir / f"client-{len(self.clients)}.pid"
        _run("glusterfs", f"--volfile-server={self.host}", f"--volfile-id={VOLUME}",
             f"--pid-file={pid_file}", f"--log-file={self.workdir}/client-{len(self.clients)}.log",
             mountpoint)
        pid = _read_pid(pid_file)
        self.clients[mountpoint] = pid
        deadline = time.monotonic() + 10
        while not os.path.ismount(mountpoint):
            if time.monotonic() > deadline:
                raise AssertionError(f"the glusterfs client did not mount {mountpoint}")
            time.sleep(0.05)
        return pid

    def unmount(self, mountpoint):
        pid = self.clients.pop(Path(mountpoint))
        if os.path.ismount(mountpoint):
            _run("umount", mountpoint, check=False)
            if os.path.ismount(mountpoint):
                _run("umount", "-l", mountpoint, check=False)
        stop_pid(pid)


@contextlib.contextmanager
def gluster_volume(workdir):
    workdir = Path(workdir)
    state, brick = workdir / "glusterd", workdir / "brick"
    state.mkdir(parents=True)
    brick.mkdir()
    host = socket.gethostname()
    glusterd_pid_file = workdir / "glusterd.pid"
    _run("glusterd", "-p", glusterd_pid_file, "-l", workdir / "glusterd.log",
         f"--xlator-option=management.working-directory={state}")
    glusterd = _read_pid(glusterd_pid_file)
    volume = Volume(workdir, host)
    brick_pid = None
    try:
        _wait_for_glusterd()
        _gluster("volume", "create", VOLUME, f"{host}:{brick}", "force")
        _gluster("volume", "set", VOLUME, "network.ping-timeout", str(PING_TIMEOUT))
        _gluster("volume", "start", VOLUME)
        brick_pid = _brick_pid(brick)
        yield volume
    finally:
        for mountpoint in list(volume.clients):
            volume.unmount(mountpoint)
        _gluster("volume", "stop", VOLUME, check=False)
        _gluster("volume", "delete", VOLUME, check=False)
        if brick_pid is not None:
            stop_pid(brick_pid)
        stop_pid(glusterd)


def _wait_for_glusterd(timeout=15):
    deadline = time.monotonic() + timeout
    while _gluster("volume", "list", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError("glusterd does not answer")
        time.sleep(0.1)


def _brick_pid(brick):
    """The brick server's pid, from the pid file glusterd gives it."""
    for line in _gluster("volume", "status", VOLUME, "detail").stdout.splitlines():
        if line.strip().startswith("Pid") and ":" in line:
            return int(line.split(":", 1)[1].strip())
    raise AssertionError(f"no brick process for {brick}")
