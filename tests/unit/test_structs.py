"""Byte layouts against the kernel's UAPI headers, and name/uuid checks (no root, no kernel).

The offsets come from gcc compiling /usr/include/linux/dm-ioctl.h, loop.h and
fs.h, not from the library or the notes: a field the library packs one byte
off, or a request number with a wrong size field, fails here.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from dmflakey_ioctl.kernel import blockdev, dm, loop
from dmflakey_ioctl.errors import InvalidArgumentError, InvalidNameError

from .uapi import assert_fields, layout, probe

HEADERS = [Path("/usr/include/linux/dm-ioctl.h"), Path("/usr/include/linux/loop.h"),
           Path("/usr/include/linux/fs.h")]

# (struct, fields in declaration order); flexible array members are offset-only.
C_FIELDS = {
    "dm_ioctl": ["version", "data_size", "data_start", "target_count", "open_count", "flags",
                 "event_nr", "padding", "dev", "name", "uuid", "data"],
    "dm_target_spec": ["sector_start", "length", "status", "next", "target_type"],
    "dm_name_list": ["dev", "next", "name"],
    "dm_target_versions": ["next", "version", "name"],
    "dm_target_msg": ["sector", "message"],
    "dm_target_deps": ["count", "padding", "dev"],
    "loop_info64": ["lo_device", "lo_inode", "lo_rdevice", "lo_offset", "lo_sizelimit", "lo_number",
                    "lo_encrypt_type", "lo_encrypt_key_size", "lo_flags", "lo_file_name",
                    "lo_crypt_name", "lo_encrypt_key", "lo_init"],
    "loop_config": ["fd", "block_size", "info", "__reserved"],
}
FLEXIBLE = {("dm_name_list", "name"), ("dm_target_versions", "name"), ("dm_target_msg", "message"),
            ("dm_target_deps", "dev")}

CONSTANTS = [
    "DM_VERSION_MAJOR", "DM_NAME_LEN", "DM_UUID_LEN", "DM_MAX_TYPE_NAME",
    "DM_READONLY_FLAG", "DM_SUSPEND_FLAG", "DM_PERSISTENT_DEV_FLAG", "DM_STATUS_TABLE_FLAG",
    "DM_ACTIVE_PRESENT_FLAG", "DM_INACTIVE_PRESENT_FLAG", "DM_BUFFER_FULL_FLAG",
    "DM_SKIP_LOCKFS_FLAG", "DM_NOFLUSH_FLAG", "DM_QUERY_INACTIVE_TABLE_FLAG",
    "DM_UEVENT_GENERATED_FLAG", "DM_UUID_FLAG", "DM_DATA_OUT_FLAG", "DM_DEFERRED_REMOVE",
    "DM_INTERNAL_SUSPEND_FLAG",
    "LOOP_SET_FD", "LOOP_CLR_FD", "LOOP_SET_STATUS64", "LOOP_GET_STATUS64", "LOOP_SET_DIRECT_IO",
    "LOOP_SET_BLOCK_SIZE", "LOOP_CONFIGURE", "LOOP_CTL_GET_FREE", "LO_NAME_SIZE",
    "LO_FLAGS_READ_ONLY", "LO_FLAGS_AUTOCLEAR", "LO_FLAGS_DIRECT_IO", "BLKGETSIZE64",
    "BLKSSZGET", "BLKFLSBUF", "BLKZEROOUT",
]

# dm.Command member -> the header's request macro and enum constant
COMMANDS = {c: (f"DM_{c.name}", f"DM_{c.name}_CMD") for c in dm.Command}


@pytest.fixture(scope="module")
def c(tmp_path_factory) -> dict[str, int]:
    """Every size, offset and constant above, as gcc sees them in the installed headers."""
    commands = [name for pair in COMMANDS.values() for name in pair]
    return probe(tmp_path_factory.mktemp("uapi"), HEADERS, C_FIELDS, FLEXIBLE, CONSTANTS + commands)


# --------------------------------------------------------------------------- dm structs

def test_dm_ioctl_header_matches_the_header_file(c):
    assert dm.HEADER.size == c["sizeof dm_ioctl"] == 312
    fields = C_FIELDS["dm_ioctl"]
    assert_fields(c, "dm_ioctl", fields, layout(dm.HEADER.format, [3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]))
    assert dm.HEADER_DATA == c["offset dm_ioctl.data"]
    assert c["sizeof dm_ioctl"] % 8 == 0  # the first target spec at data_start is 8-aligned
    assert dm.NAME_MAX == c["const DM_NAME_LEN"] - 1
    assert dm.UUID_MAX == c["const DM_UUID_LEN"] - 1
    assert dm.TYPE_MAX == c["const DM_MAX_TYPE_NAME"] - 1
    assert dm.INTERFACE[0] == c["const DM_VERSION_MAJOR"]


def test_dm_target_spec_matches_the_header_file(c):
    assert dm.TARGET_SPEC.size == c["sizeof dm_target_spec"] == 40
    assert_fields(c, "dm_target_spec", C_FIELDS["dm_target_spec"],
                   layout(dm.TARGET_SPEC.format, [1, 1, 1, 1, 1]))


def test_variable_records_match_the_header_file(c):
    # dm_name_list: dev, next, then the name at 12 (sizeof is 16: never use it as the name offset)
    assert_fields(c, "dm_name_list", ["dev", "next"], layout(dm.NAME_LIST.format, [1, 1]))
    assert dm.NAME_LIST_NAME == c["offset dm_name_list.name"] == 12
    assert c["sizeof dm_name_list"] != dm.NAME_LIST_NAME
    # dm_target_versions: next, version[3], name at 16
    assert_fields(c, "dm_target_versions", ["next", "version"], layout(dm.TARGET_VERSIONS.format, [1, 3]))
    assert dm.TARGET_VERSIONS.size == c["offset dm_target_versions.name"] == 16
    # dm_target_msg: a u64 sector, the message right after it (what message() packs)
    assert (c["offset dm_target_msg.sector"], c["size dm_target_msg.sector"]) == (0, dm.U64.size)
    assert c["offset dm_target_msg.message"] == dm.U64.size
    # dm_target_deps: count and padding as two u32, then u64 device numbers
    assert_fields(c, "dm_target_deps", ["count", "padding"], layout(dm.U32X2.format, [1, 1]))
    assert c["offset dm_target_deps.dev"] == dm.U32X2.size


def test_command_request_numbers_match_the_header_macros(c):
    assert len(dm.Command) == c["const DM_GET_TARGET_VERSION_CMD"] + 1
    for command, (macro, enum_name) in COMMANDS.items():
        assert command.value == c[f"const {enum_name}"], enum_name
        assert command.request == c[f"const {macro}"], \
            f"{command.name}: library {command.request:#x}, header {c[f'const {macro}']:#x}"


def test_flags_match_the_header_file(c):
    pairs = {
        dm.Flag.READONLY: "DM_READONLY_FLAG", dm.Flag.SUSPEND: "DM_SUSPEND_FLAG",
        dm.Flag.PERSISTENT_DEV: "DM_PERSISTENT_DEV_FLAG", dm.Flag.STATUS_TABLE: "DM_STATUS_TABLE_FLAG",
        dm.Flag.ACTIVE_PRESENT: "DM_ACTIVE_PRESENT_FLAG", dm.Flag.INACTIVE_PRESENT: "DM_INACTIVE_PRESENT_FLAG",
        dm.Flag.BUFFER_FULL: "DM_BUFFER_FULL_FLAG", dm.Flag.SKIP_LOCKFS: "DM_SKIP_LOCKFS_FLAG",
        dm.Flag.NOFLUSH: "DM_NOFLUSH_FLAG", dm.Flag.QUERY_INACTIVE_TABLE: "DM_QUERY_INACTIVE_TABLE_FLAG",
        dm.Flag.UEVENT_GENERATED: "DM_UEVENT_GENERATED_FLAG", dm.Flag.UUID: "DM_UUID_FLAG",
        dm.Flag.DATA_OUT: "DM_DATA_OUT_FLAG", dm.Flag.DEFERRED_REMOVE: "DM_DEFERRED_REMOVE",
        dm.Flag.INTERNAL_SUSPEND: "DM_INTERNAL_SUSPEND_FLAG",
    }
    for flag, macro in pairs.items():
        assert int(flag) == c[f"const {macro}"], f"{flag.name} != {macro}"


# --------------------------------------------------------------------------- loop structs

def test_loop_info64_matches_the_header_file(c):
    assert loop.LOOP_INFO64.size == c["sizeof loop_info64"] == 232
    assert_fields(c, "loop_info64", C_FIELDS["loop_info64"],
                   layout(loop.LOOP_INFO64.format, [1] * 12 + [2]))
    assert loop.NAME_LEN == c["const LO_NAME_SIZE"]


def test_loop_config_matches_the_header_file(c):
    assert loop.LOOP_CONFIG_SIZE == c["sizeof loop_config"] == 304
    assert_fields(c, "loop_config", ["fd", "block_size"], layout(loop.LOOP_CONFIG_HEAD.format, [1, 1]))
    assert (c["offset loop_config.info"], c["size loop_config.info"]) == \
        (loop.LOOP_CONFIG_HEAD.size, loop.LOOP_INFO64.size)
    assert c["offset loop_config.__reserved"] == loop.LOOP_CONFIG_HEAD.size + loop.LOOP_INFO64.size
    assert c["size loop_config.__reserved"] == loop.LOOP_CONFIG_SIZE - c["offset loop_config.__reserved"]


def test_loop_constants_match_the_header_files(c):
    for name in ["LOOP_SET_FD", "LOOP_CLR_FD", "LOOP_SET_STATUS64", "LOOP_GET_STATUS64",
                 "LOOP_SET_DIRECT_IO", "LOOP_SET_BLOCK_SIZE", "LOOP_CONFIGURE", "LOOP_CTL_GET_FREE",
                 "LO_FLAGS_READ_ONLY", "LO_FLAGS_AUTOCLEAR", "LO_FLAGS_DIRECT_IO"]:
        assert getattr(loop, name) == c[f"const {name}"], f"loop.{name}"


def test_block_device_requests_match_the_header_files(c):
    for name in ["BLKGETSIZE64", "BLKSSZGET", "BLKFLSBUF", "BLKZEROOUT"]:
        assert getattr(blockdev, name) == c[f"const {name}"], f"blockdev.{name}"


def test_loop_config_packs_fields_at_the_header_offsets(c):
    buf = loop._config(0x1234, 0x5678, 4096, "/some/backing/file.img")
    assert len(buf) == c["sizeof loop_config"]
    assert struct.unpack_from("=I", buf, c["offset loop_config.fd"])[0] == 0x1234
    assert struct.unpack_from("=I", buf, c["offset loop_config.block_size"])[0] == 4096
    info = c["offset loop_config.info"]
    assert struct.unpack_from("=I", buf, info + c["offset loop_info64.lo_flags"])[0] == 0x5678
    name = buf[info + c["offset loop_info64.lo_file_name"]:][:c["size loop_info64.lo_file_name"]]
    assert name.rstrip(b"\0") == b"/some/backing/file.img"
    reserved = c["offset loop_config.__reserved"]
    assert buf[reserved:] == bytes(c["size loop_config.__reserved"])
    # a long path keeps its tail and leaves room for the NUL
    long = "/" + "d" * 100 + "/tail.img"
    buf = loop._config(3, 0, 0, long)
    name = bytes(buf[info + c["offset loop_info64.lo_file_name"]:][:c["size loop_info64.lo_file_name"]])
    assert name[-1] == 0 and name.rstrip(b"\0") == long.encode()[-(c["const LO_NAME_SIZE"] - 1):]


# --------------------------------------------------------------------------- packing

def test_pack_request_puts_each_field_at_the_header_offset(c):
    name = b"N" * 120 + b"-name-7"
    uuid = b"U" * 100 + b"-uuid-128-" + b"u" * 18
    assert (len(name), len(uuid)) == (dm.NAME_MAX, dm.UUID_MAX)
    buf = dm.pack_request(name=name, uuid=uuid, flags=0x0A0B0C0D, dev=0x0102030405060708,
                          event_nr=0x1E2E3E4E, target_count=0x77, payload=b"PAYLOAD!", size=1000)
    assert len(buf) == 1000

    def u32(field: str) -> int:
        return struct.unpack_from("=I", buf, c[f"offset dm_ioctl.{field}"])[0]

    version = c["offset dm_ioctl.version"]
    assert struct.unpack_from("=3I", buf, version) == dm.INTERFACE
    assert u32("data_size") == 1000
    assert u32("data_start") == c["sizeof dm_ioctl"]
    assert u32("target_count") == 0x77
    assert struct.unpack_from("=i", buf, c["offset dm_ioctl.open_count"])[0] == 0
    assert u32("flags") == 0x0A0B0C0D
    assert u32("event_nr") == 0x1E2E3E4E
    assert u32("padding") == 0
    assert struct.unpack_from("=Q", buf, c["offset dm_ioctl.dev"])[0] == 0x0102030405060708
    name_at, name_len = c["offset dm_ioctl.name"], c["size dm_ioctl.name"]
    assert bytes(buf[name_at:name_at + name_len]) == name + b"\0"      # NUL-terminated at the last byte
    uuid_at, uuid_len = c["offset dm_ioctl.uuid"], c["size dm_ioctl.uuid"]
    assert bytes(buf[uuid_at:uuid_at + uuid_len]) == uuid + b"\0"
    data_at = c["offset dm_ioctl.data"]
    assert bytes(buf[data_at:c["sizeof dm_ioctl"]]) == bytes(c["sizeof dm_ioctl"] - data_at)
    start = c["sizeof dm_ioctl"]
    assert bytes(buf[start:start + 8]) == b"PAYLOAD!"
    assert bytes(buf[start + 8:]) == bytes(1000 - start - 8)


def test_pack_request_sizes_itself_to_header_plus_payload(c):
    assert len(dm.pack_request()) == c["sizeof dm_ioctl"]
    buf = dm.pack_request(payload=b"x" * 50)
    assert len(buf) == c["sizeof dm_ioctl"] + 50
    assert struct.unpack_from("=I", buf, c["offset dm_ioctl.data_size"])[0] == len(buf)
    # a size smaller than what the payload needs is raised, never truncating the payload
    buf = dm.pack_request(payload=b"y" * 50, size=100)
    assert len(buf) == c["sizeof dm_ioctl"] + 50 and buf.endswith(b"y" * 50)


@pytest.mark.parametrize("params", [
    ["", "a", "1234567", "12345678", "123456789abcdef", "0123456789abcdef"],
    ["7:0 0", "7:12 2048 4 1 error_writes", "x" * 200],
])
def test_pack_targets_aligns_each_spec_with_the_right_next(c, params):
    spec_size = c["sizeof dm_target_spec"]
    targets = [dm.Target(i * 10, 10, "linear" if i % 2 else "zero", p) for i, p in enumerate(params)]
    payload, count = dm.pack_targets(targets, "load", "dev")
    assert count == len(targets)
    offset = 0
    for target in targets:
        assert offset % 8 == 0

        def field(name: str, fmt: str) -> int:
            return struct.unpack_from(fmt, payload, offset + c[f"offset dm_target_spec.{name}"])[0]

        assert field("sector_start", "=Q") == target.start
        assert field("length", "=Q") == target.length
        assert field("status", "=i") == 0
        type_at = offset + c["offset dm_target_spec.target_type"]
        assert payload[type_at:type_at + c["size dm_target_spec.target_type"]].rstrip(b"\0") == \
            target.target_type.encode()
        nxt = field("next", "=I")
        text = target.params.encode() + b"\0"
        assert nxt % 8 == 0, f"next {nxt} is not 8-aligned"
        assert spec_size + len(text) <= nxt < spec_size + len(text) + 8, "padding is not minimal"
        params_at = offset + spec_size
        assert payload[params_at:params_at + len(text)] == text
        assert payload[params_at + len(text):offset + nxt] == bytes(nxt - spec_size - len(text))
        offset += nxt
    assert offset == len(payload)  # the last spec's next is set the same way and ends the payload


# --------------------------------------------------------------------------- names and uuids

@pytest.mark.parametrize("name", [
    "", "a" * 128, "é" * 64, "日" * 43, "a/b", "/", "a\0b", "\0", "tab\there", "new\nline", "esc\x1b",
    "del\x7f", "\x01", "control", ".", "..", None, b"bytes-name", 42, ["list"],
], ids=repr)
def test_check_name_refuses(name):
    with pytest.raises(InvalidNameError) as err:
        dm.check_name(name, "create")
    assert isinstance(err.value, InvalidArgumentError) and isinstance(err.value, ValueError)
    assert not err.value.errno  # refused by the library: the kernel never saw it
    assert err.value.operation == "create"


@pytest.mark.parametrize("name", [
    "a" * 127, "é" * 63 + "x", "日本語" * 14 + "x", "😀" * 31 + "abc", "dmfi-t-1", "control2", "...",
    "a.b", "-", "Ünïcödé name with spaces",
], ids=repr)
def test_check_name_accepts(name):
    raw = dm.check_name(name)
    assert raw == name.encode("utf-8") and 1 <= len(raw) <= 127


@pytest.mark.parametrize("uuid", [
    "", "u" * 129, "é" * 65, "a/b", "a\0b", "line\n", "\x7f", b"bytes", 7,
], ids=repr)
def test_check_uuid_refuses(uuid):
    with pytest.raises(InvalidNameError) as err:
        dm.check_uuid(uuid, "create")
    assert not err.value.errno and err.value.operation == "create"


def test_check_uuid_accepts_none_and_up_to_128_bytes():
    assert dm.check_uuid(None) == b""
    assert dm.check_uuid("u" * 128) == b"u" * 128
    assert dm.check_uuid("é" * 64) == "é".encode() * 64
    assert dm.check_uuid("DMFI-control") == b"DMFI-control"
