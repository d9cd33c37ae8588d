"""The dm ioctl core against the real kernel, with dmsetup as a second opinion."""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest

from dmflakey_ioctl.kernel import dm, loop
from dmflakey_ioctl.errors import (DeviceBusyError, DeviceExistsError, DeviceNotFoundError,
                                   DMFlakeyError, InvalidNameError, TableRejectedError)

from .helpers import dm_names, dmsetup, sparse_file, unique_name

SECTORS = 16 << 11  # 16 MiB


@pytest.fixture
def backing(tmp_path):
    image = sparse_file(tmp_path / "backing.img", SECTORS * 512)
    with loop.attach(str(image)) as dev:
        yield dev


@pytest.fixture
def name():
    """A unique device name; whatever the test left under it is removed afterwards."""
    name = unique_name()
    yield name
    if name in dm_names():
        dm.remove(name)


def linear_zero(dev: loop.LoopDevice) -> list[dm.Target]:
    half = SECTORS // 2
    return [dm.Target(0, half, "linear", f"{dev.major_minor} 0"),
            dm.Target(half, SECTORS - half, "zero", "")]


def test_version_matches_dmsetup():
    major, minor, patch = dm.version()
    assert major == 4
    driver = [l.split(":", 1)[1].strip() for l in dmsetup("version").splitlines() if l.startswith("Driver")]
    assert driver == [f"{major}.{minor}.{patch}"]


def test_create_info_and_remove_agree_with_dmsetup(name):
    created = dm.create(name, uuid=f"DMFI-test-{name}")
    info = dm.info(name)
    assert (info.name, info.uuid) == (name, f"DMFI-test-{name}")
    assert (info.major, info.minor) == (created.major, created.minor)
    assert not info.live_table and not info.suspended and info.target_count == 0
    line = dmsetup("info", "-c", "--noheadings", "--separator", ";", "-o", "name,uuid,major,minor,open",
                   name).strip()
    assert line == f"{name};DMFI-test-{name};{info.major};{info.minor};0"
    assert dm.remove(name) is True
    assert name not in dm_names()
    assert "No devices found" in dmsetup("ls") or name not in dmsetup("ls")


def test_multi_target_table_round_trip_and_node(backing, name):
    dm.create(name)
    dm.load(name, linear_zero(backing))
    assert dm.info(name).inactive_table
    info = dm.resume(name)
    assert info.live_table and not info.inactive_table and info.target_count == 2
    st = os.stat(f"/dev/mapper/{name}")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(info.major, info.minor)
    assert dm.table(name) == linear_zero(backing)
    assert [line.rstrip() for line in dmsetup("table", name).splitlines()] == \
        [t.line() for t in linear_zero(backing)]
    # data written through the node lands in the backing device; the zero half reads zeros
    fd = os.open(f"/dev/mapper/{name}", os.O_RDWR)
    try:
        os.pwrite(fd, b"hello dm", 4096)
        os.fsync(fd)
        assert os.pread(fd, 8, (SECTORS // 2) * 512) == bytes(8)
    finally:
        os.close(fd)
    with open(backing.path, "rb") as fh:
        fh.seek(4096)
        assert fh.read(8) == b"hello dm"
    dm.remove(name)
    assert not os.path.exists(f"/dev/mapper/{name}")


def test_status_agrees_with_dmsetup(backing, name):
    dm.create(name)
    dm.load(name, [dm.Target(0, SECTORS, "striped", f"1 8 {backing.major_minor} 0")])
    dm.resume(name)
    status = dm.status(name)
    assert len(status) == 1 and status[0].target_type == "striped"
    words = status[0].params.split()
    assert words[0] == "1" and backing.major_minor in words and words[-1] == "A"
    assert dmsetup("status", name).strip() == status[0].line()


def test_message_with_and_without_an_answer(backing, name):
    dm.create(name)
    with pytest.raises(DMFlakeyError):
        dm.message(name, 0, "hello")  # no live table yet
    dm.load(name, linear_zero(backing))
    dm.resume(name)
    region = dm.message(name, 0, "@stats_create - /2")
    assert region is not None and region.strip().isdigit()
    listing = dm.message(name, 0, "@stats_list")
    assert listing is not None and listing.startswith(f"{region.strip()}: 0+{SECTORS}")
    assert dmsetup("message", name, "0", "@stats_list").strip() == listing.strip()
    assert dm.message(name, 0, f"@stats_delete {region.strip()}") is None
    with pytest.raises(DMFlakeyError) as err:
        dm.message(name, 0, "no-such-message")  # linear has no message handler
    assert err.value.errno == errno.EINVAL


@pytest.mark.parametrize("lockfs,flush", [(True, True), (False, True), (True, False), (False, False)])
def test_suspend_and_resume_state(backing, name, lockfs, flush):
    dm.create(name)
    dm.load(name, linear_zero(backing))
    dm.resume(name)
    dm.suspend(name, lockfs=lockfs, flush=flush)
    assert dm.info(name).suspended
    assert "SUSPENDED" in dmsetup("info", name)
    dm.resume(name)
    assert not dm.info(name).suspended
    assert "ACTIVE" in dmsetup("info", name)


def test_clear_drops_the_inactive_table(backing, name):
    dm.create(name)
    dm.load(name, linear_zero(backing))
    dm.resume(name)
    dm.load(name, [dm.Target(0, SECTORS, "zero", "")])
    assert "LIVE & INACTIVE" in dmsetup("info", name)
    assert dm.table(name, inactive=True) == [dm.Target(0, SECTORS, "zero", "")]
    dm.clear(name)
    info = dm.info(name)
    assert info.live_table and not info.inactive_table
    assert dm.table(name) == linear_zero(backing)


def test_remove_while_open_is_busy_and_loses_nothing(backing, name):
    dm.create(name)
    dm.load(name, linear_zero(backing))
    dm.resume(name)
    fd = os.open(f"/dev/mapper/{name}", os.O_RDWR)
    try:
        os.pwrite(fd, b"keep me", 0)
        os.fsync(fd)
        with pytest.raises(DeviceBusyError) as err:
            dm.remove(name, retries=2)
        assert err.value.errno == errno.EBUSY and name in str(err.value)
        assert dm.info(name).open_count == 1
        assert os.pread(fd, 7, 0) == b"keep me"
    finally:
        os.close(fd)
    assert dm.remove(name) is True


def test_deferred_remove_waits_for_the_last_close(backing, name):
    dm.create(name)
    dm.load(name, linear_zero(backing))
    dm.resume(name)
    fd = os.open(f"/dev/mapper/{name}", os.O_RDONLY)
    try:
        assert dm.remove(name, deferred=True) is False
        assert dm.info(name).deferred_remove
    finally:
        os.close(fd)
    # the kernel removes the device from a workqueue after the last close; the table
    # (and with it the claim on the loop device) goes last
    holders = f"/sys/block/loop{backing.number}/holders"
    deadline = time.monotonic() + 5
    while (name in dm_names() or os.listdir(holders)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert name not in dm_names() and not os.listdir(holders)


def test_missing_duplicate_and_invalid(name):
    with pytest.raises(DeviceNotFoundError) as err:
        dm.remove(name)
    assert err.value.errno == errno.ENXIO
    with pytest.raises(DeviceNotFoundError):
        dm.info(name)
    dm.create(name)
    with pytest.raises(DeviceExistsError) as err:
        dm.create(name)
    assert err.value.errno == errno.EBUSY
    with pytest.raises(InvalidNameError):
        dm.create("control")


def test_rejected_table_reports_the_kernel_reason(backing, name):
    dm.create(name)
    with pytest.raises(TableRejectedError) as err:
        dm.load(name, [dm.Target(0, SECTORS, "flakey", f"{backing.major_minor} 0 0 0 0")])
    assert err.value.errno == errno.EINVAL
    assert "interval" in err.value.kernel_log.lower()
    assert not dm.info(name).inactive_table


def test_list_devices_and_targets_agree_with_dmsetup(name):
    dm.create(name, uuid=f"DMFI-list-{name}")
    listed = {d.name: d for d in dm.list_devices()}
    # the kernel lists uuids since dm ioctl 4.45 (Linux 5.15; not 5.10)
    assert listed[name].uuid == (f"DMFI-list-{name}" if dm.version() >= (4, 45, 0) else None)
    info = dm.info(name)
    assert (listed[name].major, listed[name].minor) == (info.major, info.minor)
    assert f"{name}\t({info.major}:{info.minor})" in dmsetup("ls").splitlines()
    versions = dm.target_versions()
    assert "flakey" in versions and dm.target_version("flakey") == versions["flakey"]
    for line in dmsetup("targets").splitlines():
        target, version = line.split()
        assert versions[target] == tuple(int(x) for x in version.lstrip("v").split("."))


def test_reads_and_removes_a_device_dmsetup_made(backing):
    name = unique_name("dmfi-dmsetup")
    dmsetup("create", name, "--uuid", f"DMFI-ext-{name}", "--table",
            f"0 {SECTORS} linear {backing.major_minor} 0")
    try:
        info = dm.info(name)
        assert info.uuid == f"DMFI-ext-{name}" and info.live_table
        assert dm.table(name) == [dm.Target(0, SECTORS, "linear", f"{backing.major_minor} 0")]
        assert name in {d.name for d in dm.list_devices()}
    finally:
        dm.remove(name)
    assert name not in dm_names()
