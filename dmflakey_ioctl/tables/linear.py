"""The ``linear`` target: sectors passed straight through to a device at an offset.

Scoped faults use it for the ranges outside the scope: a pass-through that
needs no feature words and reads back exactly as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .checks import U64_MAX, check_device, check_uint, parse_uint, refuse

__all__ = ["LinearTable"]

_BUILD = "build linear table"
_PARSE = "parse linear table"


@dataclass(frozen=True)
class LinearTable:
    """``<device> <offset>``: the target's sector 0 is the device's sector ``offset``."""

    target_type: ClassVar[str] = "linear"

    device: str
    offset: int = 0

    def __post_init__(self) -> None:
        check_device(_BUILD, self.device)
        object.__setattr__(self, "offset", check_uint(_BUILD, "offset", self.offset, 0, U64_MAX))

    def params(self) -> str:
        return f"{self.device} {self.offset}"

    def passes_through(self) -> bool:
        return True

    @classmethod
    def parse(cls, params: str) -> "LinearTable":
        words = params.split()
        if len(words) != 2:
            raise refuse(_PARSE, f"expected <device> <offset>, got {params!r}")
        return cls(words[0], parse_uint(_PARSE, params, "offset", words[1]))
