"""dmflakey-ioctl: a file-backed block device that drops, fails or corrupts I/O on command.

Pure Python over the kernel's device-mapper and loop ioctls: no dmsetup,
losetup, udev or lvm2 needed.
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

__version__ = "0.1.0"

__all__ = [
    "DMFlakeyError",
    "DeviceBusyError",
    "DeviceExistsError",
    "DeviceNotFoundError",
    "InvalidArgumentError",
    "InvalidNameError",
    "InvalidTableError",
    "KernelSupportError",
    "NotRootError",
    "TableRejectedError",
    "UnsupportedFeatureError",
]
