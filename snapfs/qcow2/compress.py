"""Decompress one qcow2 compressed cluster (raw deflate or zstd).

Output is bounded by the cluster size, so a hostile stream cannot expand
beyond one cluster.  A stream that does not fill the cluster is corrupt, as
QEMU treats it.
"""

import io
import zlib

import zstandard

from ..errors import CorruptImage
from .structs import COMPRESSION_ZSTD


def decompress_cluster(path, data, cluster_size, compression_type):
    try:
        if compression_type == COMPRESSION_ZSTD:
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
            out = reader.read(cluster_size)
            while len(out) < cluster_size:
                more = reader.read(cluster_size - len(out))
                if not more:
                    break
                out += more
        else:
            # QEMU writes raw deflate (no zlib header) with a 4 KiB window;
            # -15 accepts every window size.
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
    except (zlib.error, zstandard.ZstdError) as e:
        raise CorruptImage(path, f"compressed cluster cannot be decompressed: {e}") from None
    if len(out) != cluster_size:
        raise CorruptImage(path, f"compressed cluster decompresses to {len(out)} bytes, "
                                 f"not {cluster_size}")
    return out
