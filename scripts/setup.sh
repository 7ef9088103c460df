#!/usr/bin/env bash
# Install what snapfs and its tests need on a Debian machine, then make the
# project's virtualenv (.venv).  Safe to run again: it only installs what is
# missing.  Sourced by scripts/test.sh and scripts/demo.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config qemu-utils e2fsprogs xfsprogs fdisk gdisk util-linux mount cpio)
# qemu-system-x86_64 for the tests of running VMs; without its recommends
# (GTK display, firmware), which a -display none QEMU never uses; GlusterFS for
# the tests of stores shared by hosts (tests/support/gluster.py).
APT_LEAN_PACKAGES=(qemu-system-x86 glusterfs-server glusterfs-client)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}
missing=()
for pkg in "${APT_PACKAGES[@]}"; do installed "$pkg" || missing+=("$pkg"); done
lean=()
for pkg in "${APT_LEAN_PACKAGES[@]}"; do installed "$pkg" || lean+=("$pkg"); done
if [ $(( ${#missing[@]} + ${#lean[@]} )) -gt 0 ]; then
    echo "setup: installing ${missing[*]} ${lean[*]}"
    as_root apt-get update -qq
    if [ ${#missing[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if [ ${#lean[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
            "${lean[@]}" >/dev/null
    fi
fi

[ -e /dev/fuse ] || as_root modprobe fuse || true

PYTHON="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "setup: creating $ROOT/.venv"
    "$PYTHON" -m venv "$ROOT/.venv" || {
        as_root apt-get install -y -qq python3-venv >/dev/null && "$PYTHON" -m venv "$ROOT/.venv"; }
fi
# Reinstall when pyproject.toml changed since the last install.
stamp="$ROOT/.venv/.snapfs-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    echo "setup: installing snapfs and its test dependencies into .venv"
    "$ROOT/.venv/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test]"
    touch "$stamp"
fi
