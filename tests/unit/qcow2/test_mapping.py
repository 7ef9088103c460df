"""Extent maps against `qemu-img map --output=json`: the per-image runs and
the merged map of whole chains (depth, host offset, zero/data/compressed)."""

from hypothesis import given, settings

from snapfs.store.chain import Chain, VolumeRef
from snapfs.qcow2.mapping import COMPRESSED, DATA, ZERO
from snapfs.store.volume import VolumePool
from tests.support.chains import build_chain, chain_specs
from tests.support.qemu import map_json, qemu_img, qemu_io


def _qemu_segments(top):
    """[(start, end, kind, depth, offset)] from qemu-img map; unallocated
    everywhere reads as zeros, like an explicit zero."""
    out = []
    for e in map_json(top):
        if not e["data"]:
            out.append((e["start"], e["start"] + e["length"], ZERO, None, None))
        elif "offset" in e:
            out.append((e["start"], e["start"] + e["length"], DATA, e["depth"], e["offset"]))
        else:
            out.append((e["start"], e["start"] + e["length"], COMPRESSED, e["depth"], None))
    return out


def _our_segments(chain, paths):
    depth_of = {str(p): len(paths) - 1 - i for i, p in enumerate(paths)}
    out = []
    for i, (start, length, kind, path) in enumerate(chain.extents()):
        if kind == ZERO:
            out.append((start, start + length, ZERO, None, None))
        elif kind == DATA:
            out.append((start, start + length, DATA, depth_of[path], chain.hosts[i]))
        else:
            out.append((start, start + length, COMPRESSED, depth_of[path], None))
    return out


def _split(segments, cuts):
    """Cut segments at every boundary in ``cuts``; data offsets follow."""
    result = []
    for start, end, kind, depth, offset in segments:
        points = [start] + [c for c in cuts if start < c < end] + [end]
        for a, b in zip(points, points[1:]):
            off = offset + (a - start) if offset is not None else None
            result.append((a, b, kind, depth, off))
    return result


def assert_same_map(chain, paths):
    ours, theirs = _our_segments(chain, paths), _qemu_segments(paths[-1])
    cuts = sorted({s for s, *_ in ours} | {s for s, *_ in theirs})
    assert _split(ours, cuts) == _split(theirs, cuts)


def test_single_image_runs(tmp_path):
    path = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", path, "1M")
    qemu_io(path, "write -P 1 0 12k", "write -z 64k 8k", "write -c -P 3 128k 4k",
            "write -P 4 200k 4k", "discard 4k 4k", fmt="qcow2")
    pool = VolumePool()
    chain = Chain(pool, [VolumeRef(str(path), "qcow2")])
    assert_same_map(chain, [path])
    pool.close()


def test_extended_l2_subclusters(tmp_path):
    path = tmp_path / "x.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", path, "4M")
    qemu_io(path, "write -P 1 0 4k", "write -z 8k 4k", "write -P 2 40k 2k",
            "write -c -P 3 1M 64k", "write -z 2M 64k", fmt="qcow2")
    pool = VolumePool()
    chain = Chain(pool, [VolumeRef(str(path), "qcow2")])
    assert_same_map(chain, [path])
    pool.close()


# qemu-img map reports a raw file's holes as zeros while snapfs maps a raw
# base as one data extent; raw bases are covered by the byte oracle
# (tests/mount/test_oracle.py).
@settings(max_examples=25)
@given(spec=chain_specs().filter(lambda s: not s.raw_base))
def test_merged_map_matches_qemu_img_map(tmp_path_factory, spec):
    directory = tmp_path_factory.mktemp("chain")
    built = build_chain(spec, directory)
    pool = VolumePool()
    try:
        chain = Chain(pool, [VolumeRef(str(p), f) for p, f in zip(built.layers, built.formats)])
        assert_same_map(chain, built.layers)
    finally:
        pool.close()
