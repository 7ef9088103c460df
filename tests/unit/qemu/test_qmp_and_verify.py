"""The QMP session's failures on real sockets (nothing listening, a stale
socket, a server that never greets), and the comparison of QEMU's device
tops with a manifest."""

import errno
import os
import socket

import pytest

from snapfs.errors import QemuError, QemuNotRunning, QemuTimeout
from snapfs.qemu.qmp import QmpSession
from snapfs.qemu.verify import mismatches
from snapfs.store.manifest import Manifest, Snapshot


def test_no_socket_is_not_running(tmp_path):
    with pytest.raises(QemuNotRunning, match="not running"):
        QmpSession(tmp_path / "none.sock").open()


def test_a_stale_socket_is_not_running(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)                 # bound, never listening: what a killed QEMU leaves
    s.close()
    with pytest.raises(QemuNotRunning):
        QmpSession(path).open()


def test_a_server_that_never_greets_times_out(tmp_path):
    path = str(tmp_path / "mute.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(1)                  # like a QEMU busy with another QMP client
    try:
        with pytest.raises(QemuTimeout) as e:
            QmpSession(path, connect_timeout=0.3).open()
        assert e.value.errno == errno.EBUSY
        assert "did not answer" in str(e.value)
    finally:
        s.close()


def test_a_hang_up_mid_handshake_is_a_qemu_error(tmp_path, monkeypatch):
    """qemu.qmp's connect() fails its own state assertion when QEMU hangs
    up just after its greeting (seen in the live model test as QEMU was
    stopped): a QemuError, which live.connect() retries, not an EIO."""
    from qemu.qmp import QMPClient

    async def hang_up(self, address, *args, **kwargs):
        assert False, "Runstate.RUNNING"

    monkeypatch.setattr(QMPClient, "connect", hang_up)
    with pytest.raises(QemuError, match="ended mid-handshake"):
        QmpSession(str(tmp_path / "qmp.sock"), connect_timeout=1).open()


class FakeStore:
    """Only what ``mismatches`` asks of a store: where a VM's files are."""

    def __init__(self, root):
        self.root = root

    def vm_dir(self, name):
        return os.path.join(self.root, name)


BASE, LEAF, DBASE, DLEAF = ("11111111-1111-1111-1111-111111111111",
                            "22222222-2222-2222-2222-222222222222",
                            "33333333-3333-3333-3333-333333333333",
                            "44444444-4444-4444-4444-444444444444")


def manifest():
    vols = {BASE: {"disk": "sda", "format": "qcow2", "parent": None},
            LEAF: {"disk": "sda", "format": "qcow2", "parent": BASE},
            DBASE: {"disk": "data", "format": "qcow2", "parent": None},
            DLEAF: {"disk": "data", "format": "qcow2", "parent": DBASE}}
    return Manifest("web", "55555555-5555-5555-5555-555555555555", "t", ["sda", "data"], vols,
                    [Snapshot("66666666-6666-6666-6666-666666666666", "monday", "", "t",
                              {"sda": BASE, "data": DBASE})],
                    {"sda": LEAF, "data": DLEAF})


def test_exactly_the_active_leaves_match(tmp_path):
    d = tmp_path / "web"
    tops = [("snapfs-sda", f"{d}/{LEAF}"), ("snapfs-data", f"{d}/{DLEAF}"),
            ("cd0", "/isos/debian.iso")]       # not the VM's: not its business
    assert mismatches(FakeStore(str(tmp_path)), manifest(), tops) == []


def test_a_snapshot_volume_a_copy_and_a_missing_disk_are_named(tmp_path):
    d = tmp_path / "web"
    m = manifest()
    tops = [("snapfs-sda", f"{d}/{BASE}"), ("other", "/elsewhere/copy.qcow2")]
    problems = mismatches(FakeStore(str(tmp_path)), m, tops)
    assert problems == [
        f"disk sda: QEMU has device snapfs-sda on {d}/{BASE} (the volume of snapshot monday); "
        f"the store's active leaf is {d}/{LEAF}",
        f"disk data: QEMU has no device with a volume of this disk; the store's active leaf "
        f"is {d}/{DLEAF}"]
    tops = [("snapfs-sda", f"{d}/{LEAF}"), ("snapfs-data", "/elsewhere/copy.qcow2"),
            ("extra", f"{d}/{DBASE}")]
    problems = mismatches(FakeStore(str(tmp_path)), m, tops)
    assert problems == [
        f"disk data: QEMU has device snapfs-data on /elsewhere/copy.qcow2; the store's active "
        f"leaf is {d}/{DLEAF}",
        f"device extra: QEMU has {d}/{DBASE} (the volume of snapshot monday), which is no "
        f"active leaf of VM web"]
