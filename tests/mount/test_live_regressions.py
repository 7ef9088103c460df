"""Regressions found by the model test of running VMs
(tests/model/test_live_model.py), each made deterministic."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from snapfs.qemu.live import connect
from tests.support.live_vm import LiveVm
from tests.support.mounting import mounted, snapfs, wait_for
from tests.support.qemu_vm import stop

pytestmark = pytest.mark.mount

MiB = 1 << 20
K64 = 64 * 1024
SIZES = {"sda": 4 * MiB, "data": 2 * MiB}


@pytest.fixture
def vm(tmp_path, store, run_dir):
    snapfs("vm", "add", store, "web", "--disk", "sda=4M", "--disk", "data=2M")
    return LiveVm(store, "web", tmp_path, SIZES)


@contextlib.contextmanager
def hanging_up(path):
    """A QEMU on its way out, at QMP socket ``path``: it takes one
    connection and hangs up before its greeting, and listens no more (the
    socket file stays, stale), as a QEMU that got SIGTERM does to a client
    that connected just before it exited."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    server.settimeout(30)
    took = []

    def serve():
        try:
            conn, _ = server.accept()
        except OSError:
            return
        server.close()           # no longer listening: the next connect is refused
        conn.close()
        took.append(True)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield took
    finally:
        server.close()
        thread.join()


def test_connect_to_a_qemu_that_hangs_up_and_goes(tmp_path):
    """A QEMU that hangs up during the handshake and then is gone is not
    running: connect says so (None), it doesn't fail the operation."""
    qmp = tmp_path / "web.qmp"
    with hanging_up(qmp) as took:
        assert connect({"qmp": str(qmp)}) is None
    assert took == [True]


def test_live_delete_whose_qemu_exits_finishes_offline(tmp_path, vm):
    """Found by the model: rmdir of a running VM's snapshot, then QEMU
    stopped at once.  The merge's first QMP connect met QEMU on its way
    out (EOFError during the greeting) and the delete failed with EIO,
    leaving its intent, though QEMU was gone: it must finish offline, as
    when QEMU dies during the merge.  Made deterministic: the delete's
    intent is recorded (snapfs killed at delete:recorded), QEMU stops, and
    the mount's recovery meets a socket that hangs up once."""
    with vm.running():
        vm.write("sda", 0x11, 0, 3 * K64)
        vm.write("data", 0x21, K64, K64)
        snapfs("snapshot", "create", vm.store, "web", "keep")
        keep = vm.snapshot_model()
        vm.write("sda", 0x12, K64, 4 * K64)
        snapfs("snapshot", "create", vm.store, "web", "gone")
        vm.write("sda", 0x13, 2 * K64, K64)
        vm.write("data", 0x22, 0, 2 * K64)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_CRASH_")}
        r = subprocess.run([sys.executable, "-m", "snapfs.cli", "snapshot", "delete", vm.store,
                            "web", "gone"], capture_output=True, text=True, timeout=60,
                           env=dict(env, SNAPFS_CRASH_AT="1"))
        assert r.returncode == -signal.SIGKILL, r
        assert vm.manifest()["operation"]["live"]
    with hanging_up(vm.qmp) as took:
        with mounted(vm.store, tmp_path / "mnt") as mnt:
            assert took == [True]
            m = vm.manifest()
            assert m["operation"] is None, m["operation"]
            assert [s["name"] for s in m["snapshots"]] == ["keep"]
            for disk in SIZES:
                assert (mnt / "web" / "snapshots" / "keep" / f"{disk}.raw").read_bytes() == \
                    keep[disk], disk
                assert (mnt / "web" / "active" / f"{disk}.raw").read_bytes() == \
                    vm.model[disk], disk
    for disk, vid in m["active"].items():
        assert vm.view(vid) == vm.model[disk], disk
    vm.check_volumes()


def test_qemu_that_exits_after_the_switch_of_a_live_delete(tmp_path, vm):
    """Found by the model: rmdir, then QEMU stopped while snapfs cleaned up
    after the live merge (the manifest switched, the merged-away files not
    unlinked yet).  The cleanup's query of QEMU's nodes failed and so did
    the delete (EIO, its intent left for the next operation), though QEMU
    was gone and held nothing: the files must go at once.  Made
    deterministic with the delete paused right after its switch."""
    flag = tmp_path / "paused"
    with vm.running() as proc:
        vm.write("sda", 0x11, 0, 3 * K64)
        snapfs("snapshot", "create", vm.store, "web", "keep")
        keep = vm.snapshot_model()
        vm.write("sda", 0x12, K64, 4 * K64)
        vm.write("data", 0x21, 0, K64)
        snapfs("snapshot", "create", vm.store, "web", "gone")
        vm.write("sda", 0x13, 2 * K64, K64)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_")}
        env.update(SNAPFS_RUN_DIR=os.environ["SNAPFS_RUN_DIR"],
                   SNAPFS_PAUSE_AT="delete:switched", SNAPFS_PAUSE_FILE=str(flag))
        delete = subprocess.Popen([sys.executable, "-m", "snapfs.cli", "snapshot", "delete",
                                   vm.store, "web", "gone"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert wait_for(flag.exists, timeout=30)
            assert vm.manifest()["operation"]["phase"] == "cleanup"
            stop(proc)                         # QEMU exits; snapfs still holds its session
        finally:
            flag.unlink(missing_ok=True)
            out, err = delete.communicate(timeout=60)
    assert delete.returncode == 0, err
    m = vm.manifest()
    assert m["operation"] is None, m["operation"]
    assert [s["name"] for s in m["snapshots"]] == ["keep"]
    for disk, vid in m["snapshots"][0]["volumes"].items():
        assert vm.view(vid) == keep[disk], disk
    for disk, vid in m["active"].items():
        assert vm.view(vid) == vm.model[disk], disk
    vm.check_volumes()
