"""Acceptance 3: every image in the hostile corpus is refused at import with
one clear line, or imported and then served as EIO with the mount still up.
No host file content ever appears in a view."""

import errno
import os

from tests.support.hostile import REFUSE_OR_EIO, build_accept_cases, build_corpus
from tests.support.mounting import mounted, snapfs
from tests.support.qemu import qemu_img, qemu_io, to_raw


def _read_all(path):
    """(bytes read, errno of the first failure or 0)."""
    data = bytearray()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                data += chunk
    except OSError as e:
        return bytes(data), e.errno
    return bytes(data), 0


def _view_files(vm_dir):
    """Every readable file of a VM (control files are write-only)."""
    for dirpath, _, files in os.walk(vm_dir):
        if os.path.basename(dirpath) == "control":
            continue
        for name in files:
            yield os.path.join(dirpath, name)


def test_hostile_corpus(tmp_path, store):
    cases = build_corpus(tmp_path / "corpus")
    assert len(cases) >= 40
    secrets = [c.secret for c in cases if c.secret]
    # A healthy VM beside the hostile ones must keep working throughout.
    good = tmp_path / "good.qcow2"
    qemu_img("create", "-f", "qcow2", good, "1M")
    qemu_io(good, "write -P 0x5a 0 64k", fmt="qcow2")
    snapfs("vm", "add", store, "good", "--disk", f"sda={good}")

    imported = []
    for i, case in enumerate(cases):
        result = snapfs("vm", "add", store, f"h{i}", "--disk", f"sda={case.top}", check=False)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("snapfs: error: "), (case.name, result.stderr)
            assert "Traceback" not in result.stderr
            # The message names a file involved and says why.
            assert len(lines[0]) > len("snapfs: error: ") + 10, case.name
            assert not (store / "vms" / f"h{i}").exists()
        else:
            assert case.expect == REFUSE_OR_EIO, f"{case.name} must be refused: {case.reason}"
            imported.append((i, case))
    assert sorted(os.listdir(store / "vms")) == sorted(["good"] + [f"h{i}" for i, _ in imported])

    with mounted(store, tmp_path / "mnt") as mnt:
        for i, case in imported:
            failures = []
            for path in _view_files(mnt / f"h{i}"):
                data, err = _read_all(path)
                if err:
                    failures.append(err)
                for secret in secrets:
                    assert secret not in data, f"host content leaked through {path}"
            assert failures and set(failures) == {errno.EIO}, (
                f"{case.name} was imported, so a view must fail with EIO ({case.reason})")
            # The mount is still up and the healthy VM still reads.
            assert os.listdir(mnt)
            data, err = _read_all(mnt / "good" / "active" / "sda.raw")
            assert err == 0 and data[:65536] == b"\x5a" * 65536


def test_legal_edge_cases_import(tmp_path, store):
    for i, case in enumerate(build_accept_cases(tmp_path / "accept")):
        snapfs("vm", "add", store, f"ok{i}", "--disk", f"sda={case.top}")
        expected = to_raw(case.top)
        with mounted(store, tmp_path / f"mnt{i}") as mnt:
            data, err = _read_all(mnt / f"ok{i}" / "active" / "sda.raw")
            assert err == 0 and data == expected, case.name
