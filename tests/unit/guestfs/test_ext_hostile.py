"""The ext reader on damaged and hostile images.

A valid image (built by mkfs.ext* -d) is damaged precisely where debugfs
says a structure lives: an inode, an extent tree, a directory block, an
attribute block, a group descriptor; or truncated; or flipped at random
in its metadata by hypothesis.  Then the whole tree is walked through the
public ``GuestFs`` methods only.  Every call must return, or raise
FsDamaged or Unsupported, within a few seconds (the budget is cut to 2 s),
the walk must end, and every file the damage did not touch must read
exactly as on the undamaged image.
"""

import os
import re
import stat
import struct
import subprocess
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapfs.guestfs import base, ext
from snapfs.guestfs.base import FsDamaged, Unsupported
from snapfs.guestfs.ext import ExtGuestFs

KiB, MiB = 1 << 10, 1 << 20
CALL_SECONDS = 5            # each call; the budget is 2 s (see the fixture)
MAX_PATHS = 5000            # a walk that meets more has looped
BS = 1024


def debugfs(image, request):
    return subprocess.run(["debugfs", "-R", request, str(image)], check=True,
                          capture_output=True, text=True).stdout


def build(tmp_path, fstype, options):
    """An image of a known tree: small, large and fragmented files (an
    extent tree of depth 1, or indirect blocks), directories nested and
    large, fast and slow symlinks, an attribute block, in 8 block groups."""
    src = tmp_path / f"src-{fstype}"
    (src / "dir" / "sub" / "deeper").mkdir(parents=True)
    (src / "big").mkdir()
    (src / "small.txt").write_bytes(b"hello " * 100)
    (src / "file.bin").write_bytes(os.urandom(60 * KiB))
    with open(src / "frag.bin", "wb") as f:   # islands of data: one extent each
        for i in range(24):
            f.seek(i * 2 * BS)
            f.write(bytes([i + 1]) * BS)
    for i in range(30):
        (src / "dir" / f"file-{i:02d}").write_bytes(b"d%d" % i)
    for i in range(5):
        (src / "dir" / "sub" / f"s-{i}").write_bytes(b"s%d" % i * 100)
    (src / "dir" / "sub" / "deeper" / "x").write_bytes(b"x")
    for i in range(300):
        (src / "big" / f"entry-{i:04d}-with-a-longer-name").write_bytes(b"")
    os.symlink("small.txt", src / "link")
    os.symlink("t" * 300, src / "longlink")
    (src / "xattr.txt").write_bytes(b"attributes")
    os.setxattr(src / "xattr.txt", "user.big", b"v" * 600)
    os.setxattr(src / "xattr.txt", "user.small", b"s")
    for i in range(8):
        (src / f"victim-{i}").write_bytes(b"victim %d " % i * 500)
    image = tmp_path / f"{fstype}.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    # 8 groups of 64 inodes: the large directory's files spread over them.
    subprocess.run([f"mkfs.{fstype}", "-q", "-F", "-b", str(BS), "-g", "2048", "-N", "512", "-I", "256",
                    *options, "-d", str(src), str(image)], check=True, capture_output=True)
    return image


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    return {"ext4": build(tmp, "ext4", ["-O", "^metadata_csum"]),
            "ext2": build(tmp, "ext2", [])}


@pytest.fixture(autouse=True)
def short_budget(monkeypatch):
    monkeypatch.setattr(base, "REQUEST_SECONDS", 2.0)


class Image:
    """A copy of an image in memory, to damage, and where things are in it."""

    def __init__(self, path):
        self.path = path
        self.data = bytearray(path.read_bytes())

    def fs(self):
        data = self.data
        return ExtGuestFs(lambda offset, length: bytes(data[offset:offset + length]), len(data))

    def ino(self, path):
        return int(re.search(r"Inode: (\d+)", debugfs(self.path, f"stat {path}")).group(1))

    def inode_offset(self, path):
        out = debugfs(self.path, f"imap <{self.ino(path)}>")
        block, offset = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", out).groups()
        return int(block) * BS + int(offset, 16)

    def blocks(self, path):
        return [int(b) for b in debugfs(self.path, f"blocks {path}").split()]

    def put(self, offset, fmt, *values):
        struct.pack_into(fmt, self.data, offset, *values)

    def get(self, offset, fmt):
        return struct.unpack_from(fmt, self.data, offset)


def timed(fn, *args):
    """fn(*args), or the name of the error it may raise; never slow."""
    start = time.monotonic()
    try:
        return fn(*args)
    except FsDamaged:
        return "EIO"
    except Unsupported:
        return "unsupported"
    finally:
        assert time.monotonic() - start < CALL_SECONDS, (fn.__name__, args)


def describe(fs, ino):
    """What every public method says of one inode."""
    st_ = timed(fs.stat, ino)
    listing = timed(fs.listdir, ino)
    if isinstance(listing, list):
        listing = sorted(listing)
    content = timed(fs.inline_data, ino)
    if content is None:
        runs = timed(fs.runs, ino)
        content = runs if isinstance(runs, str) else timed(
            fs.read_file, runs, 0, min(sum(n for _, n in runs), 4 * MiB))
    timed(fs.metadata_ranges, ino)
    return {"stat": st_, "listdir": listing, "readlink": timed(fs.readlink, ino),
            "xattrs": timed(fs.xattrs, ino), "content": content}


def survey(fs):
    """{path: describe()} of everything reachable from the root."""
    out, todo = {b"": describe(fs, fs.root)}, [b""]
    while todo:
        path = todo.pop()
        listing = out[path]["listdir"]
        if not isinstance(listing, list):
            continue
        for name, child, kind in listing:
            assert name and b"/" not in name and name not in (b".", b"..")
            child_path = path + b"/" + name
            out[child_path] = describe(fs, child)
            assert len(out) < MAX_PATHS, "the walk loops"
            if kind == stat.S_IFDIR:
                todo.append(child_path)
    return out


@pytest.fixture(scope="module")
def pristine(images):
    return {kind: survey(Image(path).fs()) for kind, path in images.items()}


def assert_local(damaged, pristine, affected, missing=(), edited=()):
    """Every path the damage did not touch reads as before; each touched
    one fails (EIO) somewhere, or is gone from its directory.  A directory
    whose block was edited (an entry added or cleared) lists what it did,
    less the missing entries, and none of the added ones."""
    under = lambda p, roots: any(p == r or p.startswith(r + b"/") for r in roots)
    for path, before in pristine.items():
        if path in edited:
            now = dict(damaged[path])
            assert now.pop("listdir") == [e for e in before["listdir"]
                                          if path + b"/" + e[0] not in missing], path
            assert now.pop("content") != before["content"]
            assert now == {k: v for k, v in before.items() if k not in ("listdir", "content")}
        elif under(path, missing):
            assert path not in damaged or under(path, affected), path
        elif under(path, affected):
            if path in damaged:
                assert "EIO" in damaged[path].values() or damaged[path] != before, path
        else:
            assert damaged.get(path) == before, path
    assert set(damaged) <= set(pristine)


def damage_inode_mode(img):
    img.put(img.inode_offset("/victim-0"), "<H", 0xF1ED)
    return [b"/victim-0"]


def damage_inode_size(img):
    off = img.inode_offset("/victim-1")
    img.put(off + 4, "<I", 0xFFFFFFFF)
    img.put(off + 108, "<I", 0x80000000)       # 2^63 and more: negative
    return [b"/victim-1"]


def damage_extent_count(img):
    img.put(img.inode_offset("/victim-2") + 40 + 2, "<HH", 0xFFFF, 0xFFFF)
    return [b"/victim-2"]


def damage_extent_depth(img):
    img.put(img.inode_offset("/victim-3") + 40 + 6, "<H", 1000)
    return [b"/victim-3"]


def frag_index(img):
    """The offset of frag.bin's i_block, which holds one index entry."""
    off = img.inode_offset("/frag.bin") + 40
    magic, entries, _, depth = img.get(off, "<HHHH")
    assert (magic, depth) == (0xF30A, 1) and entries >= 1, "frag.bin must have an index node"
    return off


def damage_extent_index_self(img):
    root = frag_index(img)
    leaf = img.get(root + 12 + 4, "<I")[0]
    # The node becomes an index of depth 1 whose entry points at itself.
    img.put(leaf * BS + 6, "<H", 1)
    img.put(leaf * BS + 12, "<IIHH", 0, leaf, 0, 0)
    return [b"/frag.bin"]


def damage_extent_index_outside(img):
    img.put(frag_index(img) + 12 + 4, "<IH", 0xFFFFFF00, 0x7FFF)
    return [b"/frag.bin"]


def dir_entries_block(img, path):
    return img.blocks(path)[0] * BS


def damage_rec_len_zero(img):
    start = dir_entries_block(img, "/dir/sub")
    img.put(start + 12 + 4, "<H", 0)           # the ".." entry's rec_len
    return [b"/dir/sub"]


def damage_rec_len_past_block(img):
    start = dir_entries_block(img, "/dir/sub")
    img.put(start + 12 + 4, "<H", 2 * BS)
    return [b"/dir/sub"]


def damage_name_len_past_rec_len(img):
    start = dir_entries_block(img, "/dir/sub")
    img.put(start + 12 + 6, "<B", 200)         # ".." with rec_len of the rest, name 200 bytes
    at = start + 12 + img.get(start + 12 + 4, "<H")[0]
    img.put(at + 6, "<B", 255)                 # the next entry's name runs past its record
    return [b"/dir/sub"]


def find_entry(img, dir_path, name):
    """The offset of a named entry in a directory's blocks."""
    for block in img.blocks(dir_path):
        at, end = block * BS, (block + 1) * BS
        while at < end:
            inode, rec_len, name_len = img.get(at, "<IHB")
            if img.data[at + 8:at + 8 + name_len] == name:
                return at
            at += rec_len
    raise AssertionError(f"{name} not in {dir_path}")


def damage_entry_inode_zero(img):
    img.put(find_entry(img, "/dir", b"file-07"), "<I", 0)
    return [], [b"/dir/file-07"], [b"/dir"]


def damage_entry_inode_too_large(img):
    img.put(find_entry(img, "/dir", b"file-08"), "<I", 0x7FFFFFFF)
    return [b"/dir"]


def add_entry(img, dir_path, name, inode, file_type=2):
    """Splits the last entry of the directory's first block to add one."""
    block = img.blocks(dir_path)[0] * BS
    at = block
    while True:
        _, rec_len, name_len = img.get(at, "<IHB")
        if at + rec_len >= block + BS:
            break
        at += rec_len
    used = (8 + name_len + 3) & ~3
    img.put(at + 4, "<H", used)
    new = at + used
    img.put(new, "<IHBB", inode, block + BS - new, len(name), file_type)
    img.data[new + 8:new + 8 + len(name)] = name


def damage_loop_to_root(img):
    add_entry(img, "/dir/sub", b"loop", 2)
    return [], [], [b"/dir/sub"]


def damage_loop_to_ancestor(img):
    add_entry(img, "/dir/sub/deeper", b"up", img.ino("/dir"), file_type=1)   # the type lies too
    return [], [], [b"/dir/sub/deeper"]


def damage_second_way_in(img):
    add_entry(img, "/dir/sub", b"bigagain", img.ino("/big"))
    return [], [], [b"/dir/sub"]


def damage_symlink_size(img):
    img.put(img.inode_offset("/longlink") + 4, "<I", 1 << 30)
    return [b"/longlink"]


def damage_xattr_block(img):
    acl = img.get(img.inode_offset("/xattr.txt") + 104, "<I")[0]
    assert acl, "xattr.txt must have an attribute block"
    img.data[acl * BS + 32:acl * BS + BS] = os.urandom(BS - 32)
    return [b"/xattr.txt"]


def damage_xattr_sizes(img):
    acl = img.get(img.inode_offset("/xattr.txt") + 104, "<I")[0]
    img.put(acl * BS + 32 + 8, "<I", 0xFFFFFFF0)   # the first entry's value size
    return [b"/xattr.txt"]


def group_of(img, path):
    ino = img.ino(path)
    per_group = struct.unpack_from("<I", img.data, 1024 + 40)[0]
    return (ino - 1) // per_group


def damage_group_descriptor(img):
    """The descriptor of a group that holds some of the files (not the
    root's) points its inode table past the end of the filesystem."""
    group = group_of(img, "/big/entry-0200-with-a-longer-name")
    assert group != 0, "mkfs put all inodes in group 0"
    incompat, desc_size = struct.unpack_from("<I", img.data, 1024 + 0x60)[0], 32
    if incompat & 0x80:                             # 64bit: s_desc_size
        desc_size = struct.unpack_from("<H", img.data, 1024 + 0xFE)[0]
    img.put(2 * BS + group * desc_size + 8, "<I", 0xFFFFFF00)
    per_group = struct.unpack_from("<I", img.data, 1024 + 40)[0]
    return {"group": group, "per_group": per_group}


EXT4_CASES = [damage_inode_mode, damage_inode_size, damage_extent_count, damage_extent_depth,
              damage_extent_index_self, damage_extent_index_outside, damage_rec_len_zero,
              damage_rec_len_past_block, damage_name_len_past_rec_len, damage_entry_inode_zero,
              damage_entry_inode_too_large, damage_loop_to_root, damage_loop_to_ancestor,
              damage_second_way_in, damage_symlink_size, damage_xattr_block, damage_xattr_sizes]


@pytest.mark.parametrize("damage", EXT4_CASES, ids=lambda f: f.__name__[len("damage_"):])
def test_damage_stays_local(damage, images, pristine):
    img = Image(images["ext4"])
    touched = damage(img)
    if isinstance(touched, list):
        touched = (touched,)
    assert_local(survey(img.fs()), pristine["ext4"], *touched)


def test_group_descriptor_outside(images, pristine):
    img = Image(images["ext4"])
    where = damage_group_descriptor(img)
    fs = img.fs()
    damaged = survey(fs)
    before = pristine["ext4"]
    for path, was in before.items():
        ino = was["stat"].ino if path else fs.root
        in_group = (ino - 1) // where["per_group"] == where["group"]
        if in_group:
            assert path not in damaged or damaged[path]["stat"] == "EIO", path
        elif path in damaged:
            assert damaged[path] == was, path
    assert b"/small.txt" in damaged and b"/big" in damaged


def test_truncated_image(images, pristine):
    img = Image(images["ext4"])
    del img.data[len(img.data) // 3:]
    try:
        fs = img.fs()
    except (FsDamaged, Unsupported):
        return
    damaged = survey(fs)
    for path, now in damaged.items():
        for key, value in now.items():
            assert value in ("EIO", "unsupported") or value == pristine["ext4"][path][key], path


def test_ext2_indirect_damage(images, pristine):
    """Block maps of ext2: an indirect pointer outside, a size no map can
    hold, an indirect block that points at itself."""
    img = Image(images["ext2"])
    off = img.inode_offset("/file.bin") + 40
    img.put(off + 12 * 4, "<I", 0xFFFFFFF0)            # the single indirect block
    off = img.inode_offset("/victim-1")
    img.put(off + 4, "<I", 0xFFFFFFFF)
    img.put(off + 108, "<I", 0x7FFFFFFF)               # 2^63 - 1 bytes
    off = img.inode_offset("/frag.bin") + 40
    single = img.get(off + 12 * 4, "<I")[0]
    img.put(single * BS, "<I", single)
    img.put(off + 13 * 4, "<I", single)                # double indirect: itself
    damaged = survey(img.fs())
    assert damaged[b"/file.bin"]["content"] == "EIO"
    assert damaged[b"/victim-1"]["content"] == "EIO"
    assert_local(damaged, pristine["ext2"], [b"/file.bin", b"/victim-1", b"/frag.bin"])


def test_extent_cap_is_hit_while_reading(images, monkeypatch):
    """A file of thousands of extents (a tree of depth 2 built here) with
    MAX_RUNS cut to 200: the walk stops at the cap, after a handful of
    leaf blocks, without reading the rest or holding their runs."""
    img = Image(images["ext4"])
    per_block = (BS - 12) // 12
    first_free = len(img.data) // BS - 2 - per_block - 4
    index, leaves = first_free, range(first_free + 1, first_free + 1 + per_block)
    lblock = 0
    img.put(index * BS, "<HHHHI", 0xF30A, per_block, per_block, 1, 0)
    for i, leaf in enumerate(leaves):
        img.put(index * BS + 12 + 12 * i, "<IIHH", lblock, leaf, 0, 0)
        img.put(leaf * BS, "<HHHHI", 0xF30A, per_block, per_block, 0, 0)
        for j in range(per_block):
            img.put(leaf * BS + 12 + 12 * j, "<IHHI", lblock, 1, 0, 10)
            lblock += 2                             # a hole after each: two runs an extent
    off = img.inode_offset("/victim-4")
    img.put(off + 40, "<HHHHIIIHH", 0xF30A, 1, 4, 2, 0, 0, index, 0, 0)
    img.put(off + 4, "<I", lblock * BS)
    monkeypatch.setattr(ext, "MAX_RUNS", 200)
    fs = img.fs()
    reads = []
    inner = fs.reader._read
    fs.reader._read = lambda o, n: (reads.append(o // BS), inner(o, n))[1]
    tracemalloc.start()
    try:
        with pytest.raises(FsDamaged, match="over 200 extents"):
            fs.runs(img.ino("/victim-4"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    leaves_read = [b for b in reads if b in leaves]
    assert 1 <= len(leaves_read) <= 200 // (2 * per_block) + 2, leaves_read
    assert peak < 1 * MiB


def test_directory_cap_is_hit_while_reading(images, monkeypatch):
    monkeypatch.setattr(ext, "MAX_DIR_ENTRIES", 50)
    img = Image(images["ext4"])
    fs = img.fs()
    reads = []
    inner = fs.reader._read
    fs.reader._read = lambda o, n: (reads.append(n), inner(o, n))[1]
    with pytest.raises(FsDamaged, match="over 50 entries"):
        fs.listdir(img.ino("/big"))
    assert sum(reads) < len(img.blocks("/big")) * BS / 2 + 200 * 256


def test_budget_ends_a_request_that_reads_too_much(images, monkeypatch):
    """A directory of a million empty blocks (one extent) is read until
    the byte budget ends the request, not to the end."""
    monkeypatch.setattr(base, "REQUEST_BYTES", 2 * MiB)
    img = Image(images["ext4"])
    off = img.inode_offset("/dir/sub/deeper")
    blocks = len(img.data) // BS - 100
    for b in range(100, 100 + blocks):               # empty entries: rec_len = block
        img.put(b * BS, "<IH", 0, BS)
    img.put(off + 40, "<HHHHIIHHI", 0xF30A, 1, 4, 0, 0, 0, 0x7FFF, 0, 100)
    img.put(off + 4, "<I", 0x7FFF * BS)
    img.put(off + 32, "<I", img.get(off + 32, "<I")[0] & ~ext.INLINE_DATA_FL | ext.EXTENTS_FL)
    fs = img.fs()
    start = time.monotonic()
    with pytest.raises(FsDamaged):
        fs.listdir(img.ino("/dir/sub/deeper"))
    assert time.monotonic() - start < CALL_SECONDS


def metadata_areas(image_path):
    """Byte ranges of the metadata: superblock, group descriptors, the
    used part of each inode table, directory blocks, extent index and
    attribute blocks (where dumpe2fs and debugfs say they are)."""
    areas = [(1024, 1024), (2 * BS, BS)]
    dump = subprocess.run(["dumpe2fs", str(image_path)], check=True, capture_output=True,
                          text=True).stdout
    for first, last in re.findall(r"Inode table at (\d+)-(\d+)", dump):
        areas.append((int(first) * BS, min(int(last) - int(first) + 1, 16) * BS))
    for path in ("/", "/dir", "/dir/sub", "/big"):
        areas += [(int(b) * BS, BS) for b in debugfs(image_path, f"blocks {path}").split()]
    acl = re.search(r"File ACL: (\d+)", debugfs(image_path, "stat /xattr.txt")).group(1)
    areas.append((int(acl) * BS, BS))
    ex = debugfs(image_path, "ex /frag.bin")
    areas += [(int(m) * BS, BS) for m in re.findall(r"^\s*0/\s*1\s+\d+/\s*\d+\s+\d+ - \d+\s+(\d+)",
                                                    ex, re.M)]
    return areas


@pytest.fixture(scope="module")
def fuzz_areas(images):
    return {kind: metadata_areas(path) for kind, path in images.items()}


@settings(max_examples=int(os.environ.get("EXT_FUZZ_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_metadata(images, fuzz_areas, data):
    """Random bytes of the metadata replaced: opening may fail, and any
    call may fail, but only with FsDamaged or Unsupported, quickly, and the
    walk ends."""
    kind = data.draw(st.sampled_from(["ext4", "ext2"]))
    img = Image(images[kind])
    areas = fuzz_areas[kind]
    for _ in range(data.draw(st.integers(1, 24))):
        start, length = areas[data.draw(st.integers(0, len(areas) - 1))]
        at = start + data.draw(st.integers(0, length - 1))
        img.data[at] = data.draw(st.sampled_from([0, 0xFF, img.data[at] ^ (1 << data.draw(
            st.integers(0, 7))), data.draw(st.integers(0, 255))]))
    try:
        fs = img.fs()
    except (FsDamaged, Unsupported):
        return
    survey(fs)
