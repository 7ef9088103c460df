"""The guest view of one qcow2 image through its L1 and L2 tables, as the
writer keeps them in memory: its own clusters, else the backing chain
below.  ``GuestTables`` is the read side of ``writer.Qcow2Writer``; the
writer loads the tables and changes them, this resolves guest ranges
through them and reads.  Every entry is checked against the file first:
an image is untrusted input."""

import os

from ..errors import CorruptImage
from . import structs as S
from .compress import decompress_cluster
from .mapping import read_u64_table

_ALLOC_ALL = 0xFFFFFFFF           # extended L2: all subclusters allocated

# What a guest range maps to, for reads.  _EXT: an extended L2 entry that is
# not compressed (look at its bitmap).
_BELOW, _DATA, _ZERO, _COMP, _EXT = range(5)


class GuestTables:
    """Guest reads through the tables of an image.  The subclass sets
    ``path``, ``fd``, ``header``, ``size``, ``_l1`` (the L1 table),
    ``_l2`` (an OrderedDict cache: L2 table offset -> entries),
    ``_below`` (the backing view, or None) and ``_lock`` (held by every
    public method), and may override ``_trim`` (called after reads)."""

    # -- public API --------------------------------------------------------

    def read(self, offset, length):
        """Guest bytes [offset, offset + length): own clusters, else ``below``.

        Raises ValueError outside the disk, CorruptImage for tables or
        clusters that are inconsistent or outside the file, OSError.
        """
        with self._lock:
            self._check_range(offset, length)
            pieces = self._pieces(offset, length)
            if len(pieces) == 1 and pieces[0][0] == _DATA:
                # One extent (the common case): no intermediate buffer, whose
                # page faults would cost more than the read itself.
                data = os.pread(self.fd, length, pieces[0][3])
                data += bytes(length - len(data))   # past the end of the file: zeros
            else:
                out = bytearray(length)
                self._fill(memoryview(out), offset, pieces)
                data = bytes(out)
            self._trim()
            return data

    def _trim(self):
        """Bound what is cached (see the subclass)."""

    def _check_range(self, offset, length):
        if self.fd < 0:
            raise ValueError(f"{self.path}: the image is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} lies outside the disk "
                             f"({self.size} bytes)")

    # -- tables ------------------------------------------------------------

    def _table(self, l1i):
        """(offset, entries, copied) of L2 table ``l1i``; (0, None, False) if none.
        Raises CorruptImage for a misplaced table."""
        entry = self._l1[l1i]
        off = entry & S.OFFSET_MASK
        if not off:
            return 0, None, False
        table = self._l2.get(off)
        if table is None:
            cs = self.header.cluster_size
            if off % cs:
                raise CorruptImage(self.path, f"L2 table offset {off:#x} is not cluster aligned")
            if off + cs > self.header.file_size:
                raise CorruptImage(self.path, f"L2 table at {off:#x} lies past the end of the file")
            table = read_u64_table(self.fd, off, cs // 8)
            self._l2[off] = table
        else:
            self._l2.move_to_end(off)
        return off, table, bool(entry & S.L2E_COPIED)

    def _entry(self, table, l2i):
        if table is None:
            return 0, 0
        if self.header.extended_l2:
            return table[2 * l2i], table[2 * l2i + 1]
        return table[l2i], 0

    def _classify(self, entry, bitmap, guest):
        """(kind, host, aux) of an L2 entry, checked against the file.

        _COMP: aux is the compressed byte count; _EXT: aux is the bitmap.
        Raises CorruptImage for an entry outside the file or self-contradictory.
        """
        hdr = self.header
        if entry & S.L2E_COMPRESSED:
            if bitmap:
                raise CorruptImage(self.path, f"compressed cluster with a bitmap at {guest:#x}")
            shift = 62 - (hdr.cluster_bits - 8)
            host = entry & ((1 << shift) - 1)
            sectors = ((entry >> shift) & ((1 << (hdr.cluster_bits - 8)) - 1)) + 1
            if host < hdr.cluster_size or host >= hdr.file_size:
                raise CorruptImage(self.path, f"compressed cluster at {host:#x} is outside the file")
            return _COMP, host, sectors * 512 - (host & 511)
        host = entry & S.OFFSET_MASK
        if host and (host % hdr.cluster_size or host >= hdr.file_size):
            raise CorruptImage(self.path, f"L2 entry for guest {guest:#x} points at {host:#x}, "
                                          "misaligned or past the end of the file")
        if hdr.extended_l2:
            alloc, zero = bitmap & _ALLOC_ALL, bitmap >> 32
            if alloc & zero or (alloc and not host):
                raise CorruptImage(self.path, f"invalid bitmap {bitmap:#x} at guest {guest:#x}")
            return _EXT, host, bitmap
        if entry & S.L2E_ZERO:
            return _ZERO, host, 0
        return (_DATA, host, 0) if host else (_BELOW, 0, 0)

    # -- reading -----------------------------------------------------------

    def _pieces(self, offset, length):
        """[kind, guest start, length, host] extents of a guest range, merged.
        Raises CorruptImage (from ``_table``, ``_classify``)."""
        hdr = self.header
        cs, cb, l2n = hdr.cluster_size, hdr.cluster_bits, hdr.l2_entries
        pieces = []   # [kind, guest start, length, host]; adjacent ones merged

        def add(kind, start, n, host=0):
            if pieces:
                last = pieces[-1]
                if last[0] == kind and last[1] + last[2] == start and kind != _COMP \
                        and (kind != _DATA or last[3] + last[2] == host):
                    last[2] += n
                    return
            pieces.append([kind, start, n, host])

        pos, end = offset, offset + length
        while pos < end:
            c0 = pos >> cb << cb
            stop = min(c0 + cs, end)
            _, table, _ = self._table((pos >> cb) // l2n)
            entry, bitmap = self._entry(table, (pos >> cb) % l2n)
            kind, host, aux = self._classify(entry, bitmap, c0)
            if kind == _EXT:
                alloc, zero = aux & _ALLOC_ALL, aux >> 32
                if alloc == _ALLOC_ALL:
                    add(_DATA, pos, stop - pos, host + pos - c0)
                elif zero == _ALLOC_ALL or not (alloc | zero):
                    add(_ZERO if zero else _BELOW, pos, stop - pos)
                else:
                    sc = cs >> 5
                    s = pos
                    while s < stop:
                        j = (s - c0) // sc
                        e = min(stop, c0 + (j + 1) * sc)
                        if alloc >> j & 1:
                            add(_DATA, s, e - s, host + s - c0)
                        else:
                            add(_ZERO if zero >> j & 1 else _BELOW, s, e - s)
                        s = e
            elif kind == _COMP:
                pieces.append([_COMP, pos, stop - pos, (host, aux, c0)])
            elif kind == _DATA:
                add(_DATA, pos, stop - pos, host + pos - c0)
            else:
                add(kind, pos, stop - pos)
            pos = stop
        return pieces

    def _fill(self, out, offset, pieces):
        """Fill ``out`` (zeroed, guest bytes from ``offset``) from ``pieces``.
        Raises CorruptImage (compressed data), OSError."""
        hdr = self.header
        for kind, start, n, host in pieces:
            dst = out[start - offset:start - offset + n]
            if kind == _DATA:
                # Past the end of the file reads as zeros, as in QEMU.
                os.preadv(self.fd, [dst], host)
            elif kind == _BELOW and self._below is not None:
                data = self._below(start, n)
                dst[:min(n, len(data))] = data[:n]
            elif kind == _COMP:
                chost, nbytes, c0 = host
                raw = os.pread(self.fd, min(nbytes, hdr.file_size - chost), chost)
                cluster = decompress_cluster(self.path, raw, hdr.cluster_size,
                                             hdr.compression_type)
                dst[:] = cluster[start - c0:start - c0 + n]
