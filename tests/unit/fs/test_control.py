"""Control-file command lines (fs/control.py)."""

import pytest

from snapfs.errors import InvalidArgument
from snapfs.fs.control import parse


@pytest.mark.parametrize("text, expected", [
    ("s1 copy", ("s1", "copy")),
    ("before upgrade copy", ("before upgrade", "copy")),    # a snapshot name with spaces
    ("before upgrade\tnew vm", ("before upgrade", "new vm")),  # a tab: spaces on both sides
    ("s1   copy", ("s1", "copy")),
])
def test_clone_takes_snapshot_and_new_vm(text, expected):
    assert parse("clone", text) == ("clone", expected)


@pytest.mark.parametrize("text", ["", "s1", "s1\t", "\tcopy"])
def test_clone_needs_both_names(text):
    with pytest.raises(InvalidArgument):
        parse("clone", text)
