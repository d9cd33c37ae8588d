"""The README's example runs as written, against the real kernel: with this interpreter, and with
the oldest Python >= 3.9 on the machine (requires-python says 3.9)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import subprocess
from pathlib import Path

from .helpers import dm_names

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def oldest_python() -> str:
    """scripts/pythons' choice: the oldest interpreter >= 3.9 there is (this one at worst)."""
    loader = importlib.machinery.SourceFileLoader("pythons", str(REPO / "scripts" / "pythons"))
    spec = importlib.util.spec_from_loader("pythons", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module.oldest()


def test_readme_example_runs_and_leaves_nothing():
    blocks = python_blocks(README.read_text())
    assert blocks, "the README has no python example"
    before = dm_names()
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})
    assert dm_names() == before


def test_readme_example_runs_under_the_oldest_python(tmp_path):
    python = oldest_python()
    code = "import sys; print('python', *sys.version_info[:2])\n" + "\n".join(python_blocks(README.read_text()))
    before = dm_names()
    proc = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, f"{python}: {proc.stdout}{proc.stderr}"
    major, minor = map(int, proc.stdout.split()[1:3])
    assert (major, minor) >= (3, 9)
    print(f"README example ran under {python} ({major}.{minor})")
    assert dm_names() == before
