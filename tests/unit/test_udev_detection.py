"""udev detection without a kernel: the rules by name or content, in every folder, and a live daemon.

The folders and the control socket are pointed at a temporary tree; the socket
cases use real AF_UNIX sockets (listening, bound but closed, missing).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from dmflakey_ioctl.kernel import nodes

DEBIAN_LINK_RULE = 'ENV{DM_UDEV_DISABLE_DM_RULES_FLAG}!="1", ENV{DM_NAME}=="?*", SYMLINK+="mapper/$env{DM_NAME}"\n'


@pytest.fixture
def rules(tmp_path, monkeypatch):
    """Four empty rules folders standing for /etc, /run, /usr/lib and /lib."""
    folders = [tmp_path / name for name in ("etc", "run", "usr-lib", "lib")]
    for folder in folders:
        folder.mkdir()
    monkeypatch.setattr(nodes, "UDEV_RULES_DIRS", tuple(str(f) for f in folders))
    return folders


@pytest.fixture
def control(tmp_path, monkeypatch):
    path = tmp_path / "control"
    monkeypatch.setattr(nodes, "UDEV_CONTROL", str(path))
    return path


@pytest.mark.parametrize("name", ["10-dm.rules", "55-dm.rules"])
@pytest.mark.parametrize("where", range(4))
def test_dm_rules_found_by_every_name_in_every_folder(rules, name, where):
    (rules[where] / "50-udev-default.rules").write_text('KERNEL=="loop*", GROUP="disk"\n')
    assert nodes.dm_rules_present() is False
    (rules[where] / name).write_text("# device-mapper\n")
    assert nodes.dm_rules_present() is True


def test_dm_rules_found_by_what_they_do(rules):
    (rules[2] / "69-my-dm.rules").write_text('SUBSYSTEM!="block", GOTO="end"\n' + DEBIAN_LINK_RULE)
    assert nodes.dm_rules_present() is True


def test_control_node_rule_alone_is_not_the_link_rules(rules):
    (rules[3] / "50-dm-control.rules").write_text('KERNEL=="device-mapper", NAME="mapper/control"\n')
    assert nodes.dm_rules_present() is False


def test_rules_masked_in_etc_do_not_count(rules):
    (rules[3] / "55-dm.rules").write_text(DEBIAN_LINK_RULE)
    os.symlink("/dev/null", rules[0] / "55-dm.rules")
    assert nodes.dm_rules_present() is False


def test_no_socket_is_no_udev(control):
    assert nodes.udev_running() is False


def test_a_listening_socket_is_a_running_udev(control):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        server.bind(str(control))
        server.listen(1)
        assert nodes.udev_running() is True
    finally:
        server.close()


def test_a_socket_nobody_listens_on_is_no_udev(control):
    """A stopped or crashed udevd leaves /run/udev/control behind."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(control))
    stale.close()
    assert control.exists() and nodes.udev_running() is False


def test_manages_mapper_needs_both(rules, control):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        server.bind(str(control))
        server.listen(1)
        assert nodes.udev_manages_mapper() is False
        (rules[3] / "55-dm.rules").write_text(DEBIAN_LINK_RULE)
        assert nodes.udev_manages_mapper() is True
    finally:
        server.close()
    assert nodes.udev_manages_mapper() is False


def test_wait_for_link_gone(tmp_path):
    link = tmp_path / "mapper-name"
    os.symlink("../dm-0", link)
    assert nodes.wait_for_link_gone(str(link), 0.05) is False
    link.unlink()
    assert nodes.wait_for_link_gone(str(link), 0.05) is True
    assert not Path(link).exists()
