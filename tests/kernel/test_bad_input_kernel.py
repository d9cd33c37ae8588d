"""What the library accepts, the kernel accepts: randomized tables and names against a real kernel.

The same seeded generators as tests/unit/test_bad_input.py (which checks that
refusals happen before any ioctl).  Here every flakey table the builder
accepts is loaded and resumed on a scratch device and must be taken by the
kernel and read back as the same table; every name (and uuid) the checker
accepts must be taken by DM_DEV_CREATE, come back unchanged from the kernel,
get a working /dev/mapper node, and go away again.  The kernel never sees an
invalid table: the refusals are the unit test's business.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import stat

import pytest

from dmflakey_ioctl.kernel import dm
from dmflakey_ioctl.errors import InvalidArgumentError, TableRejectedError
from dmflakey_ioctl.tables.flakey import FlakeyTable
from tests.unit.test_bad_input import (NAME_CASES, SEED, SPECIAL_NAMES, TABLE_CASES, build_table, random_name,
                                       random_table_args, random_uuid)

from .helpers import FLAKEY_FEATURE_RELEASE, dm_names, kernel_has, unique_name

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
        missing = [f for f in FLAKEY_FEATURE_RELEASE
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
