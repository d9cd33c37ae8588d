import errno
import pickle

import pytest

import dmflakey_ioctl
from dmflakey_ioctl.errors import (DeviceBusyError, DMFlakeyError, InvalidNameError, ProgramFailedError,
                                   ProgramNotFoundError, TableRejectedError, UnsupportedFeatureError)


def test_message_names_operation_device_cause_and_errno():
    err = DeviceBusyError("remove", "flakey0", "device is open", errno.EBUSY)
    assert isinstance(err, OSError) and isinstance(err, DMFlakeyError)
    assert err.errno == errno.EBUSY
    assert str(err) == "remove flakey0: device is open [EBUSY: Device or resource busy]"


def test_refusals_are_value_errors_without_errno():
    err = InvalidNameError("create", "a/b", "name contains '/'")
    assert isinstance(err, ValueError)
    assert err.errno is None
    assert str(err) == "create a/b: name contains '/'"


@pytest.mark.parametrize("err", [
    DeviceBusyError("remove", "x", "open", errno.EBUSY),
    UnsupportedFeatureError("load", "x", "no error_reads", errno.EINVAL, feature="error_reads",
                            since="6.5", running="6.1.0"),
    TableRejectedError("load", "x", "rejected", errno.EINVAL, kernel_log="flakey: Invalid argument count"),
    ProgramNotFoundError("mkfs", "/img", "mkfs.xfs not found", errno.ENOENT, program="mkfs.xfs",
                         package="xfsprogs"),
    ProgramFailedError("mkfs", "/img", "mkfs.ext4 failed", program="/sbin/mkfs.ext4", returncode=1,
                       output="bad\n"),
])
def test_errors_survive_pickling(err):
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert str(copy) == str(err) and copy.errno == err.errno
    assert getattr(copy, "__dict__") == getattr(err, "__dict__")


def test_every_public_name_of_the_package_imports():
    """The package loads its names lazily: a wrong module in that map only shows on first use."""
    for name in dmflakey_ioctl.__all__:
        assert getattr(dmflakey_ioctl, name) is not None, name
    assert issubclass(dmflakey_ioctl.ProgramNotFoundError, FileNotFoundError)
