"""Flakey's fault switches without a kernel: what each call asks for, and what it refuses.

A Flakey can be built over a made-up backing device: it packs its requests but
opens nothing.  Every refusal must happen before the control file is opened;
the host has no /dev/mapper/control, so a call that reached for the kernel
would either fail differently or leave that node behind.  The control file's
opener is also replaced by one that fails the test, so the check holds on a
host that has device-mapper too.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import pytest

from dmflakey_ioctl import features

from dmflakey_ioctl.kernel import dm
from dmflakey_ioctl.errors import InvalidArgumentError, InvalidTableError, UnsupportedFeatureError
from dmflakey_ioctl.flakey import DEFAULT_INTERVAL, Flakey
from dmflakey_ioctl.ownership import Owner
from dmflakey_ioctl.tables.flakey import PROBABILITY_MAX, CorruptBIOByte, Direction, FlakeyTable
from dmflakey_ioctl.tables.segments import DeviceTable

CONTROL = dm.CONTROL_PATH
BACKING = "7:0"
NEWER = tuple(features.FEATURE_SINCE)
UUID = "DMFLAKEY-0.0.1.0-img-000000000000"


def make_dev() -> Flakey:
    """A Flakey over a made-up device: building it opens nothing."""
    return Flakey("dmfu-args", UUID, os.makedev(253, 0), BACKING, 131072, owner=Owner.from_uuid(UUID))


@pytest.fixture
def no_kernel(monkeypatch):
    existed = os.path.exists(CONTROL)

    def refuse(self):
        raise AssertionError(f"{CONTROL} was opened: the call reached for the kernel")

    monkeypatch.setattr(dm.Control, "fileno", refuse)
    yield
    assert os.path.exists(CONTROL) == existed


@pytest.fixture
def feature_cache():
    """The newer features count as present (the probe itself would need the kernel)."""
    features.reset_cache()
    for feature in NEWER:
        features.supported(feature, probe=lambda f: True)
    yield
    features.reset_cache()


@pytest.fixture
def dev(no_kernel, feature_cache):
    return make_dev()


class FakeSwap:
    def run(self) -> None:
        pass


def capture_swaps(monkeypatch) -> list:
    """The (table, sync_fs) each switch would swap in, captured instead of prepared and sent."""
    seen: list[tuple[FlakeyTable, bool]] = []

    def prepare_swap(self, device, targets, *, lockfs=False, dev=None):
        assert device == dm.ByUuid(UUID, "dmfu-args"), "a switch addresses its device by uuid"
        seen.append((DeviceTable.parse(targets).fault, lockfs))
        return FakeSwap()
    monkeypatch.setattr(dm.Control, "prepare_swap", prepare_swap)
    return seen


@pytest.fixture
def loads(dev, monkeypatch):
    return capture_swaps(monkeypatch)


def test_construction_touches_no_kernel(dev):
    assert dev.device_path == "/dev/mapper/dmfu-args"
    assert (dev.backing, dev.sectors, dev.loop_device, dev.image_path) == (BACKING, 131072, None, None)


# ---- what the switches ask for ------------------------------------------------------------------------

@pytest.mark.parametrize("call, table, sync_fs", [
    (lambda d: d.allow_writes(), FlakeyTable(BACKING, DEFAULT_INTERVAL, 0), False),
    (lambda d: d.allow_writes(interval=timedelta(minutes=2), sync_fs=True), FlakeyTable(BACKING, 120, 0), True),
    (lambda d: d.drop_writes(), FlakeyTable(BACKING, 0, DEFAULT_INTERVAL, drop_writes=True), False),
    (lambda d: d.drop_writes(interval=5, up_interval=3, sync_fs=True),
     FlakeyTable(BACKING, 3, 5, drop_writes=True), True),
    (lambda d: d.error_writes(interval=timedelta(seconds=1), up_interval=timedelta(hours=1)),
     FlakeyTable(BACKING, 3600, 1, error_writes=True), False),
    (lambda d: d.error_writes(interval=0, up_interval=1), FlakeyTable(BACKING, 1, 0, error_writes=True), False),
    (lambda d: d.error_reads(interval=2**32 - 1), FlakeyTable(BACKING, 0, 2**32 - 1, error_reads=True), False),
    (lambda d: d.corrupt_bio_byte(3, "W", 9, 1), FlakeyTable(BACKING, 0, 120, corrupt_bio_byte=CorruptBIOByte(
        3, Direction.WRITE, 9, 1)), False),
    (lambda d: d.corrupt_bio_byte(1, Direction.READ, 255, interval=7),
     FlakeyTable(BACKING, 0, 7, corrupt_bio_byte=CorruptBIOByte(1, "r", 255)), False),
    (lambda d: d.random_read_corrupt(1.0), FlakeyTable(BACKING, 0, 120, random_read_corrupt=PROBABILITY_MAX), False),
    (lambda d: d.random_read_corrupt(1), FlakeyTable(BACKING, 0, 120, random_read_corrupt=PROBABILITY_MAX), False),
    (lambda d: d.random_write_corrupt(0.5), FlakeyTable(BACKING, 0, 120, random_write_corrupt=PROBABILITY_MAX // 2),
     False),
    # the smallest probabilities still corrupt now and then: never rounded to the kernel's fail-all 0
    (lambda d: d.random_write_corrupt(1e-12), FlakeyTable(BACKING, 0, 120, random_write_corrupt=1), False),
    (lambda d: d.random_read_corrupt(5e-324), FlakeyTable(BACKING, 0, 120, random_read_corrupt=1), False),
    # 0 means no corruption: a pass-through table, not the kernel's "0 = fail all I/O"
    (lambda d: d.random_read_corrupt(0.0), FlakeyTable(BACKING, 1, 0), False),
    (lambda d: d.random_write_corrupt(0, up_interval=9, sync_fs=True), FlakeyTable(BACKING, 9, 0), True),
    (lambda d: d.random_read_corrupt(-0.0), FlakeyTable(BACKING, 1, 0), False),
])
def test_switch_loads_the_intended_table(dev, loads, call, table, sync_fs):
    call(dev)
    assert loads == [(table, sync_fs)]


# ---- refusals -----------------------------------------------------------------------------------------

BAD_INTERVALS = [-1, 1.5, 2.0, True, False, "10", None, timedelta(seconds=1.5), timedelta(microseconds=1),
                 timedelta(seconds=-1)]
SWITCHES = {
    "allow_writes": lambda d, **kw: d.allow_writes(**kw),
    "drop_writes": lambda d, **kw: d.drop_writes(**kw),
    "error_writes": lambda d, **kw: d.error_writes(**kw),
    "error_reads": lambda d, **kw: d.error_reads(**kw),
    "corrupt_bio_byte": lambda d, **kw: d.corrupt_bio_byte(1, "r", 0, **kw),
    "random_read_corrupt": lambda d, **kw: d.random_read_corrupt(0.5, **kw),
    "random_write_corrupt": lambda d, **kw: d.random_write_corrupt(0.5, **kw),
    "random_read_corrupt_0": lambda d, **kw: d.random_read_corrupt(0.0, **kw),
    "random_write_corrupt_0": lambda d, **kw: d.random_write_corrupt(0, **kw),
}


def refused(dev, loads, call, error=InvalidArgumentError):
    with pytest.raises(error) as info:
        call(dev)
    assert info.value.errno is None, "an errno means the kernel was asked"
    assert loads == []
    return info.value


@pytest.mark.parametrize("bad", BAD_INTERVALS, ids=repr)
@pytest.mark.parametrize("switch", SWITCHES)
def test_bad_interval_is_refused(dev, loads, switch, bad):
    err = refused(dev, loads, lambda d: SWITCHES[switch](d, interval=bad))
    assert "interval" in str(err) and dev.name in str(err)


@pytest.mark.parametrize("bad", BAD_INTERVALS, ids=repr)
@pytest.mark.parametrize("switch", [s for s in SWITCHES if s != "allow_writes"])
def test_bad_up_interval_is_refused(dev, loads, switch, bad):
    err = refused(dev, loads, lambda d: SWITCHES[switch](d, up_interval=bad))
    assert "up_interval" in str(err)


@pytest.mark.parametrize("call", [
    lambda d: d.drop_writes(interval=0),                       # up 0 + down 0: no period
    lambda d: d.allow_writes(interval=timedelta(0)),
    lambda d: d.error_writes(interval=2**32),                  # a u32 in the kernel
    lambda d: d.error_writes(interval=timedelta(seconds=2**32)),
    lambda d: d.error_writes(interval=2**31, up_interval=2**31),  # the sum overflows
])
def test_a_period_the_kernel_cannot_hold_is_refused(dev, loads, call):
    refused(dev, loads, call, InvalidTableError)


@pytest.mark.parametrize("bad", [math.nan, -0.1, -1e-300, 1.5, 1.0000001, math.inf, -math.inf, "0.5", True,
                                 False, None, 2, -1, 0.5j], ids=repr)
@pytest.mark.parametrize("which", ["random_read_corrupt", "random_write_corrupt"])
def test_bad_probability_is_refused(dev, loads, which, bad):
    err = refused(dev, loads, lambda d: getattr(d, which)(bad))
    assert "probability" in str(err)


@pytest.mark.parametrize("args", [
    (0, "r", 1), (2**32, "r", 1), (-1, "r", 1), ("1", "r", 1), (1.0, "r", 1), (True, "r", 1),
    (1, "r", 256), (1, "r", -1), (1, "r", "1"), (1, "r", 1.0),
    (1, "x", 1), (1, "rw", 1), (1, "", 1), (1, None, 1), (1, b"r", 1),
    (1, "r", 1, -1), (1, "r", 1, 2**32), (1, "r", 1, 1.0),
], ids=repr)
def test_bad_corrupt_bio_byte_is_refused(dev, loads, args):
    refused(dev, loads, lambda d: d.corrupt_bio_byte(*args), InvalidTableError)


@pytest.mark.parametrize("features_", [
    dict(drop_writes=True, corrupt_bio_byte=CorruptBIOByte(1, "w", 0)),
    dict(error_writes=True, corrupt_bio_byte=CorruptBIOByte(1, "w", 0)),
    dict(drop_writes=True, error_writes=True),
    dict(drop_writes=True, random_write_corrupt=1),
    dict(error_reads=True, corrupt_bio_byte=CorruptBIOByte(1, "r", 0)),
    dict(error_reads=True, random_read_corrupt=1),
    dict(random_read_corrupt=0),
    dict(random_write_corrupt=PROBABILITY_MAX + 1),
], ids=lambda f: "+".join(f))
def test_a_conflicting_table_never_reaches_load_table(no_kernel, features_):
    dev = make_dev()
    with pytest.raises(InvalidTableError):
        dev.load_table(FlakeyTable(dev.backing, 0, 10, **features_))


@pytest.mark.parametrize("feature, call", [
    ("error_reads", lambda d: d.error_reads()),
    ("random_read_corrupt", lambda d: d.random_read_corrupt(0.1)),
    ("random_write_corrupt", lambda d: d.random_write_corrupt(1.0)),
])
def test_a_missing_feature_is_refused_without_the_kernel(no_kernel, monkeypatch, feature, call):
    features.reset_cache()
    try:
        for name in NEWER:
            features.supported(name, probe=lambda f: False)
        dev = make_dev()
        seen = capture_swaps(monkeypatch)
        with pytest.raises(UnsupportedFeatureError) as info:
            call(dev)
        assert (info.value.feature, info.value.since) == (feature, features.FEATURE_SINCE[feature])
        assert info.value.running == os.uname().release and info.value.since in str(info.value)
        assert seen == []
        # a probability of 0 corrupts nothing and so needs no feature
        if feature.startswith("random"):
            getattr(dev, feature)(0.0)
            assert seen == [(FlakeyTable(BACKING, 1, 0), False)]
    finally:
        features.reset_cache()


@pytest.mark.parametrize("call", [
    lambda d: d.random_read_corrupt(2.0),
    lambda d: d.random_write_corrupt(math.nan),
    lambda d: d.error_reads(interval=-1),
    lambda d: d.error_reads(up_interval=1.5),
    lambda d: d.error_reads(interval=0),
    lambda d: d.random_read_corrupt(0.5, interval=timedelta(seconds=0.5)),
    lambda d: d.random_write_corrupt(1.0, up_interval=-3),
    lambda d: d.random_write_corrupt(1.0, interval=2**32),
])
def test_a_bad_argument_is_refused_before_the_feature_probe(no_kernel, monkeypatch, call):
    """Argument errors come first: refusing them needs no probe (whose scratch devices are ioctls)."""
    features.reset_cache()
    try:
        class Exploding:
            def run(self):
                raise AssertionError("probed the kernel in a call that had to be refused anyway")
        for name in features.PROBES:
            monkeypatch.setitem(features.PROBES, name, Exploding())
        dev = make_dev()
        with pytest.raises(InvalidArgumentError) as info:
            call(dev)
        assert info.value.errno is None
        assert features._cache == {}
    finally:
        features.reset_cache()
