"""Fuzz the qcow2 parser: damaged copies of real images either open and
read, or fail with a snapfs error naming the file; never another exception,
and never a read past what the map allows."""

import os
import shutil

import pytest
from hypothesis import given, settings, strategies as st

from snapfs.store.chain import Chain, VolumeRef
from snapfs.errors import SnapfsError
from snapfs.qcow2.image import Qcow2Image
from snapfs.store.volume import VolumePool
from tests.support.qemu import qemu_img, qemu_io

SEEDS = {
    "v2": ("compat=0.10,cluster_size=4096", ["write -P 1 0 64k", "write -P 2 1M 8k"]),
    "v3-extl2": ("extended_l2=on,cluster_size=65536",
                 ["write -P 1 0 4k", "write -z 64k 4k", "write -c -P 3 128k 64k"]),
    "zstd": ("compression_type=zstd,cluster_size=512",
             ["write -c -P 4 0 4k", "write -P 5 8k 512"]),
}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    directory = tmp_path_factory.mktemp("seeds")
    paths = {}
    for name, (opts, ops) in SEEDS.items():
        path = directory / f"{name}.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", opts, path, "2M")
        qemu_io(path, *ops, fmt="qcow2")
        if name == "v2":
            qemu_img("snapshot", "-c", "s1", path)
        paths[name] = path
    return paths


def exercise(path):
    """Everything snapfs does with an image; only SnapfsError may escape."""
    try:
        with Qcow2Image(path) as img:
            img.internal_snapshots()
            img.runs()
        pool = VolumePool()
        try:
            chain = Chain(pool, [VolumeRef(str(path), "qcow2")])
            for offset in (0, chain.size // 2, max(0, chain.size - 4096)):
                data = chain.read(offset, 1 << 20)
                assert len(data) == min(1 << 20, max(0, chain.size - offset))
        finally:
            pool.close()
    except SnapfsError as e:
        assert str(path) in str(e)


@settings(max_examples=300)
@given(seed=st.sampled_from(sorted(SEEDS)),
       edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)),
                      min_size=1, max_size=12),
       in_metadata=st.booleans())
def test_damaged_images_fail_cleanly(seeds, tmp_path_factory, seed, edits, in_metadata):
    path = tmp_path_factory.mktemp("fuzz") / "x.qcow2"
    shutil.copyfile(seeds[seed], path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for offset, value in edits:
            # Half the examples hit the header cluster, where damage matters most.
            f.seek(offset % (512 if in_metadata else size))
            f.write(bytes([value]))
    exercise(path)


@settings(max_examples=100)
@given(head=st.binary(min_size=0, max_size=600))
def test_random_headers(tmp_path_factory, head):
    path = tmp_path_factory.mktemp("fuzz") / "h.qcow2"
    path.write_bytes(b"QFI\xfb" + head)
    exercise(path)
