"""`snapfs vm add --libvirt`: a domain and its snapshots as virsh writes
them, imported; views read with snapfs' chains and compared with
`qemu-img convert`.  Every bad input is one line naming the file and the
element, and leaves the store as it was.  (Views through a mount, LUNs:
tests/mount/test_libvirt_import.py.)"""

import hashlib
import json
import os
import shutil

import pytest

from snapfs.ops.discover import discover_chain
from snapfs.errors import UnsafeBacking
from tests.support.hostile import set_tail
from tests.support.libvirt import (NIGHTLY_TIME, PRE_UPGRADE_TIME, TEMPLATE_TIME, block_disk,
                                   build_web01, disk_only_snapshot, domain_xml, file_disk,
                                   make_image, snapshot_xml, utc, write)
from tests.support.mounting import snapfs
from tests.support.qemu import qemu_img, to_raw
from tests.unit.ops.test_import import assert_store_volumes_clean, views


def manifest(store, vm):
    return json.loads((store / "vms" / vm / "manifest.json").read_text())


def add(store, built, *extra, check=True):
    return snapfs("vm", "add", store, "web01", "--libvirt", built.domain,
                  "--libvirt-snapshots", built.snapshots, *extra, check=check)


def expected_views(built):
    return {name: {disk: to_raw(path) for disk, path in disks.items()}
            for name, disks in built.views.items()}


def test_domain_and_snapshots_import(tmp_path, store):
    built = build_web01(tmp_path / "libvirt")
    before = {p: p.read_bytes() for p in built.sources}
    result = add(store, built)
    m = manifest(store, "web01")
    assert m["disks"] == ["vda", "vdb", "vdd"]          # the domain's order
    assert m["kinds"]["vdd"]["kind"] == "shareable"
    snaps = [(s["name"], s["description"], s["created"], s["consistency"], sorted(s["volumes"]))
             for s in m["snapshots"]]
    assert snaps == [
        # No snapshot XML names the template: named after its file, its time.
        ("debian12", "imported from debian12.qcow2", utc(TEMPLATE_TIME), "offline", ["vda"]),
        # The description's line break became a space; taken running.
        ("pre-upgrade", "Before the upgrade to 2.0", utc(PRE_UPGRADE_TIME), "crash",
         ["vda", "vdb"]),
        # vdb was snapshot='no'.
        ("nightly", "nightly", utc(NIGHTLY_TIME), "offline", ["vda"]),
    ]
    assert views(store, "web01") == expected_views(built)
    assert_store_volumes_clean(store, "web01")
    # What was skipped is said, one line each.
    said = result.stderr
    assert "<disk type='file' device='cdrom'> with <target dev='sda'>: a CD-ROM" in said
    assert "<disk type='network' device='disk'> with <target dev='vde'>: a network disk" in said
    assert "savevm.xml: skipped snapshot 'savevm': an internal snapshot" in said
    assert "memory-only.xml: skipped snapshot 'memory-only': a memory-only snapshot" in said
    assert "added VM web01: 3 disk(s), shareable: vdd, 3 snapshot(s)" in result.stdout
    # The sources are untouched; the check is clean.
    assert {p: p.read_bytes() for p in built.sources} == before
    assert "ok: 1 VM(s)" in snapfs("check", store).stdout


def test_without_snapshot_metadata_layers_are_named_after_files(tmp_path, store):
    built = build_web01(tmp_path / "libvirt", shareable=False)
    domain = tmp_path / "vda-only.xml"
    domain.write_text(domain_xml("web01", [file_disk("vda", built.views["active"]["vda"])]))
    snapfs("vm", "add", store, "web01", "--libvirt", domain)
    m = manifest(store, "web01")
    # debian12.qcow2, web01.qcow2, web01.pre-upgrade: names up to the first dot.
    assert [s["name"] for s in m["snapshots"]] == ["debian12", "web01", "web01-2"]
    assert [s["description"] for s in m["snapshots"]] == [
        "imported from debian12.qcow2", "imported from web01.qcow2",
        "imported from web01.pre-upgrade"]
    v = views(store, "web01")
    assert v["web01-2"]["vda"] == to_raw(built.views["nightly"]["vda"])
    assert v["active"]["vda"] == to_raw(built.views["active"]["vda"])


def test_move(tmp_path, store):
    built = build_web01(tmp_path / "libvirt")
    want = expected_views(built)
    add(store, built, "--move")
    assert views(store, "web01") == want
    # Every layer was renamed in; the shareable image was copied (stored raw).
    assert [p for p in built.sources if p.exists()] == []
    assert built.shared.exists()
    assert_store_volumes_clean(store, "web01")
    assert "ok: 1 VM(s)" in snapfs("check", store).stdout


def test_creation_time_orders_what_the_chains_leave_open(tmp_path, store):
    """Two disks, snapshots of one disk each: creation time decides.  On one
    disk, the chain wins over a creation time that says otherwise."""
    src = tmp_path / "img"
    src.mkdir()
    a = make_image(src / "a.qcow2", writes=[(1, 0, 4096)])
    b = make_image(src / "b.qcow2", writes=[(2, 0, 4096)])
    dom = domain_xml("db", [file_disk("vda", a), file_disk("vdb", b)])
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    tops = {"vda": a, "vdb": b}
    for name, disk, when in [("a1", "vda", 300), ("b1", "vdb", 200), ("a2", "vda", 100)]:
        new = disk_only_snapshot({disk: tops[disk]}, name)[disk]
        (snaps / f"{name}.xml").write_text(snapshot_xml(
            name, 1700000000 + when, [(disk, "external", new)], dom))
        tops[disk] = new
    domain = tmp_path / "db.xml"
    domain.write_text(domain_xml("db", [file_disk("vda", tops["vda"]),
                                        file_disk("vdb", tops["vdb"])]))
    snapfs("vm", "add", store, "db", "--libvirt", domain, "--libvirt-snapshots", snaps)
    m = manifest(store, "db")
    assert [(s["name"], list(s["volumes"])) for s in m["snapshots"]] == [
        ("b1", ["vdb"]), ("a1", ["vda"]), ("a2", ["vda"])]


def test_contradicting_snapshots_are_refused(tmp_path, store):
    """x holds vda's first layer and vdb's second, y the other way round:
    no order of snapshots fits both chains."""
    src = tmp_path / "img"
    src.mkdir()
    tops = {d: make_image(src / f"{d}.qcow2") for d in ("vda", "vdb")}
    one = disk_only_snapshot(tops, "one")
    two = disk_only_snapshot(one, "two")
    dom = domain_xml("db", [file_disk(d, tops[d]) for d in tops])
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    (snaps / "x.xml").write_text(snapshot_xml(
        "x", 1700000000, [("vda", "external", one["vda"]), ("vdb", "external", two["vdb"])], dom))
    (snaps / "y.xml").write_text(snapshot_xml(
        "y", 1700000100, [("vda", "external", two["vda"]), ("vdb", "external", one["vdb"])], dom))
    domain = tmp_path / "db.xml"
    domain.write_text(domain_xml("db", [file_disk(d, two[d]) for d in two]))
    r = snapfs("vm", "add", store, "db", "--libvirt", domain, "--libvirt-snapshots", snaps,
               check=False)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"snapfs: error: {snaps}: snapshots 'x' (x.xml), 'y' (y.xml) "
                                "hold the disks' layers in contradicting orders")
    assert os.listdir(store / "vms") == []


def test_internal_snapshots_of_the_images(tmp_path, store):
    """`virsh snapshot-create` (internal) puts a snapshot of one name in each
    disk: its XML is skipped, the images' tables give one snapshot of both
    disks, as `vm add --disk` would."""
    src = tmp_path / "img"
    src.mkdir()
    tops, dom = {}, None
    for disk, pattern in (("vda", 1), ("vdb", 2)):
        tops[disk] = make_image(src / f"{disk}.qcow2", writes=[(pattern, 0, 4096)])
        qemu_img("snapshot", "-c", "savevm", tops[disk])
        write(tops[disk], [(pattern + 10, 4096, 4096)])
    dom = domain_xml("db", [file_disk(d, tops[d]) for d in tops])
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    (snaps / "savevm.xml").write_text(snapshot_xml(
        "savevm", 1700000000, [("vda", "internal", None), ("vdb", "internal", None)], dom,
        memory="internal", state="running"))
    overlays = disk_only_snapshot(tops, "ext1")
    (snaps / "ext1.xml").write_text(snapshot_xml(
        "ext1", 1700000100, [(d, "external", overlays[d]) for d in overlays], dom))
    domain = tmp_path / "db.xml"
    domain.write_text(domain_xml("db", [file_disk(d, overlays[d]) for d in overlays]))
    result = snapfs("vm", "add", store, "db", "--libvirt", domain, "--libvirt-snapshots", snaps)
    assert "savevm.xml: skipped snapshot 'savevm': an internal snapshot" in result.stderr
    m = manifest(store, "db")
    assert [(s["name"], sorted(s["volumes"])) for s in m["snapshots"]] == [
        ("savevm", ["vda", "vdb"]), ("ext1", ["vda", "vdb"])]
    v = views(store, "db")
    for disk, top in tops.items():
        out = tmp_path / f"{disk}-savevm.raw"
        qemu_img("convert", "-O", "raw", "-l", "snapshot.name=savevm", top, out)
        assert v["savevm"][disk] == out.read_bytes()
        assert v["ext1"][disk] == to_raw(top)
        assert v["active"][disk] == to_raw(overlays[disk])


def test_backing_format_from_backing_store(tmp_path, store):
    """An overlay that does not record its backing format (old libvirt):
    <backingStore><format> gives it; without that, the import refuses."""
    built = build_web01(tmp_path / "libvirt", shareable=False)
    top = built.views["active"]["vda"]
    below = built.views["nightly"]["vda"]
    set_tail(top, str(below).encode(), None)
    domain = tmp_path / "vda.xml"
    domain.write_text(domain_xml("web01", [file_disk("vda", top)]))
    result = snapfs("vm", "add", store, "web01", "--libvirt", domain, check=False)
    assert result.returncode == 1 and "backing format" in result.stderr
    domain.write_text(domain_xml("web01", [file_disk("vda", top, chain=[below],
                                                     complete=False)]))
    snapfs("vm", "add", store, "web01", "--libvirt", domain)
    assert views(store, "web01")["active"]["vda"] == to_raw(built.views["active"]["vda"])


def test_absolute_backing_names(tmp_path):
    """An absolute backing name is followed inside the top's directory, or
    to a file the domain XML lists; never elsewhere, and never without
    the caller asking (plain --disk)."""
    outside = tmp_path / "templates"
    outside.mkdir()
    base = make_image(outside / "base.qcow2")
    images = tmp_path / "images"
    images.mkdir()
    top = make_image(images / "vm.qcow2", backing=base)
    with pytest.raises(UnsafeBacking, match="is absolute"):
        discover_chain(top)
    with pytest.raises(UnsafeBacking, match="not in the chain the domain XML lists"):
        discover_chain(top, listed={})
    layers = discover_chain(top, listed={str(base.resolve()): "qcow2"})
    assert [layer.path for layer in layers] == [str(base), str(top)]
    near = make_image(images / "near.qcow2", backing=top)
    with pytest.raises(UnsafeBacking, match="not in the chain"):
        discover_chain(near, listed={})
    inner = make_image(images / "inner.qcow2")
    assert len(discover_chain(make_image(images / "o.qcow2", backing=inner), listed={})) == 2


# -- errors ---------------------------------------------------------------------

def _billion_laughs(path):
    path.write_text("<?xml version='1.0'?>\n<!DOCTYPE domain [\n"
                    " <!ENTITY a 'aaaaaaaaaa'>\n <!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;'>\n]>\n"
                    "<domain type='kvm'><name>&b;</name></domain>\n")


def _replace(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _not_in_chain(built, tmp):
    # A branch: an overlay made on pre-upgrade that the domain never ran.
    branch = make_image(built.domain.parent / "images" / "web01.branch",
                        backing=built.views["nightly"]["vda"])
    _replace(built.snapshots / "nightly.xml", str(built.views["active"]["vda"]), str(branch))


def _not_a_block_device(built, tmp):
    fake = tmp / "fake-lun"
    fake.write_bytes(bytes(4096))
    _replace(built.domain, "<disk type='network'",
             block_disk("vdc", fake) + "\n<disk type='network'")


def _duplicate_target(built, tmp):
    _replace(built.domain, "<target dev='vdd'", "<target dev='vdb'")


def _external_entity(built, tmp):
    text = (built.snapshots / "nightly.xml").read_text()
    (built.snapshots / "nightly.xml").write_text(
        "<!DOCTYPE domainsnapshot [<!ENTITY e SYSTEM 'file:///etc/passwd'>]>\n"
        + text.replace("<description>nightly", "<description>&e;"))


ERRORS = {
    # case: (change, file that the error names, element or words it names)
    "malformed domain": (lambda b, t: b.domain.write_text(b.domain.read_text()[:-30]),
                         "web01.xml", "malformed XML"),
    "malformed snapshot": (lambda b, t: _replace(b.snapshots / "nightly.xml", "</name>", "</nam>"),
                           "nightly.xml", "malformed XML: mismatched tag"),
    "missing disk file": (lambda b, t: b.views["active"]["vdb"].unlink(),
                          "web01.xml", "<target dev='vdb'>: <source file="),
    "overlay not in chain": (_not_in_chain, "nightly.xml",
                             "<disk name='vda' snapshot='external'><source file="),
    "LUN not a block device": (_not_a_block_device, "web01.xml",
                               "<disk type='block' device='disk'> with <target dev='vdc'>"),
    "duplicate target": (_duplicate_target, "web01.xml", "<target dev='vdb'>: two disks"),
    "another domain's name": (lambda b, t: _replace(b.snapshots / "nightly.xml",
                                                    "<name>web01</name>", "<name>db01</name>"),
                              "nightly.xml", "<domain><name>db01</name>"),
    "another domain's uuid": (lambda b, t: _replace(b.snapshots / "pre-upgrade.xml",
                                                    "<uuid>4dea22b3", "<uuid>5dea22b3"),
                              "pre-upgrade.xml", "<domain><uuid>5dea22b3"),
    "entity expansion": (lambda b, t: _billion_laughs(b.domain), "web01.xml",
                         "refused XML: a <!DOCTYPE>"),
    "external entity": (_external_entity, "nightly.xml", "refused XML: a <!DOCTYPE>"),
    "two snapshots of one name": (lambda b, t: _replace(b.snapshots / "nightly.xml",
                                                        "<name>nightly</name>",
                                                        "<name>pre-upgrade</name>"),
                                  "nightly.xml", "<name>pre-upgrade</name>"),
}


@pytest.mark.parametrize("move", [False, True], ids=["copy", "move"])
@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, store, case, move):
    snapfs("vm", "add", store, "other", "--disk", "sda=1M")
    built = build_web01(tmp_path / "libvirt")
    change, file, element = ERRORS[case]
    change(built, tmp_path)
    sources = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in built.sources
               if p.exists()}
    vms = sorted(os.listdir(store / "vms"))
    result = add(store, built, *(["--move"] if move else []), check=False)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("snapfs: error:")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr
    assert file in errors[0] and element in errors[0], errors[0]
    assert sorted(os.listdir(store / "vms")) == vms
    assert not (store / "shared").exists() or os.listdir(store / "shared") == []
    assert "ok: 1 VM(s)" in snapfs("check", store).stdout
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sources} == sources


def test_option_combinations(tmp_path, store):
    built = build_web01(tmp_path / "libvirt", shareable=False)
    r = snapfs("vm", "add", store, "x", "--libvirt-snapshots", built.snapshots, check=False)
    assert r.returncode == 1 and "--libvirt-snapshots needs --libvirt" in r.stderr
    r = snapfs("vm", "add", store, "x", "--libvirt", built.domain, "--disk", "sdz=1M",
               check=False)
    assert r.returncode == 1 and "no --disk, --lun or --shareable" in r.stderr
    not_a_domain = tmp_path / "snap.xml"
    shutil.copy(built.snapshots / "nightly.xml", not_a_domain)
    r = snapfs("vm", "add", store, "x", "--libvirt", not_a_domain, check=False)
    assert r.returncode == 1 and "<domainsnapshot>: not a domain XML" in r.stderr
    assert os.listdir(store / "vms") == []
