#!/usr/bin/env bash
# Install everything the test suite needs, then run all of it.
# Extra arguments go to pytest (e.g. scripts/test.sh -k oracle -x).
# SNAPFS_TEST_PROFILE=thorough runs many more hypothesis examples.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: the mount tests need root (FUSE, loop devices); run as root" >&2
    exit 1
fi
# The layers of DESIGN.md section 6 (pyproject.toml [tool.importlinter]):
# a module that imports against them fails the run before any test does.
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
