"""dmflakey-ioctl: a file-backed block device that drops, fails or corrupts I/O on command.

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
    NotRootError,
    ProgramFailedError,
    ProgramNotFoundError,
    TableRejectedError,
    UnsupportedFeatureError,
)
if TYPE_CHECKING:  # for type checkers; at run time __getattr__ below imports on first use
    from .flakey import (
        DEFAULT_IMAGE_SIZE,
        DEFAULT_INTERVAL,
        Flakey,
        attach_flakey,
        check_device_mapper,
        cleanup_stale,
        init_flakey,
        init_flakey_image,
        list_flakey,
        open_flakey,
    )
    from .fs import FSType, mount, syncfs, umount
    from .tables.flakey import CorruptBIOByte, Direction, FlakeyTable

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_INTERVAL",
    "CorruptBIOByte",
    "DMFlakeyError",
    "DeviceBusyError",
    "DeviceExistsError",
    "DeviceNotFoundError",
    "Direction",
    "FSType",
    "Flakey",
    "FlakeyTable",
    "InvalidArgumentError",
    "InvalidNameError",
    "InvalidTableError",
    "KernelSupportError",
    "NotRootError",
    "ProgramFailedError",
    "ProgramNotFoundError",
    "TableRejectedError",
    "UnsupportedFeatureError",
    "attach_flakey",
    "check_device_mapper",
    "cleanup_stale",
    "init_flakey",
    "init_flakey_image",
    "list_flakey",
    "mount",
    "open_flakey",
    "syncfs",
    "umount",
]

# Public names are imported on first use (PEP 562): `import dmflakey_ioctl` loads only the
# exceptions, so the pytest plugin (loaded in every pytest session) and the CLI start fast.
_LAZY = {
    "DEFAULT_IMAGE_SIZE": "flakey",
    "DEFAULT_INTERVAL": "flakey",
    "Flakey": "flakey",
    "attach_flakey": "flakey",
    "check_device_mapper": "flakey",
    "cleanup_stale": "flakey",
    "init_flakey": "flakey",
    "init_flakey_image": "flakey",
    "list_flakey": "flakey",
    "open_flakey": "flakey",
    "FSType": "fs",
    "mount": "fs",
    "syncfs": "fs",
    "umount": "fs",
    "CorruptBIOByte": "tables.flakey",
    "Direction": "tables.flakey",
    "FlakeyTable": "tables.flakey",
}
_SUBMODULES = ("errors", "features", "flakey", "fs", "kernel", "tables")


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
