"""dmflakey-ioctl: a file-backed block device that drops, fails, delays or corrupts I/O on command.

Pure Python over the kernel's device-mapper and loop ioctls: no dmsetup,
losetup, udev or lvm2 needed.  Start with :func:`init_flakey`.
"""

from typing import TYPE_CHECKING

from .errors import (
    DeviceBusyError,
    DeviceExistsError,
    DeviceNotFoundError,
    DMFlakeyError,
    InvalidArgumentError,
    InvalidNameError,
    InvalidTableError,
    KernelSupportError,
    LeftAloneWarning,
    LogFormatError,
    LogFullError,
    NotRootError,
    PermissionDeniedError,
    ProgramFailedError,
    ProgramNotFoundError,
    TableRejectedError,
    UnsupportedFeatureError,
)

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ below imports on first use
    from .cleanup import OwnedDevice, cleanup_stale, list_owned
    from .crashreport import CrashReport, CrashState
    from .explorer import explore
    from .flakey import (
        DEFAULT_IMAGE_SIZE,
        DEFAULT_INTERVAL,
        Flakey,
        attach_flakey,
        check_device_mapper,
        init_flakey,
        init_flakey_image,
        list_flakey,
        open_flakey,
    )
    from .fs import FSType, mount, syncfs, umount
    from .kernel.fiemap import file_extents
    from .recording import Recording, open_recording, record_writes, record_writes_to
    from .tables.delay import DelayTable
    from .tables.flakey import CorruptBIOByte, Direction, FlakeyTable
    from .tables.linear import LinearTable
    from .tables.segments import DeviceTable, Segment
    from .writelog import LogEntry, LogFlags, WriteLog

__version__ = "0.2.0"

# Public names are imported on first use (PEP 562): `import dmflakey_ioctl` loads only the
# exceptions, so the pytest plugin (loaded in every pytest session) and the CLI start fast.
_LAZY = {
    "CrashReport": "crashreport",
    "CrashState": "crashreport",
    "explore": "explorer",
    "Recording": "recording",
    "open_recording": "recording",
    "record_writes": "recording",
    "record_writes_to": "recording",
    "LogEntry": "writelog",
    "LogFlags": "writelog",
    "WriteLog": "writelog",
    "OwnedDevice": "cleanup",
    "cleanup_stale": "cleanup",
    "list_owned": "cleanup",
    "DEFAULT_IMAGE_SIZE": "flakey",
    "DEFAULT_INTERVAL": "flakey",
    "Flakey": "flakey",
    "attach_flakey": "flakey",
    "check_device_mapper": "flakey",
    "init_flakey": "flakey",
    "init_flakey_image": "flakey",
    "list_flakey": "flakey",
    "open_flakey": "flakey",
    "FSType": "fs",
    "mount": "fs",
    "syncfs": "fs",
    "umount": "fs",
    "file_extents": "kernel.fiemap",
    "DelayTable": "tables.delay",
    "CorruptBIOByte": "tables.flakey",
    "Direction": "tables.flakey",
    "FlakeyTable": "tables.flakey",
    "LinearTable": "tables.linear",
    "DeviceTable": "tables.segments",
    "Segment": "tables.segments",
}
_SUBMODULES = ("cleanup", "crashreport", "errors", "explorer", "features", "flakey", "fs",
               "images", "kernel", "ownership", "recording", "tables", "writelog")

__all__ = sorted([
    "DMFlakeyError", "DeviceBusyError", "DeviceExistsError", "DeviceNotFoundError",
    "InvalidArgumentError", "InvalidNameError", "InvalidTableError", "KernelSupportError",
    "LeftAloneWarning", "LogFormatError", "LogFullError", "NotRootError", "PermissionDeniedError", "ProgramFailedError",
    "ProgramNotFoundError", "TableRejectedError",
    "UnsupportedFeatureError", *_LAZY,
])


def __getattr__(name: str) -> object:
    from importlib import import_module
    if name in _SUBMODULES:
        return import_module(f"{__name__}.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
