"""Store files are private to their owner whatever the umask (files 0600,
directories 0700), `snapfs check` flags and repairs looser modes (finding 8
of the hardening issue), and leftover manifest temp files are removed when
a writer opens the store (finding 6a)."""

import errno
import os
import stat

import pytest

from snapfs.store.check import StoreChecker
from snapfs.store.store import Store
from tests.support.privacy import cli, loose_modes
from tests.support.qemu import qemu_img

TMP = ".manifest.json.tmp"


def qcow2_chain(directory):
    """base.qcow2 <- top.qcow2 made by qemu-img, readable by everyone (as a
    umask of 022 leaves them), so that a move that kept the mode would show."""
    directory.mkdir()
    qemu_img("create", "-f", "qcow2", directory / "base.qcow2", "4M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             directory / "top.qcow2", cwd=directory)
    for name in ("base.qcow2", "top.qcow2"):
        os.chmod(directory / name, 0o644)
    return directory / "top.qcow2"


@pytest.fixture(params=[0o022, 0o000, 0o077], ids=lambda m: f"umask{m:03o}")
def umask(request):
    return request.param


@pytest.fixture
def busy_store(tmp_path, umask):
    """A store through every command that creates files: init, vm add
    (blank, copied chain, moved chain), snapshot create and delete, vm clone."""
    store = tmp_path / "store"
    cli(umask, "init", store)
    cli(umask, "vm", "add", store, "blank", "--disk", "sda=4M")
    cli(umask, "vm", "add", store, "copied", "--disk", f"sda={qcow2_chain(tmp_path / 'c')}")
    cli(umask, "vm", "add", store, "moved", "--move",
        "--disk", f"sda={qcow2_chain(tmp_path / 'm')}")
    # --move really moved (else the mode fix of moved images is not tested).
    assert not (tmp_path / "m" / "top.qcow2").exists()
    cli(umask, "snapshot", "create", store, "blank", "monday")
    cli(umask, "snapshot", "create", store, "copied", "monday")
    cli(umask, "snapshot", "delete", store, "copied", "base")
    cli(umask, "vm", "clone", store, "copied", "monday", "cloned")
    return store


def test_every_store_file_is_private(busy_store, umask):
    bad, seen = loose_modes(busy_store)
    assert bad == []
    # The walk saw the marker, the lock, vms/, four VMs with manifests and volumes.
    for path in ("snapfs-store.json", "lock", "vms/moved/manifest.json",
                 "vms/cloned/manifest.json"):
        assert (busy_store / path).is_file(), path
    assert seen >= 15
    assert cli(umask, "check", busy_store).stdout.startswith("ok: 4 VM(s)")


def test_init_makes_an_existing_empty_directory_private(tmp_path):
    store = tmp_path / "store"
    store.mkdir(mode=0o755)
    os.chmod(store, 0o755)
    cli(0o022, "init", store)
    assert loose_modes(store) == ([], 3)


@pytest.mark.parametrize("umask", [0o022], ids=["umask022"])
def test_check_flags_and_repairs_loose_modes(busy_store, umask):
    vm = busy_store / "vms" / "blank"
    volume = next(p for p in vm.iterdir() if p.name != "manifest.json")
    os.chmod(volume, 0o644)
    os.chmod(vm, 0o750)
    os.chmod(busy_store / "snapfs-store.json", 0o602)
    r = cli(umask, "check", busy_store, ok=False)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert f"{volume}: mode 0644 lets other users read it; expected 0600" in lines, lines
    assert f"{vm}: mode 0750 lets other users list and enter it; expected 0700" in lines, lines
    assert (f"{busy_store / 'snapfs-store.json'}: mode 0602 lets other users write it; "
            f"expected 0600") in lines, lines
    assert len(lines) == 3, lines

    r = cli(umask, "check", "--repair", busy_store)
    assert f"repaired: {volume}: mode 0644 -> 0600" in r.stdout.splitlines(), r.stdout
    assert loose_modes(busy_store)[0] == []
    assert cli(umask, "check", busy_store).stdout.startswith("ok: 4 VM(s)")


# -- leftover manifest temp files ------------------------------------------

@pytest.fixture
def two_vms(tmp_path):
    store = tmp_path / "store"
    cli(0o022, "init", store)
    cli(0o022, "vm", "add", store, "web", "--disk", "sda=1M")
    cli(0o022, "vm", "add", store, "db", "--disk", "sda=1M")
    return store


def test_remove_temporaries_removes_only_manifest_temp_files(two_vms):
    web = two_vms / "vms" / "web"
    (web / TMP).write_text('{"half": ')             # what a SIGKILL mid-save leaves
    (web / "stray").write_bytes(b"x")               # not a temp file: check's business
    staging = two_vms / "vms" / ".import-1"
    staging.mkdir()
    (staging / TMP).write_text("{}")                # not a VM: check removes the directory
    manifest = (web / "manifest.json").read_bytes()
    lines = Store.open(two_vms).remove_temporaries()
    assert lines == [f"removed {web / TMP} (left by an interrupted manifest update)"]
    assert not (web / TMP).exists()
    assert (web / "stray").exists() and (staging / TMP).exists()
    assert (web / "manifest.json").read_bytes() == manifest
    assert Store.open(two_vms).remove_temporaries() == []


def test_check_does_not_count_a_manifest_temp_file(two_vms):
    # Read-only, check may run beside a mount whose save is in flight: the
    # temp file is never the truth, so it is no problem.  --repair removes it.
    tmp = two_vms / "vms" / "db" / TMP
    tmp.write_text("{}")
    os.chmod(tmp, 0o600)
    store = Store.open(two_vms)
    checker = StoreChecker(store)
    assert checker.run() == []
    assert tmp.exists()
    checker = StoreChecker(store, repair=True)
    assert checker.run() == [f"repaired: removed {tmp} (left by an interrupted manifest update)"]
    assert not tmp.exists()


def test_a_changing_command_removes_a_manifest_temp_file(two_vms):
    """Needs Store.remove_temporaries called by the recovery that writers run."""
    tmp = two_vms / "vms" / "web" / TMP
    tmp.write_text('{"half": ')
    r = cli(0o022, "snapshot", "create", two_vms, "db", "monday")
    assert not tmp.exists(), r.stderr
    assert cli(0o022, "check", two_vms).returncode == 0


def test_save_leaves_no_temp_file_when_it_fails(two_vms, monkeypatch):
    from snapfs.store import manifest as M
    store = Store.open(two_vms)
    m = store.load_vm("web")

    class NoSpaceOs:
        """The os module of manifest.py only, whose writes find the disk full."""
        def __getattr__(self, name):
            return getattr(os, name)

        def write(self, fd, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(M, "os", NoSpaceOs())
    with pytest.raises(OSError):
        store.save_vm(m)
    monkeypatch.undo()
    assert not (two_vms / "vms" / "web" / TMP).exists()


def test_private_file_creates_or_tightens(tmp_path):
    from snapfs.store.store import private_file
    path = tmp_path / "snapfs.log"
    old = os.umask(0o022)
    try:
        with private_file(path) as f:
            f.write("one\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(path, 0o644)
    with private_file(path) as f:       # appends, and tightens an old log's mode
        f.write("two\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text() == "one\ntwo\n"


# -- images moved in ---------------------------------------------------------

def test_a_failed_move_gives_the_images_their_mode_back(tmp_path, monkeypatch):
    from snapfs.ops import importer
    store_path = tmp_path / "store"
    cli(0o022, "init", store_path)
    top = qcow2_chain(tmp_path / "src")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    # sda is moved in (and made 0600) before sdb's blank volumes fail.
    monkeypatch.setattr(importer, "create_image", disk_full)
    store = Store.open(store_path)
    with store.locked("test"), pytest.raises(OSError):
        importer.add_vm(store, "web", [f"sda={top}", "sdb=1M"], move=True)
    for name in ("base.qcow2", "top.qcow2"):
        assert stat.S_IMODE(os.stat(tmp_path / "src" / name).st_mode) == 0o644, name
    assert os.listdir(store_path / "vms") == []


def test_a_symlink_is_copied_not_moved(tmp_path):
    # Moved, the link would sit in the store and point outside it.
    store = tmp_path / "store"
    cli(0o022, "init", store)
    top = qcow2_chain(tmp_path / "src")
    link = tmp_path / "src" / "link.qcow2"
    link.symlink_to("top.qcow2")
    cli(0o022, "vm", "add", store, "web", "--move", "--disk", f"sda={link}")
    assert link.is_symlink() and top.exists()
    vm = store / "vms" / "web"
    assert not any(p.is_symlink() for p in vm.iterdir())
    assert loose_modes(store)[0] == []
    assert cli(0o022, "check", store).returncode == 0


def test_staging_leftovers_are_recovery_and_repair_business(two_vms):
    """A hidden staging directory in vms/ (an import, a clone or a removal
    cut short): a read-only check beside a mount may see one in flight and
    says nothing; recovery (a writer opening the store) and --repair
    remove it."""
    from snapfs.ops.recovery import recover
    staging = two_vms / "vms" / ".clone-1"
    staging.mkdir(mode=0o700)
    (staging / "volume").write_bytes(b"x")
    os.chmod(staging / "volume", 0o600)
    store = Store.open(two_vms)
    assert StoreChecker(store).run() == []
    assert staging.exists()
    repaired = StoreChecker(store, repair=True).run()
    assert repaired == [f"repaired: removed {staging} (leftover of an interrupted import, clone "
                        f"or removal)"]
    staging.mkdir(mode=0o700)
    lines = recover(store)
    assert lines == [f"removed {staging} (leftover of an interrupted import, clone or removal)"]
    assert sorted(os.listdir(two_vms / "vms")) == ["db", "web"]
