"""Subcommands for recording writes and using the log: record, mark, stop, log, replay, explore."""

from __future__ import annotations

import argparse
import json
import os
import shlex
from typing import Any, Union

from ..fs import FSType
from ..userprog import require_program, run_user_program
from ..recording import DEFAULT_RECORDING_SIZE, open_recording, record_writes_to
from ..writelog import WriteLog
from .args import device_name, integer, parse_size
from .devices import open_device

__all__ = ["register"]

EXIT_OK, EXIT_FAILED = 0, 1


def _entry_or_label(text: str) -> Union[int, str]:
    """An entry index (a decimal number) or a mark label."""
    return int(text) if text.isdigit() else text


def _cmd_record(args: argparse.Namespace) -> int:
    fs_type = None if args.fs == "none" else args.fs
    rec = record_writes_to(args.name, args.image, args.log, fs_type, args.size, args.log_size,
                           args.mkfs_options, block_size=args.block_size, persistent=True)
    print(f"recording {rec.name}: {rec.device_path}, data {rec.image_path}, log {rec.log_path}, "
          f"{rec.entries} entries so far")
    return EXIT_OK


def _cmd_mark(args: argparse.Namespace) -> int:
    rec = open_device(args, open_recording)
    rec.mark(args.label)
    print(f"{rec.name}: mark {args.label} ({rec.entries} entries)")
    return EXIT_OK


def _cmd_stop(args: argparse.Namespace) -> int:
    rec = open_device(args, open_recording)
    mounted = rec.mount_points()
    log = rec.stop()
    try:
        for point in mounted:
            print(f"unmounted {point}")
        print(f"stopped {rec.name}: log {log.path} ({len(log)} entries), data {rec.image_path}")
    finally:
        log.close(keep=True)
    return EXIT_OK


def _cmd_log(args: argparse.Namespace) -> int:
    with WriteLog.open(args.path) as log:
        entries = [log[i] for i in log.mark_points()] if args.marks else list(log)
        if args.json:
            print(json.dumps({"path": log.path, "sector_size": log.sector_size,
                              "entries": len(log), "nr_entries": log.nr_entries,
                              "entries_beyond_count": log.entries_beyond_count,
                              "device_size": log.device_size, "marks": log.marks,
                              "list": [e.as_dict() for e in entries]}, indent=2))
            return EXIT_OK
        print(f"{log.path}: {len(log)} entries, {log.sector_size}-byte sectors, device "
              f"{log.device_size} bytes" + (f" ({log.entries_beyond_count} beyond the super "
                                            "block's count)" if log.entries_beyond_count else ""))
        for entry in entries:
            print(entry.describe())
    return EXIT_OK


def _cmd_replay(args: argparse.Namespace) -> int:
    with WriteLog.open(args.path) as log:
        until = log.index_of(args.until) if args.until is not None else len(log) - 1
        if not os.path.exists(args.to) and args.start == 0:
            log.materialize(until, args.to)
            print(f"{args.to}: a new image of {log.device_size} bytes with entries 0..{until}")
            return EXIT_OK
        done = log.replay(args.to, until=until, start=args.start)
        print(f"{args.to}: entries {args.start}..{until} replayed ({done})")
    return EXIT_OK


def _points(text: str) -> Union[str, int, list]:
    """flush, fua, mark, entry, N (every Nth entry) or a list of entries: 3,17,40."""
    if text in ("flush", "fua", "mark", "entry"):
        return text
    try:
        if "," in text:
            return [int(part) for part in text.split(",") if part]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad points {text!r}: use flush, fua, mark, entry, a "
                                         "number N (every Nth entry) or a list like 3,17,40") from None


def _cmd_explore(args: argparse.Namespace) -> int:
    from ..explorer import explore
    check_argv = shlex.split(args.check)
    fsck = shlex.split(args.fsck) if args.fsck else None
    require_program(check_argv, "explore")   # a typo fails now, not as every state failing
    if fsck:
        require_program(fsck, "explore")

    def check(mount_point: str) -> None:
        status, output = run_user_program(check_argv + [mount_point], "explore")
        if status != 0:
            raise AssertionError(f"{args.check} exited with status {status}: "
                                 + " | ".join(output.strip().splitlines()[-5:]))

    with WriteLog.open(args.path) as log:
        report = explore(log, check, points=args.points, after=args.after,
                         mount_options=args.mount_options, fsck=fsck, reorder=args.reorder,
                         seed=args.seed, stop_on_failure=args.stop_on_failure)
    if args.html:
        report.write_html(args.html)
    if args.json:
        print(report.to_json(indent=2))
    else:
        print(report.summary())
        if report.failures:
            print(report.describe_failures())
        if args.html:
            print(f"HTML report: {args.html}")
    return EXIT_OK if not report.failures else EXIT_FAILED


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the recording and log subcommands to the parser's subparsers."""
    record = sub.add_parser("record", parents=[common], help="make a device that logs every write",
                            description="Make a recording device over a new data image and a new "
                            "log image (dm log-writes): mkfs runs on it, so the log holds the "
                            "filesystem's whole history; the device stays until `stop`.")
    record.add_argument("name", type=device_name, help="name of /dev/mapper/NAME")
    record.add_argument("--image", required=True, metavar="PATH", help="data image to create")
    record.add_argument("--log", required=True, metavar="PATH", help="log image to create")
    record.add_argument("--size", type=parse_size, default=DEFAULT_RECORDING_SIZE,
                        help="data image size (default 256M)")
    record.add_argument("--log-size", type=parse_size, default=None,
                        help="log image size (default twice --size; sparse)")
    record.add_argument("--fs", choices=[t.value for t in FSType] + ["none"], default="ext4",
                        help="filesystem to make on the recording device (default ext4)")
    record.add_argument("--mkfs-options", metavar="OPTIONS", help="extra mkfs arguments")
    record.add_argument("--block-size", type=int, choices=[512, 4096], default=None,
                        help="logical block size of the device (4096: a 4Kn disk)")
    record.set_defaults(handler=_cmd_record)

    mark = sub.add_parser("mark", parents=[common], help="log a named mark on a recording",
                          description="Log a mark: a point `replay --until LABEL` stops at.")
    mark.add_argument("name", type=device_name, help="the recording device")
    mark.add_argument("label", help="one word, no spaces or backslashes")
    mark.set_defaults(handler=_cmd_mark)

    stop = sub.add_parser("stop", parents=[common], help="end a recording, keeping both images",
                          description="Unmount the recording device if mounted, remove it (the "
                          "log gets its last entries) and keep the data and log images.")
    stop.add_argument("name", type=device_name, help="the recording device")
    stop.set_defaults(handler=_cmd_stop)

    log = sub.add_parser("log", parents=[common], help="list a write log's entries",
                         description="List the entries of a dm-log-writes log (a file or a block "
                         "device; any tool's log): index, sector, size, flags, label.")
    log.add_argument("path", help="the log")
    log.add_argument("--json", action="store_true", help="print JSON")
    log.add_argument("--marks", action="store_true", help="only the marks")
    log.set_defaults(handler=_cmd_log, needs_kernel=False)

    replay = sub.add_parser("replay", parents=[common], help="rebuild a disk state from a log",
                            description="Apply the log's entries FROM..UNTIL (inclusive) onto a "
                            "block device or an image file; a path that does not exist becomes a "
                            "new sparse image of the recorded device's size.")
    replay.add_argument("path", help="the log")
    replay.add_argument("--to", required=True, metavar="TARGET", help="device or image file")
    replay.add_argument("--until", type=_entry_or_label, metavar="N|LABEL",
                        help="last entry to apply: an index or a mark label (default: all)")
    replay.add_argument("--from", dest="start", type=integer("entry", 0, 2**63), default=0,
                        metavar="N", help="first entry to apply (default 0)")
    replay.set_defaults(handler=_cmd_replay, needs_kernel=False)


    explore = sub.add_parser("explore", parents=[common], help="check every crash state of a log",
                             description="Rebuild the disk at every crash point of a write log, "
                             "mount each state on a throwaway snapshot and run a check command on "
                             "it (the mount point is its last argument; exit 0 means the state is "
                             "good). Exit status 1 when a state failed.")
    explore.add_argument("path", help="the log")
    explore.add_argument("--check", required=True, metavar="CMD",
                         help="the check command, e.g. --check 'sh -c \"test -s $0/config\"'")
    explore.add_argument("--points", type=_points, default="flush",
                         help="flush (default), fua, mark, entry, N (every Nth entry) or a list "
                         "3,17,40")
    explore.add_argument("--after", type=_entry_or_label, metavar="N|LABEL",
                         help="only points after this entry or mark (default: the mkfs mark)")
    explore.add_argument("--mount-options", default="", metavar="OPTIONS",
                         help="mount options for each state")
    explore.add_argument("--fsck", metavar="CMD", help="a checker run on each state before the "
                         "mount, the device appended, e.g. --fsck 'e2fsck -fn'")
    explore.add_argument("--reorder", type=integer("reorder", 0, 1000), default=0, metavar="K",
                         help="also up to K states per point with only some unflushed writes")
    explore.add_argument("--seed", type=int, default=0, help="seed of the reorder subsets")
    explore.add_argument("--stop-on-failure", action="store_true", help="stop at the first bad "
                         "state")
    explore.add_argument("--html", metavar="PATH", help="write the HTML report here")
    explore.add_argument("--json", action="store_true", help="print the report as JSON")
    explore.set_defaults(handler=_cmd_explore)
