"""Self-test of scripts/ext4chain.py: partitioned ext4 disks as a qcow2 chain of versions."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ext4chain.py"
_spec = importlib.util.spec_from_file_location("ext4chain", SCRIPT)
ext4chain = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("ext4chain", ext4chain)
_spec.loader.exec_module(ext4chain)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="loop mounts need root"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in (*ext4chain.TOOLS, "losetup", "mount")),
                       reason="needs e2fsprogs, sfdisk, sgdisk, qemu-img, losetup"),
]
CLUSTER = 64 << 10


def run(*cmd: str | Path, **kw) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw).stdout


def loops_on(directory: Path) -> list[str]:
    """Lines of `losetup -a` for loop devices whose backing file lies under `directory`."""
    return [line for line in run("losetup", "-a").splitlines() if str(directory) in line]


@pytest.fixture(scope="module", params=["mbr", "gpt"])
def chain(request, tmp_path_factory):
    outdir = tmp_path_factory.mktemp(f"chain-{request.param}")
    layers = ext4chain.build_ext4_chain(outdir, request.param, keep_raw=True)
    return request.param, outdir, layers


def test_layers_are_named_and_chained(chain):
    table, outdir, layers = chain
    assert [p.name for p in layers] == ["base.qcow2", "v2.qcow2", "v3.qcow2"]
    info = json.loads(run("qemu-img", "info", "--backing-chain", "--output=json", layers[-1]))
    assert [entry.get("backing-filename") for entry in info] == ["v2.qcow2", "base.qcow2", None]
    assert not list(outdir.glob(".ext4chain-*")), "work directory left behind"


def test_partition_tables(chain):
    table, outdir, _ = chain
    layout = ext4chain.partition_layout(table)
    assert layout[0][1] == ext4chain.partition1_offset(table) == 1 << 20
    for k in (1, 2, 3):
        pt = json.loads(run("sfdisk", "--json", outdir / f"v{k}.raw"))["partitiontable"]
        got = {int(p["node"].rsplit("raw", 1)[1]): (p["start"] * 512, p["size"] * 512, p["type"])
               for p in pt["partitions"]}
        if table == "mbr":
            assert pt["label"] == "dos"
            want = {num: (off, size, "83") for num, off, size, _ in layout}
            want[3] = (layout[2][1] - (1 << 20), layout[2][2] + (1 << 20), "5")  # extended holds p5
            assert sorted(got) == [1, 2, 3, 5]
        else:
            assert pt["label"] == "gpt"
            assert [p["name"] for p in pt["partitions"]] == ["vmroot", "data", "logs"]
            linux = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
            want = {num: (off, size, linux) for num, off, size, _ in layout}
        assert got == want


def test_partition_contents_via_loop(chain):
    table, outdir, _ = chain
    assert loops_on(outdir) == []
    for k, tree in enumerate(ext4chain.DEFAULT_VERSIONS, start=1):
        raw = outdir / f"v{k}.raw"
        (_, root_off, root_size, _), (_, data_off, data_size, _), (_, logs_off, logs_size, _) = \
            ext4chain.partition_layout(table)
        assert ext4chain.read_tree_via_loop(raw, ext4chain.partition1_offset(table), root_size) == tree
        assert ext4chain.read_tree_via_loop(raw, data_off, data_size) == ext4chain.DATA_TREE
        assert ext4chain.read_tree_via_loop(raw, logs_off, logs_size) == ext4chain.logs_tree(k)
    assert loops_on(outdir) == []


def test_each_layer_equals_its_raw_disk(chain, tmp_path):
    _, outdir, layers = chain
    for k, layer in enumerate(layers, start=1):
        flat = tmp_path / f"flat{k}.raw"
        run("qemu-img", "convert", "-O", "raw", layer, flat)
        assert flat.read_bytes() == (outdir / f"v{k}.raw").read_bytes(), f"{layer.name} != v{k}.raw"


def test_overlays_hold_only_changed_clusters(chain):
    _, outdir, layers = chain
    for k in (2, 3):
        old, new = (outdir / f"v{k - 1}.raw").read_bytes(), (outdir / f"v{k}.raw").read_bytes()
        changed = {off for off in range(0, len(new), CLUSTER) if old[off:off + CLUSTER] != new[off:off + CLUSTER]}
        mapping = json.loads(run("qemu-img", "map", "--output=json", layers[k - 1]))
        own = {off for m in mapping if m["depth"] == 0
               for off in range(m["start"], m["start"] + m["length"], CLUSTER)}
        assert own == changed
        assert layers[k - 1].stat().st_size < layers[0].stat().st_size / 2


def test_output_is_deterministic(chain, tmp_path):
    table, outdir, layers = chain
    again = ext4chain.build_ext4_chain(tmp_path, table)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in layers]
    assert not list(tmp_path.glob("*.raw")), "raw disks should be deleted without keep_raw"


def test_custom_versions_with_top_level_changes(tmp_path):
    versions = [{"a.txt": b"one\n", "d/e/f.txt": b"deep\n"},
                {"b.txt": b"two\n", "d/g.txt": b"moved\n"},
                {}]
    layers = ext4chain.build_ext4_chain(tmp_path, "mbr", versions, disk_size=24 << 20, keep_raw=True)
    assert len(layers) == 3
    _, off, size, _ = ext4chain.partition_layout("mbr", 24 << 20)[0]
    for k, tree in enumerate(versions, start=1):
        assert ext4chain.read_tree_via_loop(tmp_path / f"v{k}.raw", off, size) == tree
    assert loops_on(tmp_path) == []


def test_read_tree_via_loop_detaches_on_failure(tmp_path):
    junk = tmp_path / "junk.img"
    junk.write_bytes(bytes(1 << 20))
    with pytest.raises(ext4chain.ChainBuildError, match="mount"):
        ext4chain.read_tree_via_loop(junk)
    assert loops_on(tmp_path) == []


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(ValueError, match="table"):
        ext4chain.build_ext4_chain(tmp_path, "bsd")
    with pytest.raises(ValueError, match="at least 19 MiB"):
        ext4chain.partition_layout("gpt", 16 << 20)


def test_command_line(tmp_path):
    out = run(sys.executable, SCRIPT, tmp_path / "demo", "--size", "24M")
    assert "chain ok: base.qcow2 <- v2.qcow2 <- v3.qcow2" in out
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["base.qcow2", "v2.qcow2", "v3.qcow2"]
    bad = subprocess.run([sys.executable, SCRIPT, tmp_path / "x", "--size", "8M"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("ext4chain: error: disk size")
