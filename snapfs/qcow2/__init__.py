"""The qcow2 format: header, mapping, internal snapshots, new images and a
writer that keeps every image consistent at every instant.

The bottom layer.  It imports only ``snapfs.errors``: nothing here knows of
stores, VMs or mounts.  Reference: QEMU's docs/interop/qcow2.txt.  Every
image is untrusted input; ``header.py`` holds the bounds enforced.
"""

from .header import Header, read_header
from .image import Qcow2Image

__all__ = ["Header", "read_header", "Qcow2Image"]
