"""The ``snapshot`` target: a copy-on-write view of an origin device.

Writes to the snapshot go to the COW device; the origin is never changed
through it.  The crash explorer mounts each crash state through such a view,
so journal recovery and the check cannot touch the replay device.  A
transient ("N") snapshot keeps its exception table in memory and ignores
whatever an earlier snapshot left on the COW device, so one COW device serves
state after state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .checks import check_device, check_uint, parse_uint, refuse

__all__ = ["SnapshotTable"]

_BUILD = "build snapshot table"
_PARSE = "parse snapshot table"


@dataclass(frozen=True)
class SnapshotTable:
    """``<origin> <cow device> <P|N> <chunk size in sectors>``."""

    target_type: ClassVar[str] = "snapshot"

    origin: str
    cow_device: str
    persistent: bool = False
    chunk_sectors: int = 8

    def __post_init__(self) -> None:
        check_device(_BUILD, self.origin)
        check_device(_BUILD, self.cow_device)
        chunk = check_uint(_BUILD, "chunk_sectors", self.chunk_sectors, 1, 2**21)
        if chunk & (chunk - 1):
            raise refuse(_BUILD, f"chunk_sectors must be a power of two, got {chunk}")

    def params(self) -> str:
        return f"{self.origin} {self.cow_device} {'P' if self.persistent else 'N'} {self.chunk_sectors}"

    @classmethod
    def parse(cls, params: str) -> "SnapshotTable":
        words = params.split()
        if len(words) != 4 or words[2].upper() not in ("P", "N", "PO"):
            raise refuse(_PARSE, f"expected <origin> <cow> <P|N> <chunk>, got {params!r}")
        return cls(words[0], words[1], words[2].upper() != "N",
                   parse_uint(_PARSE, params, "chunk size", words[3]))
