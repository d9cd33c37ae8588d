"""What the command line's arguments mean: sizes, probabilities, numbers, names, sector ranges."""

from __future__ import annotations

import argparse
import re
from decimal import Decimal, InvalidOperation
from typing import Callable, NoReturn, Tuple

from ..errors import DMFlakeyError
from ..kernel import dm

__all__ = ["PROG", "UsageError", "Parser", "parse_size", "parse_probability", "integer",
           "device_name", "sector_range", "U32_MAX"]

PROG = "dmflakey"
U32_MAX = 2**32 - 1
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([kmgt]?)(ib|b)?", re.IGNORECASE)
_RANGE_RE = re.compile(r"([0-9]+)\+([0-9]+)")


class UsageError(Exception):
    """A malformed command line (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the default prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def parse_size(text: str) -> int:
    """Bytes from "512M", "10G", "64MiB", "1.5G" or plain "1048576".

    K/M/G/T and KiB/MiB/GiB/TiB count in 1024s, KB/MB/GB/TB in 1000s (as
    truncate(1) does).  The result must be a positive multiple of 512.
    """
    match = _SIZE_RE.fullmatch(text.strip())
    if not match or (match.group(3) and match.group(3).lower() == "ib" and not match.group(2)):
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use bytes or a number with K, M, G "
                                         "or T (e.g. 512M, 10G, 64MiB)")
    number, letter, suffix = match.groups()
    base = 1000 if letter and suffix and suffix.lower() == "b" else 1024
    power = "kmgt".index(letter.lower()) + 1 if letter else 0
    value = Decimal(number) * base ** power
    if value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"bad size {text!r}: not a whole number of bytes")
    size = int(value)
    if size <= 0 or size % 512:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: must be a positive multiple of 512 "
                                         f"bytes, got {size}")
    return size


def parse_probability(text: str) -> float:
    """A probability from "0.05" or "5%", from 0 to 1."""
    raw = text.strip()
    scale = Decimal(100) if raw.endswith("%") else Decimal(1)
    try:
        value = Decimal(raw.rstrip("%")) / scale
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite() or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"bad probability {text!r}: use a number from 0 to 1 "
                                         "or a percentage (0.05, 5%)")
    return float(value)


def integer(what: str, low: int, high: int, why: str = "") -> Callable[[str], int]:
    """An argparse type for an integer in low..high (0x.. hex accepted); why explains the bounds."""
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad {what} {text!r}: not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"bad {what} {text!r}: must be {low}..{high}"
                                             + (f" ({why})" if why else ""))
        return value
    return parse


def device_name(text: str) -> str:
    """A name the kernel accepts, refused here so that a bad one is a usage error."""
    try:
        dm.check_name(text)
    except DMFlakeyError as exc:
        raise argparse.ArgumentTypeError(f"bad device name {text!r}: {exc.cause}") from None
    return text


def sector_range(text: str) -> Tuple[int, int]:
    """``START+COUNT`` in 512-byte sectors, e.g. ``2048+64``."""
    match = _RANGE_RE.fullmatch(text.strip())
    if not match or int(match.group(2)) == 0:
        raise argparse.ArgumentTypeError(f"bad sector range {text!r}: use START+COUNT in 512-byte "
                                         "sectors with COUNT >= 1, e.g. 2048+64")
    return int(match.group(1)), int(match.group(2))
