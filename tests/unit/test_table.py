"""dm-flakey parameter strings: refusals, word counting, order, parsing of kernel read-backs."""

from __future__ import annotations

import enum
import itertools

import pytest

from dmflakey_ioctl.errors import InvalidArgumentError, InvalidTableError
from dmflakey_ioctl.tables.flakey import PROBABILITY_MAX, CorruptBIOByte, Direction, FlakeyTable

U32 = 2**32 - 1


def table(**kw) -> FlakeyTable:
    args = {"device": "7:0", "up_interval": 0, "down_interval": 120}
    args.update(kw)
    return FlakeyTable(**args)


def refused(match: str, **kw) -> InvalidTableError:
    with pytest.raises(InvalidTableError, match=match) as info:
        table(**kw)
    assert info.value.operation == "build flakey table"
    assert info.value.errno is None
    return info.value


# ---- building -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, params", [
    ({}, "7:0 0 0 120 0"),
    ({"up_interval": 120, "down_interval": 0}, "7:0 0 120 0 0"),
    ({"drop_writes": True}, "7:0 0 0 120 1 drop_writes"),
    ({"error_writes": True}, "7:0 0 0 120 1 error_writes"),
    ({"error_reads": True}, "7:0 0 0 120 1 error_reads"),
    ({"error_reads": True, "error_writes": True}, "7:0 0 0 120 2 error_reads error_writes"),
    ({"corrupt_bio_byte": CorruptBIOByte(32, Direction.READ, 1)}, "7:0 0 0 120 5 corrupt_bio_byte 32 r 1 0"),
    ({"random_read_corrupt": 7}, "7:0 0 0 120 2 random_read_corrupt 7"),
    ({"random_write_corrupt": PROBABILITY_MAX}, "7:0 0 0 120 2 random_write_corrupt 1000000000"),
    ({"offset": 2048, "device": "/dev/loop3", "up_interval": 5, "down_interval": 7},
     "/dev/loop3 2048 5 7 0"),
])
def test_params(kw, params):
    assert table(**kw).params() == params


def test_corruption_features_count_words_in_kernel_order():
    t = table(random_write_corrupt=3, random_read_corrupt=2, corrupt_bio_byte=CorruptBIOByte(9, "w", 255, 0x800))
    assert t.feature_words() == ["corrupt_bio_byte", "9", "w", "255", "2048",
                                 "random_read_corrupt", "2", "random_write_corrupt", "3"]
    assert t.params() == "7:0 0 0 120 9 " + " ".join(t.feature_words())


def test_error_and_drop_features_come_first():
    t = table(random_write_corrupt=4, error_reads=True, corrupt_bio_byte=CorruptBIOByte(1, "w", 0))
    assert t.feature_words() == ["error_reads", "corrupt_bio_byte", "1", "w", "0", "0", "random_write_corrupt", "4"]
    assert t.params().split()[4] == "8"
    t = table(random_read_corrupt=4, drop_writes=True, corrupt_bio_byte=CorruptBIOByte(1, "r", 0))
    assert t.feature_words() == ["drop_writes", "corrupt_bio_byte", "1", "r", "0", "0", "random_read_corrupt", "4"]
    assert t.params().split()[4] == "8"
    t = table(error_writes=True, error_reads=True)
    assert t.feature_words() == ["error_reads", "error_writes"]


def test_line():
    assert table(drop_writes=True).line(0, 8) == "0 8 flakey 7:0 0 0 120 1 drop_writes"
    assert table().line(16, 2**40) == f"16 {2**40} flakey 7:0 0 0 120 0"


@pytest.mark.parametrize("start, length", [(-1, 8), (0, 0), (0, -8), (1.0, 8), (0, "8"), (True, 8), (0, 2**64)])
def test_line_refuses_bad_geometry(start, length):
    with pytest.raises(InvalidTableError):
        table().line(start, length)


def test_corrupt_bio_byte_direction_strings_are_normalised():
    assert CorruptBIOByte(1, "r", 0).direction is Direction.READ
    assert CorruptBIOByte(1, "W", 0).direction is Direction.WRITE
    assert CorruptBIOByte(1, Direction.WRITE, 0) == CorruptBIOByte(1, "w", 0)
    assert CorruptBIOByte(U32, "r", 255, U32).words() == ["corrupt_bio_byte", str(U32), "r", "255", str(U32)]


def test_int_subclasses_are_stored_as_plain_ints():
    class Sixty(enum.IntEnum):
        S = 60

    t = table(up_interval=Sixty.S)
    assert type(t.up_interval) is int
    assert t.params() == "7:0 0 60 120 0"


def test_tables_are_frozen_and_hashable():
    t = table()
    with pytest.raises(AttributeError):
        t.up_interval = 3  # type: ignore[misc]
    assert {t, table()} == {t}


# ---- refusals ---------------------------------------------------------------------------------------------

def test_refusals_are_invalid_argument_errors():
    err = refused("drop_writes and error_writes", drop_writes=True, error_writes=True)
    assert isinstance(err, InvalidArgumentError) and isinstance(err, ValueError)
    assert str(err).startswith("build flakey table: ")


@pytest.mark.parametrize("writes", ["drop_writes", "error_writes"])
def test_write_stoppers_conflict_with_write_corruption(writes):
    refused(f"{writes} conflicts with corrupt_bio_byte in the write direction",
            **{writes: True}, corrupt_bio_byte=CorruptBIOByte(1, "w", 0))
    refused(f"{writes} conflicts with random_write_corrupt", **{writes: True}, random_write_corrupt=1)
    assert table(**{writes: True}, corrupt_bio_byte=CorruptBIOByte(1, "r", 0), random_read_corrupt=1)


def test_error_reads_conflicts_with_read_corruption():
    refused("error_reads conflicts with corrupt_bio_byte in the read direction",
            error_reads=True, corrupt_bio_byte=CorruptBIOByte(1, "r", 0))
    refused("error_reads conflicts with random_read_corrupt", error_reads=True, random_read_corrupt=1)
    assert table(error_reads=True, corrupt_bio_byte=CorruptBIOByte(1, "w", 0), random_write_corrupt=1)


@pytest.mark.parametrize("kw, match", [
    ({"nth_byte": 0}, "nth_byte must be in 1.."),
    ({"nth_byte": U32 + 1}, "nth_byte must be in 1.."),
    ({"nth_byte": 1.0}, "nth_byte must be an int, got float"),
    ({"nth_byte": "1"}, "nth_byte must be an int, got str"),
    ({"nth_byte": True}, "nth_byte must be an int, got bool"),
    ({"value": 256}, r"value must be in 0\.\.255"),
    ({"value": -1}, r"value must be in 0\.\.255"),
    ({"value": float("nan")}, "value must be an int, got float"),
    ({"flags": -1}, "flags must be in 0.."),
    ({"flags": U32 + 1}, "flags must be in 0.."),
    ({"flags": None}, "flags must be an int"),
    ({"direction": "x"}, "direction must be 'r' or 'w'"),
    ({"direction": "rw"}, "direction must be 'r' or 'w'"),
    ({"direction": ""}, "direction must be 'r' or 'w'"),
    ({"direction": 0}, "direction must be 'r' or 'w'"),
    ({"direction": None}, "direction must be 'r' or 'w'"),
])
def test_corrupt_bio_byte_refusals(kw, match):
    args = {"nth_byte": 1, "direction": "r", "value": 0, "flags": 0}
    args.update(kw)
    with pytest.raises(InvalidTableError, match=match):
        CorruptBIOByte(**args)


@pytest.mark.parametrize("name", ["up_interval", "down_interval", "offset"])
@pytest.mark.parametrize("bad, match", [
    (-1, "must be in 0.."),
    (1.5, "must be an int, got float"),
    (1.0, "must be an int, got float"),
    (float("nan"), "must be an int, got float"),
    (float("inf"), "must be an int, got float"),
    ("5", "must be an int, got str"),
    (True, "must be an int, got bool"),
    (None, "must be an int, got NoneType"),
])
def test_numbers_are_type_and_range_checked(name, bad, match):
    kw = {"up_interval": 1, "down_interval": 1, name: bad}
    refused(f"{name} {match}", **kw)


def test_interval_limits():
    refused("up_interval must be in 0..4294967295", up_interval=U32 + 1, down_interval=0)
    refused("down_interval must be in 0..4294967295", up_interval=0, down_interval=U32 + 1)
    refused("up_interval \\+ down_interval is 0", up_interval=0, down_interval=0)
    refused("overflows 32 bits", up_interval=U32, down_interval=1)
    refused("overflows 32 bits", up_interval=2**31, down_interval=2**31)
    assert table(up_interval=U32 - 5, down_interval=5).params() == f"7:0 0 {U32 - 5} 5 0"
    assert table(up_interval=0, down_interval=U32)
    refused("offset must be in 0..18446744073709551615", offset=2**64)
    assert table(offset=2**64 - 1).params().split()[1] == str(2**64 - 1)


@pytest.mark.parametrize("name", ["random_read_corrupt", "random_write_corrupt"])
def test_random_probability_refusals(name):
    err = refused(f"{name} 0 is refused", **{name: 0})
    assert "fails ALL reads and writes" in err.cause and "leave" in err.cause
    refused(f"{name} must be in 1..1000000000", **{name: -1})
    refused(f"{name} must be in 1..1000000000", **{name: PROBABILITY_MAX + 1})
    refused(f"{name} must be an int, got float", **{name: 0.5})
    refused(f"{name} must be an int, got float", **{name: float("nan")})
    refused(f"{name} must be an int, got bool", **{name: False})
    refused(f"{name} must be an int, got bool", **{name: True})
    refused(f"{name} must be an int, got str", **{name: "5"})
    assert table(**{name: 1}).feature_words() == [name, "1"]


@pytest.mark.parametrize("name", ["drop_writes", "error_writes", "error_reads"])
@pytest.mark.parametrize("bad", [1, 0, "yes", None])
def test_flags_must_be_bools(name, bad):
    refused(f"{name} must be a bool", **{name: bad})


def test_corrupt_bio_byte_must_be_the_dataclass():
    refused("corrupt_bio_byte must be a CorruptBIOByte or None", corrupt_bio_byte=(1, "r", 0, 0))


@pytest.mark.parametrize("device, match", [
    ("", "device is empty"),
    ("7:0 ", "whitespace"),
    ("/dev/my loop", "whitespace"),
    ("/dev/loop\t0", "whitespace"),
    ("/dev/loop0\n", "whitespace"),
    ("/dev/loop\x000", "control character"),
    ("/dev/loop\\0", "backslash"),
    ("loop0", "neither major:minor nor an absolute path"),
    ("7:", "neither major:minor nor an absolute path"),
    ("7:x", "neither major:minor nor an absolute path"),
    ("-7:0", "neither major:minor nor an absolute path"),
    ("4096:0", "major must be <= 4095"),
    ("7:1048576", "minor <= 1048575"),
    (7, "device must be a str, got int"),
    (None, "device must be a str"),
    (b"7:0", "device must be a str, got bytes"),
])
def test_device_refusals(device, match):
    refused(match, device=device)


@pytest.mark.parametrize("device", ["7:0", "253:12", "4095:1048575", "/dev/loop0", "/dev/disk/by-id/x-y_z"])
def test_devices_accepted(device):
    assert table(device=device).params().split()[0] == device


# ---- fails_all_io / equivalent ----------------------------------------------------------------------------

def test_fails_all_io():
    assert table().fails_all_io()
    assert table(error_reads=True, error_writes=True).fails_all_io()
    assert not table(error_writes=True).fails_all_io()
    assert not table(error_reads=True).fails_all_io()
    assert not table(drop_writes=True).fails_all_io()
    assert not table(random_read_corrupt=1).fails_all_io()
    assert not table(error_writes=True, random_read_corrupt=1).fails_all_io()
    assert not table(error_reads=True, drop_writes=True).fails_all_io()


def test_equivalent_treats_no_features_as_error_reads_and_writes():
    bare = table()
    explicit = table(error_reads=True, error_writes=True)
    assert bare != explicit
    assert bare.equivalent(explicit) and explicit.equivalent(bare)
    assert bare.equivalent(FlakeyTable.parse("7:0 0 0 120 2 error_reads error_writes"))
    assert not bare.equivalent(table(error_writes=True))
    assert not bare.equivalent(table(error_reads=True))
    assert not bare.equivalent(table(down_interval=121))
    assert not bare.equivalent(table(offset=8))
    assert not bare.equivalent(table(device="/dev/loop0"))
    assert not bare.equivalent(table(device="007:0"))
    assert not explicit.equivalent(table(error_reads=True, drop_writes=True))
    assert not bare.equivalent("7:0 0 0 120 0")  # type: ignore[arg-type]
    assert table(drop_writes=True).equivalent(table(drop_writes=True))


# ---- parsing ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # Linux 6.1 read-back: every field followed by a space
    ("7:0 0 5 5 1 drop_writes ", FlakeyTable("7:0", 5, 5, drop_writes=True)),
    ("7:0 0 5 5 0 ", FlakeyTable("7:0", 5, 5)),
    ("7:1 8 0 60 1 error_writes ", FlakeyTable("7:1", 0, 60, offset=8, error_writes=True)),
    ("7:2 0 1 1 6 drop_writes corrupt_bio_byte 1 r 0 0 ",
     FlakeyTable("7:2", 1, 1, drop_writes=True, corrupt_bio_byte=CorruptBIOByte(1, "r", 0))),
    # Linux 6.5+ read-back
    ("253:0 0 0 120 2 error_reads error_writes", FlakeyTable("253:0", 0, 120, error_reads=True, error_writes=True)),
    ("7:3 0 0 1 5 corrupt_bio_byte 32 r 1 0", FlakeyTable("7:3", 0, 1, corrupt_bio_byte=CorruptBIOByte(32, "r", 1))),
    ("7:3 0 0 1 4 random_read_corrupt 1000000000 random_write_corrupt 5",
     FlakeyTable("7:3", 0, 1, random_read_corrupt=PROBABILITY_MAX, random_write_corrupt=5)),
    ("7:0 0 120 0 1 error_writes", FlakeyTable("7:0", 120, 0, error_writes=True)),
    ("7:4 0 3 4 8 error_reads corrupt_bio_byte 4294967295 w 255 4294967295 random_write_corrupt 9",
     FlakeyTable("7:4", 3, 4, error_reads=True, corrupt_bio_byte=CorruptBIOByte(U32, "w", 255, U32),
                 random_write_corrupt=9)),
    # legacy form without a feature count, case-insensitive names, any order, any whitespace
    ("7:0 0 5 5", FlakeyTable("7:0", 5, 5)),
    ("7:0 0 5 5 2 DROP_WRITES Error_Reads", FlakeyTable("7:0", 5, 5, drop_writes=True, error_reads=True)),
    ("7:0 0 5 5 5 Corrupt_Bio_Byte 2 W 3 4", FlakeyTable("7:0", 5, 5, corrupt_bio_byte=CorruptBIOByte(2, "w", 3, 4))),
    ("  /dev/loop0\t16 5  5\n0\n", FlakeyTable("/dev/loop0", 5, 5, offset=16)),
])
def test_parse_kernel_outputs(text, expected):
    assert FlakeyTable.parse(text) == expected


def test_parse_keeps_what_the_words_say():
    t = FlakeyTable.parse("253:0 0 0 120 2 error_reads error_writes")
    assert t.error_reads and t.error_writes and not t.drop_writes
    assert t.feature_words() == ["error_reads", "error_writes"]
    assert t != FlakeyTable.parse("253:0 0 0 120 0")


@pytest.mark.parametrize("text, match", [
    ("", "got 0 words"),
    ("7:0 0 5", "got 3 words"),
    ("7:0 0 5 5 1", "num_features is 1 but only 0 feature words follow"),
    ("7:0 0 5 5 2 drop_writes", "num_features is 2 but only 1 feature words follow"),
    ("7:0 0 5 5 1 drop_writes 1", "1 extra words after the 1 feature words"),
    ("7:0 0 5 5 0 drop_writes", "1 extra words after the 0 feature words"),
    ("7:0 0 5 5 4 random_read_corrupt 1000000000 random_write_corrupt", "num_features is 4 but only 3"),
    ("7:0 0 5 5 drop_writes", "num_features must be a decimal number, got 'drop_writes'"),
    ("7:0 0 5 5 1 frobnicate", "unknown feature 'frobnicate'"),
    ("7:0 0 5 5 2 drop_writes drop_writes", "feature drop_writes duplicated"),
    ("7:0 0 5 5 2 error_reads ERROR_READS", "feature error_reads duplicated"),
    ("7:0 0 5 5 4 random_read_corrupt 1 random_read_corrupt 2", "feature random_read_corrupt duplicated"),
    ("7:0 0 5 5 10 corrupt_bio_byte 1 r 0 0 corrupt_bio_byte 2 r 0 0", "feature corrupt_bio_byte duplicated"),
    ("7:0 0 5 5 4 corrupt_bio_byte 1 r 0", "feature corrupt_bio_byte needs 4 arguments, got 3"),
    ("7:0 0 5 5 1 random_write_corrupt", "feature random_write_corrupt needs 1 arguments, got 0"),
    ("7:0 0 5 5 2 random_write_corrupt 0", "random_write_corrupt 0 is refused"),
    ("7:0 0 5 5 2 random_write_corrupt 1000000001", "random_write_corrupt must be in 1..1000000000"),
    ("7:0 0 5 5 2 random_write_corrupt 0.5", "random_write_corrupt must be a decimal number"),
    ("7:0 0 5 5 5 corrupt_bio_byte 1 x 0 0", "direction must be 'r' or 'w', got 'x'"),
    ("7:0 0 5 5 5 corrupt_bio_byte 0 r 0 0", "nth_byte must be in 1.."),
    ("7:0 0 5 5 5 corrupt_bio_byte 1 r 256 0", r"value must be in 0\.\.255"),
    ("7:0 0 5 5 5 corrupt_bio_byte 1 r -1 0", "value must be a decimal number"),
    ("7:0 0 5 5 5 corrupt_bio_byte r 1 0 0", "nth_byte must be a decimal number"),
    ("7:0 0 5 5 2 drop_writes error_writes", "drop_writes and error_writes conflict"),
    ("7:0 0 5 5 6 drop_writes corrupt_bio_byte 1 w 0 0", "drop_writes conflicts with corrupt_bio_byte"),
    ("7:0 -1 5 5 0", "offset must be a decimal number"),
    ("7:0 0 +5 5 0", "up interval must be a decimal number"),
    ("7:0 0 5 0x5 0", "down interval must be a decimal number"),
    ("7:0 0 5 \u0665 0", "down interval must be a decimal number"),
    ("7:0 0 0 0 0", "up_interval \\+ down_interval is 0"),
    ("7:0 0 4294967295 1 0", "overflows 32 bits"),
    ("7:0 0 4294967296 0 0", "up_interval must be in"),
    ("loop0 0 5 5 0", "neither major:minor nor an absolute path"),
    ("7:0 0 5 5 -1", "num_features must be a decimal number"),
])
def test_parse_refusals(text, match):
    with pytest.raises(InvalidTableError, match=match) as info:
        FlakeyTable.parse(text)
    assert info.value.operation == "parse flakey table"
    assert repr(text) in info.value.cause


@pytest.mark.parametrize("bad", [None, 5, b"7:0 0 5 5 0", ["7:0", "0", "5", "5"]])
def test_parse_refuses_non_strings(bad):
    with pytest.raises(InvalidTableError, match="expected a str"):
        FlakeyTable.parse(bad)


def _legal_tables():
    corruptions = [None, CorruptBIOByte(1, "r", 0), CorruptBIOByte(4096, "w", 255, 1 << 11),
                   CorruptBIOByte(U32, "r", 17, U32)]
    for reads, writes, corrupt, rrc, rwc, (up, down), offset, device in itertools.product(
            [False, True], [None, "drop_writes", "error_writes"], corruptions, [None, 1, PROBABILITY_MAX],
            [None, 500_000], [(0, 1), (U32, 0), (3, 7)], [0, 2**64 - 1], ["7:0", "/dev/loop12"]):
        kw = {"error_reads": reads, "corrupt_bio_byte": corrupt, "random_read_corrupt": rrc,
              "random_write_corrupt": rwc}
        if writes:
            kw[writes] = True
        try:
            yield FlakeyTable(device, up, down, offset, **kw)
        except InvalidTableError:
            continue


def test_round_trips_through_params_and_kernel_formats():
    tables = list(_legal_tables())
    assert len(tables) > 500
    for t in tables:
        words = t.params().split()
        assert int(words[4]) == len(words) - 5 == len(t.feature_words())
        assert FlakeyTable.parse(t.params()) == t
        old_kernel_format = " ".join(words) + " "
        assert FlakeyTable.parse(old_kernel_format) == t
        assert FlakeyTable.parse(t.line(0, 8).split(" ", 3)[3]) == t
        assert FlakeyTable.parse(t.params()).equivalent(t)


def test_num_features_counts_words_not_features():
    assert table(corrupt_bio_byte=CorruptBIOByte(1, "r", 0)).params().split()[4] == "5"
    assert table(random_read_corrupt=1).params().split()[4] == "2"
    assert table(random_write_corrupt=1, random_read_corrupt=1).params().split()[4] == "4"
    assert table(error_reads=True).params().split()[4] == "1"
    assert table(drop_writes=True, error_reads=True).params().split()[4] == "2"
    largest = table(error_reads=True, corrupt_bio_byte=CorruptBIOByte(1, "w", 0), random_write_corrupt=1)
    assert largest.params().split()[4] == "8"
