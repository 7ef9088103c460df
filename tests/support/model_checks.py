"""Helpers shared by the model tests (tests/model): expected errnos, whole
reads of a view, byte comparisons that say where they differ, touch."""

import errno
import os

CLUSTER = 64 << 10


def errname(code):
    return errno.errorcode.get(code, str(code)) if code else "success"


def attempt(expected, action, what):
    """Run ``action``; it must succeed if ``expected`` is None, else fail
    with OSError errno ``expected``."""
    try:
        action()
    except OSError as e:
        assert e.errno == expected, \
            f"{what}: expected {errname(expected)}, got {errname(e.errno)} ({e})"
        return
    assert expected is None, f"{what}: expected {errname(expected)}, but it succeeded"


def read_file(path, chunk=1 << 20):
    out = bytearray()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(chunk):
            out += data
    return bytes(out)


def first_difference(got, want):
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    diff = [i for i in range(0, len(want), 512) if got[i:i + 512] != want[i:i + 512]]
    first = next(i for i in range(diff[0], diff[0] + 512) if got[i] != want[i])
    return (f"{len(diff)} differing sector(s), first byte at {first} (cluster {first // CLUSTER}): "
            f"got {got[first:first + 8].hex()} want {want[first:first + 8].hex()}")


def check_bytes(got, want, what):
    if got != want:
        raise AssertionError(f"{what} differs from the model: {first_difference(got, want)}")


def touch(path, exclusive):
    """What ``touch`` does: open(O_CREAT) and set the times; with
    ``exclusive`` an existing name is EEXIST rather than EISDIR."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOCTTY | os.O_NONBLOCK
    if exclusive:
        flags |= os.O_EXCL
    fd = os.open(path, flags, 0o666)
    try:
        os.utime(fd)
    finally:
        os.close(fd)
