"""Decompress one qcow2 compressed cluster (raw deflate or zstd).

Output is bounded by the cluster size, so a hostile stream cannot expand
beyond one cluster.  A stream that does not fill the cluster is corrupt, as
QEMU treats it (when only a prefix is asked for, damage past it goes
unseen until a read reaches it).
"""

import io
import zlib

import zstandard

from ..errors import CorruptImage
from .structs import COMPRESSION_ZSTD


def decompress_cluster(path, data, cluster_size, compression_type, length=None):
    """The cluster's first ``length`` bytes (all of it by default): a small
    read near the start of a cluster need not inflate the rest."""
    want = cluster_size if length is None else length
    try:
        if compression_type == COMPRESSION_ZSTD:
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
            out = reader.read(want)
            while len(out) < want:
                more = reader.read(want - len(out))
                if not more:
                    break
                out += more
        else:
            # QEMU writes raw deflate (no zlib header) with a 4 KiB window;
            # -15 accepts every window size.
            out = zlib.decompressobj(-15).decompress(data, want)
    except (zlib.error, zstandard.ZstdError) as e:
        raise CorruptImage(path, f"compressed cluster cannot be decompressed: {e}") from None
    if len(out) != want:
        raise CorruptImage(path, f"compressed cluster decompresses to {len(out)} bytes, "
                                 f"not {cluster_size}")
    return out
