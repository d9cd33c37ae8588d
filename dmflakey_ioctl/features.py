"""Which dm-flakey features the running kernel has, found out by trying.

The flakey target has reported version 1.5.0 since about 4.13 while features
kept arriving, so its version tells nothing.  Instead a feature is tried once
per process: a table using it is loaded on a scratch flakey device over a tiny
dm ``zero`` device, and the answer is cached.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Callable, Dict, Optional

from .kernel import dm
from .errors import DMFlakeyError, UnsupportedFeatureError
from .tables.flakey import FlakeyTable

__all__ = ["FEATURE_SINCE", "supported", "require", "reset_cache"]

# The kernel release that added each feature of the flakey target.
FEATURE_SINCE: Dict[str, str] = {
    "drop_writes": "3.1",
    "corrupt_bio_byte": "3.1",
    "error_writes": "4.10",
    "error_reads": "6.4",
    "random_read_corrupt": "6.5",
    "random_write_corrupt": "6.5",
}
# Features older than any kernel this library can meet are not probed.
_PROBED = {"error_reads", "random_read_corrupt", "random_write_corrupt"}
_PROBE_SECTORS = 8

_cache: Dict[str, bool] = {}
_lock = threading.Lock()


def _probe_table(feature: str, device: str) -> FlakeyTable:
    if feature == "error_reads":
        return FlakeyTable(device, 0, 1, error_reads=True)
    if feature == "random_read_corrupt":
        return FlakeyTable(device, 0, 1, random_read_corrupt=1)
    return FlakeyTable(device, 0, 1, random_write_corrupt=1)


def _probe(feature: str) -> bool:
    """Load a table with feature on scratch devices; True when the kernel took it."""
    suffix = f"{os.getpid()}-{threading.get_ident() % 100000}"
    base, probe = f"dmflakey-probe-zero-{suffix}", f"dmflakey-probe-{suffix}"
    ctl = dm.control()
    zero = ctl.create(base, uuid=f"DMFLAKEY-PROBE-{suffix}-z")
    try:
        ctl.load(base, [dm.Target(0, _PROBE_SECTORS, "zero", "")])
        ctl.resume(base)
        ctl.create(probe, uuid=f"DMFLAKEY-PROBE-{suffix}-f")
        try:
            table = _probe_table(feature, f"{zero.major}:{zero.minor}")
            try:
                ctl.load(probe, [dm.Target(0, _PROBE_SECTORS, "flakey", table.params())])
            except DMFlakeyError as exc:
                if exc.errno == errno.EINVAL:
                    return False
                raise
            return True
        finally:
            ctl.remove(probe)
    finally:
        ctl.remove(base)


def supported(feature: str, *, probe: Optional[Callable[[str], bool]] = None) -> bool:
    """Whether the running kernel's dm-flakey has feature (probed once per process)."""
    if feature not in FEATURE_SINCE:
        raise ValueError(f"unknown dm-flakey feature {feature!r}")
    if feature not in _PROBED:
        return True
    with _lock:
        if feature not in _cache:
            _cache[feature] = (probe or _probe)(feature)
        return _cache[feature]


def require(feature: str, device: Optional[str], *,
            probe: Optional[Callable[[str], bool]] = None) -> None:
    """Raise UnsupportedFeatureError, before any change to device, when feature is missing."""
    if supported(feature, probe=probe):
        return
    since, running = FEATURE_SINCE[feature], os.uname().release
    raise UnsupportedFeatureError(
        feature, device, f"this kernel's dm-flakey has no {feature} (added in Linux {since}; "
        f"running {running})", errno.EINVAL, feature=feature, since=since, running=running)


def reset_cache() -> None:
    """Forget what was probed (tests, or after loading a newer dm-flakey module)."""
    with _lock:
        _cache.clear()
