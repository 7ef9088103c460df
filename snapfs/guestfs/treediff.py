"""The files that differ between two versions of one filesystem.

``diff_trees(a, b, changed)`` compares two ``GuestFs`` of the same
filesystem (two snapshots of one partition) and lists what ``zfs diff``
would: ``+`` added, ``-`` removed, ``M`` modified, ``R`` renamed.  It works
on any reader of the interface (ext4 now; others later).

Identity, as in zfs (libzfs_diff.c): a file is its inode, the same number
AND the same generation (and the same file type) in both trees; names are
only how it is reached.  So:

* a name whose inode changed (deleted and created again, or the number
  reused) is ``-`` then ``+``, never ``M``;
* an inode that left one name and gained another is ``R old -> new``
  (hard links: the lost and gained names are paired in sorted order;
  names left over are ``-`` / ``+``, so a new hard link is ``+`` of its
  name, nlink itself never makes ``M``);
* an inode kept under a name (same directory, same name) is ``M`` at that
  name when its mode, owner, group, size, mtime, device number, symlink
  target, extended attributes or content differ; atime, ctime and nlink
  do not count (a directory whose entries changed has a new mtime, so it
  is ``M`` as in zfs);
* a renamed directory is one ``R`` line: its children keep their
  (directory, name) and are listed only if they changed themselves; a
  removed or added directory lists every name below it, as zfs does.

What is read, given ``changed`` (the view's ranges that may differ,
``store.changed.RangeSet``):

* A's directories are all listed, and each inode they name is read once
  in A (its record, and the blocks of its map if it has any): names are
  only found by walking the tree (ext4 has no parent pointers for
  files), and a file's blocks only from its map, so this is the floor;
* an inode is unchanged when the bytes of its record and maps
  (``metadata_ranges``) are the same in B, and its data (``runs``) lie
  in unchanged ranges (a directory's blocks: the same bytes).  Only the
  parts of those ranges that meet a changed range are read, 64 KiB at
  a time on each side (that much of an inode table holds 256 records);
* B's directory listing is A's, unread, when the directory is
  unchanged; a directory that is listed in B reads only the inodes of
  the entries that are not unchanged (their type, for the walk), where
  the reader offers ``listdir_known``;
* an unchanged inode is never stat'ed in B; others are stat'ed on both
  sides, and their content is read only where the two run maps differ
  or meet a changed range.

The shortcuts trust ``metadata_ranges`` to name every block of an
inode's maps (for ext4: extent tree blocks below the inode too, indirect
blocks of ext2/3; for XFS the blocks of a B+tree data fork); a reader
that could leave some out (``exact_metadata_ranges`` False, the default
of ``GuestFs``) gets no shortcut, nor does an inode whose ranges are
empty (the format cannot say where it lives), nor any inode of a
filesystem whose journal was replayed in memory (its bytes are not the
view's): each such file is compared in full.

Optional reader methods, used when present (ext has them): ``layout(ino)``
gives the type, ``metadata_ranges`` and ``runs`` in one request, and
``listdir_known(ino, known_type)`` lists a directory as ``listdir`` does
without reading the inodes whose type the caller knows.

Damage is reported, never fatal: a directory that cannot be listed on
either side is left out on both (with its subtree), a file that cannot be
read is named in ``damaged``.  A directory reached twice (a loop, or a
hard-linked directory) is walked once and reported.
"""

from __future__ import annotations

import stat as S
from dataclasses import dataclass, field

from ..errors import SnapfsError

COMPARE_CHUNK = 1 << 20         # bytes of file content compared at a time
SAME_BLOCK = 64 << 10           # the grain at which records and maps are read (a qcow2 cluster)
SAME_BLOCKS_KEPT = 256          # blocks that differ kept meanwhile (32 MiB at most)


@dataclass(frozen=True, order=True)
class Change:
    path: bytes                 # from the filesystem's root: b"/etc/hosts"; the root is b"/"
    change: str                 # "+", "-", "M" or "R"
    new_path: bytes | None = None   # for "R"


@dataclass
class TreeDiff:
    changes: list = field(default_factory=list)     # [Change], sorted
    damaged: list = field(default_factory=list)     # [(path bytes, message)]
    stats: dict = field(default_factory=dict)       # what was read, for tests and the bench


class _Everything:
    """The changed set of a view where nothing can be skipped."""

    def intersects(self, start, length):
        return True


def diff_trees(a, b, changed) -> TreeDiff:
    """Compare GuestFs ``a`` (before) with ``b`` (after).  ``changed`` has
    ``intersects(offset, length)`` over the view's offsets (both views the
    same partition).  Never raises for damage in the filesystems."""
    if getattr(a, "recovered", None) or getattr(b, "recovered", None):
        changed = _Everything()
    return _Differ(a, b, changed).run()


class _Tree:
    """One side's directories: listings and the names that reach them."""

    def __init__(self, fs):
        self.fs = fs
        self.listings = {}      # dir ino -> [(name, ino, type bits)]
        self.failed = {}        # dir ino -> message
        self.stats = {}         # ino -> Stat (or the FsDamaged it raised)


class _Differ:
    def __init__(self, a, b, changed):
        self.a, self.b = _Tree(a), _Tree(b)
        self.changed = changed
        self.result = TreeDiff()
        self.counts = dict(dirs_listed_a=0, dirs_listed_b=0, dirs_reused=0, stats_b=0,
                           files_skipped=0, bytes_compared=0)
        self._unchanged = {}
        self._twice = set()
        self._blocks = {}           # block number -> (A's bytes, B's bytes) or True if equal
        self._kinds = {}            # ino -> type bits, from A's listings
        # A reader whose metadata_ranges may leave a map block out gets no
        # shortcut: a change made only there would go unseen.
        self.exact = bool(getattr(a, "exact_metadata_ranges", False))

    def run(self):
        self._walk(self.a, reuse=False)
        self._walk(self.b, reuse=True)
        names_a, paths_a = self._names(self.a)
        names_b, paths_b = self._names(self.b)
        changes = []
        root = self.a.fs.root
        for ino in sorted(set(names_a) | set(names_b)):
            try:
                changes += self._changes_of(ino, names_a.get(ino, []), names_b.get(ino, []),
                                            paths_a, paths_b)
            except SnapfsError as e:
                where = names_b.get(ino) or names_a.get(ino)
                paths = paths_b if ino in names_b else paths_a
                self._damage(_join(paths, where[0]), e)
        try:
            if self._same_object(root) and self._modified(root):
                changes.append(Change(b"/", "M"))
        except SnapfsError as e:
            self._damage(b"/", e)
        self.result.changes = sorted(changes)
        self.result.damaged = sorted(set(self.result.damaged))
        self.result.stats = self.counts
        return self.result

    # -- walking the two trees --------------------------------------------

    def _walk(self, tree, reuse):
        """List every directory reachable from the root, each once."""
        todo, seen = [tree.fs.root], set()
        side = "b" if reuse else "a"
        while todo:
            ino = todo.pop()
            if ino in seen:
                continue
            seen.add(ino)
            if reuse and ino in self.a.listings and self._inode_unchanged(ino):
                entries = self.a.listings[ino]
                self.counts["dirs_reused"] += 1
            else:
                try:
                    entries = self._listdir(tree, ino)
                except SnapfsError as e:
                    tree.failed[ino] = str(e)
                    continue
                self.counts[f"dirs_listed_{side}"] += 1
            tree.listings[ino] = entries
            for name, child, kind in entries:
                if not reuse and kind:
                    self._kinds[child] = kind
                if self._is_dir(tree, child, kind):
                    todo.append(child)

    def _listdir(self, tree, ino):
        """B's directories are listed with the types of the inodes found
        unchanged taken from A, where the reader can (their records are
        the same bytes): only the others' inodes are read in B."""
        known = getattr(tree.fs, "listdir_known", None)
        if known is None:
            return tree.fs.listdir(ino)
        return known(ino, None if tree is self.a else self._type_from_a)

    def _type_from_a(self, ino):
        kind = self._kinds.get(ino)
        return kind if kind and self._inode_unchanged(ino) else None

    def _is_dir(self, tree, ino, kind):
        if kind:
            return kind == S.S_IFDIR
        st = self._stat(tree, ino)
        return st is not None and st.is_dir

    def _names(self, tree):
        """({ino: [(parent dir ino, name)]}, {dir ino: its path}) over the
        directories both sides could list; a directory reached a second
        time is reported and walked once."""
        failed = set(self.a.failed) | set(self.b.failed)
        root = tree.fs.root
        names, paths = {}, {root: b"/"}
        todo = [root]
        while todo:
            d = todo.pop()
            if d in failed:
                self._damage(paths[d], self.a.failed.get(d) or self.b.failed.get(d))
                continue
            for name, child, _ in tree.listings.get(d, ()):
                names.setdefault(child, []).append((d, name))
                if child in tree.listings or child in failed:
                    path = _child_path(paths[d], name)
                    if child in paths:
                        if (id(tree), child) not in self._twice:
                            self._twice.add((id(tree), child))
                            self._damage(path, f"directory inode {child} is reached twice "
                                               f"(a loop or a hard-linked directory): "
                                               f"walked once")
                        continue
                    paths[child] = path
                    todo.append(child)
        return names, paths

    # -- one inode ------------------------------------------------------------

    def _changes_of(self, ino, in_a, in_b, paths_a, paths_b):
        if in_a == in_b and self._inode_unchanged(ino) and all(
                self._same_object(d) for d, _ in in_a):
            return []       # the common case, the same answer as below, sooner
        if not in_a or not in_b or not self._same_object(ino):
            return ([Change(_join(paths_a, n), "-") for n in in_a]
                    + [Change(_join(paths_b, n), "+") for n in in_b])
        common = [n for n in in_a if n in in_b and self._same_object(n[0])]
        gone = sorted(n for n in in_a if n not in common)
        new = sorted(n for n in in_b if n not in common)
        out = []
        for old, now in zip(gone, new):
            out.append(Change(_join(paths_a, old), "R", _join(paths_b, now)))
        out += [Change(_join(paths_a, n), "-") for n in gone[len(new):]]
        out += [Change(_join(paths_b, n), "+") for n in new[len(gone):]]
        if common and self._modified(ino):
            out += [Change(_join(paths_b, n), "M") for n in common]
        return out

    def _same_object(self, ino):
        """Is ``ino`` the same inode in both trees (not a reused number)?"""
        if self._inode_unchanged(ino):
            return True
        sa, sb = self._stat(self.a, ino, strict=True), self._stat(self.b, ino, strict=True)
        return sa.generation == sb.generation and S.S_IFMT(sa.mode) == S.S_IFMT(sb.mode)

    def _inode_unchanged(self, ino):
        """Is the inode's record, with its maps and blocks, the same in B
        as in A?  Then B holds the very same file.  Ranges that are
        possibly changed (a qcow2 cluster holds many inodes) are compared
        byte for byte: a few hundred bytes, not a parse."""
        known = self._unchanged.get(ino)
        if known is not None:
            return known
        answer = False
        try:
            is_dir, ranges, runs = self._layout(ino)
            if ranges and self._same_bytes(ranges):
                data = [(s, n) for s, n in runs() or () if s is not None]
                if is_dir:
                    answer = self._same_bytes(data)     # a directory's blocks are small
                else:
                    answer = not any(self.changed.intersects(s, n) for s, n in data)
        except SnapfsError:
            answer = False      # compared in full, where the damage is reported
        if answer:
            self.counts["files_skipped"] += 1
        self._unchanged[ino] = answer
        return answer

    def _layout(self, ino):
        """(is a directory, A's metadata ranges, a function giving its runs),
        in one request where the reader can."""
        fs = self.a.fs
        if not self.exact:
            return False, [], None
        layout = getattr(fs, "layout", None)
        if layout is not None:
            kind, ranges, runs = layout(ino)
            return kind == S.S_IFDIR, ranges, lambda: runs
        return (self._is_dir(self.a, ino, self._kinds.get(ino, 0)), fs.metadata_ranges(ino),
                lambda: fs.runs(ino))

    def _same_bytes(self, ranges):
        """Do the views hold the same bytes in ``ranges``?  Only the parts
        in changed ranges are read, 64 KiB at a time on both sides: the
        records of neighbouring inodes share them (256 to a block)."""
        for start, length in ranges:
            if not self.changed.intersects(start, length):
                continue
            self.counts["bytes_compared"] += length
            end = start + length
            for block in range(start // SAME_BLOCK, (end - 1) // SAME_BLOCK + 1):
                at = block * SAME_BLOCK
                lo, hi = max(start, at), min(end, at + SAME_BLOCK)
                if not self.changed.intersects(lo, hi - lo):
                    continue
                pair = self._blocks.get(block)
                if pair is None:
                    pair = self._read_pair(block)
                if pair is not True and pair[0][lo - at:hi - at] != pair[1][lo - at:hi - at]:
                    return False
        return True

    def _read_pair(self, block):
        """A's and B's bytes of one block, or True if they are equal
        (kept for the next inode in it, a few thousand at most)."""
        at = block * SAME_BLOCK
        pair = (self.a.fs.reader(at, SAME_BLOCK), self.b.fs.reader(at, SAME_BLOCK))
        if pair[0] == pair[1]:
            pair = True
        if len(self._blocks) >= SAME_BLOCKS_KEPT:
            self._blocks.pop(next(iter(self._blocks)))
        self._blocks[block] = pair
        return pair

    def _stat(self, tree, ino, strict=False):
        st = tree.stats.get(ino)
        if st is None:
            try:
                st = tree.fs.stat(ino)
            except SnapfsError as e:
                st = e
            tree.stats[ino] = st
            if tree is self.b:
                self.counts["stats_b"] += 1
        if isinstance(st, SnapfsError):
            if strict:
                raise st
            return None
        return st

    def _modified(self, ino):
        if self._inode_unchanged(ino):
            return False
        a, b = self.a.fs, self.b.fs
        sa, sb = self._stat(self.a, ino, strict=True), self._stat(self.b, ino, strict=True)
        if (sa.mode, sa.uid, sa.gid, sa.size, sa.mtime_ns, sa.rdev) != \
                (sb.mode, sb.uid, sb.gid, sb.size, sb.mtime_ns, sb.rdev):
            return True
        if a.xattrs(ino) != b.xattrs(ino):
            return True
        if S.S_ISLNK(sa.mode):
            return a.readlink(ino) != b.readlink(ino)
        if S.S_ISREG(sa.mode):
            return not self._same_content(ino, sa.size)
        return False

    def _same_content(self, ino, size):
        a, b = self.a.fs, self.b.fs
        inline_a, inline_b = a.inline_data(ino), b.inline_data(ino)
        if inline_a is not None or inline_b is not None:
            data_a = inline_a if inline_a is not None else a.read_file(a.runs(ino), 0, size)
            data_b = inline_b if inline_b is not None else b.read_file(b.runs(ino), 0, size)
            self.counts["bytes_compared"] += size
            return data_a == data_b
        runs_a, runs_b = a.runs(ino), b.runs(ino)
        for offset, length, start_a, start_b in _aligned(runs_a, runs_b):
            if start_a == start_b and (start_a is None
                                       or not self.changed.intersects(start_a, length)):
                continue        # the same blocks, not written in between
            for at in range(offset, offset + length, COMPARE_CHUNK):
                n = min(COMPARE_CHUNK, offset + length - at)
                self.counts["bytes_compared"] += n
                if a.read_file(runs_a, at, n) != b.read_file(runs_b, at, n):
                    return False
        return True

    def _damage(self, path, error):
        self.result.damaged.append((path, str(error)))


def _aligned(runs_a, runs_b):
    """(file offset, length, view offset in A or None, in B or None) over
    the pieces where neither run map changes from one run to the next."""
    ia = ib = 0
    pos_a = pos_b = 0       # file offsets where runs_a[ia], runs_b[ib] start
    pos = 0
    while ia < len(runs_a) and ib < len(runs_b):
        start_a, len_a = runs_a[ia]
        start_b, len_b = runs_b[ib]
        end = min(pos_a + len_a, pos_b + len_b)
        if end > pos:
            yield (pos, end - pos,
                   None if start_a is None else start_a + pos - pos_a,
                   None if start_b is None else start_b + pos - pos_b)
        pos = end
        if end == pos_a + len_a:
            pos_a += len_a
            ia += 1
        if end == pos_b + len_b:
            pos_b += len_b
            ib += 1


def _child_path(directory, name):
    return (directory if directory.endswith(b"/") else directory + b"/") + name


def _join(paths, name_of):
    d, name = name_of
    return _child_path(paths[d], name)
