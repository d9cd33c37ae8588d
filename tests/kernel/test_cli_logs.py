"""The recording subcommands as a user runs them: record, mark, status, list, stop, log, replay, remove.

One scenario, because each call is a new Python process (seconds in the
guest).  What the commands say is checked against what the kernel holds (the
device list, the live table, loop bindings), the files on disk, the log read
in-process, and a mount of the replayed image.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from dmflakey_ioctl import mount, umount
from dmflakey_ioctl.errors import DeviceNotFoundError
from dmflakey_ioctl.kernel import dm, loop
from dmflakey_ioctl.recording import open_recording
from dmflakey_ioctl.writelog import END_MARK, WriteLog

from .cli_helpers import fails, ok
from .helpers import dm_names, unique_name, write_file

MiB = 1 << 20


def same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if x != y:
                return False
            if not x:
                return True


def test_record_mark_status_list_stop_log_replay_remove(tmp_path):
    name, other = unique_name("dmfl-rec"), unique_name("dmfl-rec")
    image, log_path = tmp_path / "data.img", tmp_path / "data.log"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        out = ok("record", name, "--image", image, "--log", log_path, "--size", "64M")
        assert f"/dev/mapper/{name}" in out and str(image) in out and str(log_path) in out
        assert name in dm_names() and dm.table(name)[0].target_type == "log-writes"
        assert image.stat().st_size == 64 * MiB and log_path.stat().st_size == 128 * MiB

        open_recording(name).mount(str(mnt))   # the CLI made it, this process uses it
        kept, later = os.urandom(100 * 1024), os.urandom(30 * 1024)
        write_file(mnt / "kept", kept, sync=True)
        assert ok("mark", name, "synced").startswith(f"{name}: mark synced")
        write_file(mnt / "later", later, sync=False)

        status = json.loads(ok("status", name, "--json"))
        assert (status["kind"], status["device"]) == ("recording", f"/dev/mapper/{name}")
        assert (status["image"], status["log"]) == (str(image), str(log_path))
        assert (status["size"], status["log_size"], status["sector_size"]) == (64 * MiB, 128 * MiB, 512)
        assert status["mount_points"] == [str(mnt)] and status["logging_disabled"] is False
        assert status["entries"] > 0 and status["owner"] == "cli (persistent)"
        text = ok("status", name)
        assert re.search(r"^kind:\s+recording$", text, re.M) and str(log_path) in text
        assert re.search(rf"^{re.escape(name)}\s+recording\s+cli \(persistent\)$", ok("list"), re.M)

        assert "mark nope: no such device" in fails(1, "mark", "nope", "x")
        line = fails(1, "mark", name, "two\\words")
        assert f"mark {name}:" in line and "escape" in line

        out = ok("stop", name)
        assert name not in dm_names() and not os.path.ismount(mnt)
        assert image.exists() and log_path.exists()             # both kept
        with WriteLog.open(log_path) as log:
            count = len(log)
            labels = [log[i].label for i in log.mark_points()]
            entries = list(log)
        assert labels == [f"dmflakey-size:{64 * MiB}", "mkfs", "synced", END_MARK]
        assert f"unmounted {mnt}" in out and f"log {log_path} ({count} entries)" in out
        assert f"data {image}" in out

        lines = ok("log", log_path).splitlines()
        assert len(lines) == 1 + count and lines[0].startswith(f"{log_path}: {count} entries")
        for entry, line in zip(entries, lines[1:]):
            words = line.split()
            assert (words[0], words[1], words[2]) == (str(entry.index), "sector", str(entry.sector))
            if entry.label is not None:
                assert words[-1] == entry.label and "MARK" in words
        as_json = json.loads(ok("log", log_path, "--json"))
        assert (as_json["entries"], as_json["sector_size"], as_json["device_size"]) == \
            (count, 512, 64 * MiB)
        assert [e["index"] for e in as_json["list"]] == list(range(count))
        assert as_json["marks"]["synced"] == [e.index for e in entries if e.label == "synced"]
        marks = ok("log", log_path, "--marks").splitlines()[1:]
        assert [line.split()[-1] for line in marks] == labels

        state, reference = tmp_path / "state.img", tmp_path / "reference.img"
        out = ok("replay", log_path, "--to", state, "--until", "synced")
        assert str(state) in out and state.stat().st_size == 64 * MiB
        with WriteLog.open(log_path) as log:
            log.materialize("synced", reference)
        assert same_bytes(state, reference)
        with loop.attach(str(state)) as dev:                    # the kernel's view of the state
            mount(dev.path, str(mnt))
            try:
                assert (mnt / "kept").read_bytes() == kept and not (mnt / "later").exists()
            finally:
                umount(str(mnt))
        for path in (state, reference, image, log_path):
            path.unlink()

        image2, log2 = tmp_path / "other.img", tmp_path / "other.log"
        ok("record", other, "--image", image2, "--log", log2, "--size", "32M")
        rec = open_recording(other)
        loops = [(rec.data.loop_path, rec.data.identity), (rec.log.loop_path, rec.log.identity)]
        rec.mount(str(mnt))
        out = ok("remove", other)
        assert out.splitlines()[0] == f"unmounted {mnt}" and f"removed {other}" in out
        assert other not in dm_names() and not os.path.ismount(mnt)
        assert not image2.exists() and not log2.exists()
        assert all(loop.bound_identity(path) != identity for path, identity in loops)
    finally:
        if os.path.ismount(mnt):
            umount(str(mnt))
        for device in (name, other):
            try:
                open_recording(device).teardown()
            except DeviceNotFoundError:
                pass
