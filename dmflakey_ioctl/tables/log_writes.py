"""The ``log-writes`` target: every write to a data device also appended to a log device.

Its table names the two devices; its status line says how many entries were
logged and whether logging stopped because the log device ran out of space
(after that the data device keeps working but nothing more is logged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .checks import check_device, parse_uint, refuse

__all__ = ["LogWritesTable", "LogWritesStatus"]

_BUILD = "build log-writes table"
_PARSE = "parse log-writes"


@dataclass(frozen=True)
class LogWritesTable:
    """``<data device> <log device>``: one target from sector 0 (it logs each bio's own sector)."""

    target_type: ClassVar[str] = "log-writes"

    data_device: str
    log_device: str

    def __post_init__(self) -> None:
        check_device(_BUILD, self.data_device)
        check_device(_BUILD, self.log_device)

    def params(self) -> str:
        return f"{self.data_device} {self.log_device}"

    @classmethod
    def parse(cls, params: str) -> "LogWritesTable":
        words = params.split()
        if len(words) != 2:
            raise refuse(_PARSE, f"expected <data device> <log device>, got {params!r}")
        return cls(words[0], words[1])


@dataclass(frozen=True)
class LogWritesStatus:
    """The target's status: entries logged, the next free sector of the log, whether it gave up."""

    entries: int
    next_sector: int
    logging_disabled: bool

    @classmethod
    def parse(cls, params: str) -> "LogWritesStatus":
        """``<entries> <next sector>`` and then flag words, ``logging_disabled`` among them."""
        words = params.split()
        if len(words) < 2:
            raise refuse(_PARSE, f"expected <entries> <sector> [flags], got {params!r}")
        return cls(parse_uint(_PARSE, params, "entries", words[0]),
                   parse_uint(_PARSE, params, "sector", words[1]),
                   "logging_disabled" in words[2:])
