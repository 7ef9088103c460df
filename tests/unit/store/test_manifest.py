"""Manifest.chains and Manifest.chain against a plain walk of the parents:
the same chains and the same refusals, for random trees of volumes."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapfs.errors import StoreError
from snapfs.store.manifest import MAX_CHAIN_DEPTH, Manifest


def _manifest(parents):
    volumes = {vid: {"parent": parent, "format": "qcow2"} for vid, parent in parents.items()}
    return Manifest(name="vm", id="id", created="", disks=["sda"], volumes=volumes,
                    snapshots=[], active={}, path="manifest.json")


def _walk(parents, vid):
    """The chain base first, or StoreError for a loop, an unknown volume
    or more than MAX_CHAIN_DEPTH volumes."""
    ids = []
    while vid is not None:
        if vid not in parents or vid in ids or len(ids) == MAX_CHAIN_DEPTH:
            return StoreError
        ids.append(vid)
        vid = parents[vid]
    return tuple(reversed(ids))


@st.composite
def trees(draw):
    """Volumes v0..vN, each with an earlier volume (or none) as parent, and
    sometimes a loop, a missing parent, or a chain deeper than allowed."""
    n = draw(st.integers(1, 40))
    parents = {}
    for i in range(n):
        parent = draw(st.none() | st.integers(0, max(0, i - 1)))
        parents[f"v{i}"] = None if parent is None or i == 0 else f"v{parent}"
    damage = draw(st.sampled_from(["none", "loop", "missing", "deep"]))
    if damage == "loop":
        a, b = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
        parents[f"v{a}"] = f"v{b}"
    elif damage == "missing":
        parents[f"v{draw(st.integers(0, n - 1))}"] = "gone"
    elif damage == "deep":
        for i in range(MAX_CHAIN_DEPTH + 1):
            parents[f"d{i}"] = f"d{i - 1}" if i else None
    return parents


@given(trees(), st.data())
def test_chains_agree_with_chain(parents, data):
    m = _manifest(parents)
    asked = data.draw(st.lists(st.sampled_from(sorted(parents)), max_size=10))
    expected = {vid: _walk(parents, vid) for vid in asked}
    for vid, chain in expected.items():
        if chain is StoreError:
            with pytest.raises(StoreError):
                m.chain(vid)
        else:
            assert tuple(m.chain(vid)) == chain
    if StoreError in expected.values():
        with pytest.raises(StoreError):
            m.chains(asked)
    else:
        assert m.chains(asked) == expected


def test_chain_at_the_depth_limit():
    parents = {f"d{i}": f"d{i - 1}" if i else None for i in range(MAX_CHAIN_DEPTH)}
    m = _manifest(parents)
    top = f"d{MAX_CHAIN_DEPTH - 1}"
    assert m.chains([top])[top] == tuple(m.chain(top)) == _walk(parents, top)
    m = _manifest(dict(parents, extra=top))
    # Asked after its parent, "extra" extends a chain already walked.
    for fn in (lambda: m.chain("extra"), lambda: m.chains(["extra"]),
               lambda: m.chains([top, "extra"])):
        with pytest.raises(StoreError):
            fn()
