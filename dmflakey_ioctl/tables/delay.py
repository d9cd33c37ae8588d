"""The ``delay`` target: reads, writes and flushes held back by a number of milliseconds.

The kernel takes 3, 6 or 9 arguments: one ``<device> <offset> <delay>`` group
for everything, a second one for writes (and flushes), a third for flushes.
The builder writes the shortest form that says what was asked, so a table
that needs no separate flush class loads on every kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .checks import U32_MAX, U64_MAX, check_device, check_uint, parse_uint, refuse

__all__ = ["DelayTable"]

_BUILD = "build delay table"
_PARSE = "parse delay table"


@dataclass(frozen=True)
class DelayTable:
    """Delays in milliseconds for reads, writes and flushes of one device."""

    target_type: ClassVar[str] = "delay"

    device: str
    offset: int = 0
    read_ms: int = 0
    write_ms: int = 0
    flush_ms: int = 0

    def __post_init__(self) -> None:
        check_device(_BUILD, self.device)
        object.__setattr__(self, "offset", check_uint(_BUILD, "offset", self.offset, 0, U64_MAX))
        for name in ("read_ms", "write_ms", "flush_ms"):
            object.__setattr__(self, name, check_uint(_BUILD, name, getattr(self, name), 0,
                                                      U32_MAX))

    @property
    def needs_flush_class(self) -> bool:
        """True when flushes need their own group (the 9-argument form)."""
        return self.flush_ms != self.write_ms

    def params(self) -> str:
        group = f"{self.device} {self.offset}"
        if self.read_ms == self.write_ms == self.flush_ms:
            return f"{group} {self.read_ms}"
        words = f"{group} {self.read_ms} {group} {self.write_ms}"
        return f"{words} {group} {self.flush_ms}" if self.needs_flush_class else words

    def passes_through(self) -> bool:
        return self.read_ms == self.write_ms == self.flush_ms == 0

    @classmethod
    def parse(cls, params: str) -> "DelayTable":
        """The kernel's read-back (or params()); every group must name the same device and offset."""
        words = params.split()
        if len(words) not in (3, 6, 9):
            raise refuse(_PARSE, f"expected 3, 6 or 9 words, got {len(words)} in {params!r}")
        groups = [words[i:i + 3] for i in range(0, len(words), 3)]
        if any(g[:2] != groups[0][:2] for g in groups):
            raise refuse(_PARSE, f"the groups map different devices or offsets in {params!r}")
        delays = [parse_uint(_PARSE, params, "delay", g[2]) for g in groups]
        read = delays[0]
        write = delays[1] if len(delays) > 1 else read
        flush = delays[2] if len(delays) > 2 else write
        return cls(groups[0][0], parse_uint(_PARSE, params, "offset", groups[0][1]), read, write,
                   flush)
