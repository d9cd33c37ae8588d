"""The dmflakey command line without a kernel: parsing, sizes, exit status 2, one-line errors."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmflakey_ioctl import cli
from dmflakey_ioctl.cli import devices
from dmflakey_ioctl.errors import DeviceNotFoundError, KernelSupportError
from dmflakey_ioctl.tables.flakey import CorruptBIOByte, FlakeyTable

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@pytest.mark.parametrize("text, size", [
    ("512M", 512 * MiB), ("10G", 10 << 30), ("64MiB", 64 * MiB), ("1048576", MiB),
    ("4k", 4096), ("1.5G", 3 << 29), ("2T", 2 << 40), ("64MB", 64_000_000), ("512", 512),
    (" 16mib ", 16 * MiB), ("1024B", 1024),
])
def test_sizes(text, size):
    assert cli.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "abc", "-1", "0", "1000", "5iB", "1.1", "10X", "1e9",
                                  "1KB"])
def test_bad_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError, match="bad size"):
        cli.parse_size(text)


@pytest.mark.parametrize("text, value", [("0.25", 0.25), ("5%", 0.05), ("1", 1.0), ("0", 0.0),
                                         ("100%", 1.0), ("1e-3", 0.001)])
def test_probabilities(text, value):
    assert cli.parse_probability(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["1.5", "-0.1", "nan", "inf", "x", "101%", ""])
def test_bad_probabilities(text):
    with pytest.raises(argparse.ArgumentTypeError, match="bad probability"):
        cli.parse_probability(text)


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


@pytest.mark.parametrize("command", ["allow-writes", "drop-writes", "error-writes", "error-reads"])
def test_switch_defaults_and_options(command):
    args = parse(command, "dev")
    assert (args.name, args.interval, args.sync_fs, args.debug) == ("dev", 120, False, False)
    args = parse(command, "dev", "--interval", "1", "--sync-fs", "--debug")
    assert (args.interval, args.sync_fs, args.debug) == (1, True, True)


def test_parsed_arguments():
    args = parse("create", "d", "--image", "x.img", "--size", "64MiB", "--fs", "xfs",
                 "--mkfs-options=-m crc=1")
    assert (args.image, args.size, args.fs) == ("x.img", 64 * MiB, "xfs")
    assert args.mkfs_options == "-m crc=1"
    args = parse("corrupt-bio-byte", "d", "--byte", "32", "--direction", "r", "--value", "0xff",
                 "--flags", "1")
    assert (args.byte, args.direction, args.value, args.flags) == (32, "r", 255, 1)
    assert parse("random-read-corrupt", "d", "--probability", "5%").probability == 0.05
    assert parse("status", "d", "--json").json and parse("list", "--json").json
    assert parse("cleanup", "--all").all and not parse("cleanup").all
    args = parse("demo", "--scenario", "sqlite", "--transactions", "5")
    assert (args.scenario, args.transactions) == ("sqlite", 5)
    assert parse("--debug", "table", "d").debug


@pytest.mark.parametrize("argv, hint", [
    ([], "COMMAND"),
    (["frobnicate"], "invalid choice"),
    (["create", "d"], "--image --device"),
    (["create", "d", "--image", "x.img"], "--size"),
    (["create", "d", "--device", "/dev/loop0", "--size", "1G"], "--image only"),
    (["create", "d", "--image", "x.img", "--device", "/dev/loop0"], "not allowed"),
    (["create", "d", "--image", "x.img", "--size", "12345"], "multiple of 512"),
    (["create", "d", "--image", "x.img", "--size", "1G", "--fs", "zfs"], "invalid choice"),
    (["create", "d", "--image", "x.img", "--size", "1G", "--fs", "none", "--mkfs-options=-q"],
     "--fs none"),
    (["status", "a/b"], "cannot contain '/'"),
    (["drop-writes", "d", "--interval", "-1"], "--interval"),
    (["drop-writes", "d", "--interval", "soon"], "not an integer"),
    (["corrupt-bio-byte", "d", "--byte", "1", "--direction", "x", "--value", "1"], "--direction"),
    (["corrupt-bio-byte", "d", "--byte", "1", "--direction", "w", "--value", "256"], "0..255"),
    (["corrupt-bio-byte", "d", "--direction", "w", "--value", "1"], "--byte"),
    (["random-write-corrupt", "d", "--probability", "2"], "bad probability"),
    (["random-write-corrupt", "d"], "--probability"),
    (["list", "extra"], "unrecognized arguments"),
    (["demo", "--scenario", "fire"], "invalid choice"),
])
def test_bad_usage_exits_2_with_one_line(capsys, argv, hint):
    assert cli.main(argv) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and hint in err, err
    assert err.startswith("dmflakey")


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "corrupt-bio-byte" in capsys.readouterr().out
    assert cli.main(["create", "--help"]) == 0
    assert "--mkfs-options" in capsys.readouterr().out


def missing_dm() -> None:
    raise KernelSupportError("check kernel", None, "device-mapper is missing: test")


def test_failure_exits_1_with_one_line(capsys, monkeypatch):
    monkeypatch.setattr(cli, "check_device_mapper", missing_dm)
    assert cli.main(["status", "x"]) == cli.EXIT_FAILED
    out, err = capsys.readouterr()
    assert out == "" and err == "dmflakey: check kernel: device-mapper is missing: test\n"


def test_debug_adds_the_traceback(capsys, monkeypatch):
    monkeypatch.setattr(cli, "check_device_mapper", missing_dm)
    assert cli.main(["status", "x", "--debug"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.endswith("dmflakey: check kernel: device-mapper is missing: test\n")


def test_library_errors_and_bugs_are_one_line(capsys, monkeypatch):
    monkeypatch.setattr(cli, "check_device_mapper", lambda: None)

    def not_found(name):
        raise DeviceNotFoundError("info", name, "no such\ndevice-mapper device", 6)
    monkeypatch.setattr(devices, "_open_any", not_found)
    # the error names the user's operation, not the ioctl that found nothing
    assert cli.main(["remove", "x"]) == cli.EXIT_FAILED
    assert capsys.readouterr().err == ("dmflakey: remove x: no such device "
                                       "[ENXIO: No such device or address]\n")

    def bug(name):
        raise KeyError(name)
    monkeypatch.setattr(devices, "_open_any", bug)
    assert cli.main(["status", "x"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: KeyError" in err and "--debug" in err


@pytest.mark.parametrize("table, mode", [
    (FlakeyTable("7:0", 120, 0), "allow-writes"),
    (FlakeyTable("7:0", 0, 120, drop_writes=True), "drop-writes"),
    (FlakeyTable("7:0", 0, 120, error_writes=True), "error-writes"),
    (FlakeyTable("7:0", 0, 120, error_reads=True), "error-reads"),
    (FlakeyTable("7:0", 0, 5, corrupt_bio_byte=CorruptBIOByte(1, "r", 0)),  # type: ignore[arg-type]
     "corrupt-bio-byte"),
    (FlakeyTable("7:0", 0, 5, random_read_corrupt=10), "random-read-corrupt"),
    (FlakeyTable("7:0", 0, 5, random_write_corrupt=10), "random-write-corrupt"),
    (FlakeyTable("7:0", 0, 5, error_reads=True, drop_writes=True), "error-reads+drop-writes"),
    (FlakeyTable("7:0", 1, 5), "error-reads+error-writes"),
])
def test_table_mode(table, mode):
    assert cli.table_mode(table) == mode


def test_table_features():
    table = FlakeyTable("7:0", 0, 5, drop_writes=True,
                        corrupt_bio_byte=CorruptBIOByte(9, "r", 65, 2),  # type: ignore[arg-type]
                        random_read_corrupt=500_000_000)
    assert cli.table_features(table) == {
        "drop_writes": True,
        "corrupt_bio_byte": {"nth_byte": 9, "direction": "r", "value": 65, "flags": 2},
        "random_read_corrupt": 0.5,
    }


def host_has_dm() -> bool:
    return os.path.exists("/sys/module/dm_mod") or "device-mapper" in Path("/proc/misc").read_text()


@pytest.mark.skipif(host_has_dm(), reason="this host has device-mapper")
def test_without_device_mapper_a_real_call_says_so_and_touches_nothing():
    control_before = os.path.lexists("/dev/mapper/control")
    proc = subprocess.run([sys.executable, "-m", "dmflakey_ioctl", "status", "x"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "device-mapper is missing" in proc.stderr
    assert os.path.lexists("/dev/mapper/control") == control_before


def test_bad_usage_from_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "dmflakey_ioctl", "create", "x", "--size", "1G"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert "one of the arguments --image --device is required" in proc.stderr


def test_version(capsys):
    assert cli.main(["--version"]) == cli.EXIT_OK
    from dmflakey_ioctl import __version__
    assert capsys.readouterr().out.strip() == f"dmflakey {__version__}"


@pytest.mark.parametrize("command", ["allow-writes", "drop-writes", "error-writes", "error-reads"])
def test_interval_zero_is_bad_usage_in_the_cli_s_own_words(capsys, command):
    assert cli.main([command, "dev", "--interval", "0"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--interval" in err and "at least 1 second" in err


def test_every_subcommand_has_a_description_and_create_help_names_size_with_image():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        assert sub.description, f"{name} has no description"
    create = subparsers.choices["create"].format_help()
    assert "--size" in create and "required with --image" in " ".join(create.split())


@pytest.mark.parametrize("argv", [
    ["delay", "dev", "--read-ms", "-1"],
    ["drop-writes", "dev", "--sectors", "10"],
    ["drop-writes", "dev", "--sectors", "10+0"],
    ["explore", "log", "--check", "true", "--points", "sometimes"],
    ["replay", "log"],
])
def test_bad_new_options_are_usage_errors(capsys, argv):
    assert cli.main(argv) == cli.EXIT_USAGE
    assert capsys.readouterr().err.count("\n") == 1


def test_scope_options_reach_the_switch(monkeypatch, capsys):
    seen = {}

    class Fake:
        name = "dev"

        def drop_writes(self, **kw):
            seen.update(kw)

        def table(self):
            from dmflakey_ioctl.tables.segments import DeviceTable
            return DeviceTable.whole(8, FlakeyTable("7:0", 0, 5, drop_writes=True))

    monkeypatch.setattr(cli, "check_device_mapper", lambda: None)
    monkeypatch.setattr(devices, "open_flakey", lambda name: Fake())
    assert cli.main(["drop-writes", "dev", "--file", "/a", "--sectors", "8+2", "--sectors", "20+4",
                     "--exclude-sectors", "9+1", "--up-interval", "3"]) == cli.EXIT_OK
    assert seen["scope"] == ["/a", (8, 2), (20, 4)] and seen["exclude"] == [(9, 1)]
    assert seen["up_interval"] == 3 and seen["interval"] == 120
