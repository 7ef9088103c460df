"""Self-test of tests/support/hostile.py: the corpus builds, and qemu-img 7.2
reacts to every case the way we expect, which shows each image is damaged
exactly as intended.

qemu calls run with cwd = the image directory: qemu 7.2 resolves a relative
external data file name against the cwd (backing names against the image dir).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.hostile import (
    ACCEPT, MAX_CHAIN_DEPTH, RANDOM_CLUSTER, RANDOM_SEEDS, REFUSE, REFUSE_OR_EIO, HostileCase,
    _random_cases, build_accept_cases, build_corpus,
)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

# --- How qemu-img 7.2 reacts to each case (every case is in exactly one table).

# `qemu-img info -f qcow2` refuses to open the image: message fragment.
QEMU_OPEN_FAILS = {
    "bad_magic": "Image is not in qcow2 format",
    "version_4": "Unsupported qcow2 version 4",
    "incompat_bit10": "Unknown incompatible feature: 400",
    "crypt_method_7": "Unsupported encryption method 7",
    "compression_type_7": "unknown compression type: 7",
    "l1_size_huge": "Active L1 table too large",
    "cluster_bits_8": "Unsupported cluster size: 2^8",
    "cluster_bits_22": "Unsupported cluster size: 2^22",
    "cluster_bits_63": "Unsupported cluster size: 2^63",
    "size_2p63": "Image is too big",
    "size_exceeds_l1": "L1 table is too small",
    "backing_offset_past_cluster": "Invalid backing file offset",
    "backing_offset_past_eof": "Invalid backing file offset",
    "backing_size_1024": "Backing file name too long",
    "l1_offset_unaligned": "Active L1 table offset invalid",
    "header_length_short": "qcow2 header too short",
    "header_length_huge": "qcow2 header exceeds cluster size",
    "snapshots_count_huge": "Snapshot table too large",
    "truncated_50": "qcow2 header too short",
    "empty_file": "Image is not in qcow2 format",
    "top_dangling_symlink": "No such file or directory",
    # Seeds were picked so that qemu refuses; the message varies per seed.
    **{f"random_{seed:02d}": "Could not open" for seed in RANDOM_SEEDS},
}
# The image opens, but `qemu-img info --backing-chain` fails.
QEMU_CHAIN_FAILS = {
    "backing_loop_pair": "creates an infinite loop",
    "backing_loop_self": "creates an infinite loop",
    "backing_missing": "No such file or directory",
}
# qemu accepts the chain and serves host file content: the secret leaks.
QEMU_LEAKS_SECRET = {"backing_absolute", "backing_dotdot", "backing_symlink_escape",
                     "data_file_external"}
# qemu accepts the chain (no leak); snapfs must still refuse.
QEMU_FOLLOWS = {"chain_too_deep", "backing_name_nul", "backing_name_newline"}
# qemu opens the header (info reports "encrypted"), reading needs a key.
QEMU_NEEDS_KEY = {"crypt_aes", "crypt_luks"}
# qemu opens the image; reading the data fails with an I/O error.
QEMU_READ_EIO = {"l2_entry_unaligned", "compressed_past_eof", "compressed_garbage"}
# qemu opens and reads it (treats bytes past EOF as zeros); only
# `qemu-img check` reports the corruption (exit code 2).
QEMU_CHECK_ONLY = {"l1_offset_past_eof", "refcount_table_past_eof", "snapshots_past_eof",
                   "l1_entry_past_eof", "l2_entry_past_eof"}
# Legal images (build_accept_cases): qemu opens and reads them cleanly.
QEMU_CLEAN = {"backing_name_empty"}

TABLES = (set(QEMU_OPEN_FAILS), set(QEMU_CHAIN_FAILS), QEMU_LEAKS_SECRET, QEMU_FOLLOWS,
          QEMU_NEEDS_KEY, QEMU_READ_EIO, QEMU_CHECK_ONLY, QEMU_CLEAN)
ALL_NAMES = sorted(set().union(*TABLES))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, HostileCase]:
    root = tmp_path_factory.mktemp("hostile")
    cases = build_corpus(root / "corpus") + build_accept_cases(root / "accept")
    names = [case.name for case in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    return {case.name: case for case in cases}


def qemu_ok(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def qemu_fails(*args: object, cwd: Path) -> str:
    """Run a qemu command that must fail (deliberately no check=True); its stderr."""
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          timeout=60)
    assert proc.returncode != 0, f"qemu accepted: {args}\n{proc.stdout}"
    return proc.stderr


def info(case: HostileCase, chain: bool = False) -> list[dict]:
    args = ["qemu-img", "info", "-f", "qcow2", "--output=json", case.top]
    args += ["--backing-chain"] if chain else []
    out = json.loads(qemu_ok(*args, cwd=case.top.parent).stdout)
    return out if chain else [out]


def convert(case: HostileCase, dest: Path) -> bytes:
    qemu_ok("qemu-img", "convert", "-f", "qcow2", "-O", "raw", case.top, dest, cwd=case.top.parent)
    return dest.read_bytes()


def test_tables_cover_corpus_exactly(corpus):
    assert sum(len(t) for t in TABLES) == len(ALL_NAMES), "a case is in two tables"
    assert sorted(corpus) == ALL_NAMES


def test_corpus_files_are_small(corpus):
    assert len(corpus) >= 50
    for case in corpus.values():
        for path in case.top.parent.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert path.stat().st_size < 4 << 20, path


@pytest.mark.parametrize("name", ALL_NAMES)
def test_case_shape(corpus, name):
    case = corpus[name]
    assert case.reason and case.name == name
    assert case.expect in ((ACCEPT,) if name in QEMU_CLEAN else (REFUSE, REFUSE_OR_EIO))
    if name == "top_dangling_symlink":
        assert case.top.is_symlink() and not case.top.exists()
    else:
        assert case.top.is_file()
    if case.secret is not None:  # planted outside the image directory
        planted = case.top.parent.parent / "host" / "secret.txt"
        assert planted.read_bytes() == case.secret
        assert case.secret.startswith(b"SNAPFS-HOST-SECRET-")
        assert case.secret not in case.top.read_bytes()
    header_only = set(QEMU_OPEN_FAILS) - {f"random_{s:02d}" for s in RANDOM_SEEDS}
    must_refuse = header_only | set(QEMU_CHAIN_FAILS) | QEMU_LEAKS_SECRET | QEMU_FOLLOWS
    if name in must_refuse | QEMU_NEEDS_KEY:
        assert case.expect == REFUSE


@pytest.mark.parametrize("name", sorted(QEMU_OPEN_FAILS))
def test_qemu_refuses_to_open(corpus, name):
    case = corpus[name]
    err = qemu_fails("qemu-img", "info", "-f", "qcow2", case.top, cwd=case.top.parent)
    assert QEMU_OPEN_FAILS[name] in err


@pytest.mark.parametrize("name", sorted(QEMU_CHAIN_FAILS))
def test_qemu_opens_top_but_refuses_chain(corpus, name):
    case = corpus[name]
    assert info(case)[0]["backing-filename"]
    err = qemu_fails("qemu-img", "info", "-f", "qcow2", "--backing-chain", case.top,
                     cwd=case.top.parent)
    assert QEMU_CHAIN_FAILS[name] in err


@pytest.mark.parametrize("name", sorted(QEMU_LEAKS_SECRET))
def test_qemu_follows_name_and_leaks_host_secret(corpus, name, tmp_path):
    """The damage is real: qemu would serve host file content as the disk."""
    case = corpus[name]
    assert case.secret is not None
    assert convert(case, tmp_path / "out.raw").startswith(case.secret)


@pytest.mark.parametrize("name", sorted(QEMU_FOLLOWS))
def test_qemu_follows_chain(corpus, name):
    case = corpus[name]
    chain = info(case, chain=True)
    if name == "chain_too_deep":
        assert len(chain) == MAX_CHAIN_DEPTH + 7 > MAX_CHAIN_DEPTH
    elif name == "backing_name_nul":  # C string: qemu silently truncates at the NUL
        assert b"base.qcow2\0junk" in case.top.read_bytes()
        assert chain[0]["backing-filename"] == "base.qcow2" and len(chain) == 2
    else:
        assert chain[0]["backing-filename"] == "base\n.qcow2" and len(chain) == 2


@pytest.mark.parametrize("name", sorted(QEMU_NEEDS_KEY))
def test_qemu_sees_encryption(corpus, name, tmp_path):
    case = corpus[name]
    assert info(case)[0]["encrypted"] is True
    err = qemu_fails("qemu-img", "convert", "-f", "qcow2", "-O", "raw", case.top,
                     tmp_path / "out.raw", cwd=case.top.parent)
    assert "encrypt.key-secret" in err


@pytest.mark.parametrize("name", sorted(QEMU_READ_EIO))
def test_qemu_read_fails(corpus, name, tmp_path):
    case = corpus[name]
    assert case.expect == REFUSE_OR_EIO
    info(case)
    err = qemu_fails("qemu-img", "convert", "-f", "qcow2", "-O", "raw", case.top,
                     tmp_path / "out.raw", cwd=case.top.parent)
    assert "Input/output error" in err


@pytest.mark.parametrize("name", sorted(QEMU_CHECK_ONLY))
def test_qemu_reads_but_check_reports_corruption(corpus, name, tmp_path):
    case = corpus[name]
    info(case)
    convert(case, tmp_path / "out.raw")
    proc = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(case.top)],
                          capture_output=True, text=True, cwd=case.top.parent, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # 2: corruptions found
    assert "ERROR" in proc.stdout + proc.stderr


def test_empty_backing_name_means_no_backing(corpus, tmp_path):
    case = corpus["backing_name_empty"]
    assert case.expect == ACCEPT
    (image,) = info(case, chain=True)
    assert "backing-filename" not in image
    qemu_ok("qemu-img", "check", "-f", "qcow2", case.top, cwd=case.top.parent)
    data = convert(case, tmp_path / "out.raw")
    assert data[:65536] == b"\x5a" * 65536 and data[512 << 10:576 << 10] == b"\xa5" * 65536


def test_random_cases_are_deterministic(corpus, tmp_path):
    again = _random_cases(tmp_path)
    assert len(again) == len(RANDOM_SEEDS) == 10
    for case in again:
        assert case.top.read_bytes() == corpus[case.name].top.read_bytes()
        assert os.path.getsize(case.top) > 2 * RANDOM_CLUSTER
