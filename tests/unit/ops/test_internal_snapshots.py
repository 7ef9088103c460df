"""`snapfs vm add` of images with internal snapshots (``qemu-img snapshot -c``,
virt-manager, ``virsh snapshot-create``).

Each internal snapshot becomes a snapfs snapshot, oldest first, and each
backing layer comes after its own internal snapshots.  Every view is
checked byte for byte against QEMU, read through ``qemu-img convert`` of
the store's volumes: a snapshot of layer L against ``qemu-img snapshot -a``
of a copy of L (the restore point, at the snapshot's disk size) and against
``qemu-img convert -l`` (the same bytes when the disk was not resized since),
a backing layer and the active state against plain ``qemu-img convert``.
Every volume passes ``qemu-img check`` and has no internal snapshot left.
"""

import json
import os
import shutil
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import qemu
from tests.support.chains import COMPRESSED, WRITE, ZERO, Op, QcowOptions
from tests.support.internal_snapshots import (
    ImageSpec, Resize, Snap, allocated_bytes, build_history, build_image, histories,
    in_history_order, internal_snapshots, set_snapshot_dates, snapshot_listing,
    snapshot_views, volume_bytes,
)
from tests.support.mounting import snapfs
from tests.support.qemu import qemu_img, qemu_io, to_raw
from tests.unit.ops.test_import import assert_store_volumes_clean, views

KiB = 1024
MiB = 1024 * KiB
# Each example builds images with qemu-img and checks every view: 20 run in
# about 20 s on two cores.  SNAPFS_TEST_PROFILE=thorough runs ten times more.
EXAMPLES = 200 if os.environ.get("SNAPFS_TEST_PROFILE") == "thorough" else 20


def manifest(store, vm):
    return json.loads((store / "vms" / vm / "manifest.json").read_text())


def volume_path(store, vm, vid):
    return store / "vms" / vm / vid


def expected_history(paths):
    """[(kind, path, internal snapshot or None)]: each layer's internal
    snapshots (by date, then table order), then the layer; the last entry
    is the active state."""
    entries = []
    for path in paths:
        entries += [("internal", path, s) for s in in_history_order(internal_snapshots(path))]
        entries.append(("layer", path, None))
    return entries


def check_import(store, vm, paths, disk="sda", dates=True):
    """The VM's snapshots and active state are the history of ``paths``.
    ``dates``: the snapshots carry the dates of these images' snapshots
    (with several disks, a snapshot has one date: its first disk's)."""
    m = manifest(store, vm)
    entries = expected_history(paths)
    *snapshots, active = entries
    assert [s["name"] for s in m["snapshots"]] == [
        snap.name if kind == "internal" else path.name.split(".")[0]
        for kind, path, snap in snapshots]
    for record, (kind, path, snap) in zip(m["snapshots"], snapshots):
        got = volume_bytes(volume_path(store, vm, record["volumes"][disk]))
        if kind == "internal":
            if dates:
                assert record["created"] == snap.created
            assert snap.name in record["description"] and path.name in record["description"]
            restored, converted = snapshot_views(path, snap.id)
            if len(converted) == len(restored):     # not resized since: QEMU's views agree
                assert converted == restored
            assert got == restored, f"internal snapshot {snap.name!r} of {path.name}"
        else:
            assert got == to_raw(path), f"layer {path.name}"
    assert volume_bytes(volume_path(store, vm, m["active"][disk])) == to_raw(paths[-1])
    check_volumes(store, vm)


def check_volumes(store, vm):
    """Every volume: clean, no internal snapshots, bare-UUID backing names with
    recorded formats; snapfs' own chains read what QEMU reads."""
    m = manifest(store, vm)
    for vid in m["volumes"]:
        path = volume_path(store, vm, vid)
        assert qemu.is_clean(qemu.check(path)), path
        assert snapshot_listing(path) == "", path
        assert json.loads(qemu_img("info", "--output=json", path)).get("snapshots") is None
    assert_store_volumes_clean(store, vm)
    got = views(store, vm)
    for s in m["snapshots"]:
        for disk, vid in s["volumes"].items():
            assert got[s["name"]][disk] == volume_bytes(volume_path(store, vm, vid))


# -- random histories ---------------------------------------------------------

@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs=histories())
def test_random_histories_import_byte_for_byte(tmp_path_factory, specs):
    tmp = tmp_path_factory.mktemp("history")
    store = tmp / "store"
    snapfs("init", store)
    paths = build_history(specs, tmp / "src")
    before = {p: p.read_bytes() for p in paths}
    snapfs("vm", "add", store, "vm", "--disk", f"sda={paths[-1]}")
    check_import(store, "vm", paths)
    assert {p: p.read_bytes() for p in paths} == before      # sources untouched
    shutil.rmtree(tmp)


# -- names, dates, order ------------------------------------------------------

def v3(cluster_size=64 * KiB, **kw):
    return QcowOptions("1.1", cluster_size, **kw)


def test_names_with_spaces_dates_and_descriptions(tmp_path, store):
    spec = ImageSpec(1 * MiB, v3(), [
        Op(WRITE, 0, 64 * KiB, 1), Snap("before upgrade"),
        Op(WRITE, 64 * KiB, 64 * KiB, 2), Snap("after  the upgrade, v2.0"),
        Op(WRITE, 0, 4 * KiB, 3)])
    path = build_image(spec, tmp_path / "web01.qcow2")
    out = snapfs("vm", "add", store, "web", "--disk", f"sda={path}").stdout
    assert "2 snapshot(s)" in out
    m = manifest(store, "web")
    assert [s["name"] for s in m["snapshots"]] == ["before upgrade", "after  the upgrade, v2.0"]
    assert m["snapshots"][0]["description"] == "internal snapshot before upgrade of web01.qcow2"
    check_import(store, "web", [path])
    listing = snapfs("snapshot", "list", store, "web").stdout
    assert "before upgrade" in listing and "after  the upgrade, v2.0" in listing


def test_order_is_by_date_then_table_order(tmp_path, store):
    spec = ImageSpec(512 * KiB, v3(), [
        Op(WRITE, 0, 64 * KiB, 1), Snap("a"), Op(WRITE, 0, 64 * KiB, 2), Snap("b"),
        Op(WRITE, 0, 64 * KiB, 3), Snap("c"), Op(WRITE, 0, 64 * KiB, 4), Snap("d"),
        Op(WRITE, 0, 64 * KiB, 5)])
    path = build_image(spec, tmp_path / "d.qcow2")
    # Table order a, b, c, d; dates make it c, then a and d (same second:
    # table order), then b.
    set_snapshot_dates(path, [1_700_000_100, 1_700_000_200, 1_700_000_000, 1_700_000_100])
    snapfs("vm", "add", store, "d", "--disk", f"sda={path}")
    m = manifest(store, "d")
    assert [s["name"] for s in m["snapshots"]] == ["c", "a", "d", "b"]
    assert [s["created"] for s in m["snapshots"]] == [
        "2023-11-14T22:13:20Z", "2023-11-14T22:15:00Z", "2023-11-14T22:15:00Z",
        "2023-11-14T22:16:40Z"]
    check_import(store, "d", [path])


def test_refused_and_duplicate_names_fall_back(tmp_path, store):
    base = build_image(ImageSpec(256 * KiB, v3(), [
        Op(WRITE, 0, 64 * KiB, 1), Snap("dup"), Op(WRITE, 0, 4 * KiB, 2)]),
        tmp_path / "layer0.qcow2")
    top = build_image(ImageSpec(256 * KiB, v3(), [
        Op(WRITE, 64 * KiB, 64 * KiB, 3), Snap("dup"), Snap("latest"), Snap(".hidden"),
        Snap("a/b"), Snap(""), Snap("layer0"), Op(WRITE, 0, 512, 4)]),
        tmp_path / "top.qcow2", backing=base)
    snapfs("vm", "add", store, "n", "--disk", f"sda={top}")
    m = manifest(store, "n")
    # Refused names become internal-ID (QEMU's snapshot ID in that image);
    # a name already taken gets -2, -3...
    assert [s["name"] for s in m["snapshots"]] == [
        "dup", "layer0", "dup-2", "internal-2", "internal-3", "internal-4", "internal-5",
        "layer0-2"]
    descriptions = [s["description"] for s in m["snapshots"]]
    assert descriptions[3] == "internal snapshot latest of top.qcow2"
    assert descriptions[5] == "internal snapshot a/b of top.qcow2"
    assert descriptions[6] == "internal snapshot (no name) of top.qcow2"
    check_volumes(store, "n")


def test_backing_layers_each_after_their_own_snapshots(tmp_path, store):
    src = tmp_path / "src"
    specs = [
        ImageSpec(1 * MiB, v3(), [Op(WRITE, 0, 128 * KiB, 1), Snap("base one"),
                                  Op(WRITE, 64 * KiB, 128 * KiB, 2)]),
        ImageSpec(1 * MiB, QcowOptions("0.10", 4 * KiB), [
            Op(WRITE, 32 * KiB, 4 * KiB, 3), Snap("mid one"), Op(ZERO, 0, 64 * KiB),
            Snap("mid two"), Op(WRITE, 100 * KiB, 8 * KiB, 4)]),
        ImageSpec(1 * MiB, v3(512), [Op(WRITE, 512, 512, 5), Snap("top one"),
                                     Op(COMPRESSED, 0, 512, 6)]),
    ]
    paths = build_history(specs, src)
    snapfs("vm", "add", store, "h", "--disk", f"sda={paths[-1]}")
    assert [s["name"] for s in manifest(store, "h")["snapshots"]] == [
        "base one", "layer0", "mid one", "mid two", "layer1", "top one"]
    check_import(store, "h", paths)


# -- sizes --------------------------------------------------------------------

def test_resized_disks_keep_each_snapshots_size(tmp_path, store):
    # The base is larger than the snapshot: what the grown disk shows
    # past the snapshot's size comes from the base.
    base = build_image(ImageSpec(2 * MiB, v3(), [Op(WRITE, 0, 2 * MiB, 7)]),
                       tmp_path / "layer0.qcow2")
    top = build_image(ImageSpec(512 * KiB, v3(), [
        Op(WRITE, 0, 64 * KiB, 1), Snap("small"), Resize(1536 * KiB),
        Op(WRITE, 1 * MiB, 64 * KiB, 2), Snap("grown"), Resize(256 * KiB + 512),
        Snap("shrunk"), Resize(3 * MiB), Op(WRITE, 2 * MiB + 512, 4 * KiB, 3)]),
        tmp_path / "top.qcow2", backing=base)
    snapfs("vm", "add", store, "r", "--disk", f"sda={top}")
    m = manifest(store, "r")
    sizes = [len(volume_bytes(volume_path(store, "r", s["volumes"]["sda"])))
             for s in m["snapshots"]]
    assert sizes == [2 * MiB, 512 * KiB, 1536 * KiB, 256 * KiB + 512]
    check_import(store, "r", [base, top])


def test_a_larger_state_after_a_smaller_one_reads_the_base_past_its_size(tmp_path, store):
    # QEMU zeroes what a resize adds over a backing file, so only a state
    # that is older in the table but newer by date can show the base past
    # the end of the state before it.
    base = build_image(ImageSpec(2 * MiB, v3(), [Op(WRITE, 0, 2 * MiB, 7)]),
                       tmp_path / "layer0.qcow2")
    top = build_image(ImageSpec(2 * MiB, v3(), [
        Op(WRITE, 0, 4 * KiB, 1), Snap("big"), Resize(512 * KiB), Snap("small"),
        Op(WRITE, 8 * KiB, 4 * KiB, 2)]), tmp_path / "top.qcow2", backing=base)
    set_snapshot_dates(top, [1_700_000_200, 1_700_000_100])
    snapfs("vm", "add", store, "g", "--disk", f"sda={top}")
    assert [s["name"] for s in manifest(store, "g")["snapshots"]] == ["layer0", "small", "big"]
    check_import(store, "g", [base, top])


# -- what the store holds ------------------------------------------------------

def test_layers_hold_only_what_changed(tmp_path, store):
    path = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qemu_io(path, "write -q -P 1 0 32M", "write -q -P 5 40M 64k")
    qemu_img("snapshot", "-c", "full", path)
    qemu_io(path, "write -q -P 2 1M 64k")                 # one cluster changes
    qemu_img("snapshot", "-c", "one cluster", path)
    # The same bytes again: QEMU copies the shared cluster to a new one, so
    # the tables differ but the bytes do not.
    qemu_io(path, "write -q -P 5 40M 64k", "write -q -P 3 2M 64k")
    snapfs("vm", "add", store, "b", "--disk", f"sda={path}")
    m = manifest(store, "b")
    full, one = (volume_path(store, "b", s["volumes"]["sda"]) for s in m["snapshots"])
    active = volume_path(store, "b", m["active"]["sda"])
    assert allocated_bytes(full) == 32 * MiB + 64 * KiB
    assert allocated_bytes(one) == 64 * KiB
    assert allocated_bytes(active) == 64 * KiB
    assert os.path.getsize(one) < 512 * KiB and os.path.getsize(active) < 512 * KiB
    source = os.stat(path).st_blocks * 512
    stored = sum(os.stat(volume_path(store, "b", v)).st_blocks * 512 for v in m["volumes"])
    assert stored <= source + 1 * MiB
    check_import(store, "b", [path])


def test_extended_l2_compressed_and_zero_clusters(tmp_path, store):
    spec = ImageSpec(4 * MiB, v3(64 * KiB, extended_l2=True, compression_type="zstd"), [
        Op(COMPRESSED, 0, 64 * KiB, 1), Op(WRITE, 64 * KiB + 2048, 4096, 2),
        Op(ZERO, 1 * MiB, 256 * KiB), Snap("one"),
        Op(WRITE, 4096, 2048, 3), Op(ZERO, 64 * KiB, 64 * KiB), Snap("two"),
        Op(COMPRESSED, 3 * MiB, 64 * KiB, 4), Op(ZERO, 0, 4 * MiB)])
    path = build_image(spec, tmp_path / "x.qcow2")
    snapfs("vm", "add", store, "x", "--disk", f"sda={path}")
    check_import(store, "x", [path])


# -- several disks ---------------------------------------------------------------

def test_several_disks_are_matched_by_snapshot_name(tmp_path, store):
    a = build_image(ImageSpec(1 * MiB, v3(), [
        Op(WRITE, 0, 64 * KiB, 1), Snap("first"), Op(WRITE, 0, 64 * KiB, 2), Snap("second"),
        Op(WRITE, 0, 64 * KiB, 3)]), tmp_path / "a.qcow2")
    b = build_image(ImageSpec(512 * KiB, QcowOptions("0.10", 4 * KiB), [
        Op(WRITE, 4096, 4096, 4), Snap("first"), Snap("second"), Op(WRITE, 0, 512, 5)]),
        tmp_path / "b.qcow2")
    snapfs("vm", "add", store, "m", "--disk", f"sda={a}", "--disk", f"sdb={b}",
           "--disk", "blank=1M")
    m = manifest(store, "m")
    assert [s["name"] for s in m["snapshots"]] == ["first", "second"]
    check_import(store, "m", [a], disk="sda")
    # b's snapshots may be a second younger than a's: the VM has a's dates.
    check_import(store, "m", [b], disk="sdb", dates=False)
    for s in m["snapshots"]:
        assert volume_bytes(volume_path(store, "m", s["volumes"]["blank"])) == bytes(1 * MiB)


def test_disks_whose_snapshots_do_not_match_are_refused(tmp_path, store):
    a = build_image(ImageSpec(1 * MiB, v3(), [Op(WRITE, 0, 512, 1), Snap("first"),
                                              Snap("second")]), tmp_path / "a.qcow2")
    b = build_image(ImageSpec(1 * MiB, v3(), [Op(WRITE, 0, 512, 1), Snap("first"),
                                              Snap("other")]), tmp_path / "b.qcow2")
    c = build_image(ImageSpec(1 * MiB, v3(), [Op(WRITE, 0, 512, 1), Snap("first")]),
                    tmp_path / "c.qcow2")
    for other in (b, c):
        r = snapfs("vm", "add", store, "m", "--disk", f"sda={a}", "--disk", f"sdb={other}",
                   check=False)
        assert r.returncode == 1
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "do not match" in r.stderr and "first" in r.stderr
        assert os.listdir(store / "vms") == []


# -- --move, damage, leftovers ------------------------------------------------------

def test_move_of_an_image_with_internal_snapshots_is_refused(tmp_path, store):
    path = build_image(ImageSpec(1 * MiB, v3(), [Op(WRITE, 0, 512, 1), Snap("s")]),
                       tmp_path / "i.qcow2")
    before = path.read_bytes()
    r = snapfs("vm", "add", store, "i", "--disk", f"sda={path}", "--move", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "internal snapshots" in r.stderr and "without --move" in r.stderr
    assert path.read_bytes() == before and os.listdir(store / "vms") == []


def _snapshot_l1_offset(path):
    with open(path, "rb") as f:
        head = f.read(72)
        f.seek(struct.unpack(">Q", head[64:72])[0])
        return struct.unpack(">Q", f.read(8))[0]


def test_snapshot_tables_outside_the_file_are_refused(tmp_path, store):
    path = build_image(ImageSpec(1 * MiB, v3(), [Op(WRITE, 0, 64 * KiB, 1), Snap("s"),
                                                 Op(WRITE, 0, 64 * KiB, 2)]),
                       tmp_path / "bad.qcow2")
    # The snapshot's own L1 entry now names an L2 table past the end of the file.
    l1 = _snapshot_l1_offset(path)
    with open(path, "r+b") as f:
        f.seek(l1)
        f.write(struct.pack(">Q", (1 << 40) | (1 << 63)))
    r = snapfs("vm", "add", store, "bad", "--disk", f"sda={path}", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "bad.qcow2" in r.stderr and "L2 table" in r.stderr
    assert os.listdir(store / "vms") == []


def test_interrupted_build_leaves_nothing(tmp_path, store, monkeypatch):
    from snapfs.ops import importer
    from snapfs.qcow2.writer import Qcow2Writer
    from snapfs.store.store import Store
    path = build_image(ImageSpec(1 * MiB, v3(), [Op(WRITE, 0, 64 * KiB, 1), Snap("s"),
                                                 Op(WRITE, 0, 64 * KiB, 2)]),
                       tmp_path / "i.qcow2")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    # The first new volume's tables never reach its file: the build stops there.
    monkeypatch.setattr(Qcow2Writer, "flush", interrupted)
    s = Store.open(store)
    try:
        importer.add_vm(s, "i", [f"sda={path}"], progress=False)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the build was not interrupted")
    assert os.listdir(store / "vms") == []


@settings(max_examples=max(5, EXAMPLES // 4), deadline=None, suppress_health_check=list(HealthCheck))
@given(cluster_size=st.sampled_from([512, 2 * MiB]))
def test_images_made_by_v2_with_many_snapshots(tmp_path_factory, cluster_size):
    """v2 (compat 0.10) with the extreme cluster sizes, five snapshots."""
    tmp = tmp_path_factory.mktemp("v2")
    store = tmp / "store"
    snapfs("init", store)
    steps = []
    for i in range(5):
        steps += [Op(WRITE, (i * 3 % 4) * cluster_size, cluster_size // 2, i + 1),
                  Snap(f"nightly {i}")]
    steps.append(Op(ZERO, 0, cluster_size))
    path = build_image(ImageSpec(4 * cluster_size, QcowOptions("0.10", cluster_size), steps),
                       tmp / "v2.qcow2")
    snapfs("vm", "add", store, "v", "--disk", f"sda={path}")
    check_import(store, "v", [path])
    shutil.rmtree(tmp)
