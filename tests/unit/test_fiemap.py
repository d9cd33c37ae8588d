"""file_extents' byte layouts against the UAPI headers, and its parsing of synthetic ioctl answers.

Sizes, offsets and constants come from gcc compiling linux/fiemap.h, fs.h,
btrfs.h and btrfs_tree.h, not from the library.  What the kernel answers for
real files is proven in tests/kernel/test_fiemap.py; here the answers are
built by hand to reach every branch (each refused flag, several calls, a
chunk crossed, a RAID chunk) without root.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

import pytest

from dmflakey_ioctl.errors import DMFlakeyError, InvalidArgumentError, UnsupportedFeatureError
from dmflakey_ioctl.kernel import btrfs, fiemap

from .uapi import assert_fields, layout, probe

HEADERS = [Path("/usr/include/linux/fiemap.h"), Path("/usr/include/linux/fs.h"),
           Path("/usr/include/linux/btrfs.h"), Path("/usr/include/linux/btrfs_tree.h")]

C_FIELDS = {
    "fiemap": ["fm_start", "fm_length", "fm_flags", "fm_mapped_extents", "fm_extent_count",
               "fm_reserved", "fm_extents"],
    "fiemap_extent": ["fe_logical", "fe_physical", "fe_length", "fe_reserved64", "fe_flags",
                      "fe_reserved"],
    "fsxattr": ["fsx_xflags", "fsx_extsize", "fsx_nextents", "fsx_projid", "fsx_cowextsize", "fsx_pad"],
    "btrfs_ioctl_fs_info_args": ["max_id", "num_devices", "fsid", "nodesize", "sectorsize",
                                 "clone_alignment", "csum_type", "csum_size", "flags", "generation",
                                 "metadata_uuid", "reserved"],
    "btrfs_ioctl_dev_info_args": ["devid", "uuid", "bytes_used", "total_bytes", "unused", "path"],
    "btrfs_ioctl_feature_flags": ["compat_flags", "compat_ro_flags", "incompat_flags"],
    "btrfs_ioctl_search_key": ["tree_id", "min_objectid", "max_objectid", "min_offset", "max_offset",
                               "min_transid", "max_transid", "min_type", "max_type", "nr_items",
                               "unused", "unused1", "unused2", "unused3", "unused4"],
    "btrfs_ioctl_search_header": ["transid", "objectid", "offset", "type", "len"],
    "btrfs_ioctl_search_args_v2": ["key", "buf_size", "buf"],
    "btrfs_chunk": ["length", "owner", "stripe_len", "type", "io_align", "io_width", "sector_size",
                    "num_stripes", "sub_stripes", "stripe"],
    "btrfs_stripe": ["devid", "offset", "dev_uuid"],
}
FLEXIBLE = {("fiemap", "fm_extents"), ("btrfs_ioctl_search_args_v2", "buf")}

CONSTANTS = {
    fiemap: ["FS_IOC_FIEMAP", "FS_IOC_FSGETXATTR", "FIEMAP_MAX_OFFSET", "FIEMAP_FLAG_SYNC",
             "FIEMAP_EXTENT_LAST", "FIEMAP_EXTENT_UNKNOWN", "FIEMAP_EXTENT_DELALLOC",
             "FIEMAP_EXTENT_ENCODED", "FIEMAP_EXTENT_DATA_ENCRYPTED", "FIEMAP_EXTENT_NOT_ALIGNED",
             "FIEMAP_EXTENT_DATA_INLINE", "FIEMAP_EXTENT_DATA_TAIL", "FIEMAP_EXTENT_UNWRITTEN",
             "FS_XFLAG_REALTIME"],
    btrfs: ["BTRFS_IOC_TREE_SEARCH_V2", "BTRFS_IOC_DEV_INFO", "BTRFS_IOC_FS_INFO",
            "BTRFS_IOC_GET_FEATURES", "BTRFS_CHUNK_TREE_OBJECTID", "BTRFS_FIRST_CHUNK_TREE_OBJECTID",
            "BTRFS_CHUNK_ITEM_KEY", "BTRFS_BLOCK_GROUP_DATA", "BTRFS_BLOCK_GROUP_DUP"],
}
HEADER_ONLY = ["BTRFS_BLOCK_GROUP_RAID0", "BTRFS_BLOCK_GROUP_RAID1", "BTRFS_BLOCK_GROUP_RAID10",
               "BTRFS_BLOCK_GROUP_RAID5", "BTRFS_BLOCK_GROUP_RAID6", "BTRFS_BLOCK_GROUP_RAID1C3",
               "BTRFS_BLOCK_GROUP_RAID1C4", "BTRFS_BLOCK_GROUP_PROFILE_MASK", "BTRFS_FSID_SIZE",
               "BTRFS_UUID_SIZE", "BTRFS_DEVICE_PATH_NAME_MAX"]
# incompat features the chunk tree copes with, and those it does not (newer ones only if the header has them)
MAPPABLE = ["MIXED_BACKREF", "DEFAULT_SUBVOL", "MIXED_GROUPS", "COMPRESS_LZO", "COMPRESS_ZSTD",
            "BIG_METADATA", "EXTENDED_IREF", "RAID56", "SKINNY_METADATA", "NO_HOLES", "METADATA_UUID",
            "RAID1C34", "SIMPLE_QUOTA"]
UNMAPPABLE = ["ZONED", "EXTENT_TREE_V2", "RAID_STRIPE_TREE"]


@pytest.fixture(scope="module")
def c(tmp_path_factory) -> dict[str, int]:
    """Every size, offset and constant above, as gcc sees them in the installed headers."""
    constants = [n for names in CONSTANTS.values() for n in names] + HEADER_ONLY
    optional = [f"BTRFS_FEATURE_INCOMPAT_{feature}" for feature in MAPPABLE + UNMAPPABLE]
    return probe(tmp_path_factory.mktemp("uapi"), HEADERS, C_FIELDS, FLEXIBLE, constants, optional)


def _assert_layout(c: dict[str, int], name: str, packer: struct.Struct, groups: list[int],
                   fields: list[str] | None = None) -> None:
    fields = fields or [f for f in C_FIELDS[name] if (name, f) not in FLEXIBLE]
    assert_fields(c, name, fields, layout(packer.format, groups))


# --------------------------------------------------------------------------- layouts

def test_fiemap_structs_match_the_header(c):
    assert fiemap.FIEMAP_HEAD.size == c["sizeof fiemap"] == c["offset fiemap.fm_extents"] == 32
    _assert_layout(c, "fiemap", fiemap.FIEMAP_HEAD, [1] * 6)
    assert fiemap.FIEMAP_EXTENT.size == c["sizeof fiemap_extent"] == 56
    _assert_layout(c, "fiemap_extent", fiemap.FIEMAP_EXTENT, [1, 1, 1, 2, 1, 3])
    assert fiemap.FSXATTR.size == c["sizeof fsxattr"]
    _assert_layout(c, "fsxattr", fiemap.FSXATTR, [1] * 6)


def test_btrfs_ioctl_structs_match_the_header(c):
    assert btrfs.FS_INFO.size == c["sizeof btrfs_ioctl_fs_info_args"] == 1024
    _assert_layout(c, "btrfs_ioctl_fs_info_args", btrfs.FS_INFO, [1] * 12)
    assert btrfs.DEV_INFO.size == c["sizeof btrfs_ioctl_dev_info_args"] == 4096
    _assert_layout(c, "btrfs_ioctl_dev_info_args", btrfs.DEV_INFO, [1, 1, 1, 1, 379, 1])
    assert btrfs.FEATURE_FLAGS.size == c["sizeof btrfs_ioctl_feature_flags"]
    _assert_layout(c, "btrfs_ioctl_feature_flags", btrfs.FEATURE_FLAGS, [1, 1, 1])
    assert btrfs.SEARCH_KEY.size == c["sizeof btrfs_ioctl_search_key"] == c["size btrfs_ioctl_search_args_v2.key"]
    _assert_layout(c, "btrfs_ioctl_search_key", btrfs.SEARCH_KEY, [1] * 15)
    assert c["offset btrfs_ioctl_search_args_v2.buf_size"] == btrfs.SEARCH_KEY.size
    assert c["size btrfs_ioctl_search_args_v2.buf_size"] == btrfs.SEARCH_BUF_SIZE.size
    assert c["offset btrfs_ioctl_search_args_v2.buf"] == btrfs.SEARCH_KEY.size + btrfs.SEARCH_BUF_SIZE.size
    assert btrfs.SEARCH_HEADER.size == c["sizeof btrfs_ioctl_search_header"]
    _assert_layout(c, "btrfs_ioctl_search_header", btrfs.SEARCH_HEADER, [1] * 5)


def test_btrfs_chunk_item_matches_the_header(c):
    assert btrfs.STRIPE.size == c["sizeof btrfs_stripe"] == 32
    _assert_layout(c, "btrfs_stripe", btrfs.STRIPE, [1, 1, 1])
    assert btrfs.CHUNK.size == c["offset btrfs_chunk.stripe"] == 48
    assert c["sizeof btrfs_chunk"] == btrfs.CHUNK.size + btrfs.STRIPE.size
    _assert_layout(c, "btrfs_chunk", btrfs.CHUNK, [1] * 9, C_FIELDS["btrfs_chunk"][:-1])
    assert btrfs.CHUNK.format.startswith("<") and btrfs.STRIPE.format.startswith("<")  # on-disk LE


def test_constants_match_the_headers(c):
    for module, names in CONSTANTS.items():
        for name in names:
            assert getattr(module, name) == c[f"const {name}"], f"{module.__name__}.{name}"
    assert btrfs.PROFILE_MASK == c["const BTRFS_BLOCK_GROUP_PROFILE_MASK"]
    for bit, profile in btrfs.PROFILES.items():
        assert bit == c[f"const BTRFS_BLOCK_GROUP_{profile.upper()}"], profile
    assert btrfs.FS_INFO.unpack_from(bytes(1024))[2] == bytes(c["const BTRFS_FSID_SIZE"])
    assert btrfs.DEV_INFO.format.endswith(f"{c['const BTRFS_DEVICE_PATH_NAME_MAX']}s")


def test_incompat_features_whitelist_matches_the_header(c):
    seen = 0
    for feature in MAPPABLE:
        value = c.get(f"const BTRFS_FEATURE_INCOMPAT_{feature}")
        if value is not None:
            seen += 1
            assert value & btrfs.INCOMPAT_MAPPABLE == value, f"{feature} should be mappable"
            assert btrfs.unmappable_features(value) == []
    for feature in UNMAPPABLE:
        value = c.get(f"const BTRFS_FEATURE_INCOMPAT_{feature}")
        if value is not None:
            seen += 1
            assert btrfs.unmappable_features(value) == [feature.lower()]
    assert seen >= 13, "the header lacks the btrfs incompat feature bits"
    # the bits newer than old headers, as the kernel defines them
    assert btrfs.unmappable_features(1 << 14) == ["raid_stripe_tree"]
    assert btrfs.unmappable_features(1 << 16) == []
    assert btrfs.unmappable_features(1 << 17 | 1 << 12) == ["zoned", "incompat bit 17"]


# --------------------------------------------------------------------------- fiemap answers

def test_request_packs_the_header_fields(c):
    buf = fiemap.request(12345, 7)
    assert len(buf) == c["sizeof fiemap"] + 7 * c["sizeof fiemap_extent"]
    get = lambda field, fmt: struct.unpack_from(fmt, buf, c[f"offset fiemap.{field}"])[0]  # noqa: E731
    assert get("fm_start", "=Q") == 12345
    assert get("fm_length", "=Q") == c["const FIEMAP_MAX_OFFSET"] - 12345
    assert get("fm_flags", "=I") == c["const FIEMAP_FLAG_SYNC"]
    assert get("fm_mapped_extents", "=I") == 0
    assert get("fm_extent_count", "=I") == 7
    assert buf[c["offset fiemap.fm_extents"]:] == bytes(7 * 56)


def _answer(c: dict[str, int], buf: bytearray, extents: list[tuple[int, int, int, int]]) -> None:
    """Fill buf as the kernel does: fm_mapped_extents and each fiemap_extent, at the header's offsets."""
    struct.pack_into("=I", buf, c["offset fiemap.fm_mapped_extents"], len(extents))
    for i, (logical, physical, length, flags) in enumerate(extents):
        base = c["offset fiemap.fm_extents"] + i * c["sizeof fiemap_extent"]
        for field, fmt, value in (("fe_logical", "=Q", logical), ("fe_physical", "=Q", physical),
                                  ("fe_length", "=Q", length), ("fe_flags", "=I", flags)):
            struct.pack_into(fmt, buf, base + c[f"offset fiemap_extent.{field}"], value)
        struct.pack_into("=2Q", buf, base + c["offset fiemap_extent.fe_reserved64"], 0xAAAA, 0xBBBB)


def test_parse_answer_reads_each_extent(c):
    buf = fiemap.request(0, 4)
    _answer(c, buf, [(0, 1 << 40, 4096, 0), (8192, 7 << 30, 1 << 20, 0x2001)])
    assert fiemap.parse_answer(buf) == [fiemap.Extent(0, 1 << 40, 4096, 0),
                                        fiemap.Extent(8192, 7 << 30, 1 << 20, 0x2001)]
    assert fiemap.parse_answer(fiemap.request(0, 4)) == []
    struct.pack_into("=I", buf, c["offset fiemap.fm_mapped_extents"], 5)
    with pytest.raises(ValueError, match="5 extents for an array of 4"):
        fiemap.parse_answer(buf)


class FakeFiemap:
    """Answers FS_IOC_FIEMAP from a list of extents the way the kernel does; other ioctls go through."""

    def __init__(self, c: dict[str, int], extents: list[tuple[int, int, int, int]], fail: int = 0,
                 stuck: bool = False):
        self.c, self.extents, self.fail, self.stuck, self.starts = c, extents, fail, stuck, []
        self.real = fcntl.ioctl

    def __call__(self, fd, request, arg=0, mutate=True):
        if request != self.c["const FS_IOC_FIEMAP"]:
            return self.real(fd, request, arg, mutate)
        if self.fail:
            raise OSError(self.fail, "synthetic")
        start, _length, flags, _mapped, count = struct.unpack_from("=QQIII", arg)
        assert flags == self.c["const FIEMAP_FLAG_SYNC"]
        self.starts.append(start)
        found = [e for e in self.extents if self.stuck or e[0] + e[2] > start][:count]
        _answer(self.c, arg, found)
        return 0


def test_read_extents_calls_again_from_where_the_last_answer_ended(c, monkeypatch, tmp_path):
    extents = [(i * 8192, 10 * 8192 + i * 4096, 4096, 0) for i in range(5)]
    extents[-1] = extents[-1][:3] + (c["const FIEMAP_EXTENT_LAST"],)
    fake = FakeFiemap(c, extents)
    monkeypatch.setattr(fcntl, "ioctl", fake)
    got = fiemap.read_extents(0, "file extents", "/f", 1 << 30, per_call=2)
    assert [tuple(e) for e in got] == extents
    assert fake.starts == [0, 8192 + 4096, 3 * 8192 + 4096]
    # past the end of the file nothing more is asked for
    fake.starts.clear()
    got = fiemap.read_extents(0, "file extents", "/f", 8192 + 4096, per_call=2)
    assert len(got) == 2 and fake.starts == [0]
    # an empty answer ends the map; an answer that does not move on would loop forever: refused
    monkeypatch.setattr(fcntl, "ioctl", FakeFiemap(c, []))
    assert fiemap.read_extents(0, "file extents", "/f", 1 << 30) == []
    monkeypatch.setattr(fcntl, "ioctl", FakeFiemap(c, [(0, 1 << 20, 4096, 0)], stuck=True))
    with pytest.raises(DMFlakeyError, match="made no progress") as info:
        fiemap.read_extents(0, "file extents", "/f", 1 << 30)
    assert info.value.errno == errno.EIO


def test_read_extents_turns_kernel_errors_into_library_errors(c, monkeypatch, tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x")
    with open(f, "rb") as fh:
        monkeypatch.setattr(fcntl, "ioctl", FakeFiemap(c, [], fail=errno.EOPNOTSUPP))
        with pytest.raises(UnsupportedFeatureError) as info:
            fiemap.read_extents(fh.fileno(), "file extents", str(f), 1)
        assert info.value.errno == errno.EOPNOTSUPP and info.value.feature.startswith("FIEMAP on ")
        assert str(info.value).startswith(f"file extents {f}: ") and "FS_IOC_FIEMAP" in str(info.value)
        monkeypatch.setattr(fcntl, "ioctl", FakeFiemap(c, [], fail=errno.EIO))
        with pytest.raises(DMFlakeyError, match="FS_IOC_FIEMAP failed") as info:
            fiemap.read_extents(fh.fileno(), "file extents", str(f), 1)
        assert info.value.errno == errno.EIO


REFUSALS = [
    ("FIEMAP_EXTENT_DATA_INLINE", "inline data"),
    ("FIEMAP_EXTENT_DATA_TAIL", "tail-packed data"),
    ("FIEMAP_EXTENT_DELALLOC", "delayed-allocation"),
    ("FIEMAP_EXTENT_UNKNOWN", "unknown location"),
    ("FIEMAP_EXTENT_UNWRITTEN", "unwritten (preallocated, never written)"),
    ("FIEMAP_EXTENT_ENCODED", "encoded (compressed)"),
    ("FIEMAP_EXTENT_DATA_ENCRYPTED", "encrypted"),
    ("FIEMAP_EXTENT_NOT_ALIGNED", "unaligned"),
]


@pytest.mark.parametrize("flag, words", REFUSALS)
def test_file_extents_refuses_what_cannot_be_mapped(c, monkeypatch, tmp_path, flag, words):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 20000)
    flags = c[f"const {flag}"]
    if flag in ("FIEMAP_EXTENT_DATA_INLINE", "FIEMAP_EXTENT_DATA_TAIL"):
        flags |= c["const FIEMAP_EXTENT_NOT_ALIGNED"]   # as the kernel sets them
    if flag == "FIEMAP_EXTENT_DELALLOC":
        flags |= c["const FIEMAP_EXTENT_UNKNOWN"]
    monkeypatch.setattr(fcntl, "ioctl", FakeFiemap(c, [(0, 1 << 20, 8192, 0),
                                                       (8192, 2 << 20, 12288, flags | 1)]))
    with pytest.raises(InvalidArgumentError) as info:
        fiemap.file_extents(str(f))
    message = str(info.value)
    assert message.startswith(f"file extents {f}: cannot map the file to sectors: it has ")
    assert words in message and "at file bytes 8192..19999:" in message   # up to EOF, not past it
    assert info.value.errno is None   # refused by the library, not by the kernel


def test_file_extents_refuses_unaligned_offsets_without_the_flag(c, monkeypatch, tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 8192)
    monkeypatch.setattr(fcntl, "ioctl", FakeFiemap(c, [(0, (1 << 20) + 100, 8192, 1)]))
    with pytest.raises(InvalidArgumentError, match=r"device byte 1048676 is not 512-byte aligned"):
        fiemap.file_extents(str(f))


def test_file_extents_cuts_at_the_end_of_the_file_and_merges(c, monkeypatch, tmp_path):
    if os.major(os.stat(tmp_path).st_dev) == 0:
        pytest.skip(f"{tmp_path} is not on a block device; the kernel suite covers this")
    f = tmp_path / "f"
    f.write_bytes(b"x" * (8192 + 100))
    # two extents adjacent in the file and on the device, then preallocated space past EOF
    # (fallocate KEEP_SIZE): that is not the file's data, so it is neither refused nor returned
    fake = FakeFiemap(c, [(0, 1 << 20, 4096, 0), (4096, (1 << 20) + 4096, 8192, 0),
                          (12288, 2 << 20, 65536, c["const FIEMAP_EXTENT_UNWRITTEN"] | 1)])
    monkeypatch.setattr(fcntl, "ioctl", fake)
    assert fiemap.file_extents(str(f)) == [(2048, 17)]
    assert fake.starts == [0]


def test_not_a_regular_file_is_refused_before_it_is_opened(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)   # opening it for reading would block until a writer comes
    for path, kind in ((fifo, "prw"), (tmp_path, "drwx")):
        with pytest.raises(InvalidArgumentError) as info:
            fiemap.file_extents(str(path))
        assert str(info.value).startswith(f"file extents {path}: not a regular file (mode {kind}")
    with pytest.raises(InvalidArgumentError, match="not a regular file or a directory"):
        fiemap.file_device(str(fifo))
    with pytest.raises(DMFlakeyError, match="cannot stat it") as info:
        fiemap.file_extents(str(tmp_path / "missing"))
    assert info.value.errno == errno.ENOENT


# --------------------------------------------------------------------------- sector ranges

def test_sector_ranges_merge_only_what_is_adjacent_in_the_file_and_on_the_device():
    k = 4096
    pieces = [(0, k, (100 * k,)), (k, k, (101 * k,)),       # adjacent both ways: one range
              (2 * k, k, (50 * k,)),                         # adjacent in the file only
              (4 * k, k, (51 * k,)),                         # adjacent on the device only (a hole before)
              (5 * k, 4096, (52 * k,)),                      # adjacent both ways again
              (6 * k, 512, (60 * k,))]                       # a last partial block, elsewhere
    assert fiemap.sector_ranges(pieces) == [(800, 16), (400, 8), (408, 16), (480, 1)]


def test_sector_ranges_give_each_copy_and_merge_copy_by_copy():
    k = 4096
    pieces = [(0, k, (10 * k, 90 * k)), (k, k, (11 * k, 91 * k)),   # both copies continue: merged
              (2 * k, k, (12 * k, 70 * k))]                          # copy 2 jumps: not merged
    assert fiemap.sector_ranges(pieces) == [(80, 16), (720, 16), (96, 8), (560, 8)]
    assert fiemap.sector_ranges([]) == []


# --------------------------------------------------------------------------- btrfs chunk tree

def _chunk_item(c: dict[str, int], length: int, chunk_type: int, stripes: list[tuple[int, int]]) -> bytes:
    """A btrfs_chunk as it lies on disk (little-endian), at the header's offsets."""
    size = c["offset btrfs_chunk.stripe"] + len(stripes) * c["sizeof btrfs_stripe"]
    buf = bytearray(size)
    for field, fmt, value in (("length", "<Q", length), ("owner", "<Q", 2), ("stripe_len", "<Q", 65536),
                              ("type", "<Q", chunk_type), ("sector_size", "<I", 4096),
                              ("num_stripes", "<H", len(stripes)), ("sub_stripes", "<H", 1)):
        struct.pack_into(fmt, buf, c[f"offset btrfs_chunk.{field}"], value)
    for i, (devid, offset) in enumerate(stripes):
        base = c["offset btrfs_chunk.stripe"] + i * c["sizeof btrfs_stripe"]
        struct.pack_into("<Q", buf, base + c["offset btrfs_stripe.devid"], devid)
        struct.pack_into("<Q", buf, base + c["offset btrfs_stripe.offset"], offset)
        buf[base + c["offset btrfs_stripe.dev_uuid"]:][:16] = b"U" * 16
    return bytes(buf)


def test_search_request_asks_for_the_chunk_items(c):
    buf = btrfs.search_request(5 << 30)
    get = lambda field, fmt: struct.unpack_from(fmt, buf, c[f"offset btrfs_ioctl_search_key.{field}"])[0]  # noqa: E731
    assert get("tree_id", "=Q") == c["const BTRFS_CHUNK_TREE_OBJECTID"]
    assert get("min_objectid", "=Q") == get("max_objectid", "=Q") == c["const BTRFS_FIRST_CHUNK_TREE_OBJECTID"]
    assert get("min_type", "=I") == get("max_type", "=I") == c["const BTRFS_CHUNK_ITEM_KEY"]
    assert (get("min_offset", "=Q"), get("max_offset", "=Q")) == (5 << 30, 2**64 - 1)
    assert (get("min_transid", "=Q"), get("max_transid", "=Q")) == (0, 2**64 - 1)
    assert get("nr_items", "=I") > 0
    size = struct.unpack_from("=Q", buf, c["offset btrfs_ioctl_search_args_v2.buf_size"])[0]
    assert len(buf) == c["offset btrfs_ioctl_search_args_v2.buf"] + size


def test_parse_search_answer_and_chunk_items(c):
    buf = btrfs.search_request(0)
    items = [(1 << 20, _chunk_item(c, 8 << 20, 1, [(1, 1 << 20)])),
             (22 << 20, _chunk_item(c, 8 << 20, 0x22, [(1, 22 << 20), (1, 30 << 20)]))]
    pos = c["offset btrfs_ioctl_search_args_v2.buf"]
    for offset, data in items:
        for field, fmt, value in (("transid", "=Q", 7), ("objectid", "=Q", 256), ("offset", "=Q", offset),
                                  ("type", "=I", 228), ("len", "=I", len(data))):
            struct.pack_into(fmt, buf, pos + c[f"offset btrfs_ioctl_search_header.{field}"], value)
        pos += c["sizeof btrfs_ioctl_search_header"]
        buf[pos:pos + len(data)] = data
        pos += len(data)
    struct.pack_into("=I", buf, c["offset btrfs_ioctl_search_key.nr_items"], len(items))
    answer = btrfs.parse_search_answer(buf)
    assert [(o, t, off, d) for o, t, off, d in answer] == [(256, 228, off, d) for off, d in items]
    single, dup = (btrfs.parse_chunk(off, d) for _o, _t, off, d in answer)
    assert single == btrfs.Chunk(1 << 20, 8 << 20, 1, ((1, 1 << 20),)) and single.profile == "single"
    assert dup == btrfs.Chunk(22 << 20, 8 << 20, 0x22, ((1, 22 << 20), (1, 30 << 20)))
    assert dup.profile == "dup"
    with pytest.raises(ValueError, match="for 2 stripes"):
        btrfs.parse_chunk(0, items[1][1][:-1])


MiB = 1 << 20
DATA, METADATA, DUP, RAID0, RAID1 = 1, 4, 0x20, 0x8, 0x10


def test_chunk_map_single_dup_and_a_range_crossing_chunks():
    chunks = [btrfs.Chunk(10 * MiB, 8 * MiB, DATA, ((1, 50 * MiB),)),
              btrfs.Chunk(18 * MiB, 8 * MiB, DATA | DUP, ((1, 70 * MiB), (1, 90 * MiB))),
              btrfs.Chunk(40 * MiB, 8 * MiB, METADATA | DUP, ((1, 100 * MiB), (1, 110 * MiB)))]
    m = btrfs.ChunkMap(list(reversed(chunks)), devid=1)
    assert m.copies(12 * MiB, 4096, "op", "/f") == [(0, 4096, (52 * MiB,))]
    assert m.copies(20 * MiB, 8192, "op", "/f") == [(0, 8192, (72 * MiB, 92 * MiB))]
    # a range over the end of the single chunk into the dup one: two pieces
    assert m.copies(18 * MiB - 4096, 12288, "op", "/f") == [
        (0, 4096, (58 * MiB - 4096,)), (4096, 8192, (70 * MiB, 90 * MiB))]


@pytest.mark.parametrize("chunk, where, error, words", [
    (btrfs.Chunk(10 * MiB, 8 * MiB, DATA | RAID1, ((1, 0), (2, 0))), 11 * MiB, UnsupportedFeatureError,
     "lies in a btrfs raid1 chunk"),
    (btrfs.Chunk(10 * MiB, 8 * MiB, DATA | RAID0, ((1, 0),)), 11 * MiB, UnsupportedFeatureError,
     "lies in a btrfs raid0 chunk"),
    (btrfs.Chunk(10 * MiB, 8 * MiB, METADATA, ((1, 0),)), 11 * MiB, DMFlakeyError, "chunk without data"),
    (btrfs.Chunk(10 * MiB, 8 * MiB, DATA, ((2, 0),)), 11 * MiB, DMFlakeyError, "expected 1 on device id 1"),
    (btrfs.Chunk(10 * MiB, 8 * MiB, DATA | DUP, ((1, 0),)), 11 * MiB, DMFlakeyError, "expected 2 on"),
    (btrfs.Chunk(10 * MiB, 8 * MiB, DATA, ((1, 0),)), 18 * MiB, DMFlakeyError, "lies in no chunk"),
    (btrfs.Chunk(10 * MiB, 8 * MiB, DATA, ((1, 0),)), 9 * MiB, DMFlakeyError, "lies in no chunk"),
])
def test_chunk_map_refuses_what_it_cannot_place(chunk, where, error, words):
    m = btrfs.ChunkMap([chunk], devid=1)
    with pytest.raises(error) as info:
        m.copies(where, 4096, "file extents", "/mnt/f")
    assert str(info.value).startswith("file extents /mnt/f: ") and words in str(info.value)
    if error is UnsupportedFeatureError:
        assert info.value.feature.startswith("btrfs raid")
