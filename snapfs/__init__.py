"""snapfs: browse and manage VM snapshots kept as qcow2 chains, through FUSE."""

__version__ = "0.1.0"
