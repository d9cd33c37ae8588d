"""A whole device's table as contiguous segments: a fault over some sector ranges, pass-through elsewhere.

A fault scoped to ranges (a file's extents, a journal's sectors) becomes one
table: the fault's target over each range, at that range's offset on the
backing device, and a ``linear`` target over every gap.  Ranges are sorted and
overlapping or touching ones merge, so a table never has more segments than
it needs.  The same type reads such a table back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

from .checks import refuse
from .delay import DelayTable
from .flakey import FlakeyTable
from .linear import LinearTable

__all__ = ["Range", "Segment", "DeviceTable", "TargetTable", "merge_ranges", "subtract_ranges"]

Range = Tuple[int, int]
"""``(start_sector, nr_sectors)`` in 512-byte sectors."""
TargetTable = Union[FlakeyTable, LinearTable, DelayTable]

_PARSERS: dict = {t.target_type: t.parse for t in (FlakeyTable, LinearTable, DelayTable)}
_BUILD = "build scoped table"
_PARSE = "parse table"


def merge_ranges(ranges: Iterable[object], sectors: int) -> Tuple[Range, ...]:
    """Ranges checked against a device of ``sectors`` sectors, sorted, overlaps and neighbours merged.

    A range that is not two non-negative ints, is empty, or reaches past the
    device is refused (InvalidTableError) before anything is built.
    """
    checked = []
    for item in ranges:
        if not (isinstance(item, (tuple, list)) and len(item) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
            raise refuse(_BUILD, f"a range is (start_sector, nr_sectors), got {item!r}")
        start, count = item
        if start < 0 or count <= 0:
            raise refuse(_BUILD, f"range {tuple(item)} must start at 0 or later and hold at least "
                         "one sector")
        if start + count > sectors:
            raise refuse(_BUILD, f"range {tuple(item)} reaches sector {start + count}, past the end "
                         f"of the device ({sectors} sectors)")
        checked.append((start, count))
    merged: list = []
    for start, count in sorted(checked):
        if merged and start <= merged[-1][0] + merged[-1][1]:
            end = max(merged[-1][0] + merged[-1][1], start + count)
            merged[-1] = (merged[-1][0], end - merged[-1][0])
        else:
            merged.append((start, count))
    return tuple(merged)


def subtract_ranges(ranges: Sequence[Range], removed: Sequence[Range]) -> Tuple[Range, ...]:
    """The sectors of merged ``ranges`` that are in no range of merged ``removed``."""
    out = []
    for start, count in ranges:
        end = start + count
        for cut_start, cut_count in removed:
            cut_end = cut_start + cut_count
            if cut_end <= start or cut_start >= end:
                continue
            if cut_start > start:
                out.append((start, cut_start - start))
            start = max(start, cut_end)
            if start >= end:
                break
        if start < end:
            out.append((start, end - start))
    return tuple(out)


@dataclass(frozen=True)
class Segment:
    """Sectors ``start .. start+length`` of the device, mapped by ``table``."""

    start: int
    length: int
    table: TargetTable

    def target(self) -> Tuple[int, int, str, str]:
        """``(start, length, type, params)``, the form a table load takes."""
        return (self.start, self.length, self.table.target_type, self.table.params())

    @property
    def range(self) -> Range:
        return (self.start, self.length)


@dataclass(frozen=True)
class DeviceTable:
    """Every segment of a device's table, in order, covering sector 0 to the end."""

    segments: Tuple[Segment, ...]

    @classmethod
    def whole(cls, sectors: int, table: TargetTable) -> "DeviceTable":
        """One target over the whole device."""
        return cls((Segment(0, sectors, table),))

    @classmethod
    def scoped(cls, sectors: int, ranges: Sequence[Range], fault: TargetTable,
               passthrough: Callable[[int], TargetTable]) -> "DeviceTable":
        """fault over merged ``ranges``, passthrough(offset) over the gaps.

        Each segment maps its own sectors of the backing device: its table's
        offset is the segment's start.
        """
        if not ranges:
            raise refuse(_BUILD, "the scope holds no sectors: nothing would be faulted")
        segments, position = [], 0
        for start, count in ranges:
            if start > position:
                segments.append(Segment(position, start - position, passthrough(position)))
            segments.append(Segment(start, count, dataclasses.replace(fault, offset=start)))
            position = start + count
        if position < sectors:
            segments.append(Segment(position, sectors - position, passthrough(position)))
        return cls(tuple(segments))

    def targets(self) -> list:
        """The ``(start, length, type, params)`` of every segment, for a table load."""
        return [segment.target() for segment in self.segments]

    @property
    def sectors(self) -> int:
        last = self.segments[-1]
        return last.start + last.length

    @property
    def scope(self) -> Optional[Tuple[Range, ...]]:
        """The ranges a scoped fault covers, or None when one target covers the whole device."""
        if len(self.segments) == 1:
            return None
        return tuple(s.range for s in self.segments if not isinstance(s.table, LinearTable))

    @property
    def fault(self) -> TargetTable:
        """The table of the faulted segments (the only segment's, when not scoped)."""
        for segment in self.segments:
            if not isinstance(segment.table, LinearTable):
                return segment.table
        return self.segments[0].table

    @property
    def device(self) -> str:
        """The backing device every segment maps."""
        return self.segments[0].table.device

    @classmethod
    def parse(cls, targets: Sequence[Tuple[int, int, str, str]]) -> "DeviceTable":
        """A table as the kernel reads it back: ``(start, length, type, params)`` per target.

        Refused: an empty table, a gap, a target type other than flakey,
        linear or delay, or segments that map different backing devices.
        """
        if not targets:
            raise refuse(_PARSE, "the device has no table")
        segments, position = [], 0
        for start, length, kind, params in targets:
            if start != position:
                raise refuse(_PARSE, f"a segment starts at {start}, expected {position}")
            parser = _PARSERS.get(kind)
            if parser is None:
                raise refuse(_PARSE, f"a {kind} target is not one this library makes")
            segments.append(Segment(start, length, parser(params)))
            position = start + length
        devices = {s.table.device for s in segments}
        if len(devices) != 1:
            raise refuse(_PARSE, f"segments map different devices: {sorted(devices)}")
        return cls(tuple(segments))
