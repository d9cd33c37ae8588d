"""The pytest plugin as another project meets it: a session starts by removing what a crashed run left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .helpers import dm_names, unique_name

REPO = str(Path(__file__).resolve().parents[2])

CRASHING_CREATOR = """
import sys
from dmflakey_ioctl import init_flakey
init_flakey(sys.argv[1], sys.argv[2], None, size=1 << 20)
print("ready", flush=True)
sys.stdin.read()
"""

USER_TEST = """
def test_uses_the_fixture(flakey):
    assert flakey.device_path.startswith("/dev/mapper/")
"""


def test_session_start_removes_a_crashed_runs_device(tmp_path):
    name = unique_name("dmfl-crashed")
    child = subprocess.Popen([sys.executable, "-c", CRASHING_CREATOR, name, str(tmp_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert name in dm_names() and (tmp_path / f"{name}.img").exists()

    project = tmp_path / "project"
    project.mkdir()
    (project / "test_user.py").write_text(USER_TEST)
    # this checkout's library and plugin, whichever checkout pip installed (the plugin's entry
    # point resolves the module on sys.path, where PYTHONPATH comes first)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(project)], cwd=project, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    assert f"removed 1 stale device(s) of crashed runs: {name}" in run.stdout
    assert name not in dm_names() and not (tmp_path / f"{name}.img").exists()
