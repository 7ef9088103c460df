"""Acceptance 2: a partitioned ext4 disk in three versions (MBR and GPT),
imported as a chain.  Loop-mounting a snapshot's partition view shows that
version's files; the active view shows the newest, compared file by file."""

import os

import pytest

from ext4chain import DATA_TREE, DEFAULT_VERSIONS, build_ext4_chain, logs_tree, partition_layout
from tests.support.mounting import loop_mounted, mounted, read_tree, snapfs
from tests.support.qemu import to_raw


@pytest.mark.parametrize("table", ["mbr", "gpt"])
def test_snapshot_partitions_show_old_files(tmp_path, store, table):
    layers = build_ext4_chain(tmp_path / "src", table=table)
    snapfs("vm", "add", store, "web", "--disk", f"sda={layers[-1]}", "--disk", "scratch=8M")
    names = [p.stem for p in layers[:-1]]            # base, v2
    logs_number = 5 if table == "mbr" else 3
    expected_parts = {f"sda-part{n}.raw" for n in (1, 2, logs_number)}
    layout = {number: (offset, size) for number, offset, size, _ in partition_layout(table)}

    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "web"
        assert sorted(os.listdir(vm / "snapshots")) == sorted(names + ["latest"])
        assert os.readlink(vm / "snapshots" / "latest") == names[-1]
        views = [vm / "snapshots" / n for n in names] + [vm / "active"]
        for version, view in enumerate(views):
            listing = set(os.listdir(view))
            assert expected_parts <= listing
            assert "scratch.raw" in listing
            for number, (offset, size) in layout.items():
                assert os.path.getsize(view / f"sda-part{number}.raw") == size
            # The partition view is exactly the disk's byte range.
            with open(view / "sda.raw", "rb") as disk, open(view / "sda-part1.raw", "rb") as part:
                disk.seek(layout[1][0])
                assert disk.read(1 << 20) == part.read(1 << 20)
            with loop_mounted(view / "sda-part1.raw", tmp_path / f"p1-{version}") as m:
                assert read_tree(m) == DEFAULT_VERSIONS[version]
            with loop_mounted(view / f"sda-part{logs_number}.raw", tmp_path / f"p5-{version}") as m:
                assert read_tree(m) == logs_tree(version + 1)
            with loop_mounted(view / "sda-part2.raw", tmp_path / f"p2-{version}") as m:
                assert read_tree(m) == DATA_TREE
        # The whole disk equals qemu's reading of the same layer.
        for name, layer in zip(names, layers):
            with open(vm / "snapshots" / name / "sda.raw", "rb") as f:
                assert f.read() == to_raw(layer)
        # Old and new really differ, so the comparison above means something.
        assert DEFAULT_VERSIONS[0]["var/www/index.html"] != DEFAULT_VERSIONS[-1]["var/www/index.html"]
        assert (vm / "snapshots" / names[0] / "snapshot.json").read_bytes().startswith(b"{")
