"""Checks every table builder shares: numbers in range and device words the kernel can read."""

from __future__ import annotations

import re
from typing import Any

from ..errors import InvalidTableError

__all__ = ["U32_MAX", "U64_MAX", "DIGITS", "refuse", "check_int", "check_uint", "check_device",
           "parse_uint"]

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
DIGITS = re.compile(r"[0-9]+")
_MAJOR_MAX = 2**12 - 1
_MINOR_MAX = 2**20 - 1
_MAJOR_MINOR = re.compile(r"([0-9]+):([0-9]+)")


def refuse(operation: str, cause: str) -> InvalidTableError:
    return InvalidTableError(operation, None, cause)


def check_int(operation: str, name: str, value: Any) -> int:
    """``value`` as a plain int, refusing bools, floats, strings and the like."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise refuse(operation, f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_uint(operation: str, name: str, value: Any, low: int, high: int) -> int:
    """``value`` as a plain int within low..high."""
    number = check_int(operation, name, value)
    if not low <= number <= high:
        raise refuse(operation, f"{name} must be in {low}..{high}, got {number}")
    return number


def check_device(operation: str, device: Any) -> None:
    """Refuse a device word the kernel would split, unescape or fail to look up."""
    if not isinstance(device, str):
        raise refuse(operation, f"device must be a str, got {type(device).__name__} {device!r}")
    if not device:
        raise refuse(operation, "device is empty")
    if any(c.isspace() or not c.isprintable() or c == "\\" for c in device):
        raise refuse(operation, f"device {device!r} contains whitespace, a control character or a "
                     "backslash")
    numbers = _MAJOR_MINOR.fullmatch(device)
    if numbers:
        major, minor = int(numbers.group(1)), int(numbers.group(2))
        if major > _MAJOR_MAX or minor > _MINOR_MAX:
            raise refuse(operation, f"device {device!r}: major must be <= {_MAJOR_MAX} and minor "
                         f"<= {_MINOR_MAX}")
    elif not device.startswith("/"):
        raise refuse(operation, f"device {device!r} is neither major:minor nor an absolute path")


def parse_uint(operation: str, params: str, name: str, word: str) -> int:
    """A decimal word of a kernel read-back, or InvalidTableError quoting the whole line."""
    if not DIGITS.fullmatch(word):
        raise InvalidTableError(operation, None, f"{name} must be a decimal number, got {word!r} "
                                f"in {params!r}")
    return int(word)
