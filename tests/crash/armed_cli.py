"""``python -m tests.crash.armed_cli ARGS``: the snapfs CLI with the qcow2
writer's own ordering points armed as crash points too.

``Qcow2Writer`` reports each durable ordering point of a write batch
(refcounts, data, L2 entries, frees, ...) to its ``on_step`` callback, but
``snapfs.writers.open_writer`` passes none, so ``SNAPFS_CRASH_AT`` can only
kill a merge between whole chunk writes.  This driver hands every writer
``on_step=crashpoint``, so that kills also land inside a write, where
leaked clusters are expected.  Nothing else changes.
"""

import sys

from snapfs import faults, writers

_Writer = writers.Qcow2Writer


class ArmedQcow2Writer(_Writer):
    def __init__(self, path, below=None, on_step=None):
        super().__init__(path, below=below,
                         on_step=lambda name: faults.crashpoint(f"write:{name}"))


writers.Qcow2Writer = ArmedQcow2Writer

if __name__ == "__main__":
    from snapfs.cli import main
    sys.exit(main())
