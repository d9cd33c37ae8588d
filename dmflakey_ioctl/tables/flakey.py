"""Build, check and parse dm-flakey parameter strings.

The kernel accepts several tables that do something other than what their
author meant: a probability of 0 silently turns corruption into "fail all
I/O", a missing feature count failed nothing on some kernels, and extra words
after the feature list are ignored.  Building the string here refuses such
mistakes before any ioctl, always writes an explicit feature count, and parses
the kernel's read-back (both the 6.1 and the 6.5+ format) so a loaded table
can be checked against the intended one.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from ..errors import InvalidTableError
from .checks import DIGITS, U32_MAX, U64_MAX, check_device, check_int, check_uint, refuse

__all__ = ["Direction", "CorruptBIOByte", "FlakeyTable", "PROBABILITY_MAX"]

PROBABILITY_MAX = 1_000_000_000
"""Denominator of the random_*_corrupt probabilities (the kernel's PROBABILITY_BASE)."""

_ARITY = {
    "error_reads": 0,
    "drop_writes": 0,
    "error_writes": 0,
    "corrupt_bio_byte": 4,
    "random_read_corrupt": 1,
    "random_write_corrupt": 1,
}
_BUILD = "build flakey table"
_PARSE = "parse flakey table"


def _refuse(cause: str) -> InvalidTableError:
    return refuse(_BUILD, cause)


def _int(name: str, value: Any) -> int:
    return check_int(_BUILD, name, value)


def _uint(name: str, value: Any, low: int, high: int) -> int:
    return check_uint(_BUILD, name, value, low, high)


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _refuse(f"{name} must be a bool, got {type(value).__name__} {value!r}")


class Direction(str, enum.Enum):
    """Which bios corrupt_bio_byte changes."""

    READ = "r"
    WRITE = "w"


@dataclass(frozen=True)
class CorruptBIOByte:
    """The corrupt_bio_byte feature: set byte ``nth_byte`` (1-based) of matching bios to ``value``.

    Only bios whose flags contain every bit of ``flags`` match (0 matches all).
    """

    nth_byte: int
    direction: Direction
    value: int
    flags: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "nth_byte", _uint("corrupt_bio_byte nth_byte", self.nth_byte, 1, U32_MAX))
        direction = self.direction
        if not isinstance(direction, str) or direction.lower() not in ("r", "w"):
            raise _refuse(f"corrupt_bio_byte direction must be 'r' or 'w', got {direction!r}")
        object.__setattr__(self, "direction", Direction(direction.lower()))
        object.__setattr__(self, "value", _uint("corrupt_bio_byte value", self.value, 0, 255))
        object.__setattr__(self, "flags", _uint("corrupt_bio_byte flags", self.flags, 0, U32_MAX))

    def words(self) -> list[str]:
        """The five feature words, keyword included."""
        return ["corrupt_bio_byte", str(self.nth_byte), self.direction.value, str(self.value), str(self.flags)]


@dataclass(frozen=True)
class FlakeyTable:
    """The parameters of one flakey target: what follows ``<start> <len> flakey``."""

    target_type: ClassVar[str] = "flakey"

    device: str
    up_interval: int
    down_interval: int
    offset: int = 0
    drop_writes: bool = False
    error_writes: bool = False
    error_reads: bool = False
    corrupt_bio_byte: Optional[CorruptBIOByte] = None
    random_read_corrupt: Optional[int] = None
    random_write_corrupt: Optional[int] = None

    def __post_init__(self) -> None:
        check_device(_BUILD, self.device)
        for name, high in (("up_interval", U32_MAX), ("down_interval", U32_MAX), ("offset", U64_MAX)):
            object.__setattr__(self, name, _uint(name, getattr(self, name), 0, high))
        total = self.up_interval + self.down_interval
        if total == 0:
            raise _refuse("up_interval + down_interval is 0; the kernel needs a period of at least 1 second")
        if total > U32_MAX:
            raise _refuse(f"up_interval + down_interval = {total} overflows 32 bits (max {U32_MAX})")
        for name in ("drop_writes", "error_writes", "error_reads"):
            _check_flag(name, getattr(self, name))
        if self.corrupt_bio_byte is not None and not isinstance(self.corrupt_bio_byte, CorruptBIOByte):
            raise _refuse(f"corrupt_bio_byte must be a CorruptBIOByte or None, got {self.corrupt_bio_byte!r}")
        for name in ("random_read_corrupt", "random_write_corrupt"):
            probability = getattr(self, name)
            if probability is None:
                continue
            if _int(name, probability) == 0:
                raise _refuse(
                    f"{name} 0 is refused: the kernel then treats the table as having no features and fails"
                    f" ALL reads and writes during the down interval; leave {name} out (None) instead")
            object.__setattr__(self, name, _uint(name, probability, 1, PROBABILITY_MAX))
        self._check_conflicts()

    def _check_conflicts(self) -> None:
        """Refuse feature combinations the kernel rejects, or that newer kernels reject and older ones ignore."""
        corrupt = self.corrupt_bio_byte
        if self.drop_writes and self.error_writes:
            raise _refuse("drop_writes and error_writes conflict: a write is either dropped or failed")
        writes = "drop_writes" if self.drop_writes else "error_writes" if self.error_writes else None
        if writes and corrupt is not None and corrupt.direction is Direction.WRITE:
            raise _refuse(f"{writes} conflicts with corrupt_bio_byte in the write direction")
        later = "newer kernels refuse it and older ones never corrupt"
        if writes and self.random_write_corrupt is not None:
            raise _refuse(f"{writes} conflicts with random_write_corrupt ({later})")
        if self.error_reads and corrupt is not None and corrupt.direction is Direction.READ:
            raise _refuse(f"error_reads conflicts with corrupt_bio_byte in the read direction ({later})")
        if self.error_reads and self.random_read_corrupt is not None:
            raise _refuse(f"error_reads conflicts with random_read_corrupt ({later})")

    def feature_words(self) -> list[str]:
        """The feature words in the order the kernel prints them."""
        words: list[str] = []
        if self.error_reads:
            words.append("error_reads")
        if self.drop_writes:
            words.append("drop_writes")
        elif self.error_writes:
            words.append("error_writes")
        if self.corrupt_bio_byte is not None:
            words += self.corrupt_bio_byte.words()
        if self.random_read_corrupt is not None:
            words += ["random_read_corrupt", str(self.random_read_corrupt)]
        if self.random_write_corrupt is not None:
            words += ["random_write_corrupt", str(self.random_write_corrupt)]
        return words

    def params(self) -> str:
        """The parameter string, always with an explicit count of feature words."""
        words = self.feature_words()
        head = f"{self.device} {self.offset} {self.up_interval} {self.down_interval} {len(words)}"
        return " ".join([head, *words])

    def line(self, start: int, length: int) -> str:
        """A whole table line: ``<start> <length> flakey <params>`` (sectors)."""
        start = _uint("start", start, 0, U64_MAX)
        length = _uint("length", length, 1, U64_MAX - start)
        return f"{start} {length} flakey {self.params()}"

    def passes_through(self) -> bool:
        """True when the target never faults (no down interval)."""
        return self.down_interval == 0

    def fails_all_io(self) -> bool:
        """True when every read and write fails during the down interval.

        That is a table without feature words (the kernel then sets error_reads
        and error_writes itself) or one with exactly those two features.
        """
        return self._canonical().feature_words() == ["error_reads", "error_writes"]

    def equivalent(self, other: FlakeyTable) -> bool:
        """Equal, counting "no features" and "error_reads error_writes" as the same table.

        Device strings are compared literally: normalise them first.
        """
        return isinstance(other, FlakeyTable) and self._canonical() == other._canonical()

    def _canonical(self) -> FlakeyTable:
        """The table as a 6.5+ kernel reads it back: no features become error_reads + error_writes."""
        if self.feature_words():
            return self
        return dataclasses.replace(self, error_reads=True, error_writes=True)

    @classmethod
    def parse(cls, params: str) -> FlakeyTable:
        """Parse a parameter string: params() output or the kernel's table read-back (6.1 or 6.5+).

        Stricter than the kernel: the feature count must match the words that
        follow exactly, and duplicated or unknown features are refused.  The
        legacy form without a feature count (exactly four words) means no features.
        """
        if not isinstance(params, str):
            raise InvalidTableError(_PARSE, None, f"expected a str, got {type(params).__name__} {params!r}")

        def fail(cause: str) -> InvalidTableError:
            return InvalidTableError(_PARSE, None, f"{cause} in {params!r}")

        def number(name: str, word: str) -> int:
            if not DIGITS.fullmatch(word):
                raise fail(f"{name} must be a decimal number, got {word!r}")
            return int(word)

        words = params.split()
        if len(words) < 4:
            raise fail(f"expected <dev> <offset> <up interval> <down interval>, got {len(words)} words")
        fields: dict[str, Any] = {
            "device": words[0],
            "offset": number("offset", words[1]),
            "up_interval": number("up interval", words[2]),
            "down_interval": number("down interval", words[3]),
        }
        if len(words) > 4:
            declared = number("num_features", words[4])
            features = words[5:]
            if len(features) < declared:
                raise fail(f"num_features is {declared} but only {len(features)} feature words follow")
            if len(features) > declared:
                raise fail(f"{len(features) - declared} extra words after the {declared} feature words")
            i = 0
            while i < len(features):
                name = features[i].lower()
                arity = _ARITY.get(name)
                if arity is None:
                    raise fail(f"unknown feature {features[i]!r}")
                if name in fields:
                    raise fail(f"feature {name} duplicated")
                args = features[i + 1:i + 1 + arity]
                if len(args) < arity:
                    raise fail(f"feature {name} needs {arity} arguments, got {len(args)}")
                i += 1 + arity
                if name == "corrupt_bio_byte":
                    nth, direction, value, flags = args
                    fields[name] = (number("corrupt_bio_byte nth_byte", nth), direction,
                                    number("corrupt_bio_byte value", value), number("corrupt_bio_byte flags", flags))
                elif arity:
                    fields[name] = number(name, args[0])
                else:
                    fields[name] = True
        try:
            if "corrupt_bio_byte" in fields:
                fields["corrupt_bio_byte"] = CorruptBIOByte(*fields["corrupt_bio_byte"])
            return cls(**fields)
        except InvalidTableError as err:
            raise fail(err.cause) from None

