"""The README's example runs as written, against the real kernel."""

from __future__ import annotations

import re
from pathlib import Path

from .helpers import dm_names

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_example_runs_and_leaves_nothing():
    blocks = python_blocks(README.read_text())
    assert blocks, "the README has no python example"
    before = dm_names()
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})
    assert dm_names() == before
