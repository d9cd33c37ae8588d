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
    NotRootError,
    PermissionDeniedError,
    ProgramFailedError,
    ProgramNotFoundError,
    TableRejectedError,
    UnsupportedFeatureError,
)

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ below imports on first use
    from .cleanup import OwnedDevice, cleanup_stale, list_owned
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
    from .tables.delay import DelayTable
    from .tables.flakey import CorruptBIOByte, Direction, FlakeyTable
    from .tables.linear import LinearTable
    from .tables.segments import DeviceTable, Segment

__version__ = "0.2.0"

# Public names are imported on first use (PEP 562): `import dmflakey_ioctl` loads only the
# exceptions, so the pytest plugin (loaded in every pytest session) and the CLI start fast.
_LAZY = {
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
_SUBMODULES = ("cleanup", "errors", "features", "flakey", "fs", "images", "kernel", "ownership",
               "tables")

__all__ = sorted([
    "DMFlakeyError", "DeviceBusyError", "DeviceExistsError", "DeviceNotFoundError",
    "InvalidArgumentError", "InvalidNameError", "InvalidTableError", "KernelSupportError",
    "LeftAloneWarning", "NotRootError", "PermissionDeniedError", "ProgramFailedError",
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
