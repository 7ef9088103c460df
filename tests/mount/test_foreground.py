"""A signal to a mount's daemon unmounts like ``snapfs umount``: normally,
never lazily.  While the mount is busy (an open file, a loop device on a
view) the daemon refuses, says so, and keeps serving; the next signal
tries again (issue "never corrupt, never leak", finding 13a)."""

import mmap
import os
import signal
import subprocess
import time

import pytest

from tests.support.mounting import SNAPFS, force_unmount, snapfs, snapfs_mounts, wait_for

DISK_SIZE = 4 << 20
BUSY = "is busy"


@pytest.fixture
def vm_store(store):
    snapfs("vm", "add", store, "vm", "--disk", "sda=4M")
    return store



class ForegroundMount:
    """``snapfs mount STORE MNT --foreground`` as a child process, its
    stderr in a file so that it can be read while the daemon runs."""

    def __init__(self, store, mnt, stderr_path):
        self.mnt = mnt
        self.stderr_path = stderr_path
        with open(stderr_path, "w") as err:
            self.proc = subprocess.Popen(SNAPFS + ["mount", str(store), str(mnt), "--foreground"],
                                         stdout=subprocess.DEVNULL, stderr=err)

    def mounted(self):
        return str(self.mnt) in snapfs_mounts()

    def stderr(self):
        return self.stderr_path.read_text()

    def busy_lines(self):
        return [line for line in self.stderr().splitlines() if BUSY in line]

    def wait_until_mounted(self):
        assert wait_for(lambda: self.mounted() or self.proc.poll() is not None), self.stderr()
        assert self.mounted(), f"the daemon exited ({self.proc.returncode}):\n{self.stderr()}"

    def interrupt_while_busy(self, signum=signal.SIGINT):
        """Send ``signum`` while the mount is busy: the daemon must say so
        once and go on serving."""
        before = len(self.busy_lines())
        self.proc.send_signal(signum)
        assert wait_for(lambda: len(self.busy_lines()) > before or self.proc.poll() is not None)
        # Give a wrong (lazy) unmount the time to take effect before looking.
        time.sleep(2)
        assert self.proc.poll() is None, f"the daemon exited:\n{self.stderr()}"
        assert self.mounted()
        lines = self.busy_lines()
        assert len(lines) == before + 1, self.stderr()
        line = lines[-1]
        assert str(self.mnt) in line and "not unmounting" in line and "snapfs umount" in line

    def interrupt_and_exit(self, signum=signal.SIGINT):
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon did not exit on {signum.name}:\n{self.stderr()}")
        assert code == 0, self.stderr()
        assert not self.mounted()

    def cleanup(self):
        """Stop the daemon by its PID if a test failed; force-unmount only
        if the mount survived that."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.mounted():
            force_unmount(self.mnt)


@pytest.fixture
def foreground(tmp_path, vm_store):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fg = ForegroundMount(vm_store, mnt, tmp_path / "stderr")
    try:
        fg.wait_until_mounted()
        yield fg
    finally:
        fg.cleanup()


def _uncached_pread(fd, offset, size=4096):
    """pread that has to reach the daemon: drop the file's page cache first,
    so that a dead mount cannot answer from memory."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return os.pread(fd, size, offset)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_idle_mount_exits_on_first_signal(foreground, signum):
    assert os.listdir(foreground.mnt) == ["vm"]
    foreground.interrupt_and_exit(signum)
    assert foreground.busy_lines() == []


def test_open_file_keeps_mount_until_closed(foreground):
    fd = os.open(foreground.mnt / "vm" / "active" / "sda.raw", os.O_RDONLY)
    try:
        before = _uncached_pread(fd, DISK_SIZE - 4096)
        assert len(before) == 4096
        foreground.interrupt_while_busy(signal.SIGINT)
        # The open file still reads from the live daemon (no ENOTCONN) ...
        assert _uncached_pread(fd, DISK_SIZE - 4096) == before
        # ... and so does the rest of the mount.
        assert os.listdir(foreground.mnt / "vm" / "active") == ["sda.raw"]
        # Each further signal tries again, and is refused again.
        foreground.interrupt_while_busy(signal.SIGTERM)
    finally:
        os.close(fd)
    foreground.interrupt_and_exit(signal.SIGINT)


def _loop_backing(loop):
    try:
        with open(f"/sys/block/{os.path.basename(loop)}/loop/backing_file") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _direct_pread(path, offset, size=4096):
    """An O_DIRECT read of a block device: the loop device's own cache
    cannot answer it."""
    buf = mmap.mmap(-1, size)      # page-aligned, as O_DIRECT requires
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == size
    finally:
        os.close(fd)
    return bytes(buf)


def test_loop_device_keeps_mount_until_detached(foreground):
    view = foreground.mnt / "vm" / "active" / "sda.raw"
    loop = subprocess.run(["losetup", "-r", "-f", "--show", str(view)],
                          check=True, capture_output=True, text=True).stdout.strip()
    try:
        before = _direct_pread(loop, DISK_SIZE - 4096)
        foreground.interrupt_while_busy(signal.SIGINT)
        assert _direct_pread(loop, DISK_SIZE - 4096) == before
    finally:
        subprocess.run(["losetup", "-d", loop], check=True, capture_output=True)
    # losetup -d returns before the kernel has let go of the view; the
    # mount stays busy until then.
    assert wait_for(lambda: _loop_backing(loop) != str(view))
    foreground.interrupt_and_exit(signal.SIGINT)


def test_background_daemon_refuses_sigterm_while_busy(tmp_path, vm_store):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log_file = tmp_path / "snapfs.log"
    snapfs("mount", vm_store, mnt, "--log", log_file)
    pid = int((vm_store / "lock").read_text().split()[1].rstrip(":"))
    f = open(mnt / "vm" / "active" / "sda.raw", "rb")
    try:
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: BUSY in log_file.read_text())
        time.sleep(2)
        assert str(mnt) in snapfs_mounts()
        assert _uncached_pread(f.fileno(), 0) == bytes(4096)
        f.close()
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: str(mnt) not in snapfs_mounts())
        # The daemon released the store: it can be changed again.
        assert wait_for(lambda: not _alive(pid))
        snapfs("vm", "add", vm_store, "db", "--disk", "sda=1M")
    finally:
        f.close()
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        if str(mnt) in snapfs_mounts():
            force_unmount(mnt)


def _alive(pid):
    """The background daemon is not our child: ask /proc, where a zombie
    (its parent not having reaped it yet) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
