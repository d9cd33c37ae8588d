"""Answers that do not fit the first buffer: the kernel sets DM_BUFFER_FULL_FLAG, the library asks again.

Checked against sysfs (/sys/block/dm-*/dm/{name,uuid} and dev) and dmsetup, not
against the library's own reading, and with a spy on the replies to prove
that the kernel really answered BUFFER_FULL first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmflakey_ioctl.kernel import dm

from .helpers import dmsetup, running_release, unique_name

LONG_PARAMS_DEVICES = 8


def sysfs_devices() -> set:
    """(name, uuid, major, minor) of every dm device with a table, as sysfs shows them; the uuid
    None before Linux 5.13, whose DM_LIST_DEVICES (ioctl interface 4.45) reports none."""
    lists_uuids = running_release() >= (5, 13)
    out = set()
    for block in Path("/sys/block").glob("dm-*"):
        try:
            name = os.fsdecode((block / "dm" / "name").read_bytes().rstrip(b"\n"))
            uuid = os.fsdecode((block / "dm" / "uuid").read_bytes().rstrip(b"\n"))
            major, minor = (int(x) for x in (block / "dev").read_text().split(":"))
        except OSError:
            continue
        out.add((name, uuid if lists_uuids else None, major, minor))
    return out


@pytest.fixture
def replies(monkeypatch):
    """Every (command, BUFFER_FULL set, buffer size) the control file answered during the test."""
    seen: list[tuple] = []
    send = dm.Control.send

    def spy(self, command, buf, operation, device, **kwargs):
        answer = send(self, command, buf, operation, device, **kwargs)
        seen.append((command, bool(dm.Reply(answer).flags & dm.Flag.BUFFER_FULL), len(buf)))
        return answer

    monkeypatch.setattr(dm.Control, "send", spy)
    return seen


@pytest.fixture
def make_devices():
    """make(count, name_bytes, uuid_bytes, params): devices with a linear table over a zero device."""
    made: list[str] = []
    zero = unique_name("dmfi-buf-zero")
    dm.create(zero)
    made.append(zero)
    dm.load(zero, [dm.Target(0, 1 << 20, "zero", "")])
    base = dm.resume(zero)

    def make(count: int, name_bytes: int, uuid_bytes: int) -> list[str]:
        names = []
        for _ in range(count):
            stem = unique_name("dmfi-buf")
            name = (stem + "-").ljust(name_bytes, "n")
            uuid = ("DMFI-BUF-" + stem + "-").ljust(uuid_bytes, "u")
            dm.create(name, uuid=uuid)
            made.append(name)
            dm.load(name, [dm.Target(0, 8, "linear", f"{base.major}:{base.minor} 0")])
            dm.resume(name)
            names.append(name)
        return names

    yield make
    for name in reversed(made):
        dm.remove(name)


def test_a_device_list_longer_than_16_kib_is_complete(make_devices, replies):
    # each entry: 12 + 128 name bytes (aligned to 144) + 8 + 129 uuid bytes, about 288 bytes: 64 of
    # them need more than the 16 KiB the first request offers; before 5.13 (no uuids) 152 bytes: 120
    names = make_devices(64 if running_release() >= (5, 13) else 120, dm.NAME_MAX, dm.UUID_MAX)
    replies.clear()
    listed = dm.list_devices()
    assert (dm.Command.LIST_DEVICES, True, dm.BUFFER_START) in replies    # the kernel said: too small
    assert replies[-1][:2] == (dm.Command.LIST_DEVICES, False)
    assert {(d.name, d.uuid, d.major, d.minor) for d in listed} == sysfs_devices()
    assert set(names) <= {d.name for d in listed} and len(listed) == len({d.name for d in listed})
    assert all(len(n.encode()) == 127 for n in names)


def test_a_tiny_first_buffer_still_gives_the_whole_list_table_and_status(make_devices, replies,
                                                                         monkeypatch):
    monkeypatch.setattr(dm, "BUFFER_START", dm.HEADER.size + 8)   # room for almost nothing
    names = make_devices(LONG_PARAMS_DEVICES, 40, 60)
    replies.clear()
    listed = dm.list_devices()
    assert (dm.Command.LIST_DEVICES, True, dm.HEADER.size + 8) in replies
    assert {(d.name, d.uuid, d.major, d.minor) for d in listed} == sysfs_devices()
    for name in names:
        replies.clear()
        (target,) = dm.table(name)
        assert any(full for command, full, _ in replies if command == dm.Command.TABLE_STATUS)
        assert target.line() == dmsetup("table", name).strip()   # the oracle's reading of the same table
        (state,) = dm.status(name)
        assert (state.start, state.length, state.target_type) == (0, 8, "linear")
