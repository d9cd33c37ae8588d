"""The ``dmflakey`` command: make, switch, inspect and remove flakey devices from a shell.

Each call reads its device back from the kernel (``open_flakey``), so a later
call works on what an earlier one made, with no state file.  Devices made here
are persistent: no process owns them, so ``cleanup`` leaves them unless told
``--all``.  Exit status 0 on success, 1 when the operation failed, 2 when the
command line is wrong; an error is one line on stderr (``--debug`` adds the
traceback).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence

from .kernel import dm
from .errors import DMFlakeyError
from .flakey import (DEFAULT_INTERVAL, Flakey, Owner, attach_flakey, check_device_mapper,
                     cleanup_stale, init_flakey_image, list_flakey, open_flakey)
from .fs import FSType
from .tables.flakey import PROBABILITY_MAX, FlakeyTable

__all__ = ["main", "build_parser", "parse_size", "parse_probability", "table_mode",
           "table_features", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]

PROG = "dmflakey"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_U32_MAX = 2**32 - 1
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([kmgt]?)(ib|b)?", re.IGNORECASE)


class UsageError(Exception):
    """A malformed command line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the default prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# -- argument types ------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """Bytes from "512M", "10G", "64MiB", "1.5G" or plain "1048576".

    K/M/G/T and KiB/MiB/GiB/TiB count in 1024s, KB/MB/GB/TB in 1000s (as
    truncate(1) does).  The result must be a positive multiple of 512.
    """
    match = _SIZE_RE.fullmatch(text.strip())
    if not match or (match.group(3) and match.group(3).lower() == "ib" and not match.group(2)):
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use bytes or a number with K, M, G "
                                         "or T (e.g. 512M, 10G, 64MiB)")
    number, letter, suffix = match.groups()
    base = 1000 if letter and suffix and suffix.lower() == "b" else 1024
    power = "kmgt".index(letter.lower()) + 1 if letter else 0
    value = Decimal(number) * base ** power
    if value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"bad size {text!r}: not a whole number of bytes")
    size = int(value)
    if size <= 0 or size % 512:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: must be a positive multiple of 512 "
                                         f"bytes, got {size}")
    return size


def parse_probability(text: str) -> float:
    """A probability from "0.05" or "5%", from 0 to 1."""
    raw = text.strip()
    scale = Decimal(100) if raw.endswith("%") else Decimal(1)
    try:
        value = Decimal(raw.rstrip("%")) / scale
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite() or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"bad probability {text!r}: use a number from 0 to 1 "
                                         "or a percentage (0.05, 5%)")
    return float(value)


def _integer(what: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse type for an integer in low..high (0x.. hex accepted)."""
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad {what} {text!r}: not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"bad {what} {text!r}: must be {low}..{high}")
        return value
    return parse


def _device_name(text: str) -> str:
    """A name the kernel accepts, refused here so that a bad one is a usage error."""
    try:
        dm.check_name(text)
    except DMFlakeyError as exc:
        raise argparse.ArgumentTypeError(f"bad device name {text!r}: {exc.cause}") from None
    return text


# -- reading a device back -----------------------------------------------------------------------

def table_mode(table: FlakeyTable) -> str:
    """What the table does while it is down, named like the subcommand that sets it."""
    if table.down_interval == 0:
        return "allow-writes"
    if table.fails_all_io():
        return "error-reads+error-writes"
    modes = [mode for mode, on in (
        ("error-reads", table.error_reads),
        ("drop-writes", table.drop_writes),
        ("error-writes", table.error_writes),
        ("corrupt-bio-byte", table.corrupt_bio_byte is not None),
        ("random-read-corrupt", table.random_read_corrupt is not None),
        ("random-write-corrupt", table.random_write_corrupt is not None),
    ) if on]
    return "+".join(modes)


def table_features(table: FlakeyTable) -> Dict[str, Any]:
    """The table's features as JSON values (probabilities as fractions of 1)."""
    out: Dict[str, Any] = {}
    for flag in ("error_reads", "drop_writes", "error_writes"):
        if getattr(table, flag):
            out[flag] = True
    corrupt = table.corrupt_bio_byte
    if corrupt is not None:
        out["corrupt_bio_byte"] = {"nth_byte": corrupt.nth_byte,
                                   "direction": corrupt.direction.value,
                                   "value": corrupt.value, "flags": corrupt.flags}
    for name in ("random_read_corrupt", "random_write_corrupt"):
        raw = getattr(table, name)
        if raw is not None:
            out[name] = raw / PROBABILITY_MAX
    return out


def _describe(table: FlakeyTable) -> str:
    return f"{table_mode(table)} (up {table.up_interval} s, down {table.down_interval} s)"


def _owner_text(owner: Owner) -> str:
    if owner.pid == 0:
        return "cli (persistent)"
    return f"pid {owner.pid}" + ("" if owner.alive() else " (stale: the process is gone)")


def _status(dev: Flakey) -> tuple[Dict[str, Any], FlakeyTable]:
    """What status prints (as JSON values), and the live table it came from."""
    info = dm.info(dev.name)
    target = dm.table(dev.name)[0]
    table = FlakeyTable.parse(target.params)
    return {
        "name": dev.name,
        "uuid": info.uuid,
        "device": dev.device_path,
        "dev": f"{info.major}:{info.minor}",
        "backing": dev.backing,
        "loop_device": dev.loop_device,
        "image": dev.image_path,
        "filesystem": dev.filesystem.value if dev.filesystem else None,
        "size": dev.sectors * 512,
        "suspended": info.suspended,
        "open_count": info.open_count,
        "read_only": info.read_only,
        "persistent": dev.owner.pid == 0,
        "owner_pid": dev.owner.pid or None,
        "mode": table_mode(table),
        "up_interval": table.up_interval,
        "down_interval": table.down_interval,
        "features": table_features(table),
        "table": target.line(),
    }, table


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


# -- subcommands ---------------------------------------------------------------------------------

def _cmd_create(args: argparse.Namespace) -> int:
    if args.device:
        dev = attach_flakey(args.name, args.device, persistent=True)
        over = args.device
    else:
        fs_type = None if args.fs == "none" else args.fs
        dev = init_flakey_image(args.name, args.image, fs_type, args.mkfs_options, args.size,
                                persistent=True)
        over = f"{dev.loop_device} (image {dev.image_path})"
    fs_name = dev.filesystem.value if dev.filesystem else "no filesystem"
    print(f"created {dev.name}: {dev.device_path} over {over}, {fs_name}, "
          f"{dev.sectors * 512} bytes")
    return EXIT_OK


def _switch(apply: Callable[[Flakey, argparse.Namespace], None]
            ) -> Callable[[argparse.Namespace], int]:
    """A fault subcommand: apply it, then say what the kernel's live table now does."""
    def run(args: argparse.Namespace) -> int:
        dev = open_flakey(args.name)
        apply(dev, args)
        print(f"{dev.name}: {_describe(dev.table())}")
        return EXIT_OK
    return run


def _cmd_status(args: argparse.Namespace) -> int:
    dev = open_flakey(args.name)
    status, table = _status(dev)
    if args.json:
        _print_json(status)
        return EXIT_OK
    rows = [
        ("name", status["name"]),
        ("uuid", status["uuid"]),
        ("device", f"{status['device']} ({status['dev']})"),
        ("backing", f"{status['loop_device'] or 'block device'} ({status['backing']})"),
        ("image", status["image"] or "-"),
        ("filesystem", status["filesystem"] or "unknown"),
        ("size", f"{status['size']} bytes"),
        ("owner", _owner_text(dev.owner)),
        ("suspended", "yes" if status["suspended"] else "no"),
        ("open count", status["open_count"]),
        ("mode", status["mode"]),
        ("intervals", f"up {status['up_interval']} s, down {status['down_interval']} s"),
        ("features", " ".join(table.feature_words()) or "none"),
        ("table", status["table"]),
    ]
    for key, value in rows:
        print(f"{key + ':':<12}{value}")
    return EXIT_OK


def _cmd_table(args: argparse.Namespace) -> int:
    open_flakey(args.name)  # refuses devices the library did not make
    for target in dm.table(args.name):
        print(target.line())
    return EXIT_OK


def _list_entry(listed: dm.ListedDevice) -> Dict[str, Any]:
    owner = Owner.from_uuid(listed.uuid)
    assert owner is not None  # list_flakey only returns devices whose uuid parses
    entry: Dict[str, Any] = {
        "name": listed.name, "uuid": listed.uuid, "device": f"{dm.MAPPER_DIR}/{listed.name}",
        "persistent": owner.pid == 0, "owner_pid": owner.pid or None, "stale": not owner.alive(),
        "mode": None, "loop_device": None, "image": None,
    }
    try:
        dev = open_flakey(listed.name)
        entry.update(mode=table_mode(dev.table()), loop_device=dev.loop_device,
                     image=dev.image_path)
    except DMFlakeyError:
        pass  # half-made (no table yet) or removed meanwhile: list what the uuid tells
    return entry


def _cmd_list(args: argparse.Namespace) -> int:
    entries = [_list_entry(d) for d in sorted(list_flakey(), key=lambda d: d.name)]
    if args.json:
        _print_json(entries)
        return EXIT_OK
    if not entries:
        print("no devices made by dmflakey-ioctl")
        return EXIT_OK
    rows = [("NAME", "MODE", "OWNER", "BACKING")]
    for e in entries:
        owner = "cli" if e["persistent"] else f"pid {e['owner_pid']}"
        owner += " stale" if e["stale"] else ""
        backing = f"{e['loop_device']} {e['image']}" if e["image"] else (e["loop_device"] or "-")
        rows.append((e["name"], e["mode"] or "?", owner, backing))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    return EXIT_OK


def _cmd_remove(args: argparse.Namespace) -> int:
    dev = open_flakey(args.name)
    dev.teardown()
    if dev.image_path:
        print(f"removed {dev.name}: {dev.device_path}, {dev.loop_device}, image {dev.image_path}")
    else:
        print(f"removed {dev.name}: {dev.device_path} "
              f"(backing device {dev.backing} left as it was)")
    return EXIT_OK


def _cmd_cleanup(args: argparse.Namespace) -> int:
    errors: List[DMFlakeyError] = []
    removed = cleanup_stale(include_persistent=args.all, on_error=errors.append)
    for name in removed:
        print(f"removed {name}")
    if not removed and not errors:
        print("nothing to clean up")
    if errors:
        causes = "; ".join(str(e) for e in errors)
        raise DMFlakeyError("cleanup", None,
                            f"{len(errors)} device(s) could not be removed: {causes}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run  # sqlite3 and the demo's text are loaded only for the demo
    return run(args.scenario, transactions=args.transactions)


# -- parser --------------------------------------------------------------------------------------

def _add_switch(sub: Any, common: argparse.ArgumentParser, name: str, help_text: str,
                apply: Callable[[Flakey, argparse.Namespace], None]) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
    parser.add_argument("name", type=_device_name, help="the flakey device")
    parser.add_argument("--interval", type=_integer("interval", 0, _U32_MAX),
                        default=DEFAULT_INTERVAL, metavar="SECONDS",
                        help="the mode's interval: dm-flakey's up interval for allow-writes, "
                        f"its down interval for a fault (default {DEFAULT_INTERVAL})")
    parser.add_argument("--sync-fs", action="store_true",
                        help="freeze (and so flush) a mounted filesystem while switching")
    parser.set_defaults(handler=_switch(apply))
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one subcommand per action."""
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an error")
    parser = _Parser(prog=PROG, description="Make a file or block device drop, fail or corrupt "
                     "I/O on command (dm-flakey, driven through ioctls).")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    create = sub.add_parser("create", parents=[common], help="make a flakey device",
                            description="Make a flakey device over a new image file or over an "
                            "existing block device; it lets all I/O through until a fault is "
                            "switched on.")
    create.add_argument("name", type=_device_name, help="name of /dev/mapper/NAME")
    backing = create.add_mutually_exclusive_group(required=True)
    backing.add_argument("--image", metavar="PATH", help="image file to create (never overwritten)")
    backing.add_argument("--device", metavar="BLOCKDEV", help="existing block device to map (left "
                         "as it is on remove)")
    create.add_argument("--size", type=parse_size, help="image size: 512M, 10G, 64MiB or bytes")
    create.add_argument("--fs", choices=[t.value for t in FSType] + ["none"], default=None,
                        help="filesystem to make on the image (default ext4)")
    create.add_argument("--mkfs-options", metavar="OPTIONS",
                        help='extra mkfs arguments, e.g. --mkfs-options="-b 1024"')
    create.set_defaults(handler=_cmd_create)

    _add_switch(sub, common, "allow-writes", "let all I/O through",
                lambda d, a: d.allow_writes(interval=a.interval, sync_fs=a.sync_fs))
    _add_switch(sub, common, "drop-writes", "acknowledge writes and throw them away",
                lambda d, a: d.drop_writes(interval=a.interval, sync_fs=a.sync_fs))
    _add_switch(sub, common, "error-writes", "fail writes with EIO",
                lambda d, a: d.error_writes(interval=a.interval, sync_fs=a.sync_fs))
    _add_switch(sub, common, "error-reads", "fail reads with EIO (Linux 6.4+)",
                lambda d, a: d.error_reads(interval=a.interval, sync_fs=a.sync_fs))
    corrupt = _add_switch(sub, common, "corrupt-bio-byte", "set one byte of each matching bio",
                          lambda d, a: d.corrupt_bio_byte(a.byte, a.direction, a.value, a.flags,
                                                          interval=a.interval, sync_fs=a.sync_fs))
    corrupt.add_argument("--byte", type=_integer("byte", 1, _U32_MAX), required=True, metavar="N",
                         help="which byte of the bio (1-based)")
    corrupt.add_argument("--direction", choices=["r", "w"], required=True,
                         help="corrupt reads (data on disk stays intact) or writes")
    corrupt.add_argument("--value", type=_integer("value", 0, 255), required=True, metavar="V",
                         help="the byte to put there (0..255, 0x.. accepted)")
    corrupt.add_argument("--flags", type=_integer("flags", 0, _U32_MAX), default=0, metavar="F",
                         help="only bios with all these bio flags (default 0: every bio)")
    read = _add_switch(sub, common, "random-read-corrupt", "corrupt one random byte of a read "
                       "bio with a probability (Linux 6.5+)",
                       lambda d, a: d.random_read_corrupt(a.probability, interval=a.interval,
                                                          sync_fs=a.sync_fs))
    write = _add_switch(sub, common, "random-write-corrupt", "corrupt one random byte of a write "
                        "bio with a probability (Linux 6.5+)",
                        lambda d, a: d.random_write_corrupt(a.probability, interval=a.interval,
                                                            sync_fs=a.sync_fs))
    for switch in (read, write):
        switch.add_argument("--probability", type=parse_probability, required=True, metavar="P",
                            help="0 to 1, or a percentage (0.05, 5%%)")

    status = sub.add_parser("status", parents=[common], help="show a device as the kernel has it")
    status.add_argument("name", type=_device_name, help="the flakey device")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_cmd_status)

    listing = sub.add_parser("list", parents=[common], help="list the devices dmflakey-ioctl made")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_cmd_list)

    table = sub.add_parser("table", parents=[common], help="print the kernel's table line")
    table.add_argument("name", type=_device_name, help="the flakey device")
    table.set_defaults(handler=_cmd_table)

    remove = sub.add_parser("remove", parents=[common], help="remove a device, its loop device "
                            "and the image it created")
    remove.add_argument("name", type=_device_name, help="the flakey device")
    remove.set_defaults(handler=_cmd_remove)

    cleanup = sub.add_parser("cleanup", parents=[common], help="remove what crashed runs left")
    cleanup.add_argument("--all", action="store_true",
                         help="also remove devices made by this command (persistent ones)")
    cleanup.set_defaults(handler=_cmd_cleanup)

    demo = sub.add_parser("demo", parents=[common], help="show a power failure in seconds")
    demo.add_argument("--scenario", choices=["files", "sqlite"], default="files",
                      help="files: a synced and an unsynced file; sqlite: WAL with "
                      "synchronous=FULL vs OFF (default files)")
    demo.add_argument("--transactions", type=_integer("transactions", 1, 100000), default=100,
                      metavar="N", help="transactions per database in the sqlite scenario "
                      "(default 100)")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _check_create(args: argparse.Namespace) -> None:
    if args.device and (args.size is not None or args.fs is not None or args.mkfs_options):
        raise UsageError(f"{PROG} create: --size, --fs and --mkfs-options go with --image only")
    if args.fs == "none" and args.mkfs_options:
        raise UsageError(f"{PROG} create: --mkfs-options needs a filesystem, not --fs none")
    if args.image and args.size is None:
        raise UsageError(f"{PROG} create: --image needs --size (e.g. --size 512M)")
    if args.image and args.fs is None:
        args.fs = FSType.EXT4.value


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one subcommand; returns the exit status (0 ok, 1 failed, 2 bad usage)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(args_list)
        if args.command == "create":
            _check_create(args)
    except UsageError as exc:
        print(_one_line(str(exc)), file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        check_device_mapper()
        return int(args.handler(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, OSError):
            message = str(exc)
        else:
            message = f"internal error: {type(exc).__name__}: {exc}"
            if not args.debug:
                message += " (rerun with --debug for the traceback)"
        print(f"{PROG}: {_one_line(message)}", file=sys.stderr)
        return EXIT_FAILED
