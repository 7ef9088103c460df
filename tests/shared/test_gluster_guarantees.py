"""What a store shared by hosts stands on: the three POSIX guarantees of
the shared filesystem (issue: one store, many hosts), checked on a real
GlusterFS volume through two client mounts, each standing in for a host.

- byte-range locks (OFD) hold across clients, and are released when the
  holding process dies;
- rename is atomic: the other client sees the old file or the new one,
  whole, never a mix;
- what one client fsyncs, the other reads byte for byte.
"""

import fcntl
import os
import struct
import subprocess
import sys
import time

import pytest

from tests.support.gluster import gluster_volume

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for glusterd and FUSE")

F_OFD_SETLK = 37        # linux/fcntl.h


def _ofd_lock(fd, start, length=1):
    """An exclusive OFD lock, or BlockingIOError if another holds it."""
    flock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
    fcntl.fcntl(fd, F_OFD_SETLK, flock)


@pytest.fixture
def hosts(tmp_path):
    with gluster_volume(tmp_path / "gluster") as volume:
        a, b = tmp_path / "host-a", tmp_path / "host-b"
        volume.mount(a)
        volume.mount(b)
        yield a, b


def test_byte_range_locks_hold_across_clients_and_die_with_their_holder(hosts):
    a, b = hosts
    (a / "lease").write_bytes(b"")
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, struct, sys, time
fd = os.open({str(a / "lease")!r}, os.O_RDWR)
fcntl.fcntl(fd, {F_OFD_SETLK}, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 7, 1, 0))
print("held", flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        fd = os.open(b / "lease", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                _ofd_lock(fd, 7)
            _ofd_lock(fd, 8)            # another byte: another lease
            holder.kill()
            holder.wait()
            deadline = time.monotonic() + 10
            while True:
                try:
                    _ofd_lock(fd, 7)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, "the dead holder's lock was kept"
                    time.sleep(0.1)
        finally:
            os.close(fd)
    finally:
        holder.kill()
        holder.wait()


def test_rename_is_atomic_and_fsynced_bytes_reach_the_other_client(hosts):
    a, b = hosts
    old, new = os.urandom(300_000), os.urandom(300_000)
    for data in (old, new):
        tmp = a / "manifest.json.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, a / "manifest.json")
        seen = set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            got = (b / "manifest.json").read_bytes()
            assert got in (old, new), "a reader saw a torn file"
            seen.add(got)
            if got == data:
                break
            time.sleep(0.05)
        assert data in seen, "the other client never saw the renamed file"
    assert not (b / "manifest.json.tmp").exists()
