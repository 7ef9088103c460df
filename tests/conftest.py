import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))   # ext4chain, the fixture builder

from tests.support.mounting import force_unmount, snapfs, snapfs_mounts  # noqa: E402

# "ci" is the default; SNAPFS_TEST_PROFILE=thorough runs many more examples.
settings.register_profile("ci", deadline=None, max_examples=50,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("thorough", deadline=None, max_examples=400,
                          suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("SNAPFS_TEST_PROFILE", "ci"))


def _loop_devices(under):
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return {line for line in out.splitlines() if under in line}


@pytest.fixture(scope="session", autouse=True)
def no_leftover_mounts(tmp_path_factory):
    """The suite must leave no snapfs mount and no loop device behind (of
    its own: those under this session's temporary directory)."""
    base = str(tmp_path_factory.getbasetemp())
    ours = lambda: {m for m in snapfs_mounts() if m.startswith(base)}
    mounts_before = ours()
    loops_before = _loop_devices(base)
    yield
    leaked = ours() - mounts_before
    for m in leaked:
        force_unmount(m)
    leaked_loops = _loop_devices(base) - loops_before
    assert not leaked, f"tests left mounts behind: {leaked}"
    assert not leaked_loops, f"tests left loop devices behind: {leaked_loops}"


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """Attach records of running VMs (snapfs/qemu/attach.py) under
    tmp_path, never /run; the CLI and the mount inherit it."""
    path = tmp_path / "run"
    monkeypatch.setenv("SNAPFS_RUN_DIR", str(path))
    return path


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store"
    snapfs("init", path)
    return path


@pytest.fixture
def small_fs(tmp_path):
    """A 96 MiB ext4 filesystem, loop-mounted; always unmounted."""
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(96 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
