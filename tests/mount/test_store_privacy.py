"""A mount keeps the store private too: the volumes it creates and its own
log are 0600, whatever the umask it was started with (finding 8 of the
hardening issue)."""

import os

from tests.support.mounting import mounted, snapfs
from tests.support.privacy import cli, loose_modes


def test_a_mount_creates_private_files(tmp_path):
    store = tmp_path / "store"
    cli(0o022, "init", store)
    cli(0o022, "vm", "add", store, "vm", "--disk", "sda=4M")
    # The daemon inherits this process's umask: make it the usual one, and
    # put the test's own back whatever happens.
    old = os.umask(0o022)
    try:
        with mounted(store, tmp_path / "mnt") as mnt:
            os.mkdir(mnt / "vm" / "snapshots" / "x")
            assert "sda.raw" in os.listdir(mnt / "vm" / "snapshots" / "x")
    finally:
        os.umask(old)
    assert (store / "snapfs.log").is_file()
    assert loose_modes(store)[0] == []
    # The snapshot's overlays really were made by the mount.
    assert "x" in snapfs("snapshot", "list", store, "vm").stdout
    assert snapfs("check", store).returncode == 0
