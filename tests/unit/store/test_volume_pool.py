"""VolumePool: opening outside its lock, forget() racing an open, and a
volume's own answer to "does a read here fall through?"."""

import pytest

from snapfs.store import volume
from snapfs.store.volume import VolumePool
from tests.support.qemu import qemu_img, qemu_io

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    """A 4 MiB qcow2 (64 KiB clusters) with data at 0, zeroes at 1 MiB and
    nothing else."""
    path = tmp_path / "layer.qcow2"
    qemu_img("create", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -P 7 0 4k", "write -z 1M 64k", fmt="qcow2")
    return path


def opening_with(monkeypatch, during_open):
    """Make open_volume call ``during_open()`` (once) before it opens: what
    another thread might do while this one reads a header."""
    real_open = volume.open_volume
    calls = []

    def open_volume(path, fmt):
        calls.append(path)
        if len(calls) == 1:
            during_open()
        return real_open(path, fmt)

    monkeypatch.setattr(volume, "open_volume", open_volume)
    return calls


def test_forget_during_open_is_not_undone(monkeypatch, image, tmp_path):
    pool = VolumePool()
    calls = opening_with(monkeypatch, lambda: pool.forget(str(tmp_path)))
    raced = pool.get(image, "qcow2")
    # The caller gets a volume, but it may predate the change that forget()
    # announced: the next get opens the file again.
    again = pool.get(image, "qcow2")
    assert again is not raced and len(calls) == 2
    assert pool.get(image, "qcow2") is again and len(calls) == 2
    raced.close()
    pool.close()


def test_an_open_that_no_forget_overlaps_is_cached(monkeypatch, image):
    pool = VolumePool()
    calls = opening_with(monkeypatch, lambda: None)
    first = pool.get(image, "qcow2")
    assert pool.get(image, "qcow2") is first and len(calls) == 1
    pool.close()


def test_two_opens_of_one_volume_share_the_first_inserted(monkeypatch, image):
    pool = VolumePool()
    inner = []
    # While this open reads the header, another caller opens and caches the
    # same file: this one must close its own and share the cached volume.
    opening_with(monkeypatch, lambda: inner.append(pool.get(image, "qcow2")))
    outer = pool.get(image, "qcow2")
    assert outer is inner[0]
    assert pool.get(image, "qcow2") is outer
    pool.close()


def test_runs_of_a_forgotten_volume_are_not_cached(image, tmp_path):
    pool = VolumePool()
    old = pool.get(image, "qcow2")
    pool.forget(str(tmp_path))
    # A chain that still holds the forgotten volume asks for its runs...
    assert all(start != 2 * MiB for start, *_ in pool.runs(old))
    qemu_io(image, "write -P 9 2M 64k", fmt="qcow2")
    # ...and the file, changed since, is opened again: it must not be
    # handed the old volume's runs, cached under the same path.
    new = pool.get(image, "qcow2")
    assert any(start == 2 * MiB for start, *_ in pool.runs(new))
    old.close()
    pool.close()


def test_runs_are_cached_per_open_volume(image):
    pool = VolumePool()
    vol = pool.get(image, "qcow2")
    assert pool.runs(vol) is pool.runs(vol)
    pool.close()


def test_defines_any_follows_the_l2_entries(image):
    pool = VolumePool()
    vol = pool.get(image, "qcow2")
    assert vol.defines_any([(0, 512)])                   # data
    assert vol.defines_any([(MiB + 512, 512)])           # a zero cluster: no fall-through
    assert not vol.defines_any([(64 << 10, 512), (2 * MiB, 4096)])
    assert not vol.defines_any([(4 * MiB, 512)])         # past the end: nothing to read
    assert vol.defines_any([(2 * MiB, 4096), (60 << 10, 8 << 10)])   # one of several
    # The same answers as the runs it would otherwise compute.
    defined = [(s, n) for s, n, *_ in pool.runs(vol)]
    assert defined == [(0, 64 << 10), (MiB, 64 << 10)]
    pool.close()


def test_defines_any_of_an_empty_overlay_is_false(tmp_path, image):
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", image.name, "-F", "qcow2", top, cwd=tmp_path)
    pool = VolumePool()
    assert not pool.get(top, "qcow2").defines_any([(0, 512), (MiB, 4096)])
    pool.close()


def test_a_raw_volume_defines_all_it_holds(tmp_path):
    raw = tmp_path / "base.raw"
    raw.write_bytes(bytes(4096))
    pool = VolumePool()
    vol = pool.get(raw, "raw")
    assert vol.defines_any([(0, 512)])
    assert not vol.defines_any([(4096, 512)])
    pool.close()


# --------------------------------------------------------------------------
# ClusterCache: prefixes of clusters

def test_cluster_cache_inflates_a_prefix_first_then_the_whole_cluster(tmp_path):
    """A first small read inflates only what it needs; a read beyond it
    inflates the whole cluster; both match qemu-img's bytes."""
    from snapfs.store.volume import ClusterCache, Qcow2Volume
    from snapfs.qcow2.mapping import COMPRESSED
    from tests.support import qemu

    raw = tmp_path / "data.raw"
    raw.write_bytes(b"".join(bytes([i]) * 4096 for i in range(1, 17)) * 4)   # 256 KiB
    image = tmp_path / "c.qcow2"
    qemu.qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=65536", str(raw), str(image))
    expected = qemu.to_raw(image)
    vol = Qcow2Volume(str(image))
    vol.token = 1
    try:
        compressed = [r for r in vol.runs() if r[2] == COMPRESSED]
        assert compressed, "qemu-img stored no compressed cluster"
        guest, _, _, host, nbytes = compressed[0]
        cache = ClusterCache()
        assert cache.peek(vol, host, 1) is None
        head = cache.get(vol, host, nbytes, 8192)
        assert len(head) == 8192 and head == expected[guest:guest + 8192]
        assert cache.peek(vol, host, 8192) == head
        assert cache.peek(vol, host, 8193) is None          # not inflated that far
        whole = cache.get(vol, host, nbytes, 8193)
        assert len(whole) == 65536 and whole == expected[guest:guest + 65536]
        assert cache.used == 65536
        assert cache.get(vol, host, nbytes, 100) is whole   # served from the cache
    finally:
        vol.close()
