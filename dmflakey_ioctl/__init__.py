"""dmflakey-ioctl: a file-backed block device that drops, fails or corrupts I/O on command.

Pure Python over the kernel's device-mapper and loop ioctls: no dmsetup,
losetup, udev or lvm2 needed.  Start with :func:`init_flakey`.
"""

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
    TableRejectedError,
    UnsupportedFeatureError,
)
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
from .table import CorruptBIOByte, Direction, FlakeyTable

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
