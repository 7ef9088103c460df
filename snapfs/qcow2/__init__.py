"""The qcow2 format: header, mapping, internal snapshots, and a small writer.

Reference: QEMU's docs/interop/qcow2.txt.  Everything here treats the image
as untrusted input; see ``header.py`` for the bounds that are enforced.
"""

from .header import Header, read_header
from .image import Qcow2Image

__all__ = ["Header", "read_header", "Qcow2Image"]
