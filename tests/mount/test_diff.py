"""``snapfs diff``: partitions, the command line on a mounted store (the
active view edited through a loop mount, then snapshotted with touch),
JSON, the refusal of ``active`` while QEMU holds it, and step 1 (the
changed ranges) against QEMU's own maps, without reading data."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from ext4chain import build_ext4_chain, partition_layout
from snapfs.ops.diff import diff_vm, escape
from snapfs.store.chain import Chain
from snapfs.store.changed import changed_ranges
from snapfs.store.store import Store
from snapfs.store.volume import VolumePool
from tests.support.ext4diff import kernel_diff, overlay, run
from tests.support.mounting import loop_mounted, mounted, snapfs


def _lines(changes, view):
    out = []
    for path, change, new_path in changes:
        line = f"{change} {view}{escape(path)}"
        if new_path is not None:
            line += f" -> {view}{escape(new_path)}"
        out.append(line)
    return sorted(out)


def _ext4_image(path, src, size=48 << 20):
    with open(path, "wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-d", src, path)


def _edit(root):
    root = Path(root)
    (root / "etc" / "hosts").write_text("127.0.0.1 changed\n")
    os.rename(root / "srv", root / "srv moved")
    os.unlink(root / "srv moved" / "old")
    (root / "new\nline").write_bytes(b"x" * 5000)
    os.link(root / "etc" / "hosts", root / "hosts-link")
    os.symlink("etc/hosts", root / "to-hosts")
    os.chmod(root / "etc", 0o700)
    with open(root / "big", "r+b") as f:
        f.seek(3 << 20)
        f.write(os.urandom(100_000))


def _source(tmp_path):
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (src / "srv" / "www").mkdir(parents=True)
    (src / "srv" / "www" / "index.html").write_text("<h1>hi</h1>\n")
    (src / "srv" / "old").write_bytes(os.urandom(20_000))
    (src / "big").write_bytes(os.urandom(6 << 20))
    return src


def test_cli_on_a_mounted_store_equals_the_kernel(tmp_path, store):
    base = tmp_path / "base.raw"
    _ext4_image(base, _source(tmp_path))
    snapfs("vm", "add", store, "web", "--disk", f"sda={base}")
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "web"
        with loop_mounted(vm / "active" / "sda.raw", tmp_path / "edit", readonly=False) as root:
            _edit(root)
        expected = _lines(kernel_diff(vm / "snapshots" / "base" / "sda.raw",
                                      vm / "active" / "sda.raw", tmp_path / "k1"), "sda")
        assert any(line.startswith("R sda/srv -> ") for line in expected)
        assert "+ sda/new\\0012line" in expected
        out = snapfs("diff", store, "web", "base", "active")
        assert sorted(out.stdout.splitlines()) == expected
        assert out.stderr == ""
        (vm / "snapshots" / "after").touch()
        out = snapfs("diff", store, "web", "base", "after")
        assert sorted(out.stdout.splitlines()) == expected
        doc = json.loads(snapfs("diff", store, "web", "base", "after", "--json").stdout)
    view = doc["disks"]["sda"]["partitions"]["sda"]
    assert (view["status"], view["kind"], view["number"]) == ("compared", "ext4", None)
    assert {"change": "R", "path": "/srv", "new_path": "/srv moved"} in view["changes"]
    assert {"change": "+", "path": "/new\nline"} in view["changes"]
    assert len(view["changes"]) == len(expected)
    # The other way round, unmounted.
    out = snapfs("diff", store, "web", "after", "base")
    assert any(line == "R sda/srv\\0040moved -> sda/srv" for line in out.stdout.splitlines())
    # Nothing changed between a snapshot and itself: nothing is opened.
    doc = json.loads(snapfs("diff", store, "web", "after", "after", "--json").stdout)
    assert doc["disks"]["sda"]["changed_bytes"] == 0
    assert doc["disks"]["sda"]["partitions"]["sda"]["status"] == "unchanged"
    assert snapfs("diff", store, "web", "base", "nope", check=False).returncode == 1


@pytest.mark.parametrize("table", ["mbr", "gpt"])
def test_partitions_are_paired_and_each_equals_the_kernel(tmp_path, store, table):
    layers = build_ext4_chain(tmp_path / "src", table=table, keep_raw=True)
    snapfs("vm", "add", store, "web", "--disk", f"sda={layers[-1]}")
    disks = diff_vm(Store.open(store), "web", "base", "v2")
    [disk] = disks
    views = {v.number: v for v in disk.views}
    layout = {n: (offset, size) for n, offset, size, _ in partition_layout(table)}
    assert set(views) == set(layout)
    data_partition = 2
    assert views[data_partition].status == "unchanged"      # the same in every version
    compared = [n for n in layout if n != data_partition]
    for number in compared:
        offset, size = layout[number]
        images = []
        for version in (1, 2):
            image = tmp_path / f"p{number}-v{version}.img"
            with open(tmp_path / "src" / f"v{version}.raw", "rb") as f, open(image, "wb") as out:
                f.seek(offset)
                out.write(f.read(size))
            images.append(image)
        view = views[number]
        assert (view.status, view.kind, view.damaged) == ("compared", "ext4", [])
        got = sorted((c.path, c.change, c.new_path) for c in view.changes)
        assert got == kernel_diff(*images, tmp_path / f"k{number}")
        assert got, f"partition {number} changed between the versions"


def test_active_is_refused_while_qemu_holds_the_leaf(tmp_path, store):
    snapfs("vm", "add", store, "web", "--disk", "sda=16M")
    snapfs("snapshot", "create", store, "web", "s")
    m = Store.open(store).load_vm("web")
    leaf = Store.open(store).volume_path("web", m.active["sda"])
    qemu = subprocess.Popen(["qemu-io", "-f", "qcow2", leaf], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from snapfs.store.inuse import held_by_qemu
        deadline = 100
        while not held_by_qemu(leaf) and deadline:
            deadline -= 1
            qemu.poll()
            subprocess.run(["sleep", "0.05"])
        assert held_by_qemu(leaf)
        out = snapfs("diff", store, "web", "s", "active", check=False)
        assert out.returncode == 1 and "runs in QEMU" in out.stderr
    finally:
        qemu.communicate(b"quit\n", timeout=10)
    assert snapfs("diff", store, "web", "s", "active").stdout == ""


def _qemu_sources(top, chain_files):
    """[(start, end, source)] from qemu-img map: source is ("zero",) or
    (volume file, host offset at start)."""
    out = json.loads(run("qemu-img", "map", "--output=json", top).stdout)
    pieces = []
    for r in out:
        start, end = r["start"], r["start"] + r["length"]
        if r.get("data") and not r.get("zero") and r.get("present", True):
            source = (chain_files[len(chain_files) - 1 - r["depth"]], r["offset"])
        else:
            source = ("zero",)
        pieces.append((start, end, source))
    return pieces


def _qemu_changed(map_a, map_b):
    """Changed [start, end) ranges by QEMU's maps, merged."""
    cuts = sorted({p for s, e, _ in map_a + map_b for p in (s, e)})
    def at(pieces, pos):
        for s, e, src in pieces:
            if s <= pos < e:
                return src if src == ("zero",) else (src[0], src[1] + pos - s)
    out = []
    for lo, hi in zip(cuts, cuts[1:]):
        if at(map_a, lo) != at(map_b, lo):
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
    return out


def test_changed_ranges_read_no_data_and_agree_with_qemu_img_map(tmp_path, store, monkeypatch):
    base, edited = tmp_path / "base.raw", tmp_path / "edited.raw"
    _ext4_image(base, _source(tmp_path))
    run("cp", "--sparse=always", base, edited)
    run("mount", "-o", "loop", edited, tmp_path / "src")    # over src: any empty dir will do
    try:
        _edit(tmp_path / "src")
    finally:
        run("umount", tmp_path / "src")
    overlay(base, "raw", edited, tmp_path / "s1.qcow2", tmp_path)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "s1.qcow2", "-F", "qcow2",
        tmp_path / "top.qcow2")
    snapfs("vm", "add", store, "web", "--disk", f"sda={tmp_path / 'top.qcow2'}")
    s = Store.open(store)
    m = s.load_vm("web")
    pool = VolumePool()
    refs = {name: s.chain_refs(m, m.snapshot(name).volumes["sda"]) for name in ("base", "s1")}
    chains = {name: Chain(pool, r) for name, r in refs.items()}

    def no_reads(*args):
        raise AssertionError("step 1 read the disk")
    monkeypatch.setattr(os, "pread", no_reads)
    monkeypatch.setattr(Chain, "read", no_reads)
    changed = changed_ranges(chains["base"], chains["s1"])
    monkeypatch.undo()
    pool.close()

    maps = {name: _qemu_sources(r[-1].path, [x.path for x in r]) for name, r in refs.items()}
    # A raw base's holes are zeros to QEMU and data to snapfs (a raw
    # volume's map is one extent): both sides resolve them to the base.
    expected = _qemu_changed(maps["base"], maps["s1"])
    assert list(changed) == expected
    assert 0 < changed.total() < (4 << 20)
