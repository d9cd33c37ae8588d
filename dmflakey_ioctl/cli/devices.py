"""Subcommands for flakey devices: create, the fault switches, status, table, list, remove, cleanup."""

from __future__ import annotations

import argparse
import errno
import json
import os
from typing import Any, Callable, Dict, List, Optional

from .. import list_owned
from ..cleanup import OwnedDevice
from ..errors import DeviceNotFoundError, DMFlakeyError
from ..flakey import (DEFAULT_INTERVAL, Flakey, attach_flakey, cleanup_stale, init_flakey_image,
                      open_flakey)
from ..fs import FSType
from ..kernel import dm
from ..ownership import Kind, Owner, Verdict
from ..recording import Recording, open_recording
from ..tables.delay import DelayTable
from ..tables.flakey import PROBABILITY_MAX, FlakeyTable
from ..tables.segments import DeviceTable
from .args import (PROG, U32_MAX, device_name, integer, parse_probability, parse_size,
                   sector_range)

__all__ = ["register", "table_mode", "table_features", "open_device"]

EXIT_OK = 0


# -- reading a device back -----------------------------------------------------------------------

def table_mode(table: object) -> str:
    """What a target table does while it is down, named like the subcommand that sets it."""
    if isinstance(table, DelayTable):
        return f"delay (read {table.read_ms} ms, write {table.write_ms} ms, flush {table.flush_ms} ms)"
    if not isinstance(table, FlakeyTable):
        return "pass-through"
    if table.down_interval == 0:
        return "allow-writes"
    if table.fails_all_io():
        return "error-reads+error-writes"
    return "+".join(mode for mode, on in (
        ("error-reads", table.error_reads),
        ("drop-writes", table.drop_writes),
        ("error-writes", table.error_writes),
        ("corrupt-bio-byte", table.corrupt_bio_byte is not None),
        ("random-read-corrupt", table.random_read_corrupt is not None),
        ("random-write-corrupt", table.random_write_corrupt is not None),
    ) if on)


def table_features(table: object) -> Dict[str, Any]:
    """A target table's features as JSON values (probabilities as fractions of 1)."""
    if isinstance(table, DelayTable):
        return {"read_ms": table.read_ms, "write_ms": table.write_ms, "flush_ms": table.flush_ms}
    out: Dict[str, Any] = {}
    if not isinstance(table, FlakeyTable):
        return out
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


def describe(table: DeviceTable) -> str:
    """One line: the mode, its intervals, and where it applies."""
    fault = table.fault
    text = table_mode(fault)
    if isinstance(fault, FlakeyTable):
        text += f" (up {fault.up_interval} s, down {fault.down_interval} s)"
    scope = table.scope
    if scope is not None:
        sectors = sum(count for _, count in scope)
        text += f" on {len(scope)} range(s), {sectors} of {table.sectors} sectors"
    return text


def open_device(args: argparse.Namespace, opener: Callable[[str], Any]) -> Any:
    """opener(name), with a missing device reported under the user's own subcommand."""
    try:
        return opener(args.name)
    except DeviceNotFoundError as exc:
        raise DeviceNotFoundError(args.command, args.name, "no such device", exc.errno or
                                  errno.ENXIO) from None


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


def _scope(args: argparse.Namespace, prefix: str) -> Optional[list]:
    items = list(getattr(args, f"{prefix}file") or []) + list(getattr(args, f"{prefix}sectors") or [])
    return items or None


def _switch(apply: Callable[[Flakey, argparse.Namespace, Dict[str, Any]], None]
            ) -> Callable[[argparse.Namespace], int]:
    """A fault subcommand: apply it, then say what the kernel's live table now does."""
    def run(args: argparse.Namespace) -> int:
        dev = open_device(args, open_flakey)
        scoped: Dict[str, Any] = {}
        if hasattr(args, "file"):
            scoped = {"scope": _scope(args, ""), "exclude": _scope(args, "exclude_")}
        apply(dev, args, scoped)
        print(f"{dev.name}: {describe(dev.table())}")
        return EXIT_OK
    return run


def _flakey_status(dev: Flakey) -> Dict[str, Any]:
    table = dev.table()
    fault = table.fault
    info = dm.info(dm.ByUuid(dev.uuid, dev.name))
    return {
        "name": dev.name, "kind": "flakey", "uuid": dev.uuid, "device": dev.device_path,
        "dev": f"{os.major(dev.dev)}:{os.minor(dev.dev)}",
        "backing": dev.backing, "loop_device": dev.loop_device, "image": dev.image_path,
        "filesystem": dev.filesystem.value if dev.filesystem else None,
        "size": dev.sectors * 512, "persistent": dev.owner.persistent,
        "suspended": info.suspended, "open_count": info.open_count, "read_only": info.read_only,
        "owner": dev.owner.describe(), "owner_pid": dev.owner.pid or None,
        "mode": table_mode(fault),
        "up_interval": getattr(fault, "up_interval", None),
        "down_interval": getattr(fault, "down_interval", None),
        "features": table_features(fault),
        "segments": [{"start": s.start, "length": s.length, "target": s.table.target_type,
                      "params": s.table.params()} for s in table.segments],
        "scope": [list(r) for r in table.scope] if table.scope is not None else None,
        "table": "\n".join(" ".join(str(w) for w in s.target()) for s in table.segments),
        "mount_points": dev.mount_points(),
    }


def _open_any(name: str) -> Any:
    """The Flakey or the Recording a device of ours is, by the kind its uuid records."""
    owner = Owner.from_uuid(dm.info(name).uuid)
    if owner is not None and owner.kind is Kind.RECORDING:
        return open_recording(name)
    return open_flakey(name)


def describe_recording(rec: Any) -> Dict[str, Any]:
    """What status shows for a recording."""
    status = rec.status()
    return {"name": rec.name, "kind": "recording", "uuid": rec.uuid, "device": rec.device_path,
            "image": rec.image_path, "log": rec.log_path, "size": rec.size,
            "log_size": rec.log_size, "sector_size": rec.sector_size, "entries": status.entries,
            "logging_disabled": status.logging_disabled, "owner": rec.owner.describe(),
            "mount_points": rec.mount_points()}


def _cmd_status(args: argparse.Namespace) -> int:
    dev = open_device(args, _open_any)
    if isinstance(dev, Recording):
        status = describe_recording(dev)
        if args.json:
            _print_json(status)
        else:
            for key, value in status.items():
                print(f"{key.replace('_', ' ') + ':':<18}{value}")
        return EXIT_OK
    status = _flakey_status(dev)
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
        ("owner", status["owner"]),
        ("mounted on", ", ".join(status["mount_points"]) or "-"),
        ("mode", describe(dev.table())),
    ]
    for segment in status["segments"]:
        end = segment["start"] + segment["length"]
        rows.append(("segment", f"{segment['start']}-{end} {segment['target']} {segment['params']}"))
    for key, value in rows:
        print(f"{key + ':':<12}{value}")
    return EXIT_OK


def _cmd_table(args: argparse.Namespace) -> int:
    dev = open_device(args, open_flakey)   # refuses devices the library did not make
    for segment in dev.table().segments:
        start, length, kind, params = segment.target()
        print(f"{start} {length} {kind} {params}")
    return EXIT_OK


def _list_entry(device: OwnedDevice) -> Dict[str, Any]:
    """What list says of a device: its owner from the uuid, the rest read back where possible."""
    verdict = device.owner.verdict()
    entry: Dict[str, Any] = {
        "name": device.name, "uuid": device.uuid, "kind": device.owner.kind.name.lower(),
        "device": f"/dev/mapper/{device.name}", "owner": device.owner.describe(),
        "state": verdict.value, "stale": verdict is Verdict.STALE,
        "persistent": device.owner.persistent, "owner_pid": device.owner.pid or None,
        "mode": None, "loop_device": None, "image": None,
    }
    try:
        found = _open_any(device.name)
    except DMFlakeyError:
        return entry   # half-made (no table yet) or removed meanwhile: what the uuid tells
    if isinstance(found, Recording):
        entry.update(mode="recording", loop_device=found.data.loop_path, image=found.image_path)
    else:
        entry.update(mode=table_mode(found.table().fault), loop_device=found.loop_device,
                     image=found.image_path)
    return entry


def _cmd_list(args: argparse.Namespace) -> int:
    entries = []
    for device in sorted(list_owned(), key=lambda d: d.name):
        if device.owner.kind is Kind.PROBE:
            continue
        entries.append(_list_entry(device))
    if args.json:
        _print_json(entries)
        return EXIT_OK
    if not entries:
        print("no devices made by dmflakey-ioctl")
        return EXIT_OK
    rows = [("NAME", "KIND", "OWNER")] + [(e["name"], e["kind"], e["owner"]) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[2])
    return EXIT_OK


def _cmd_remove(args: argparse.Namespace) -> int:
    dev = open_device(args, _open_any)
    mounted = dev.mount_points()
    dev.teardown()
    for point in mounted:
        print(f"unmounted {point}")
    if isinstance(dev, Recording):
        print(f"removed {dev.name}: {dev.device_path}, data {dev.image_path}, log {dev.log_path}")
    elif dev.image_path:
        print(f"removed {dev.name}: {dev.device_path}, {dev.loop_device}, image {dev.image_path}")
    else:
        print(f"removed {dev.name}: {dev.device_path} (backing device {dev.backing} left as it was)")
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
        raise DMFlakeyError("cleanup", None, f"{len(errors)} device(s) could not be removed: {causes}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run  # sqlite3 and the demo's text are loaded only for the demo
    return run(args.scenario, transactions=args.transactions)


# -- parser --------------------------------------------------------------------------------------

_INTERVAL = integer("interval", 1, U32_MAX, "0 would make the table do nothing; the kernel needs "
                    "a period of at least 1 second")


def _add_switch(sub: Any, common: argparse.ArgumentParser, name: str, help_text: str,
                apply: Callable[[Flakey, argparse.Namespace, Dict[str, Any]], None], *,
                fault: bool = True) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, parents=[common], help=help_text, description=help_text + ".")
    parser.add_argument("name", type=device_name, help="the flakey device")
    if name != "delay":
        parser.add_argument("--interval", type=_INTERVAL, default=DEFAULT_INTERVAL,
                            metavar="SECONDS", help="the mode's interval: dm-flakey's up interval "
                            "for allow-writes, the fault's duration otherwise (default "
                            f"{DEFAULT_INTERVAL})")
    if fault and name != "delay":
        parser.add_argument("--up-interval", type=integer("up interval", 0, U32_MAX), default=0,
                            metavar="SECONDS", help="seconds of normal service before each fault "
                            "period (default 0: the fault starts at once)")
    if fault:
        parser.add_argument("--file", action="append", metavar="PATH",
                            help="fault only this file's blocks (repeatable; the file must be on "
                            "a filesystem mounted from this device)")
        parser.add_argument("--sectors", action="append", type=sector_range, metavar="START+COUNT",
                            help="fault only these 512-byte sectors (repeatable)")
        parser.add_argument("--exclude-file", action="append", metavar="PATH",
                            help="leave this file's blocks alone (repeatable)")
        parser.add_argument("--exclude-sectors", action="append", type=sector_range,
                            metavar="START+COUNT", help="leave these sectors alone (repeatable)")
    parser.add_argument("--sync-fs", action="store_true",
                        help="freeze (and so flush) a mounted filesystem while switching")
    parser.set_defaults(handler=_switch(apply))
    return parser


def _intervals(args: argparse.Namespace) -> Dict[str, Any]:
    return {"interval": args.interval, "up_interval": args.up_interval, "sync_fs": args.sync_fs}


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the device subcommands to the parser's subparsers."""
    create = sub.add_parser("create", parents=[common], help="make a flakey device",
                            description="Make a flakey device over a new image file (--image, "
                            "which needs --size) or over an existing block device (--device); it "
                            "lets all I/O through until a fault is switched on.")
    create.add_argument("name", type=device_name, help="name of /dev/mapper/NAME")
    backing = create.add_mutually_exclusive_group(required=True)
    backing.add_argument("--image", metavar="PATH", help="image file to create (never "
                         "overwritten); needs --size")
    backing.add_argument("--device", metavar="BLOCKDEV", help="existing block device to map (left "
                         "as it is on remove)")
    create.add_argument("--size", type=parse_size, help="image size, required with --image: 512M, "
                        "10G, 64MiB or bytes")
    create.add_argument("--fs", choices=[t.value for t in FSType] + ["none"], default=None,
                        help="filesystem to make on the image (default ext4)")
    create.add_argument("--mkfs-options", metavar="OPTIONS",
                        help='extra mkfs arguments, e.g. --mkfs-options="-b 1024"')
    create.set_defaults(handler=_cmd_create)

    _add_switch(sub, common, "allow-writes", "let all I/O through on the whole device",
                lambda d, a, s: d.allow_writes(interval=a.interval, sync_fs=a.sync_fs), fault=False)
    _add_switch(sub, common, "drop-writes", "acknowledge writes and throw them away",
                lambda d, a, s: d.drop_writes(**_intervals(a), **s))
    _add_switch(sub, common, "error-writes", "fail writes with EIO",
                lambda d, a, s: d.error_writes(**_intervals(a), **s))
    _add_switch(sub, common, "error-reads", "fail reads with EIO (Linux 6.4+)",
                lambda d, a, s: d.error_reads(**_intervals(a), **s))
    corrupt = _add_switch(sub, common, "corrupt-bio-byte", "set one byte of each matching bio",
                          lambda d, a, s: d.corrupt_bio_byte(a.byte, a.direction, a.value, a.flags,
                                                             **_intervals(a), **s))
    corrupt.add_argument("--byte", type=integer("byte", 1, U32_MAX), required=True, metavar="N",
                         help="which byte of the bio (1-based)")
    corrupt.add_argument("--direction", choices=["r", "w"], required=True,
                         help="corrupt reads (data on disk stays intact) or writes")
    corrupt.add_argument("--value", type=integer("value", 0, 255), required=True, metavar="V",
                         help="the byte to put there (0..255, 0x.. accepted)")
    corrupt.add_argument("--flags", type=integer("flags", 0, U32_MAX), default=0, metavar="F",
                         help="only bios with all these bio flags (default 0: every bio)")
    read = _add_switch(sub, common, "random-read-corrupt", "corrupt one random byte of a read "
                       "bio with a probability (Linux 6.5+)",
                       lambda d, a, s: d.random_read_corrupt(a.probability, **_intervals(a), **s))
    write = _add_switch(sub, common, "random-write-corrupt", "corrupt one random byte of a write "
                        "bio with a probability (Linux 6.5+)",
                        lambda d, a, s: d.random_write_corrupt(a.probability, **_intervals(a), **s))
    for switch in (read, write):
        switch.add_argument("--probability", type=parse_probability, required=True, metavar="P",
                            help="0 to 1, or a percentage (0.05, 5%%)")
    delay = _add_switch(sub, common, "delay", "hold reads, writes and flushes back by some "
                        "milliseconds (the delay target; allow-writes ends it)",
                        lambda d, a, s: d.delay(a.read_ms, a.write_ms, a.flush_ms,
                                                sync_fs=a.sync_fs, **s))
    for kind in ("read", "write", "flush"):
        delay.add_argument(f"--{kind}-ms", type=integer(f"{kind} delay", 0, U32_MAX), default=0,
                           metavar="N", help=f"{kind} delay in milliseconds (default 0)")

    status = sub.add_parser("status", parents=[common], help="show a device as the kernel has it",
                            description="Show a device as the kernel has it: for a flakey device its "
                            "backing, image, owner, mounts, mode and every table segment; for a "
                            "recording its images and the entries logged.")
    status.add_argument("name", type=device_name, help="the device")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_cmd_status)

    listing = sub.add_parser("list", parents=[common], help="list the devices dmflakey-ioctl made",
                             description="List the devices dmflakey-ioctl made, of every kind, "
                             "with their owner (alive, stale, persistent or another namespace).")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_cmd_list)

    table = sub.add_parser("table", parents=[common], help="print the kernel's table lines",
                           description="Print the device's live table as the kernel reads it back.")
    table.add_argument("name", type=device_name, help="the flakey device")
    table.set_defaults(handler=_cmd_table)

    remove = sub.add_parser("remove", parents=[common], help="remove a device, its loop device "
                            "and the image it created",
                            description="Remove a device made by dmflakey-ioctl. What is still "
                            "mounted from it is unmounted first, and said so; its loop device goes "
                            "and the image create made is deleted.")
    remove.add_argument("name", type=device_name, help="the device")
    remove.set_defaults(handler=_cmd_remove)

    cleanup = sub.add_parser("cleanup", parents=[common], help="remove what crashed runs left",
                             description="Remove the devices of crashed runs made in this pid "
                             "namespace: their creating process is gone. Devices of other "
                             "namespaces (containers) are never touched.")
    cleanup.add_argument("--all", action="store_true",
                         help="also remove devices made by this command (persistent ones)")
    cleanup.set_defaults(handler=_cmd_cleanup)

    demo = sub.add_parser("demo", parents=[common], help="show a power failure in seconds",
                          description="Show on a throwaway device what survives a power cut.")
    demo.add_argument("--scenario", choices=["files", "sqlite", "rename"], default="files",
                      help="files: a synced and an unsynced file; sqlite: WAL with "
                      "synchronous=FULL vs OFF; rename: every crash state of an atomic save, "
                      "with and without fsync before the rename (default files)")
    demo.add_argument("--transactions", type=integer("transactions", 1, 100000), default=100,
                      metavar="N", help="transactions per database in the sqlite scenario "
                      "(default 100)")
    demo.set_defaults(handler=_cmd_demo)


def check_create(args: argparse.Namespace, usage: Callable[[str], Exception]) -> None:
    """What argparse cannot say about create's options."""
    if args.device and (args.size is not None or args.fs is not None or args.mkfs_options):
        raise usage(f"{PROG} create: --size, --fs and --mkfs-options go with --image only")
    if args.fs == "none" and args.mkfs_options:
        raise usage(f"{PROG} create: --mkfs-options needs a filesystem, not --fs none")
    if args.image and args.size is None:
        raise usage(f"{PROG} create: --image needs --size (e.g. --size 512M)")
    if args.image and args.fs is None:
        args.fs = FSType.EXT4.value
