"""On-disk structures of qcow2, as construct definitions.

All integers are big-endian.  Offsets are bytes from the start of the image
file; an offset of 0 means "none" (nothing is ever stored in the header
cluster except the header, its extensions and the backing file name).
"""

from construct import (
    Bytes,
    Const,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Struct,
    this,
)

MAGIC = b"QFI\xfb"

# Header fields common to versions 2 and 3 (72 bytes).
HeaderV2 = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,                  # 2 (compat=0.10) or 3 (compat=1.1)
    "backing_file_offset" / Int64ub,      # 0: no backing file
    "backing_file_size" / Int32ub,        # bytes, no NUL terminator, < 1024
    "cluster_bits" / Int32ub,             # cluster size = 1 << cluster_bits
    "size" / Int64ub,                     # virtual disk size, bytes
    "crypt_method" / Int32ub,             # 0 none, 1 AES, 2 LUKS
    "l1_size" / Int32ub,                  # entries in the active L1 table
    "l1_table_offset" / Int64ub,          # cluster aligned
    "refcount_table_offset" / Int64ub,    # cluster aligned
    "refcount_table_clusters" / Int32ub,  # size of the refcount table
    "nb_snapshots" / Int32ub,             # internal snapshots
    "snapshots_offset" / Int64ub,         # snapshot table, cluster aligned
)
HEADER_V2_LENGTH = 72

# Fields added by version 3 (bytes 72..103); version 2 implies the defaults
# in V2_DEFAULTS.
HeaderV3Tail = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,           # refcount_bits = 1 << refcount_order
    "header_length" / Int32ub,            # 104, or 112 with compression_type
)
HEADER_V3_MIN_LENGTH = 104
V2_DEFAULTS = dict(
    incompatible_features=0,
    compatible_features=0,
    autoclear_features=0,
    refcount_order=4,
    header_length=HEADER_V2_LENGTH,
)

# Optional byte 104: 0 zlib (raw deflate), 1 zstd.  Meaningful only when the
# COMPRESSION_TYPE incompatible bit is set.
COMPRESSION_TYPE_OFFSET = 104
COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)

# Header extensions follow the header: type, length, data padded to 8 bytes.
ExtensionHeader = Struct(
    "type" / Int32ub,
    "length" / Int32ub,
)
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# L1 entry: bits 9..55 hold the L2 table offset, bit 63 is COPIED.
# L2 entry (standard cluster): bits 9..55 host offset, bit 0 reads-as-zero
# (v3), bit 62 compressed, bit 63 COPIED.
OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_COMPRESSED = 1 << 62
L2E_COPIED = 1 << 63
L2E_ZERO = 1 << 0

# One internal snapshot table entry (variable length, padded to 8 bytes).
SnapshotEntry = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
    "extra_data" / Bytes(this.extra_data_size),
    "id_str" / Bytes(this.id_str_size),
    "name" / Bytes(this.name_size),
)
SNAPSHOT_FIXED_LENGTH = 40

# Known layout of the extra data (each field present only if it fits).
SnapshotExtra = Struct(
    "vm_state_size_large" / Int64ub,
    "disk_size" / Int64ub,
    "icount" / Int64ub,
)

CompressionTypeByte = Int8ub
