"""Acceptance 3: ext4 end to end through a read-write loop mount of the
active view, with snapshots taken between changes."""

import os

from ext4chain import DEFAULT_VERSIONS, build_ext4_chain
from tests.support.mounting import loop_mounted, mounted, read_tree, snapfs
from tests.support.qemu import check, is_clean


def apply(root, changes):
    for rel, content in changes.items():
        path = root / rel
        if content is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)


def test_write_ext4_through_active_and_snapshot(tmp_path, store):
    layers = build_ext4_chain(tmp_path / "src", table="mbr")
    snapfs("vm", "add", store, "web", "--disk", f"sda={layers[-1]}")
    expected = dict(DEFAULT_VERSIONS[-1])
    history = []
    rounds = [
        {"var/www/index.html": b"<h1>edited live</h1>\n", "etc/new.conf": b"x = 1\n"},
        {"etc/new.conf": None, "srv/blob.bin": os.urandom(3 << 20)},
        {"var/www/index.html": b"<h1>third</h1>\n", "etc/hostname": b"web02\n"},
    ]
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "web"
        part = vm / "active" / "sda-part1.raw"
        for i, changes in enumerate(rounds):
            with loop_mounted(part, tmp_path / f"rw{i}", readonly=False) as root:
                apply(root, changes)
            apply_model(expected, changes)
            os.mkdir(vm / "snapshots" / f"round{i}")
            history.append((f"round{i}", dict(expected)))
        # Every snapshot shows its round's files; active shows the last.
        for name, tree in history:
            with loop_mounted(vm / "snapshots" / name / "sda-part1.raw", tmp_path / f"ro-{name}") as m:
                assert read_tree(m) == tree, name
        with loop_mounted(part, tmp_path / "ro-active") as m:
            assert read_tree(m) == history[-1][1]
        # The imported snapshots are untouched.
        with loop_mounted(vm / "snapshots" / "base" / "sda-part1.raw", tmp_path / "ro-base") as m:
            assert read_tree(m) == DEFAULT_VERSIONS[0]
        # Deleting the middle round merges it away; the others do not change.
        os.rmdir(vm / "snapshots" / "round1")
        for name, tree in (history[0], history[2]):
            with loop_mounted(vm / "snapshots" / name / "sda-part1.raw", tmp_path / f"re-{name}") as m:
                assert read_tree(m) == tree, name
    vm_dir = store / "vms" / "web"
    for name in os.listdir(vm_dir):
        if name != "manifest.json":
            assert is_clean(check(vm_dir / name)), name
    assert snapfs("check", store).returncode == 0


def apply_model(tree, changes):
    for rel, content in changes.items():
        if content is None:
            tree.pop(rel, None)
        else:
            tree[rel] = content
