"""The CLI: every error is one line on stderr and a non-zero exit, never a
traceback; `snapfs check` reports each problem on its own line."""

import json
import os
import subprocess
import sys

import pytest

from snapfs.store.store import Store
from tests.support.mounting import snapfs
from tests.support.qemu import qemu_img, qemu_io


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("snapfs: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img" / "disk.qcow2"
    path.parent.mkdir()
    qemu_img("create", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -P 5 0 64k", fmt="qcow2")
    return path


def test_errors_are_one_line(tmp_path, store, image):
    missing = tmp_path / "nope"
    assert_one_line_error(snapfs("vm", "list", missing, check=False), "no such store")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x").write_text("x")
    assert_one_line_error(snapfs("vm", "list", tmp_path / "plain", check=False), "not a snapfs store")
    assert_one_line_error(snapfs("init", tmp_path / "plain", check=False), "not empty")
    assert_one_line_error(snapfs("vm", "add", store, "a", "--disk", "sda=12Q", check=False),
                          "neither a size nor an existing file")
    assert_one_line_error(snapfs("vm", "add", store, "a", "--disk", "sda=0", check=False),
                          "invalid size")
    assert_one_line_error(snapfs("vm", "add", store, "a", "--disk", f"sda={missing}", check=False))
    assert_one_line_error(snapfs("vm", "add", store, "a", "--disk", "sda", check=False),
                          "NAME=SIZE")
    assert_one_line_error(snapfs("vm", "add", store, "../x", "--disk", "sda=1M", check=False),
                          "invalid VM name")
    assert_one_line_error(snapfs("vm", "add", store, "a", "--disk", "sda-part1=1M", check=False),
                          "invalid disk name")
    assert_one_line_error(snapfs("vm", "add", store, "a", "--disk", "sda=1M", "--disk", "sda=2M",
                                 check=False), "duplicate disk")
    snapfs("vm", "add", store, "a", "--disk", f"sda={image}")
    assert_one_line_error(snapfs("vm", "add", store, "a", "--disk", "sda=1M", check=False),
                          "already exists")
    assert_one_line_error(snapfs("snapshot", "list", store, "zz", check=False), "no VM named")
    assert_one_line_error(snapfs("vm", "remove", store, "zz", check=False), "no VM named")
    assert_one_line_error(snapfs("inspect", tmp_path / "nope.qcow2", check=False), "no such file")
    (tmp_path / "junk.qcow2").write_bytes(b"QFI\xfb" + bytes(10))
    assert_one_line_error(snapfs("inspect", tmp_path / "junk.qcow2", check=False), "junk.qcow2")
    # Nothing half-made was left behind by the failures.
    assert sorted(os.listdir(store / "vms")) == ["a"]


def test_locked_store_is_refused(store):
    holder = Store.open(store)
    holder.acquire_lock("mounted at /somewhere")
    try:
        result = snapfs("vm", "add", store, "b", "--disk", "sda=1M", check=False)
        assert_one_line_error(result, "mounted at /somewhere", "through the mount")
        # Reading is still allowed while another process writes.
        assert snapfs("vm", "list", store).returncode == 0
    finally:
        holder.release_lock()
    snapfs("vm", "add", store, "b", "--disk", "sda=1M")


def test_chains_of_different_lengths_are_refused(tmp_path, store, image):
    top = image.parent / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2", top, cwd=image.parent)
    result = snapfs("vm", "add", store, "m", "--disk", f"a={top}", "--disk", f"b={image}",
                    check=False)
    assert_one_line_error(result, "different lengths")


def test_snapshot_list_json(tmp_path, store, image):
    top = image.parent / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2", top, cwd=image.parent)
    snapfs("vm", "add", store, "web", "--disk", f"sda={top}")
    snaps = json.loads(snapfs("snapshot", "list", store, "web", "--json").stdout)
    assert [s["name"] for s in snaps] == ["disk"]
    assert set(snaps[0]) == {"id", "name", "description", "created", "volumes",
                           "consistency", "excluded"}
    assert snaps[0]["excluded"] == {}
    assert "disk" in snapfs("snapshot", "list", store, "web").stdout


def test_check_reports_each_problem(tmp_path, store, image):
    top = image.parent / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2", top, cwd=image.parent)
    snapfs("vm", "add", store, "web", "--disk", f"sda={top}", "--disk", "sdb=1M")
    snapfs("vm", "add", store, "db", "--disk", "sda=1M")
    assert snapfs("check", store).stdout.startswith("ok: 2 VM(s), 5 volume(s)")
    manifest = json.loads((store / "vms" / "web" / "manifest.json").read_text())
    base = manifest["snapshots"][0]["volumes"]["sda"]
    active = manifest["active"]["sda"]
    other = manifest["active"]["sdb"]
    (store / "vms" / "web" / "stray-file").write_bytes(b"x")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", other, "-F", "qcow2",
             store / "vms" / "web" / active)
    os.unlink(store / "vms" / "db" / json.loads(
        (store / "vms" / "db" / "manifest.json").read_text())["active"]["sda"])
    result = snapfs("check", store, check=False)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert any("stray-file" in l and "leftover" in l for l in lines), lines
    assert any(active in l and "backing file is" in l and base in l for l in lines), lines
    assert any("volume file is missing" in l for l in lines), lines
    assert len(lines) == len(set(lines))


def test_help_texts():
    # The installed console script, as a user runs it.
    exe = os.path.join(os.path.dirname(sys.executable), "snapfs")
    for args in ([], ["vm", "add"], ["mount"], ["check"]):
        r = subprocess.run([exe, *args, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: snapfs" in r.stdout


# -- the mount.fuse3 form and mount options -------------------------------------

from snapfs.cli import _mount_form, build_parser  # noqa: E402
from snapfs.errors import InvalidArgument  # noqa: E402
from snapfs.fs.mount_options import parse_mount_options  # noqa: E402


def test_mount_form_is_recognised():
    p = build_parser()
    # As mount.fuse3 runs it.
    assert _mount_form(["/srv/vms", "/mnt/vms", "-o", "rw,dev,suid"], p) == \
        ["mount", "/srv/vms", "/mnt/vms", "-o", "rw,dev,suid"]
    assert _mount_form(["--debug", "store", "/mnt"], p) == ["--debug", "mount", "store", "/mnt"]
    args = p.parse_args(_mount_form(["/srv/vms", "/mnt/vms", "-o", "ro", "-o", "allow_other"], p))
    assert (args.store, args.mountpoint, args.options) == ("/srv/vms", "/mnt/vms",
                                                           ["ro", "allow_other"])
    # Subcommands are untouched, and a lone unknown word is still a bad command.
    for argv in (["mount", "s", "m"], ["vm", "list", "s"], ["umount", "m"], ["bogus"], [],
                 ["--version"]):
        assert _mount_form(argv, p) == argv


def test_mount_form_through_the_cli(tmp_path):
    r = snapfs(tmp_path / "nostore", tmp_path, "-o", "ro", check=False)
    assert_one_line_error(r, "no such store")
    r = snapfs(tmp_path / "nostore", tmp_path, "-o", "bogus", check=False)
    assert_one_line_error(r, "unknown mount option 'bogus'")
    r = snapfs(tmp_path / "nostore", "/dev/fd/5", "-o", "rw", check=False)
    assert_one_line_error(r, "drop_privileges mount option is not supported")
    assert "STORE MOUNTPOINT" in snapfs("--help").stdout


def test_mount_options_sorted():
    o = parse_mount_options(["rw,dev,suid"])     # what `mount -t fuse.snapfs` sends by default
    assert (o.read_only, o.allow_other, o.fuse_flags) == (False, False, [])
    o = parse_mount_options(["ro,nodev,nosuid,noexec,allow_other"])
    assert o.read_only and o.allow_other and o.fuse_flags == ["ro", "noexec"]
    # Bookkeeping, atime and dev/suid options are accepted and go nowhere.
    o = parse_mount_options(["defaults,auto,noauto,nofail,_netdev,user,users,nouser,owner,group",
                             "relatime,noatime,lazytime,strictatime,nodiratime,user=bob",
                             "comment=x,x-systemd.automount,default_permissions,,"])
    assert (o.read_only, o.allow_other, o.fuse_flags) == (False, False, [])
    # The later of a pair wins, as with mount(8).
    assert parse_mount_options(["ro", "rw"]).read_only is False
    assert parse_mount_options(["rw,ro"]).read_only is True
    assert parse_mount_options(["noexec,exec,sync,dirsync"]).fuse_flags == ["sync", "dirsync"]
    assert parse_mount_options(["exec,noexec,sync,async"]).fuse_flags == ["noexec"]


def test_scratch_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    o = parse_mount_options(["scratch=rel/dir,scratch_limit=20G"])
    assert o.scratch_dir == str(tmp_path / "rel" / "dir")   # absolute: the daemon leaves cwd
    assert o.scratch_limit == 20 << 30
    o = parse_mount_options(["scratch=/var/tmp/x", "scratch_limit=512M"])
    assert (o.scratch_dir, o.scratch_limit) == ("/var/tmp/x", 512 << 20)
    assert (parse_mount_options([]).scratch_dir, parse_mount_options([]).scratch_limit) == \
        (None, None)


@pytest.mark.parametrize("option, words", [
    ("bogus", "unknown mount option 'bogus'"),
    ("fsname=x", "unknown mount option 'fsname=x'"),    # would hide the mount from umount
    ("subtype=x", "unknown mount option"),
    ("auto_unmount", "unknown mount option"),
    ("nosymfollow", "unknown mount option"),
    ("scratch", "unknown mount option 'scratch'"),
    ("scratch=", "scratch= needs a directory"),
    ("scratch_limit=12Q", "scratch_limit: invalid size '12Q'"),
    ("scratch_limit=0", "scratch_limit: invalid size '0'"),
])
def test_bad_mount_options(option, words):
    with pytest.raises(InvalidArgument) as e:
        parse_mount_options(["allow_other", option])
    assert words in str(e.value)
