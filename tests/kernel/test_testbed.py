"""The test bed itself: the guest (or host) really has what the suite relies on.

These use hand-packed ioctls on purpose, independent of the library.
"""

from __future__ import annotations

import fcntl
import os
import struct

DM_IOCTL = struct.Struct("=3IIIIiIIIQ128s129s7s")
DM_VERSION = 0xC138FD00
DM_LIST_VERSIONS = 0xC138FD0D
DM_GET_TARGET_VERSION = 0xC138FD11
# every target type the suites use; the kernel loads a target's module when asked for it
TARGETS = ["linear", "zero", "flakey", "log-writes", "snapshot", "snapshot-origin", "delay"]
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_CLR_FD = 0x4C01


def dm_call(request: int, size: int = 16384, name: bytes = b"") -> bytearray:
    buf = bytearray(size)
    DM_IOCTL.pack_into(buf, 0, 4, 0, 0, size, DM_IOCTL.size, 0, 0, 0, 0, 0, 0, name, b"", b"")
    fd = os.open("/dev/mapper/control", os.O_RDWR)
    try:
        fcntl.ioctl(fd, request, buf)
    finally:
        os.close(fd)
    return buf


def test_control_node_exists():
    st = os.stat("/dev/mapper/control")
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (10, 236)


def test_dm_version_is_4x():
    buf = dm_call(DM_VERSION)
    major, minor, _patch = struct.unpack_from("=3I", buf)
    assert major == 4 and minor >= 27


def test_flakey_in_target_list():
    buf = dm_call(DM_LIST_VERSIONS)
    names, offset = [], DM_IOCTL.size
    while True:
        nxt = struct.unpack_from("=I", buf, offset)[0]
        names.append(bytes(buf[offset + 16:]).split(b"\0", 1)[0].decode())
        if not nxt:
            break
        offset += nxt
    assert "flakey" in names


def test_loop_device_attaches_to_a_file(tmp_path):
    image = tmp_path / "img"
    with open(image, "wb") as fh:
        fh.truncate(8 << 20)
    ctl = os.open("/dev/loop-control", os.O_RDWR)
    number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
    os.close(ctl)
    backing = os.open(image, os.O_RDWR)
    loop = os.open(f"/dev/loop{number}", os.O_RDWR)
    try:
        config = bytearray(304)
        struct.pack_into("=II", config, 0, backing, 0)
        fcntl.ioctl(loop, LOOP_CONFIGURE, config)
        with open(f"/sys/block/loop{number}/loop/backing_file") as fh:
            assert fh.read().strip() == str(image)
        assert int(open(f"/sys/block/loop{number}/size").read()) * 512 == 8 << 20
    finally:
        fcntl.ioctl(loop, LOOP_CLR_FD, 0)
        os.close(loop)
        os.close(backing)


def test_every_target_the_suites_use_is_there():
    """A kernel of the matrix that lacks one says so here, by name (ENOENT/EINVAL otherwise later)."""
    missing = []
    for target in TARGETS:
        try:
            buf = dm_call(DM_GET_TARGET_VERSION, name=target.encode())
        except OSError as exc:
            missing.append(f"{target} ({os.strerror(exc.errno)})")
            continue
        data_start = struct.unpack_from("=I", buf, 16)[0]
        assert bytes(buf[data_start + 16:]).split(b"\0", 1)[0].decode() == target
    assert not missing, f"kernel {os.uname().release} lacks the dm targets: {', '.join(missing)}"
