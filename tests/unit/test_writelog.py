"""The dm-log-writes reader and replayer against synthetic logs.

The logs come from :class:`LogBuilder`, a writer written here from the format
description (docs of the kernel target and the project's notes), not from the
reader; it also keeps its own model of the recorded device, the oracle every
replay is compared with.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import struct

import pytest

from dmflakey_ioctl.errors import DeviceExistsError, DMFlakeyError, InvalidArgumentError, LogFormatError
from dmflakey_ioctl.writelog import (SIZE_MARK_PREFIX, LogEntry, LogFlags, ReplayResult, WriteLog,
                                     check_mark_label)

LOG_MAGIC = 0x6A736677736872
FLUSH, FUA, DISCARD, MARK, META = 1, 2, 4, 8, 16
MiB = 1 << 20


class LogBuilder:
    """Builds a log as the kernel lays it out, and the device it describes."""

    def __init__(self, sector_size: int = 512, device_size: int = 1 * MiB) -> None:
        self.ss = sector_size
        self.body = bytearray()
        self.records: list[tuple] = []        # (kind, sector, nr_sectors, flags, payload)
        self.device_size = device_size

    def _header(self, sector: int, nr: int, flags: int, data_len: int, inline: bytes = b"") -> bytes:
        head = struct.pack("<4Q", sector, nr, flags, data_len) + inline
        return head + bytes(self.ss - len(head))

    def write(self, sector: int, data: bytes, flags: int = 0) -> int:
        assert len(data) % self.ss == 0 and data
        nr = len(data) // self.ss
        self.body += self._header(sector, nr, flags, 0) + data
        self.records.append(("write", sector, nr, flags, bytes(data)))
        return len(self.records) - 1

    def discard(self, sector: int, nr: int) -> int:
        self.body += self._header(sector, nr, DISCARD, 0)
        self.records.append(("discard", sector, nr, DISCARD, None))
        return len(self.records) - 1

    def flush(self, flags: int = FLUSH) -> int:
        self.body += self._header(0, 0, flags, 0)
        self.records.append(("flush", 0, 0, flags, None))
        return len(self.records) - 1

    def mark(self, label: str) -> int:
        raw = label.encode()
        self.body += self._header(0, 0, MARK, len(raw), raw)
        self.records.append(("mark", 0, 0, MARK, label))
        return len(self.records) - 1

    def raw(self, block: bytes) -> None:
        """Bytes that are not an entry the builder models (garbage, stale blocks)."""
        self.body += block

    def build(self, nr_entries: int | None = None, *, magic: int = LOG_MAGIC, version: int = 1,
              sector_size: int | None = None) -> bytes:
        count = len(self.records) if nr_entries is None else nr_entries
        head = struct.pack("<QQQI", magic, version, count, sector_size or self.ss) + b"\xde\xad\xbe\xef"
        return head + bytes(self.ss - len(head)) + bytes(self.body)

    def save(self, path, **kw) -> str:
        with open(path, "wb") as fh:
            fh.write(self.build(**kw))
        return str(path)

    def device(self, until: int | None = None, start: int = 0, base: bytes | None = None) -> bytearray:
        """The recorded device after entries start..until (inclusive), from base or zeros."""
        dev = bytearray(base if base is not None else bytes(self.device_size))
        last = len(self.records) - 1 if until is None else until
        for kind, sector, nr, _flags, payload in self.records[start:last + 1]:
            pos = sector * self.ss
            if kind == "write":
                dev[pos:pos + len(payload)] = payload
            elif kind == "discard":
                dev[pos:pos + nr * self.ss] = bytes(nr * self.ss)
        return dev


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size) if hasattr(random.Random, "randbytes") \
        else bytes(random.Random(seed).getrandbits(8) for _ in range(size))


def target_file(path, size: int, fill: bytes | None = None) -> str:
    with open(path, "wb") as fh:
        if fill is None:
            fh.truncate(size)
        else:
            fh.write(fill)
    return str(path)


def read(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def sample_log(ss: int = 512) -> LogBuilder:
    b = LogBuilder(ss, device_size=64 * ss)
    b.mark(f"{SIZE_MARK_PREFIX}{64 * ss}")
    b.write(0, pattern(1, 4 * ss), META)
    b.write(4, pattern(2, 2 * ss))
    b.flush()
    b.mark("one")
    b.write(10, pattern(3, 3 * ss), FUA)
    b.discard(0, 2)
    b.write(1, pattern(4, ss))
    b.mark("two")
    return b


# --------------------------------------------------------------------------- reading

def test_entries_flags_marks_and_sizes(tmp_path):
    b = sample_log()
    with WriteLog.open(b.save(tmp_path / "log")) as log:
        assert len(log) == 9 and log.nr_entries == 9 and log.entries_beyond_count == 0
        assert log.sector_size == 512
        assert log.device_size == 64 * 512
        e = log[1]
        assert isinstance(e, LogEntry)
        assert (e.index, e.sector, e.nr_sectors, e.label) == (1, 0, 4, None)
        assert e.flags == LogFlags.METADATA and e.offset == 0 and e.size == 2048
        assert log[5].flags == LogFlags.FUA and log[5].offset == 10 * 512 and log[5].size == 1536
        assert log[6].flags == LogFlags.DISCARD and log[6].size == 1024
        assert log[3].flags == LogFlags.FLUSH and log[3].size == 0
        assert log[-1].label == "two" and log[-1].flags == LogFlags.MARK
        assert [x.index for x in log] == list(range(9))
        assert log.marks == {f"{SIZE_MARK_PREFIX}{64 * 512}": [0], "one": [4], "two": [8]}
        assert log.flush_points() == [3, 5] and log.fua_points() == [5]
        assert log.mark_points() == [0, 4, 8]
        assert log.read_data(2) == pattern(2, 1024)
        assert log.read_data(6) == b"" and log.read_data(4) == b""
        line = log[5].describe()
        assert "5" in line and "sector 10" in line and "1.5 KiB" in line and "FUA" in line
        assert "two" in log[8].describe() and "MARK" in log[8].describe()
        d = json.loads(json.dumps(log[5].as_dict()))
        assert d == {"index": 5, "sector": 10, "nr_sectors": 3, "offset": 5120, "size": 1536,
                     "sector_size": 512, "flags": ["FUA"], "label": None}
        with pytest.raises(IndexError):
            log[9]
        with pytest.raises(TypeError):
            log["one"]  # type: ignore[index]


def test_stale_count_entries_beyond_it_are_found_and_reported(tmp_path):
    b = sample_log()
    with WriteLog.open(b.save(tmp_path / "log", nr_entries=3)) as log:
        assert log.nr_entries == 3 and len(log) == 9 and log.entries_beyond_count == 6
        assert log.marks["two"] == [8]


@pytest.mark.parametrize("garbage", [
    struct.pack("<4Q", 0, 0, 0, 0),                      # an all-zero block: no entry
    struct.pack("<4Q", 3, 1, 1 << 7, 0),                  # a flag the kernel never sets
    struct.pack("<4Q", 3, 1, 0, 0) + b"x",                # byte 32 set in a non-mark header
    struct.pack("<4Q", 3, 1 << 40, 0, 0),                 # data far past the end of the log
    struct.pack("<4Q", 0, 2, MARK, 3) + b"abc",           # a mark with sectors
])
def test_scan_past_a_stale_count_stops_at_the_first_invalid_entry(tmp_path, garbage):
    b = sample_log()
    b.raw(garbage + bytes(512 - len(garbage)))
    b.write(20, pattern(9, 512))                          # valid-looking, but after the garbage
    with WriteLog.open(b.save(tmp_path / "log", nr_entries=2)) as log:
        assert len(log) == 9 and log.entries_beyond_count == 7


def test_end_mark_ends_the_log_left_overs_after_it_are_ignored(tmp_path):
    b = sample_log()
    b.mark("dm-log-writes-end")
    count = len(b.records)
    b.write(30, pattern(5, 512))                          # an earlier recording's entry
    with WriteLog.open(b.save(tmp_path / "log", nr_entries=count)) as log:
        assert len(log) == count and log.entries_beyond_count == 0
        assert log[-1].label == "dm-log-writes-end"
    # with the count behind, the scan still stops right after the end mark
    with WriteLog.open(b.save(tmp_path / "log2", nr_entries=4)) as log:
        assert len(log) == count and log.entries_beyond_count == count - 4


def test_zero_padding_after_the_last_entry_is_not_an_entry(tmp_path):
    b = sample_log()
    b.raw(bytes(64 * 1024))                               # a log device bigger than its log
    with WriteLog.open(b.save(tmp_path / "log")) as log:
        assert len(log) == 9 and log.entries_beyond_count == 0


def format_error(path) -> LogFormatError:
    with pytest.raises(LogFormatError) as info:
        WriteLog.open(path)
    err = info.value
    assert isinstance(err, DMFlakeyError) and str(err.offset) in str(err) and path in str(err)
    return err


@pytest.mark.parametrize("kw, offset", [
    ({"magic": 0x1234}, 0),
    ({"version": 2}, 8),
    ({"sector_size": 1000}, 24),
    ({"sector_size": 256}, 24),
    ({"sector_size": 131072}, 24),
])
def test_bad_super_block(tmp_path, kw, offset):
    err = format_error(sample_log().save(tmp_path / "log", **kw))
    assert err.offset == offset


def test_too_short_and_empty_files(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    assert format_error(str(tmp_path / "empty")).offset == 0
    whole = sample_log(4096).build()
    (tmp_path / "short").write_bytes(whole[:1024])        # magic fine, super block cut short
    assert format_error(str(tmp_path / "short")).offset == 0


def test_truncated_data_inside_the_count(tmp_path):
    b = sample_log()
    whole = b.build()
    (tmp_path / "log").write_bytes(whole[:-512 - 100])    # cut inside entry 7's data
    err = format_error(str(tmp_path / "log"))
    entry7 = 512 * (1 + 1 + 5 + 3 + 1 + 1 + 4 + 1)       # super + entries 0..6 with their data
    assert err.offset == entry7 and "entry 7" in str(err) and "truncated" in str(err)


def test_log_ending_before_the_count(tmp_path):
    b = sample_log()
    err = format_error(b.save(tmp_path / "log", nr_entries=12))
    assert err.offset == len(b.build()) and "entry 9 of the 12" in str(err)
    whole = b.build()
    (tmp_path / "cut").write_bytes(whole[:-300])           # inside the last header
    err = format_error(str(tmp_path / "cut"))
    assert err.offset == len(whole) - 512 and "entry 8" in str(err)


def test_entry_running_past_the_end(tmp_path):
    b = sample_log()
    b.raw(struct.pack("<4Q", 7, 100, 0, 0) + bytes(480) + bytes(512 * 3))
    err = format_error(b.save(tmp_path / "log", nr_entries=10))
    assert err.offset == len(sample_log().build()) and "past the end" in str(err)


@pytest.mark.parametrize("bad, what", [
    (struct.pack("<4Q", 0, 0, 0, 0), "both 0"),
    (struct.pack("<4Q", 1, 1, 64, 0), "0x40"),
    (struct.pack("<4Q", 1, 1, 0, 0) + b"\1", "byte 32"),
    (struct.pack("<4Q", 0, 0, MARK, 600) + b"x", "does not fit"),
    (struct.pack("<4Q", 0, 0, MARK | FUA, 1) + b"x", "MARK flag"),
    (struct.pack("<4Q", 0, 0, MARK, 3) + b"a\0b", "NUL"),
])
def test_invalid_entry_inside_the_count(tmp_path, bad, what):
    b = sample_log()
    b.raw(bad + bytes(512 - len(bad)) + bytes(512))
    err = format_error(b.save(tmp_path / "log", nr_entries=10))
    assert err.offset == len(sample_log().build()) and what in str(err)


def test_missing_log_and_not_a_file(tmp_path):
    with pytest.raises(DMFlakeyError) as info:
        WriteLog.open(tmp_path / "nope")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(InvalidArgumentError):
        WriteLog.open(tmp_path)


def test_log_format_error_survives_pickling():
    err = LogFormatError("read log", "/x", "bad magic", offset=0)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is LogFormatError and copy.offset == 0 and str(copy) == str(err)


def test_four_k_sectors(tmp_path):
    b = LogBuilder(4096, device_size=32 * 4096)
    b.write(3, pattern(1, 8192), FUA)
    b.mark("x" * (4096 - 33))
    b.discard(3, 1)
    b.write(7, pattern(2, 4096))
    with WriteLog.open(b.save(tmp_path / "log")) as log:
        assert log.sector_size == 4096 and len(log) == 4
        assert log[0].offset == 3 * 4096 and log[0].size == 8192
        assert log[1].label == "x" * (4096 - 33)
        assert log[3].offset == 7 * 4096
        assert log.device_size == 8 * 4096                # no size mark: the highest byte touched
        target = target_file(tmp_path / "t", log.device_size)
        log.replay(target)
        assert read(target) == bytes(b.device())[:log.device_size]


@pytest.mark.parametrize("ss", [512, 4096])
def test_mark_at_the_size_limit_is_read_and_one_more_byte_refused(tmp_path, ss):
    limit = ss - 33
    longest = "m" * limit
    assert check_mark_label(longest, ss, "mark", "rec") == longest
    with pytest.raises(InvalidArgumentError) as info:
        check_mark_label(longest + "m", ss, "mark", "rec")
    assert str(limit) in str(info.value) and "rec" in str(info.value)
    b = LogBuilder(ss)
    b.mark(longest)
    b.write(0, bytes(ss))
    with WriteLog.open(b.save(tmp_path / "log")) as log:
        assert log[0].label == longest and log.marks == {longest: [0]}


@pytest.mark.parametrize("label", ["", "two words", "tab\there", "new\nline", "back\\slash", "nul\0",
                                   "bell\x07", "del\x7f", "café", "dm-log-writes-end", 7, None, b"x"])
def test_check_mark_label_refuses(label):
    with pytest.raises(InvalidArgumentError):
        check_mark_label(label, 512, "mark", "rec")


@pytest.mark.parametrize("ss", [0, 256, 1000, 131072, True, "512"])
def test_check_mark_label_refuses_bad_sector_sizes(ss):
    with pytest.raises(InvalidArgumentError):
        check_mark_label("ok", ss, "mark", "rec")


def test_check_mark_label_accepts_printable_words():
    for label in ["mkfs", "after-fsync", "a.b_c:d=1", "dmflakey-size:1048576", "x" * 479]:
        assert check_mark_label(label, 512, "mark", "rec") == label


def test_repeated_labels_keep_every_index_and_until_means_the_last(tmp_path):
    b = LogBuilder(device_size=16 * 512)
    b.write(0, pattern(1, 512))
    b.mark("sync")
    b.write(0, pattern(2, 512))
    b.mark("sync")
    b.write(0, pattern(3, 512))
    with WriteLog.open(b.save(tmp_path / "log")) as log:
        assert log.marks == {"sync": [1, 3]}
        assert log.index_of("sync") == 3
        target = target_file(tmp_path / "t", log.device_size)
        log.replay(target, until="sync")
        assert read(target)[:512] == pattern(2, 512)


def test_index_of(tmp_path):
    with WriteLog.open(sample_log().save(tmp_path / "log")) as log:
        assert log.index_of(0) == 0 and log.index_of(-1) == 8 and log.index_of("one") == 4
        for bad in [9, -10, "three", True, 1.0, None]:
            with pytest.raises(InvalidArgumentError):
                log.index_of(bad)  # type: ignore[arg-type]


def test_device_size_from_the_size_mark_or_the_highest_byte(tmp_path):
    b = LogBuilder(device_size=MiB)
    b.mark(f"{SIZE_MARK_PREFIX}{MiB}")
    b.write(2, pattern(1, 1024))
    with WriteLog.open(b.save(tmp_path / "a")) as log:
        assert log.device_size == MiB
    c = LogBuilder()
    c.write(2, pattern(1, 1024))
    c.discard(100, 8)
    with WriteLog.open(c.save(tmp_path / "b")) as log:
        assert log.device_size == 108 * 512
    d = LogBuilder()
    d.mark(f"{SIZE_MARK_PREFIX}12x")
    err = format_error(d.save(tmp_path / "c"))
    assert err.offset == 512


# --------------------------------------------------------------------------- replaying

def test_full_replay_equals_the_device_and_reports_what_it_did(tmp_path):
    b = sample_log()
    with WriteLog.open(b.save(tmp_path / "log")) as log:
        target = target_file(tmp_path / "t", log.device_size)
        result = log.replay(target)
        assert isinstance(result, ReplayResult)
        assert result == (9, (4 + 2 + 3 + 1) * 512, 2 * 512)
        assert read(target) == bytes(b.device()[:log.device_size])


def test_replay_to_a_label_and_to_an_index_and_from_a_start(tmp_path):
    b = sample_log()
    with WriteLog.open(b.save(tmp_path / "log")) as log:
        for until in range(len(log)):
            target = target_file(tmp_path / f"t{until}", log.device_size)
            log.replay(target, until=until)
            assert read(target) == bytes(b.device(until)[:log.device_size]), until
        by_label = target_file(tmp_path / "label", log.device_size)
        log.replay(by_label, until="one")
        assert read(by_label) == read(tmp_path / "t4")
        base = pattern(7, log.device_size)
        partial = target_file(tmp_path / "partial", log.device_size, fill=base)
        assert log.replay(partial, start=5, until=7).entries == 3
        assert read(partial) == bytes(b.device(7, start=5, base=base))
        with pytest.raises(InvalidArgumentError):
            log.replay(partial, start=8, until=6)


def test_coalescing_keeps_log_order_later_overlapping_writes_win(tmp_path):
    rng = random.Random(42)
    b = LogBuilder(device_size=256 * 512)
    last_end = 0
    for n in range(1500):
        roll = rng.random()
        if roll < 0.5:
            start = last_end if last_end < 250 else 0           # after the last write: coalesced
        else:
            start = rng.randrange(0, 250)                       # anywhere: overlaps earlier ones
        nr = rng.randint(1, min(6, 256 - start))
        if roll > 0.96:
            b.discard(start, nr)
        elif roll > 0.92:
            b.flush(rng.choice([FLUSH, FUA]))
        elif roll > 0.91:
            b.mark(f"m{n}")
        else:
            b.write(start, pattern(n, nr * 512))
            last_end = start + nr
    with WriteLog.open(b.save(tmp_path / "log")) as log:
        for until in [len(log) - 1, len(log) // 2, 17]:
            target = target_file(tmp_path / f"t{until}", 256 * 512, fill=b"\xff" * (256 * 512))
            log.replay(target, until=until)
            assert read(target) == bytes(b.device(until, base=b"\xff" * (256 * 512))), until


def test_replay_in_small_populate_windows_gives_the_same_image(tmp_path, monkeypatch):
    """Forward replay maps the log window by window; windows of a few entries must not matter."""
    from dmflakey_ioctl import writelog
    rng = random.Random(3)
    b = LogBuilder(device_size=128 * 512)
    for n in range(300):
        start = rng.randrange(0, 120)
        b.write(start, pattern(n, rng.randint(1, 8) * 512))
        if n % 50 == 0:
            b.discard(rng.randrange(0, 100), 20)
    monkeypatch.setattr(writelog, "POPULATE_WINDOW", 3000)
    with WriteLog.open(b.save(tmp_path / "log")) as log:
        target = target_file(tmp_path / "t", log.device_size)
        with log.replayer(target) as rep:
            assert rep.advance(150).entries == 151
            assert rep.advance().entries == len(log) - 151
            rep.flush()
        assert read(target) == bytes(b.device()[:log.device_size])


def test_a_discard_or_mark_between_target_adjacent_writes(tmp_path):
    b = LogBuilder(device_size=32 * 512)
    b.write(0, pattern(1, 1024))
    b.discard(20, 4)
    b.write(2, pattern(2, 1024))                           # right after the first write
    b.mark("between")
    b.write(4, pattern(3, 512))
    b.discard(5, 1)
    b.write(5, pattern(4, 512))                            # over the range just discarded
    with WriteLog.open(b.save(tmp_path / "log")) as log:
        target = target_file(tmp_path / "t", 32 * 512, fill=b"\x11" * (32 * 512))
        assert log.replay(target) == (7, 3072, 2560)
        assert read(target) == bytes(b.device(base=b"\x11" * (32 * 512)))


def test_replayer_advances_stepwise_and_applies_chosen_entries(tmp_path):
    b = sample_log()
    with WriteLog.open(b.save(tmp_path / "log")) as log:
        target = target_file(tmp_path / "t", log.device_size)
        with log.replayer(target) as rep:
            assert rep.position == 0
            assert rep.advance("one").entries == 5 and rep.position == 5
            rep.flush()
            assert read(target) == bytes(b.device(4)[:log.device_size])
            rep.advance(6)
            rep.advance(6)                                 # nothing left to apply up to 6
            with pytest.raises(InvalidArgumentError):
                rep.advance(3)                             # cannot go back
            rep.advance()
            rep.flush()
            assert rep.position == 9 and rep.totals.entries == 9
        assert read(target) == bytes(b.device()[:log.device_size])
        other = target_file(tmp_path / "o", log.device_size)
        with log.replayer(other) as rep:
            assert rep.apply_only([5, 2]).entries == 2 and rep.position == 0
            rep.flush()
        expect = bytearray(log.device_size)
        expect[10 * 512:13 * 512] = pattern(3, 1536)
        expect[4 * 512:6 * 512] = pattern(2, 1024)
        assert read(other) == bytes(expect)


def seek_holes(path, start: int, end: int) -> bool:
    """True when [start, end) is one hole (SEEK_DATA finds no data before end)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            data = os.lseek(fd, start, os.SEEK_DATA)
        except OSError as exc:
            assert exc.errno == errno.ENXIO                # no data at all after start
            return True
        return data >= end
    finally:
        os.close(fd)


def test_discards_become_holes_reading_zeros(tmp_path):
    b = LogBuilder(device_size=64 * 1024)
    b.write(0, pattern(1, 64 * 1024))
    b.discard(32, 64)                                      # bytes 16 KiB .. 48 KiB
    with WriteLog.open(b.save(tmp_path / "log")) as log:
        target = target_file(tmp_path / "t", log.device_size)
        assert log.replay(target).bytes_zeroed == 32 * 1024
        data = read(target)
        assert data == bytes(b.device()) and data[16384:49152] == bytes(32768)
        assert seek_holes(target, 16384, 49152)
        kept = target_file(tmp_path / "k", log.device_size)
        assert log.replay(kept, discard="ignore").bytes_zeroed == 0
        assert read(kept) == pattern(1, 64 * 1024)
        with pytest.raises(InvalidArgumentError):
            log.replay(kept, discard="skip")


def test_a_discard_larger_than_128_mib_is_zeroed_on_a_sparse_target(tmp_path):
    size = 300 * MiB
    b = LogBuilder(device_size=size)
    b.mark(f"{SIZE_MARK_PREFIX}{size}")
    b.write(0, pattern(1, 4096))
    b.discard(8, (260 * MiB) // 512)                       # 4 KiB .. 260 MiB + 4 KiB
    with WriteLog.open(b.save(tmp_path / "log")) as log:
        target = target_file(tmp_path / "t", size)
        with open(target, "r+b") as fh:                    # data the discard must remove
            for pos in (4096, 128 * MiB, 260 * MiB):
                fh.seek(pos)
                fh.write(b"\xaa" * 4096)
            fh.seek(260 * MiB + 4096)
            fh.write(b"\xbb" * 4096)                       # just after it: must stay
        assert log.replay(target).bytes_zeroed == 260 * MiB
        with open(target, "rb") as fh:
            for pos in (4096, 128 * MiB, 260 * MiB):
                fh.seek(pos)
                assert fh.read(4096) == bytes(4096), pos
            fh.seek(260 * MiB + 4096)
            assert fh.read(4096) == b"\xbb" * 4096
            fh.seek(0)
            assert fh.read(4096) == pattern(1, 4096)
        assert seek_holes(target, 8192, 260 * MiB)
        assert os.stat(target).st_blocks * 512 < 4 * MiB  # still sparse


def test_target_too_small_missing_or_not_a_file_is_refused_before_any_write(tmp_path):
    b = sample_log()
    with WriteLog.open(b.save(tmp_path / "log")) as log:
        small = target_file(tmp_path / "small", log.device_size - 512, fill=b"\x55" * (log.device_size - 512))
        before = os.stat(small)
        with pytest.raises(InvalidArgumentError) as info:
            log.replay(small)
        assert str(log.device_size) in str(info.value)
        assert read(small) == b"\x55" * (log.device_size - 512)
        assert os.stat(small).st_mtime_ns == before.st_mtime_ns
        with pytest.raises(DMFlakeyError) as info:
            log.replay(tmp_path / "missing")
        assert info.value.errno == errno.ENOENT and not (tmp_path / "missing").exists()
        with pytest.raises(DMFlakeyError):
            log.replay(tmp_path)


def test_a_log_without_entries(tmp_path):
    with WriteLog.open(LogBuilder().save(tmp_path / "log")) as log:
        assert len(log) == 0 and list(log) == [] and log.device_size == 0 and log.marks == {}
        assert log.flush_points() == [] and log.mark_points() == []
        target = target_file(tmp_path / "t", 4096, fill=b"\x01" * 4096)
        assert log.replay(target) == (0, 0, 0)
        assert read(target) == b"\x01" * 4096
        with pytest.raises(InvalidArgumentError):
            log.index_of(0)


def test_materialize(tmp_path):
    b = sample_log()
    with WriteLog.open(b.save(tmp_path / "log")) as log:
        image = tmp_path / "state.img"
        log.materialize("one", image)
        assert os.path.getsize(image) == log.device_size
        assert read(image) == bytes(b.device(4)[:log.device_size])
        with pytest.raises(DeviceExistsError):
            log.materialize(2, image)
        assert read(image) == bytes(b.device(4)[:log.device_size])
        with pytest.raises(InvalidArgumentError):
            log.materialize("nope", tmp_path / "never.img")
        assert not (tmp_path / "never.img").exists()


# --------------------------------------------------------------------------- ownership

def test_open_never_deletes_an_owned_log_is_deleted_unless_kept(tmp_path):
    path = sample_log().save(tmp_path / "log")
    WriteLog.open(path).close()
    assert os.path.exists(path)
    st = os.stat(path)
    log = WriteLog.open(path, owned_identity=(st.st_dev, st.st_ino))
    log.close(keep=True)
    assert os.path.exists(path)
    with WriteLog.open(path, owned_identity=(st.st_dev, st.st_ino)):
        pass
    assert not os.path.exists(path)


def test_an_owned_log_replaced_at_its_path_is_not_deleted(tmp_path):
    path = sample_log().save(tmp_path / "log")
    st = os.stat(path)
    log = WriteLog.open(path, owned_identity=(st.st_dev, st.st_ino))
    os.rename(path, tmp_path / "moved")
    sample_log().save(path)                                # someone else's file now
    log.close()
    log.close()                                            # idempotent
    assert os.path.exists(path) and os.path.exists(tmp_path / "moved")
    with pytest.raises(InvalidArgumentError):
        log.replay(target_file(tmp_path / "t", 64 * 512))
