"""What the library accepts, the kernel accepts: randomized tables and names against a real kernel.

The same seeded generators as tests/unit/test_bad_input.py (which checks that
refusals happen before any ioctl).  Here every flakey table the builder
accepts is loaded and resumed on a scratch device and must be taken by the
kernel and read back as the same table; every name (and uuid) the checker
accepts must be taken by DM_DEV_CREATE, come back unchanged from the kernel,
get a working /dev/mapper node, and go away again.  The kernel never sees an
invalid table: the refusals are the unit test's business.

Names are also checked the other way, against an oracle that is not the
library's rule: for a few hundred seeded random names the library's
check_name must accept exactly the names that the kernel, asked with a
DM_DEV_CREATE packed here by hand, creates under that very name.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import random
import stat
import struct

import pytest

from dmflakey_ioctl.kernel import dm
from dmflakey_ioctl.errors import InvalidArgumentError, InvalidNameError, TableRejectedError
from dmflakey_ioctl.tables.flakey import FlakeyTable
from tests.unit.test_bad_input import (NAME_CASES, SEED, SPECIAL_NAMES, TABLE_CASES, build_table, random_name,
                                       random_table_args, random_uuid)

from .helpers import dm_names, kernel_has, unique_name

ZERO_SECTORS = 1 << 30    # a 512 GiB dm zero device: room for large offsets, no memory used
TARGET_SECTORS = 8


@pytest.fixture
def zero():
    """A dm zero device to map; its number and its /dev/mapper path both serve as the flakey device."""
    name = unique_name("dmfi-zero")
    dm.create(name)
    try:
        dm.load(name, [dm.Target(0, ZERO_SECTORS, "zero", "")])
        info = dm.resume(name)
        yield info
    finally:
        dm.remove(name)


@pytest.fixture
def scratch():
    name = unique_name("dmfi-bad")
    dm.create(name)
    yield name
    dm.remove(name)


def test_every_table_the_builder_accepts_the_kernel_accepts(zero, scratch):
    number = f"{zero.major}:{zero.minor}"
    rng = random.Random(SEED)  # the unit test's first sequence, with this device and room
    loaded = refused = 0
    for case in range(TABLE_CASES):
        args = random_table_args(rng, [number, zero.path], max_offset=ZERO_SECTORS - TARGET_SECTORS)
        try:
            table = build_table(args)
        except InvalidArgumentError:
            continue
        line = [dm.Target(0, TARGET_SECTORS, "flakey", table.params())]
        missing = [f for f in ("error_reads", "random_read_corrupt", "random_write_corrupt")
                   if (getattr(table, f) not in (None, False)) and not kernel_has(f)]
        if missing:   # a newer feature this kernel lacks: refused at load, nothing changes
            before = dm.info(scratch)
            with pytest.raises(TableRejectedError) as rejection:
                dm.load(scratch, line)
            assert rejection.value.errno == errno.EINVAL, (case, rejection.value)
            # (or, with more feature words than that kernel's maximum, a refused count)
            assert "Unrecognised flakey feature" in rejection.value.kernel_log or \
                "Invalid number of feature args" in rejection.value.kernel_log, (case, rejection.value)
            after = dm.info(scratch)
            assert (after.live_table, after.inactive_table, after.suspended) == \
                (before.live_table, False, False), (case, after)
            refused += 1
            continue
        try:
            dm.load(scratch, line)
            info = dm.resume(scratch)
        except Exception as err:  # noqa: BLE001 - the message names the case
            raise AssertionError(f"case {case}: the kernel refused {table.params()!r} that the builder "
                                 f"accepted: {err}") from err
        assert info.live_table and not info.suspended and not info.inactive_table
        live = dm.table(scratch)
        assert len(live) == 1 and (live[0].start, live[0].length) == (0, TARGET_SECTORS)
        back = FlakeyTable.parse(live[0].params)
        # the kernel prints the device as major:minor, whatever form the table used
        assert back.equivalent(dataclasses.replace(table, device=number)), (case, table.params(), live[0].params)
        loaded += 1
    # enough cases reached the kernel (on a kernel without the newer features, many are refused)
    assert loaded + refused > TABLE_CASES // 4 and loaded > TABLE_CASES // 8, (loaded, refused)


def test_every_name_the_checker_accepts_the_kernel_accepts(zero):
    rng = random.Random(SEED + 4)
    names, uuids = [], set()
    present = dm_names()
    for name in [random_name(rng) for _ in range(NAME_CASES)] + SPECIAL_NAMES:
        try:
            dm.check_name(name)
        except InvalidArgumentError:
            continue
        if name not in names and name not in present:
            names.append(name)
    assert len(names) > 60, len(names)
    created = []
    try:
        for i, name in enumerate(names):
            uuid = random_uuid(rng)
            try:
                dm.check_uuid(uuid)
            except InvalidArgumentError:
                uuid = None
            if uuid in uuids:
                uuid = None
            uuids.add(uuid)
            try:
                made = dm.create(name, uuid=uuid)
            except Exception as err:  # noqa: BLE001
                raise AssertionError(f"DM_DEV_CREATE refused {name!r} (uuid {uuid!r}): {err}") from err
            created.append(name)
            info = dm.info(name)
            assert (info.name, info.uuid, info.minor) == (name, uuid or "", made.minor)
            assert any(d.name == name and d.uuid in (uuid or "", None) for d in dm.list_devices())
            if i % 4 == 0:  # a table, a resume and a node under that name too
                dm.load(name, [dm.Target(0, 8, "linear", f"{zero.major}:{zero.minor} 0")])
                live = dm.resume(name)
                st = os.stat(live.path)
                assert stat.S_ISBLK(st.st_mode) and st.st_rdev == live.dev, name
            assert dm.remove(name) is True
            created.remove(name)
            assert not os.path.lexists(f"{dm.MAPPER_DIR}/{name}"), name
    finally:
        for name in created:
            dm.remove(name)



# ---- names, both ways: the library accepts exactly what the kernel takes ---------------------------------

# struct dm_ioctl and the request numbers as linux/dm-ioctl.h declares them, written out here rather
# than taken from the library, so that a packing mistake there cannot hide here.
RAW_HEADER = struct.Struct("=3I I I I i I I I Q 128s 129s 7s")
RAW_DEV_CREATE = (3 << 30) | (RAW_HEADER.size << 16) | (0xFD << 8) | 3
RAW_DEV_REMOVE = (3 << 30) | (RAW_HEADER.size << 16) | (0xFD << 8) | 4
RAW_DEV_STATUS = (3 << 30) | (RAW_HEADER.size << 16) | (0xFD << 8) | 7
RAW_NAME_FIELD = 128

PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))
LETTERS = "\u00e9\u00fc\u00f1\u00df\u00f8\u00e5\u00c7\u0416\u0436\u03a9\u4e2d\u6587\u30c7\u30d0\u00a0"
NOT_UTF8 = "\udc80\udcff\udce9"            # bytes 0x80, 0xff, 0xe9 alone, as os.fsdecode gives them
CONTROL = "\t\n\r\x01\x1b\x7f"
NAME_SPECIALS = [
    "control", ".", "..", "...", ".a", "a.", "control ", " control", "Control", "contro", "controll",
    "/", "a/b", "/a", "a/", "", " ", "  ", "\\", "\\\\", "a\\ b", "-", "a b", "a" * 126, "a" * 127, "a" * 128,
    "a" * 200, "\u00e9" * 63, "\u00e9" * 64, "a" * 125 + "\u00e9", "a" * 126 + "\u00e9", "\u4e2d" * 42 + "a",
    "\u4e2d" * 43, "\udcff" * 127, "\udcff" * 128, "dm-0", "loop0", "mapper",
]


def random_kernel_name(rng: random.Random) -> str:
    """A name over printable ASCII, some letters beyond it and undecodable bytes, often near the limit."""
    length = rng.choice([1, 2, 3, rng.randint(1, 40), rng.randint(100, 140), rng.randint(120, 130)])
    pool = rng.choices([PRINTABLE, LETTERS, NOT_UTF8, "/.\\ "], [10, 3, 1, 2])[0]
    chars = [rng.choice(pool if rng.random() < 0.5 else PRINTABLE) for _ in range(length)]
    name = "".join(chars)
    if rng.random() < 0.3:  # land near the 127-byte limit, counted in bytes, not characters
        target = rng.randint(124, 131)
        while len(name.encode("utf-8", "surrogateescape")) < target:
            name += rng.choice(PRINTABLE.replace("/", ""))
        while len(name.encode("utf-8", "surrogateescape")) > target:
            name = name[:-1]
    return name


def raw_request(dev: int = 0, name: bytes = b"") -> bytearray:
    buf = bytearray(RAW_HEADER.size)
    RAW_HEADER.pack_into(buf, 0, 4, 0, 0, RAW_HEADER.size, RAW_HEADER.size, 0, 0, 0, 0, 0, dev,
                         name[:RAW_NAME_FIELD], b"", b"")
    return buf


def kernel_takes(control_fd: int, raw: bytes) -> tuple:
    """(created under exactly these bytes, errno) for a hand-packed DM_DEV_CREATE; what it made is removed.

    The name the kernel stored is asked back by device number (DM_DEV_STATUS writes the stored
    name into the answer): a device without a table has no sysfs entry on current kernels.
    """
    buf = raw_request(name=raw)
    try:
        fcntl.ioctl(control_fd, RAW_DEV_CREATE, buf)
    except OSError as exc:
        return False, exc.errno
    dev = RAW_HEADER.unpack_from(buf)[10]
    try:
        status = raw_request(dev=dev)
        fcntl.ioctl(control_fd, RAW_DEV_STATUS, status)
        stored = RAW_HEADER.unpack_from(status)[11].split(b"\0", 1)[0]
    finally:
        fcntl.ioctl(control_fd, RAW_DEV_REMOVE, raw_request(dev=dev))   # by number: whatever its name
    return stored == raw, 0


def library_takes(name: str) -> bool:
    try:
        dm.check_name(name)
    except InvalidNameError:
        return False
    return True


def kernel_release() -> tuple:
    return tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])


def test_the_library_accepts_exactly_the_names_the_kernel_takes(zero):
    """Both ways, against the kernel's own answer.

    Excluded from the comparison, each asserted as the documented difference:
    - control characters (and DEL): the kernel stores them, the library refuses them, because
      udev rules, dmsetup output and /dev/mapper listings cannot carry them safely;
    - "control", ".", "..": refused by the kernel since 6.5 (they clash with /dev/mapper/control
      and the directory entries); older kernels take them and the library still refuses them.
    A NUL cannot be sent at all (the field is a C string); lone surrogates that stand for no byte
    cannot be encoded; neither is a question for the kernel.
    """
    rng = random.Random(SEED + 6)
    names = list(dict.fromkeys(NAME_SPECIALS + [random_kernel_name(rng) for _ in range(500)]))
    present = {os.fsencode(name) for name in dm_names()}
    reserved_refused_by_kernel = kernel_release() >= (6, 5)
    verdicts = {True: 0, False: 0}
    mismatches = []
    fd = os.open(dm.CONTROL_PATH, os.O_RDWR | os.O_CLOEXEC)
    try:
        for name in names:
            raw = name.encode("utf-8", "surrogateescape")
            if raw in present:
                continue
            kernel, err = kernel_takes(fd, raw)
            library = library_takes(name)
            if name in ("control", ".", "..") and not reserved_refused_by_kernel:
                assert kernel and not library, (name, err)   # the documented exception on old kernels
                continue
            verdicts[kernel] += 1
            if kernel != library:
                said = "kernel takes it" if kernel else f"kernel refuses ({errno.errorcode.get(err, err)})"
                mismatches.append((name, raw, said, "library accepts" if library else "library refuses"))
        assert not mismatches, f"{len(mismatches)} names judged differently: {mismatches[:20]}"
        assert verdicts[True] >= 200 and verdicts[False] >= 60, verdicts
        # the documented exception: control characters the kernel takes and the library refuses
        for name in ["a\tb", "new\nline", "\x01", "esc\x1b[0m", "del\x7f"]:
            kernel, err = kernel_takes(fd, name.encode())
            assert kernel, (name, err)
            assert not library_takes(name), name
    finally:
        os.close(fd)
    assert not {n.encode("utf-8", "surrogateescape") for n in names} & {os.fsencode(n) for n in dm_names()}
