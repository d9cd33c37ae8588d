"""What the benchmark scripts share: the machine they ran on, the order of the ways in a round,
and the verdict at the end.  Standard library only.

A sibling module: a script run as ``python3 scripts/X.py`` has scripts/ first on sys.path,
whatever the working directory.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TypeVar

T = TypeVar("T")


def machine() -> Dict[str, str]:
    """Where the figures come from: host name, Python version, kernel release."""
    return {"host": platform.node(), "python": platform.python_version(),
            "kernel": platform.release()}


def rotated(names: Sequence[T], round_index: int) -> List[T]:
    """names starting at a later one each round, so that a slow phase of a shared machine hits
    every way alike."""
    first = round_index % len(names)
    return list(names[first:]) + list(names[:first])


def verdict(results: Dict[str, object], missed: List[str], out: Optional[str]) -> int:
    """Record the missed targets in results, write results as JSON to out (when given) and print
    the verdict; the exit status: 1 when a target was missed, else 0."""
    results["missed"] = missed
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
    if missed:
        print("MISSED: " + "; ".join(missed))
        return 1
    print("all targets met")
    return 0
