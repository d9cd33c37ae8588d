"""Randomized bad input: every table, target list, switch argument and name either works or is
refused by the library with its own error, before any ioctl (no root, no kernel).

The control file's opener is replaced by one that raises ReachedKernel, a
KernelSupportError: a call that got as far as the kernel ends there (on a host
without /dev/mapper/control it would have raised KernelSupportError anyway, and
on a host with device-mapper nothing is created).  So a call either reaches the
kernel (accepted) or raises an InvalidArgumentError with no errno (refused
before any ioctl); any other exception, a TypeError or a UnicodeEncodeError
say, fails the test.  The generators are shared with
tests/kernel/test_bad_input_kernel.py, which feeds every accepted table and
name to a real kernel.
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Dict, List, Optional

import pytest

from dmflakey_ioctl.kernel import dm
from dmflakey_ioctl.errors import (DMFlakeyError, InvalidArgumentError, InvalidNameError,
                                   InvalidTableError, KernelSupportError)
from dmflakey_ioctl.flakey import Flakey, init_flakey
from dmflakey_ioctl.ownership import Owner
from dmflakey_ioctl.tables.flakey import PROBABILITY_MAX, CorruptBIOByte, FlakeyTable

SEED = 0xD3F1A4E
TABLE_CASES = 600
NAME_CASES = 400
U32 = 2**32 - 1
U64 = 2**64 - 1


class ReachedKernel(KernelSupportError):
    """The call got past every check of the library and asked for the control file."""


@pytest.fixture
def no_kernel(monkeypatch):
    def reached(self):
        raise ReachedKernel("open", dm.CONTROL_PATH, "unit test: the call reached for the kernel")

    monkeypatch.setattr(dm.Control, "fileno", reached)
    # a control file opened earlier in the session would let prepared requests skip fileno()
    monkeypatch.setattr(dm, "_default", dm.Control())


# ---- generators (shared with the kernel test) ---------------------------------------------------------

def _junk_number(rng: random.Random) -> Any:
    return rng.choice([
        -1, -rng.randint(2, 10**9), U32 + 1, U64, U64 + 1, 2**64 + rng.randint(0, 10**6), 10**40, -(10**40),
        0.5, 1.0, rng.random() * 1e6, float("nan"), float("inf"), float("-inf"), -0.0, 1e300,
        True, False, None, "1", " 2", "0x10", b"1", 3 + 0j, [1], (1,), {1: 1}, object(),
    ])


def _number(rng: random.Random, low: int, high: int, junk: float = 0.25) -> Any:
    """Mostly a valid int in low..high (with the edges often), sometimes junk."""
    if rng.random() < junk or high < low:
        return _junk_number(rng)
    return rng.choice([low, high, rng.randint(low, min(high, low + 10)), rng.randint(low, high)])


def _interval(rng: random.Random) -> Any:
    """Seconds: mostly small, sometimes the 32-bit edge (two of those overflow the period), or junk."""
    if rng.random() < 0.06:
        return _junk_number(rng)
    return rng.choice([0, 0, 1, 1, rng.randint(2, 600), rng.randint(0, 10**6), U32, rng.randint(0, U32)])


def _flag(rng: random.Random) -> Any:
    return rng.choice([True, False, False, False]) if rng.random() < 0.9 else \
        rng.choice([1, 0, "yes", None, 1.0, [True]])


JUNK_DEVICES = ["", " ", "7:0 1", "7:", ":1", "7:01x", "7:99999999", "4096:0", "7:1048576", "-1:0", "abc",
                "dev/loop0", "loop0", "/dev/loop0\n", "/dev/lo op0", "7\\:0", "/dev/\x00x", "/dev/\udcff",
                "\u00e97:0", "7:0\t", "７:０", 7, None, b"7:0", ("7", "0")]


def random_table_args(rng: random.Random, devices: List[str], max_offset: int = U64) -> Dict[str, Any]:
    """Keyword arguments for FlakeyTable, often wrong; corrupt_bio_byte is given as its 4 arguments."""
    args: Dict[str, Any] = {
        "device": rng.choice(devices) if rng.random() < 0.85 else rng.choice(JUNK_DEVICES),
        "up_interval": _interval(rng),
        "down_interval": _interval(rng),
    }
    if rng.random() < 0.6:
        offset = _number(rng, 0, max_offset, 0.08)
        if type(offset) is int and max_offset < offset <= U64:  # junk the builder may rightly accept
            offset = max_offset
        args["offset"] = offset
    for name in ("drop_writes", "error_writes", "error_reads"):
        if rng.random() < 0.3:
            args[name] = _flag(rng)
    if rng.random() < 0.3:
        args["corrupt_bio_byte"] = (
            _number(rng, 1, U32, 0.08),
            rng.choice(["r", "w", "R", "W"]) if rng.random() < 0.9 else
            rng.choice(["", "rw", "x", "read", 1, None, b"r", "\u0280"]),
            _number(rng, 0, 255, 0.08),
            _number(rng, 0, U32, 0.05),
        )
    for name in ("random_read_corrupt", "random_write_corrupt"):
        if rng.random() < 0.25:
            args[name] = _number(rng, 1, PROBABILITY_MAX, 0.1) if rng.random() < 0.95 else 0
    return args


def build_table(args: Dict[str, Any]) -> FlakeyTable:
    kwargs = dict(args)
    if "corrupt_bio_byte" in kwargs:
        kwargs["corrupt_bio_byte"] = CorruptBIOByte(*kwargs["corrupt_bio_byte"])
    return FlakeyTable(**kwargs)


NAME_POOLS = [
    "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", "-_.+:@=,", " ~!#$%^&*()[]{}'\"`;<>?|",
    "éüñßøå", "中文字符デバイス", "🙂🧪💾", "\u200b\u00a0\u2028\ufeff",  # zero-width, nbsp, separators
    "/", "\x00", "\x01\x07\t\n\r\x1b\x1f\x7f", "\udc80\udcff", "\ud800\udfff",  # escapes and lone surrogates
]
SPECIAL_NAMES = ["control", ".", "..", "...", "-", " ", "a" * 127, "a" * 128, "é" * 63, "é" * 64,
                 "🙂" * 31 + "abc", "🙂" * 32, "x/", "/x", "x\x00", "", "control ", "Control", "dm-0",
                 "\udcff" * 127, "\udcff" * 128, "\ud800"]


def random_name(rng: random.Random) -> Any:
    """A device name, often one the kernel or udev would not take."""
    roll = rng.random()
    if roll < 0.08:
        return rng.choice(SPECIAL_NAMES)
    if roll < 0.1:
        return rng.choice([None, 0, b"name", ["name"], 1.5])
    length = rng.choice([1, 2, rng.randint(1, 20), rng.randint(20, 140), rng.randint(120, 130)])
    pools = NAME_POOLS[:2] + rng.sample(NAME_POOLS, rng.randint(0, 3))
    weights = [8 if p in NAME_POOLS[:2] else 1 for p in pools]
    return "".join(rng.choice(rng.choices(pools, weights)[0]) for _ in range(length))


def random_uuid(rng: random.Random) -> Any:
    if rng.random() < 0.3:
        return None
    name = random_name(rng)
    if isinstance(name, str) and rng.random() < 0.3:
        name = (name * 3)[:rng.randint(1, 140)]
    return name


def name_ok(name: Any, limit: int = dm.NAME_MAX, reserved: bool = True) -> bool:
    """Oracle, independent of the library: what device-mapper (and udev) accept as a name or uuid."""
    if not isinstance(name, str):
        return False
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    if not 1 <= len(raw) <= limit or "/" in name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return False
    return not (reserved and name in ("control", ".", ".."))


def outcome(call: Callable[[], Any]) -> Optional[DMFlakeyError]:
    """None when the call reached the kernel; the refusal otherwise (any other error fails the test)."""
    try:
        call()
    except ReachedKernel:
        return None
    except InvalidArgumentError as err:
        assert err.errno is None, f"refused with an errno, so the kernel was asked: {err!r}"
        assert str(err) and err.operation, err
        return err
    except DMFlakeyError as err:
        raise AssertionError(f"a DMFlakeyError that is no refusal: {err!r}") from err
    raise AssertionError("the call neither reached the kernel nor refused")


# ---- tables -------------------------------------------------------------------------------------------

UNIT_DEVICES = ["7:0", "253:1048575", "4095:0", "/dev/loop0", "/dev/mapper/x"]


def test_random_tables_build_or_refuse_before_any_ioctl(no_kernel):
    rng = random.Random(SEED)
    accepted = refused = 0
    for case in range(TABLE_CASES):
        args = random_table_args(rng, UNIT_DEVICES)
        try:
            table = build_table(args)
        except InvalidTableError as err:
            assert err.errno is None and err.operation == "build flakey table", (case, args, err)
            refused += 1
            continue
        accepted += 1
        params = table.params()
        words = params.split()
        assert int(words[4]) == len(words) - 5, (case, params)   # an explicit, right feature count
        assert FlakeyTable.parse(params) == table, (case, params)
        payload, count = dm.pack_targets([(0, 8, "flakey", params)], "load table", "dmfu-bad")
        assert count == 1 and len(payload) % 8 == 0
        assert outcome(lambda: dm.load("dmfu-bad", [(0, 8, "flakey", params)])) is None, (case, args)
    # the generator must exercise both sides
    assert accepted > TABLE_CASES // 5 and refused > TABLE_CASES // 5, (accepted, refused)


def test_random_tables_refusals_name_the_cause(no_kernel):
    rng = random.Random(SEED + 1)
    for _ in range(200):
        args = random_table_args(rng, UNIT_DEVICES)
        try:
            build_table(args)
        except InvalidTableError as err:
            assert err.cause and len(str(err)) < 2000, err


def random_target(rng: random.Random, start: int) -> Any:
    shape = rng.random()
    length = _number(rng, 1, U64 - start, 0.3)
    kind = rng.choice(["flakey", "zero", "linear", "error"]) if rng.random() < 0.7 else rng.choice(
        ["", " ", "a" * 16, "a" * 15, "fla key", "flakey\x00", "z\u00e9ro", "\udcff", "\ud800", 7, None, b"zero",
         "x\n"])
    params = rng.choice(["", "7:0 0 1 0", "7:0 0 0 1 1 drop_writes", "é", "a" * 5000]) if rng.random() < 0.7 \
        else rng.choice(["\x00", "a\x00b", "\ud800", "\udcff", 5, None, b"7:0", "x" * 70000])
    if shape < 0.75:
        return (start if rng.random() < 0.85 else _number(rng, 0, U64, 0.5), length, kind, params)
    if shape < 0.85:
        return dm.Target(start, length, kind, params)
    return rng.choice([(start, length, kind), (start, length, kind, params, "extra"), 5, None, "abcd",
                       [start, length, kind, params], {}])


def test_random_target_lists_pack_or_refuse_before_any_ioctl(no_kernel):
    rng = random.Random(SEED + 2)
    accepted = 0
    for case in range(TABLE_CASES):
        if rng.random() < 0.05:
            targets: Any = rng.choice([None, 5, "abc", [], ()])
        else:
            targets, start = [], 0
            for _ in range(rng.choice([1, 1, 2, 3])):
                item = random_target(rng, start)
                targets.append(item)
                if isinstance(item, tuple) and len(item) == 4 and isinstance(item[1], int):
                    start += item[1]
        first = outcome(lambda: dm.load("dmfu-bad", targets))
        again = outcome(lambda: dm.control().load("dmfu-bad", targets, read_only=True))
        assert (first is None) == (again is None), (case, targets)
        if first is None:
            accepted += 1
            payload, count = dm.pack_targets(targets, "load table", "dmfu-bad")
            assert count == len(targets) and len(payload) % 8 == 0
    assert accepted > 50, accepted


# ---- the switches of a Flakey -------------------------------------------------------------------------

@pytest.fixture
def fake(no_kernel):
    uuid = "DMFLAKEY-0.0.1.0-img-000000000000"
    return Flakey("dmfu-bad", uuid, os.makedev(253, 0), "7:0", 131072, owner=Owner.from_uuid(uuid))


def random_switch(rng: random.Random) -> Callable[[Flakey], Any]:
    kw: Dict[str, Any] = {}
    if rng.random() < 0.7:
        kw["interval"] = _number(rng, 0, U32, 0.4)
    if rng.random() < 0.5:
        kw["up_interval"] = _number(rng, 0, U32, 0.4)
    if rng.random() < 0.3:
        kw["sync_fs"] = rng.choice([True, False])
    probability = rng.choice([0.0, 1.0, 0.5, 1e-12, 5e-324, -0.0, 1, 0, rng.random()]) if rng.random() < 0.6 \
        else rng.choice([float("nan"), float("inf"), -1e-9, 1.0000001, 2, -1, "0.5", None, True, 1j, [0.5]])
    method = rng.choice(["allow_writes", "drop_writes", "error_writes", "error_reads", "corrupt_bio_byte",
                         "random_read_corrupt", "random_write_corrupt"])
    if method == "allow_writes":
        kw.pop("up_interval", None)
        return lambda d: d.allow_writes(**kw)
    if method == "corrupt_bio_byte":
        args = (_number(rng, 1, U32, 0.3), rng.choice(["r", "w", "W", "x", "", 0, None]),
                _number(rng, 0, 255, 0.3), _number(rng, 0, U32, 0.2))
        return lambda d: d.corrupt_bio_byte(*args, **kw)
    if method.startswith("random_"):
        return lambda d: getattr(d, method)(probability, **kw)
    return lambda d: getattr(d, method)(**kw)


def test_random_switch_arguments_work_or_are_refused_before_any_ioctl(fake):
    rng = random.Random(SEED + 3)
    results = [outcome(lambda: random_switch(rng)(fake)) for _ in range(TABLE_CASES)]
    refused = [r for r in results if r is not None]
    assert len(refused) > 50 and len(results) - len(refused) > 50
    assert all(fake.name in str(r) or r.operation == "build flakey table" for r in refused)


@pytest.mark.parametrize("probability", [float("nan"), float("inf"), -float("inf"), -1e-300, 1 + 1e-15, "1",
                                         None, True, False, 1j])
@pytest.mark.parametrize("method", ["random_read_corrupt", "random_write_corrupt"])
def test_nan_and_other_bad_probabilities_are_refused(fake, method, probability):
    err = outcome(lambda: getattr(fake, method)(probability))
    assert err is not None and "probability" in str(err)


# ---- names and uuids ----------------------------------------------------------------------------------

NAME_OPERATIONS: Dict[str, Callable[[Any], Any]] = {
    "create": lambda n: dm.create(n),
    "info": lambda n: dm.info(n),
    "remove": lambda n: dm.remove(n),
    "suspend": lambda n: dm.suspend(n, lockfs=False),
    "resume": lambda n: dm.resume(n),
    "load": lambda n: dm.load(n, [(0, 8, "zero", "")]),
    "clear": lambda n: dm.clear(n),
    "table": lambda n: dm.table(n),
    "status": lambda n: dm.status(n),
    "message": lambda n: dm.message(n, 0, "@stats_list"),
}


def test_random_names_are_checked_like_the_kernel_before_any_ioctl(no_kernel, tmp_path):
    rng = random.Random(SEED + 4)
    names = [random_name(rng) for _ in range(NAME_CASES)] + SPECIAL_NAMES
    verdicts = {True: 0, False: 0}
    for name in names:
        expected = name_ok(name)
        verdicts[expected] += 1
        for operation, call in NAME_OPERATIONS.items():
            err = outcome(lambda: call(name))
            assert (err is None) == expected, (operation, name, err)
            if err is not None:
                assert isinstance(err, InvalidNameError), (operation, name, err)
        # no image file is made for a name that is refused
        err = outcome(lambda: init_flakey(name, str(tmp_path), fs_type=None, size=1 << 20))
        assert (err is None) == expected, (name, err)
        assert os.listdir(tmp_path) == [], name
    assert verdicts[True] > 60 and verdicts[False] > 60, verdicts


def test_random_uuids_are_checked_before_any_ioctl(no_kernel):
    rng = random.Random(SEED + 5)
    for _ in range(NAME_CASES):
        uuid = random_uuid(rng)
        expected = uuid is None or name_ok(uuid, dm.UUID_MAX, reserved=False)
        err = outcome(lambda: dm.create("dmfu-bad", uuid=uuid))
        assert (err is None) == expected, (uuid, err)


def test_message_arguments_are_checked_before_any_ioctl(no_kernel):
    for sector, text in [(-1, "x"), (2**64, "x"), (True, "x"), (0.0, "x"), (None, "x"), (0, ""), (0, "a\x00"),
                         (0, "\ud800"), (0, None), (0, b"x")]:
        err = outcome(lambda: dm.message("dmfu-bad", sector, text))
        assert err is not None, (sector, text)
    assert outcome(lambda: dm.message("dmfu-bad", 2**64 - 1, "\u00e9 x")) is None


def test_remove_with_negative_retries_still_asks_once(no_kernel):
    assert outcome(lambda: dm.remove("dmfu-bad", retries=-5)) is None


def test_oracle_sanity():
    assert name_ok("a" * 127) and not name_ok("a" * 128) and not name_ok("é" * 64) and name_ok("é" * 63)
    assert name_ok("\udcff") and not name_ok("\ud800") and not name_ok("control") and name_ok("...")
