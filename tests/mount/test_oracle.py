"""Acceptance 1: random chains built by qemu-img/qemu-io, imported and
mounted; every snapshot view and the active view must equal
`qemu-img convert -O raw` of the matching layer, read through the mount.
A layer's internal snapshot (``snapN``) is imported as a snapshot too, and
reads as ``qemu-img convert -l snapshot.name=snapN`` of its layer."""

import os

from hypothesis import given

from tests.support.chains import build_chain, chain_specs, expected_views
from tests.support.mounting import mounted, snapfs
from tests.support.qemu import check, is_clean, qemu_img



def _read_view(path, chunk=1 << 20):
    # Odd-sized reads too: FUSE requests then straddle extents.
    out = bytearray()
    with open(path, "rb") as f:
        while data := f.read(chunk if len(out) % 3 else 100_000):
            out += data
    return bytes(out)


# The profile decides the number of examples: 50 in CI ("ci"), 400 with
# SNAPFS_TEST_PROFILE=thorough (tests/conftest.py).
@given(spec=chain_specs())
def test_views_equal_qemu_convert(tmp_path_factory, spec):
    work = tmp_path_factory.mktemp("oracle")
    built = build_chain(spec, work / "src")
    expected = expected_views(built)
    store = work / "store"
    snapfs("init", store)
    snapfs("vm", "add", store, "vm", "--disk", f"sda={built.layers[-1]}")
    # Every qcow2 volume in the store still passes qemu-img check after the
    # backing names were rewritten.
    vm_dir = store / "vms" / "vm"
    for name in os.listdir(vm_dir):
        if name != "manifest.json" and (vm_dir / name).read_bytes()[:4] == b"QFI\xfb":
            report = check(vm_dir / name)
            assert is_clean(report), report
    snapshots = [layer.stem for layer in built.layers]
    if built.formats[-1] == "qcow2":
        snapshots = snapshots[:-1]          # the top qcow2 becomes the active leaf
    internal = {f"snap{i}": path for i, (layer, path) in enumerate(zip(spec.layers, built.layers))
                if layer.snapshot_after is not None}
    with mounted(store, work / "mnt") as mnt:
        listed = sorted(n for n in os.listdir(mnt / "vm" / "snapshots") if n != "latest")
        assert listed == sorted(snapshots + list(internal))
        for i, name in enumerate(snapshots):
            got = _read_view(mnt / "vm" / "snapshots" / name / "sda.raw")
            assert got == expected[i], f"snapshot {name} differs from qemu-img convert"
        for name, layer in internal.items():
            out = work / f"{name}.raw"
            qemu_img("convert", "-O", "raw", "-l", f"snapshot.name={name}", layer, out)
            got = _read_view(mnt / "vm" / "snapshots" / name / "sda.raw")
            want = out.read_bytes()
            # A resize after the snapshot: convert -l reads at the image's
            # current size, the view has the snapshot's own (its restore point).
            common = min(len(got), len(want))
            assert got[:common] == want[:common], f"internal snapshot {name} differs"
        active = _read_view(mnt / "vm" / "active" / "sda.raw")
        assert active == expected[-1], "active view differs from qemu-img convert"
        assert os.path.getsize(mnt / "vm" / "active" / "sda.raw") == len(expected[-1])
