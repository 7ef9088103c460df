"""Self-test of the qcow2 chain builder used as the oracle (tests/support)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # make `tests` importable

from tests.support import qemu  # noqa: E402
from tests.support.chains import (  # noqa: E402
    COMPRESSED, DISCARD, KiB, WRITE, ZERO, ZERO_UNMAP,
    ChainSpec, LayerSpec, Op, QcowOptions, build_chain, chain_specs, expected_views,
)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=chain_specs())
def test_random_chains_build_and_convert(spec: ChainSpec, tmp_path_factory) -> None:
    built = build_chain(spec, tmp_path_factory.mktemp("chain"))
    chain = qemu.info_chain(built.top)
    assert [Path(entry["filename"]).name for entry in chain] == \
        [path.name for path in reversed(built.layers)]
    assert [entry["format"] for entry in chain] == list(reversed(built.formats))
    for entry, layer in zip(chain, reversed(spec.layers)):
        assert entry["virtual-size"] == layer.virtual_size
    views = expected_views(built)
    for view, layer in zip(views, spec.layers):
        assert len(view) == layer.virtual_size
    assert len(views[-1]) == spec.layers[-1].virtual_size


def test_hand_written_chain(tmp_path: Path) -> None:
    """v3, 64 KiB clusters, zstd; 3 layers, the top larger than the middle."""
    spec = ChainSpec(
        compat="1.1", cluster_size=64 * KiB, compression_type="zstd",
        layers=[
            LayerSpec(256 * KiB, [Op(WRITE, 0, 256 * KiB, 0x11)]),
            LayerSpec(192 * KiB, [Op(COMPRESSED, 0, 128 * KiB, 0x22),
                                  Op(ZERO, 136 * KiB, 4 * KiB)]),
            LayerSpec(320 * KiB, [Op(DISCARD, 0, 64 * KiB),
                                  Op(WRITE, 96 * KiB, 4 * KiB, 0x33),
                                  Op(ZERO_UNMAP, 144 * KiB, 8 * KiB),
                                  Op(WRITE, 300 * KiB, 4 * KiB, 0x44)]),
        ])
    built = build_chain(spec, tmp_path)
    assert [p.name for p in built.layers] == ["layer0.qcow2", "layer1.qcow2", "layer2.qcow2"]
    assert built.formats == ["qcow2"] * 3

    def fill(byte: int, kib: int) -> bytes:
        return bytes([byte]) * (kib * KiB)

    base = fill(0x11, 256)
    middle = fill(0x22, 128) + fill(0x11, 8) + fill(0, 4) + fill(0x11, 52)
    top = (fill(0, 64)                      # discarded over backing: zero cluster
           + fill(0x22, 32) + fill(0x33, 4) + fill(0x22, 28)   # COW from compressed
           + fill(0x11, 8) + fill(0, 4) + fill(0x11, 4)
           + fill(0, 8) + fill(0x11, 40)    # zero write -u
           + fill(0, 108)                   # beyond the middle's end: base hidden
           + fill(0x44, 4) + fill(0, 16))
    assert expected_views(built) == [base, middle, top]
    assert qemu.check(built.layers[1])["compressed-clusters"] == 2


def test_raw_base_and_snapshot(tmp_path: Path) -> None:
    """A raw base under a qcow2 overlay holding an internal snapshot."""
    spec = ChainSpec(
        raw_base=True, refcount_bits=2, cluster_size=4 * KiB,
        layers=[
            LayerSpec(64 * KiB, [Op(WRITE, 0, 64 * KiB, 0x55)]),
            LayerSpec(64 * KiB, [Op(WRITE, 0, 8 * KiB, 0x66),
                                 Op(WRITE, 4 * KiB, 1 * KiB, 0x77)], snapshot_after=1),
        ])
    built = build_chain(spec, tmp_path)
    assert [p.name for p in built.layers] == ["layer0.raw", "layer1.qcow2"]
    assert built.formats == ["raw", "qcow2"]
    top_info = qemu.info(built.top)
    assert [s["name"] for s in top_info["snapshots"]] == ["snap1"]
    assert top_info["backing-filename"] == "layer0.raw"
    assert top_info["backing-filename-format"] == "raw"
    expected = (bytes([0x66]) * 4 * KiB + bytes([0x77]) * KiB
                + bytes([0x66]) * 3 * KiB + bytes([0x55]) * 56 * KiB)
    assert expected_views(built) == [bytes([0x55]) * 64 * KiB, expected]


def test_compressed_write_after_freeing_a_compressed_cluster(tmp_path: Path) -> None:
    """Regression for the QEMU 7.2 stale compressed-cluster bug (see _sessions)."""
    spec = ChainSpec(cluster_size=4 * KiB, layers=[LayerSpec(64 * KiB, [
        Op(COMPRESSED, 0, 4 * KiB, 1), Op(WRITE, 0, 4 * KiB, 2),
        Op(WRITE, 8 * KiB, 4 * KiB, 3), Op(COMPRESSED, 16 * KiB, 4 * KiB, 4)])])
    view, = expected_views(build_chain(spec, tmp_path))
    assert view == (bytes([2]) * 4 * KiB + bytes(4 * KiB) + bytes([3]) * 4 * KiB
                    + bytes(4 * KiB) + bytes([4]) * 4 * KiB + bytes(44 * KiB))


@pytest.mark.parametrize("options, key, value", [
    (QcowOptions(extended_l2=True), "extended-l2", True),
    (QcowOptions(compression_type="zstd"), "compression-type", "zstd"),
    (QcowOptions(refcount_bits=1, cluster_size=512), "refcount-bits", 1),
    (QcowOptions(refcount_bits=64, cluster_size=2048 * KiB), "refcount-bits", 64),
    (QcowOptions(compat="0.10"), "compat", "0.10"),
])
def test_requested_options_reach_the_image(tmp_path, options, key, value) -> None:
    spec = ChainSpec(layers=[LayerSpec(128 * KiB, [Op(WRITE, 0, 4 * KiB, 1)]),
                             LayerSpec(128 * KiB, [], options=options)])
    built = build_chain(spec, tmp_path)
    top = qemu.info(built.top)
    assert top["format-specific"]["data"][key] == value
    assert top["cluster-size"] == options.cluster_size


def test_invalid_specs_are_rejected() -> None:
    with pytest.raises(ValueError):
        QcowOptions(compat="0.10", compression_type="zstd").validate()
    with pytest.raises(ValueError):
        QcowOptions(extended_l2=True, cluster_size=8 * KiB).validate()
    with pytest.raises(ValueError):
        ChainSpec(layers=[LayerSpec(128 * KiB, [Op(COMPRESSED, 0, 32 * KiB, 1)])]).validate()


def _has(spec: ChainSpec, predicate) -> bool:
    return any(predicate(spec, i, layer) for i, layer in enumerate(spec.layers)
               if not spec.is_raw(i))


FEATURES = {
    "v2 layer": lambda s, i, l: s.options_for(i).compat == "0.10",
    "extended L2": lambda s, i, l: s.options_for(i).extended_l2,
    "zstd": lambda s, i, l: s.options_for(i).compression_type == "zstd",
    "refcount_bits=1": lambda s, i, l: s.options_for(i).refcount_bits == 1,
    "refcount_bits=64": lambda s, i, l: s.options_for(i).refcount_bits == 64,
    "512 B clusters": lambda s, i, l: s.options_for(i).cluster_size == 512,
    "2 MiB clusters": lambda s, i, l: s.options_for(i).cluster_size == 2048 * KiB,
    "mixed cluster sizes": lambda s, i, l: i > 0 and not s.is_raw(i - 1)
        and s.options_for(i).cluster_size != s.options_for(i - 1).cluster_size,
    "qcow2 over raw": lambda s, i, l: i == 1 and s.raw_base,
    "grows over parent": lambda s, i, l: i > 0
        and l.virtual_size > s.layers[i - 1].virtual_size,
    "shrinks under parent": lambda s, i, l: i > 0
        and l.virtual_size < s.layers[i - 1].virtual_size,
    "unaligned size": lambda s, i, l: l.virtual_size % s.options_for(i).cluster_size,
    "snapshot": lambda s, i, l: l.snapshot_after is not None,
    "compressed write": lambda s, i, l: any(o.kind == COMPRESSED for o in l.ops),
    "partial compressed tail": lambda s, i, l: any(
        o.kind == COMPRESSED and o.length % s.options_for(i).cluster_size for o in l.ops),
    "write": lambda s, i, l: any(o.kind == WRITE for o in l.ops),
    "zero write": lambda s, i, l: any(o.kind == ZERO for o in l.ops),
    "zero unmap": lambda s, i, l: any(o.kind == ZERO_UNMAP for o in l.ops),
    "discard": lambda s, i, l: any(o.kind == DISCARD for o in l.ops),
}


def test_strategy_covers_every_feature() -> None:
    """Every feature is produced by chain_specs() (specs only, nothing built)."""
    seen: set[str] = set()

    @settings(max_examples=300, database=None, derandomize=True,
              phases=[Phase.generate], deadline=None)
    @given(spec=chain_specs())
    def collect(spec: ChainSpec) -> None:
        spec.validate()
        seen.update(name for name, pred in FEATURES.items() if _has(spec, pred))

    collect()
    assert set(FEATURES) - seen == set()
