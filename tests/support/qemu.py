"""Thin wrappers around QEMU's own image tools (``qemu-img``, ``qemu-io``).

These are the test oracle: whatever QEMU says an image contains is, by
definition, what snapfs must present.  Every call goes through
:func:`_run`, which raises :class:`QemuError` (carrying stderr) on failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]


class QemuError(RuntimeError):
    """A qemu-img / qemu-io invocation failed."""

    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str):
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"{' '.join(argv)!s} exited {returncode}\n"
            f"stderr: {stderr.strip()}\nstdout: {stdout.strip()}"
        )


def _run(argv: list[str], *, cwd: PathLike | None = None,
         ok_codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    """Run *argv*; raise :class:`QemuError` unless its exit code is in *ok_codes*."""
    try:
        proc = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=cwd)
    except subprocess.CalledProcessError as exc:
        if exc.returncode in ok_codes:
            return subprocess.CompletedProcess(argv, exc.returncode, exc.stdout, exc.stderr)
        raise QemuError(argv, exc.returncode, exc.stdout, exc.stderr) from None
    return proc


def qemu_img(*args: PathLike, cwd: PathLike | None = None) -> str:
    """Run ``qemu-img ARGS...`` and return its stdout."""
    return _run(["qemu-img", *map(str, args)], cwd=cwd).stdout


def qemu_io(image: PathLike, *commands: str, fmt: str | None = None,
            cwd: PathLike | None = None) -> str:
    """Run each of *commands* (``-c CMD``) in one ``qemu-io`` session on *image*.

    The image is opened read-write (qemu-io's default).  qemu-io exits non-zero
    if any command failed; we additionally reject output mentioning a failed
    command, so a silently ignored error cannot slip through.
    """
    argv = ["qemu-io"]
    if fmt is not None:
        argv += ["-f", fmt]
    for command in commands:
        argv += ["-c", command]
    argv.append(str(image))
    proc = _run(argv, cwd=cwd)
    if " failed:" in proc.stdout or " failed:" in proc.stderr:
        raise QemuError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def info(path: PathLike) -> dict[str, Any]:
    """``qemu-img info --output=json`` of a single image."""
    return json.loads(qemu_img("info", "--output=json", path))


def info_chain(path: PathLike) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain --output=json``: top image first."""
    return json.loads(qemu_img("info", "--backing-chain", "--output=json", path))


def map_json(path: PathLike) -> list[dict[str, Any]]:
    """``qemu-img map --output=json``: extents of the whole chain seen from *path*."""
    return json.loads(qemu_img("map", "--output=json", path))


def check(path: PathLike) -> dict[str, Any]:
    """``qemu-img check --output=json``, tolerant of findings.

    qemu-img check exits 2 when it found corruptions and 3 when it found only
    leaks; both still print the JSON report, which is returned with an extra
    ``"returncode"`` key.  Any other failure raises :class:`QemuError`.
    """
    argv = ["qemu-img", "check", "--output=json", str(path)]
    proc = _run(argv, ok_codes=(0, 2, 3))
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise QemuError(argv, proc.returncode, proc.stdout, proc.stderr) from None
    report["returncode"] = proc.returncode
    return report


def is_clean(report: dict[str, Any]) -> bool:
    """True when a :func:`check` report shows no errors, corruptions or leaks."""
    return (report["returncode"] == 0
            and report.get("check-errors", 0) == 0
            and report.get("corruptions", 0) == 0
            and report.get("leaks", 0) == 0)


def to_raw_file(path: PathLike, out: PathLike, fmt: str | None = None) -> None:
    """Convert the chain seen from *path* to a raw file *out* (``qemu-img convert``)."""
    argv: list[PathLike] = ["convert"]
    if fmt is not None:
        argv += ["-f", fmt]
    argv += ["-O", "raw", path, out]
    qemu_img(*argv)


def to_raw(path: PathLike, fmt: str | None = None) -> bytes:
    """Return the guest-visible bytes of the chain seen from *path*."""
    with tempfile.TemporaryDirectory(prefix="snapfs-raw-") as tmp:
        out = Path(tmp) / "view.raw"
        to_raw_file(path, out, fmt=fmt)
        return out.read_bytes()
