"""Devices other tools made stay untouched: `dmflakey cleanup --all` and open_flakey vs dmsetup's devices.

The foreign devices are made with dmsetup, the worst one a flakey device over
a loop device and an image, exactly the shape of ours but without our uuid.
What "untouched" means is read from dmsetup, sysfs and the image files, not
from the library.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmflakey_ioctl.errors import DMFlakeyError, DeviceNotFoundError
from dmflakey_ioctl.flakey import init_flakey, open_flakey
from dmflakey_ioctl.kernel import loop

from .cli_helpers import dmflakey
from .helpers import dm_names, dmsetup, sparse_file, unique_name

MiB = 1 << 20
MARK = b"the other tool's data\n"


def bound_loops(image: Path) -> list[str]:
    """The loop devices whose backing file is image, by sysfs."""
    out = []
    for p in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if p.read_text().rstrip("\n") == str(image):
                out.append(p.parent.parent.name)
        except OSError:
            continue
    return out


def snapshot(name: str) -> tuple:
    """What dmsetup says about a device: info columns and table."""
    info = dmsetup("info", "-c", "--noheadings", "--separator", ";", "-o",
                   "name,uuid,major,minor,attr,open,segments,events", name).strip()
    return info, dmsetup("table", name).strip()


@pytest.fixture
def other_tool(tmp_path):
    """A dmsetup world: a flakey device over a loop device and an image, and one with its own uuid."""
    folder = Path(os.path.realpath(tmp_path))
    image = sparse_file(folder / "other.img", 8 * MiB)
    with open(image, "r+b") as fh:
        fh.write(MARK)
    backing = loop.attach(str(image))
    flakey = unique_name("dmfi-other-flakey")
    zero = unique_name("dmfi-other-zero")
    made = []
    try:
        dmsetup("create", flakey, "--table", f"0 {backing.size // 512} flakey {backing.major_minor} 0 60 0")
        made.append(flakey)
        dmsetup("create", zero, "--uuid", f"OTHER-TOOL-{zero}", "--table", "0 8 zero")
        made.append(zero)
        yield {"flakey": flakey, "zero": zero, "image": image, "loop": backing}
    finally:
        for name in made:
            if name in dm_names():
                dmsetup("remove", name)
        backing.detach()


def assert_untouched(world: dict, before: dict) -> None:
    for key in ("flakey", "zero"):
        assert world[key] in dm_names()
        assert snapshot(world[key]) == before[key], key
    for key in ("flakey", "zero"):                                  # and none was left suspended
        state = dmsetup("info", world[key])
        assert "ACTIVE" in state and "SUSPENDED" not in state, state
    assert bound_loops(world["image"]) == [Path(world["loop"].path).name]
    assert world["image"].read_bytes()[:len(MARK)] == MARK


def test_open_flakey_refuses_a_device_another_tool_made(other_tool):
    before = {key: snapshot(other_tool[key]) for key in ("flakey", "zero")}
    for key in ("flakey", "zero"):
        with pytest.raises(DMFlakeyError) as info:
            open_flakey(other_tool[key])
        err = info.value
        assert not isinstance(err, DeviceNotFoundError)
        assert err.device == other_tool[key] and err.operation == "open_flakey"
        assert "dmflakey-ioctl" in err.cause            # says whose devices it opens
    proc = dmflakey("remove", other_tool["flakey"])
    assert proc.returncode == 1 and proc.stdout == "" and other_tool["flakey"] in proc.stderr
    assert_untouched(other_tool, before)


def test_cleanup_all_removes_cli_devices_and_nothing_else(other_tool, tmp_path):
    folder = Path(os.path.realpath(tmp_path))
    cli_image_name, cli_device_name = unique_name("dmfi-cli-img"), unique_name("dmfi-cli-dev")
    cli_image = folder / "cli.img"
    given = loop.attach(str(sparse_file(folder / "given.img", 8 * MiB)))
    live = None
    try:
        for args in (["create", cli_image_name, "--image", str(cli_image), "--size", "16MiB", "--fs", "none"],
                     ["create", cli_device_name, "--device", given.path]):
            proc = dmflakey(*args)
            assert (proc.returncode, proc.stderr) == (0, ""), proc
        cli_loops = bound_loops(cli_image)
        assert len(cli_loops) == 1 and cli_image.exists()
        live = init_flakey(unique_name("dmfi-live"), str(folder), None, size=MiB)  # owner: this process
        before = {key: snapshot(other_tool[key]) for key in ("flakey", "zero")}
        live_before = snapshot(live.name)

        proc = dmflakey("cleanup", "--all")
        assert (proc.returncode, proc.stderr) == (0, ""), proc
        removed = set(proc.stdout.splitlines())
        assert {f"removed {cli_image_name}", f"removed {cli_device_name}"} <= removed
        assert not {f"removed {n}" for n in (other_tool["flakey"], other_tool["zero"], live.name)} & removed

        # the CLI's devices went with their loop device and the image the CLI made ...
        assert cli_image_name not in dm_names() and cli_device_name not in dm_names()
        assert not os.path.lexists(f"/dev/mapper/{cli_image_name}")
        assert not cli_image.exists() and bound_loops(cli_image) == []
        assert not Path(f"/sys/block/{cli_loops[0]}/loop/backing_file").exists() or \
            Path(f"/sys/block/{cli_loops[0]}/loop/backing_file").read_text().strip() != str(cli_image)
        # ... but the block device given to the CLI stays as it was
        assert bound_loops(Path(given.backing_file)) == [Path(given.path).name]
        # another tool's devices, loop device and image, and a live process's device: untouched
        assert_untouched(other_tool, before)
        assert snapshot(live.name) == live_before and Path(live.image_path).exists()
    finally:
        if live is not None:
            live.teardown()
        for name in (cli_image_name, cli_device_name):
            if name in dm_names():
                open_flakey(name).teardown()
        given.detach()
