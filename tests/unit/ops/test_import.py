"""`snapfs vm add`: what lands in the store, checked with qemu-img."""

import json
import os

from snapfs.store.chain import Chain
from snapfs.store.store import Store
from snapfs.store.volume import VolumePool
from tests.support.mounting import snapfs
from tests.support.qemu import check, info_chain, is_clean, qemu_img, qemu_io, to_raw


def views(store_path, vm):
    """{snapshot name or 'active': {disk: bytes}} read with snapfs' chains."""
    store = Store.open(store_path)
    m = store.load_vm(vm)
    pool = VolumePool()
    out = {}
    try:
        for name, volumes in [(s.name, s.volumes) for s in m.snapshots] + [("active", m.active)]:
            out[name] = {}
            for disk, vid in volumes.items():
                chain = Chain(pool, store.chain_refs(m, vid))
                out[name][disk] = chain.read(0, chain.size)
    finally:
        pool.close()
    return out


def assert_store_volumes_clean(store_path, vm):
    store = Store.open(store_path)
    m = store.load_vm(vm)
    for vid, vol in m.volumes.items():
        path = store.volume_path(vm, vid)
        if vol["format"] == "qcow2":
            assert is_clean(check(path)), path
            chain = info_chain(path)
            assert [os.path.basename(c["filename"]) for c in chain] == list(reversed(m.chain(vid)))
            assert [c["format"] for c in chain] == [m.volumes[v]["format"] for v in reversed(m.chain(vid))]


def make_chain(directory, names, size="2M"):
    directory.mkdir(parents=True, exist_ok=True)
    prev = None
    for i, name in enumerate(names):
        path = directory / f"{name}.qcow2"
        args = ["create", "-f", "qcow2"] + (["-b", f"{prev}.qcow2", "-F", "qcow2"] if prev else [])
        qemu_img(*args, path, size, cwd=directory)
        qemu_io(path, f"write -P {i + 1} {i * 64}k 64k", fmt="qcow2")
        prev = name
    return directory / f"{names[-1]}.qcow2"


def test_chain_layers_become_snapshots(tmp_path, store):
    top = make_chain(tmp_path / "src", ["base", "mid", "top"])
    expected = [to_raw(tmp_path / "src" / f"{n}.qcow2") for n in ("base", "mid", "top")]
    snapfs("vm", "add", store, "web", "--disk", f"sda={top}")
    v = views(store, "web")
    assert list(v) == ["base", "mid", "active"]
    assert [v[n]["sda"] for n in v] == expected
    assert_store_volumes_clean(store, "web")
    # The sources are untouched.
    assert info_chain(top)[1]["filename"].endswith("mid.qcow2")


def test_raw_image_becomes_base_and_overlay(tmp_path, store):
    raw = tmp_path / "disk.img"
    raw.write_bytes(os.urandom(300_000))          # not a multiple of 512
    snapfs("vm", "add", store, "r", "--disk", f"sda={raw}")
    v = views(store, "r")
    padded = raw.read_bytes() + bytes(-300_000 % 512)
    assert v == {"disk": {"sda": padded}, "active": {"sda": padded}}
    assert_store_volumes_clean(store, "r")
    m = json.loads((store / "vms" / "r" / "manifest.json").read_text())
    formats = sorted(vol["format"] for vol in m["volumes"].values())
    assert formats == ["qcow2", "raw"]


def test_several_disks_and_blank_disks(tmp_path, store):
    a = make_chain(tmp_path / "a", ["a0", "a1", "a2"])
    b = make_chain(tmp_path / "b", ["b0", "b1", "b2"], size="1M")
    snapfs("vm", "add", store, "multi", "--disk", f"sda={a}", "--disk", f"sdb={b}",
           "--disk", "blank=3M")
    v = views(store, "multi")
    assert list(v) == ["a0", "a1", "active"]          # names from the first disk
    assert v["a0"]["sdb"] == to_raw(tmp_path / "b" / "b0.qcow2")
    assert v["a1"]["sdb"] == to_raw(tmp_path / "b" / "b1.qcow2")
    assert all(v[s]["blank"] == bytes(3 << 20) for s in v)
    assert_store_volumes_clean(store, "multi")


def test_move_renames_into_the_store(tmp_path, store):
    top = make_chain(tmp_path / "src", ["base", "top"])
    inode = os.stat(top).st_ino
    expected = to_raw(top)
    snapfs("vm", "add", store, "moved", "--disk", f"sda={top}", "--move")
    assert not top.exists() and not (tmp_path / "src" / "base.qcow2").exists()
    m = json.loads((store / "vms" / "moved" / "manifest.json").read_text())
    assert os.stat(store / "vms" / "moved" / m["active"]["sda"]).st_ino == inode
    assert views(store, "moved")["active"]["sda"] == expected
    assert_store_volumes_clean(store, "moved")


def test_move_with_a_bad_disk_loses_nothing(tmp_path, store):
    top = make_chain(tmp_path / "src", ["base", "top"])
    before = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    r = snapfs("vm", "add", store, "x", "--disk", f"sda={top}", "--disk", "sdb=bogus", "--move",
               check=False)
    assert r.returncode == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()} == before
    assert os.listdir(store / "vms") == []


def test_internal_snapshots_become_snapshots(tmp_path, store):
    # More in test_internal_snapshots.py.
    path = tmp_path / "i.qcow2"
    qemu_img("create", "-f", "qcow2", path, "1M")
    qemu_io(path, "write -P 1 0 64k", fmt="qcow2")
    qemu_img("snapshot", "-c", "inside", path)
    snapfs("vm", "add", store, "i", "--disk", f"sda={path}")
    m = json.loads((store / "vms" / "i" / "manifest.json").read_text())
    assert [s["name"] for s in m["snapshots"]] == ["inside"]
    for vid in m["volumes"]:
        assert json.loads(snapfs("inspect", store / "vms" / "i" / vid, "--json").stdout)["snapshots"] == []
    assert views(store, "i")["inside"]["sda"] == to_raw(path)


def test_corrupt_marked_image_is_read_never_written(tmp_path, store):
    top = make_chain(tmp_path / "src", ["base", "top"])
    with open(top, "r+b") as f:          # set the corrupt bit on the overlay
        f.seek(72)
        f.write((2).to_bytes(8, "big"))
    r = snapfs("vm", "add", store, "c", "--disk", f"sda={top}", check=False)
    assert r.returncode == 1 and "marked corrupt" in r.stderr
    assert os.listdir(store / "vms") == []
    # A corrupt-marked image that needs no rewrite imports and reads.
    base = tmp_path / "src" / "base.qcow2"
    with open(base, "r+b") as f:
        f.seek(72)
        f.write((2).to_bytes(8, "big"))
    snapfs("vm", "add", store, "c", "--disk", f"sda={base}")
    assert views(store, "c")["active"]["sda"][:65536] == b"\x01" * 65536


def test_dirty_image_is_refused_with_advice(tmp_path, store):
    top = make_chain(tmp_path / "src", ["base", "top"])
    with open(top, "r+b") as f:          # the dirty bit of lazy refcounts
        f.seek(72)
        f.write((1).to_bytes(8, "big"))
    r = snapfs("vm", "add", store, "d", "--disk", f"sda={top}", check=False)
    assert r.returncode == 1 and "qemu-img check -r all" in r.stderr
    qemu_img("check", "-r", "all", top)
    snapfs("vm", "add", store, "d", "--disk", f"sda={top}")
    assert_store_volumes_clean(store, "d")
