"""Host-local attach records: where they live, their modes, atomic
replacement."""

import json
import os
import stat

import pytest

from snapfs.errors import NotFound, StoreError
from snapfs.qemu import attach
from snapfs.qemu.attach import (read_record, record_path, records_dir, remove_record,
                                store_key, write_record)


@pytest.fixture
def run(tmp_path, monkeypatch):
    base = tmp_path / "run" / "snapfs"
    monkeypatch.setenv("SNAPFS_RUN_DIR", str(base))
    return base


def test_record_lives_under_the_run_dir_keyed_by_the_store_real_path(tmp_path, run):
    store = tmp_path / "store"
    store.mkdir()
    (tmp_path / "link").symlink_to(store)
    record = write_record(store, "web", tmp_path / "q.sock")
    assert record_path(store, "web") == str(run / store_key(store) / "web.json")
    assert len(store_key(store)) == 16
    # The same store reached through a symlink or a relative path: the same record.
    assert read_record(tmp_path / "link", "web") == record
    os.chdir(tmp_path)
    assert read_record("store", "web") == record
    assert record["qmp"] == str(tmp_path / "q.sock") and record["guest_agent"] is None
    assert record["store"] == str(store) and record["attached"].endswith("Z")


def test_directories_0700_files_0600_whatever_the_umask(tmp_path, run):
    old = os.umask(0)
    try:
        write_record(tmp_path, "web", "/q", "/ga")
    finally:
        os.umask(old)
    for d in (run.parent, run, run / store_key(tmp_path)):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    path = record_path(tmp_path, "web")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(open(path).read())["guest_agent"] == "/ga"


def test_replacing_is_atomic_and_leaves_no_temporary(tmp_path, run, monkeypatch):
    write_record(tmp_path, "web", "/first")
    real_replace = os.replace

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(attach.os, "replace", fail)
    with pytest.raises(OSError):
        write_record(tmp_path, "web", "/second")
    monkeypatch.setattr(attach.os, "replace", real_replace)
    assert read_record(tmp_path, "web")["qmp"] == "/first"
    assert os.listdir(records_dir(tmp_path)) == ["web.json"]
    write_record(tmp_path, "web", "/second")
    assert read_record(tmp_path, "web")["qmp"] == "/second"
    assert os.listdir(records_dir(tmp_path)) == ["web.json"]


def test_remove_and_missing(tmp_path, run):
    assert read_record(tmp_path, "web") is None
    with pytest.raises(NotFound):
        remove_record(tmp_path, "web")
    remove_record(tmp_path, "web", missing_ok=True)
    write_record(tmp_path, "web", "/q")
    remove_record(tmp_path, "web")
    assert read_record(tmp_path, "web") is None


def test_a_255_byte_vm_name_gets_a_hashed_file_name(tmp_path, run):
    name = "v" * 255
    write_record(tmp_path, name, "/q")
    assert read_record(tmp_path, name)["vm"] == name
    assert os.path.basename(record_path(tmp_path, name)).startswith("vm-")


def test_a_broken_record_is_an_error_not_offline(tmp_path, run):
    write_record(tmp_path, "web", "/q")
    with open(record_path(tmp_path, "web"), "w") as f:
        f.write("{not json")
    with pytest.raises(StoreError, match="attach record"):
        read_record(tmp_path, "web")
    with open(record_path(tmp_path, "web"), "w") as f:
        json.dump({"qmp": 3}, f)
    with pytest.raises(StoreError, match="attach again|vm attach"):
        read_record(tmp_path, "web")


def test_default_base_is_run_snapfs_for_root(monkeypatch):
    monkeypatch.delenv("SNAPFS_RUN_DIR", raising=False)
    monkeypatch.setattr(attach.os, "geteuid", lambda: 0)
    assert attach.run_dir() == "/run/snapfs"
    monkeypatch.setattr(attach.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert attach.run_dir() == "/run/user/1000/snapfs"
