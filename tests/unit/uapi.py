"""The kernel's UAPI headers as gcc sees them: sizes, offsets and constants, for layout tests.

A probe program is generated, compiled and run; its answers are the oracle the
library's struct formats are checked against (not the library, not the notes).
A missing compiler or header fails: skipping would pass a run that checked no
layout at all.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import textwrap
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Set, Tuple

import pytest


def _lines(c_fields: Dict[str, List[str]], flexible: Set[Tuple[str, str]], constants: Iterable[str],
           optional: Iterable[str]) -> List[str]:
    lines = []
    for struct_name, fields in c_fields.items():
        lines.append(f'P("sizeof {struct_name}", sizeof(struct {struct_name}));')
        for field in fields:
            lines.append(f'P("offset {struct_name}.{field}", offsetof(struct {struct_name}, {field}));')
            if (struct_name, field) not in flexible:
                lines.append(f'P("size {struct_name}.{field}", sizeof(((struct {struct_name} *)0)->{field}));')
    lines.extend(f'P("const {name}", {name});' for name in constants)
    lines.extend(f'#ifdef {name}\n    P("const {name}", {name});\n#endif' for name in optional)
    return lines


def probe(folder: Path, headers: Sequence[Path], c_fields: Dict[str, List[str]],
          flexible: Set[Tuple[str, str]], constants: Iterable[str],
          optional: Iterable[str] = ()) -> Dict[str, int]:
    """"sizeof S", "offset S.f", "size S.f" and "const NAME" values from the headers.

    Flexible array members get an offset only; optional constants appear only
    when the installed headers define them.
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is not installed: `make deps` installs it (Debian package gcc)")
    missing = [str(h) for h in headers if not h.exists()]
    if missing:
        pytest.fail(f"kernel UAPI headers missing: {', '.join(missing)}: `make deps` installs them "
                    "(Debian package linux-libc-dev)")
    includes = "\n".join(f"#include <{h.relative_to('/usr/include')}>" for h in headers)
    body = "\n    ".join(_lines(c_fields, flexible, constants, optional))
    source = textwrap.dedent("""\
        #include <stddef.h>
        #include <stdio.h>
        #include <sys/ioctl.h>
        @INCLUDES@
        #define P(label, value) printf("%s %llu\\n", label, (unsigned long long)(value))
        int main(void) {
            @BODY@
            return 0;
        }
        """).replace("@INCLUDES@", includes).replace("@BODY@", body)
    (folder / "layout.c").write_text(source)
    build = subprocess.run([gcc, "-Wall", "-Werror", "-o", str(folder / "layout"), str(folder / "layout.c")],
                           capture_output=True, text=True)
    assert build.returncode == 0, f"compiling the layout probe failed:\n{build.stderr}"
    run = subprocess.run([str(folder / "layout")], capture_output=True, text=True, check=True)
    return {label: int(value) for label, value in (line.rsplit(" ", 1) for line in run.stdout.splitlines())}


def layout(fmt: str, groups: List[int]) -> List[Tuple[int, int]]:
    """(offset, size) of each C field of a struct format, field i taking groups[i] struct items."""
    items = []
    offset = 0
    for count, code in re.findall(r"(\d*)([a-zA-Z])", fmt):
        n = int(count or 1)
        sizes = [n] if code == "s" else [struct.calcsize("=" + code)] * n
        for size in sizes:
            items.append((offset, size))
            offset += size
    assert sum(groups) == len(items), f"{fmt}: {len(items)} items, fields take {sum(groups)}"
    out, i = [], 0
    for g in groups:
        out.append((items[i][0], sum(size for _, size in items[i:i + g])))
        i += g
    return out


def assert_fields(c: Dict[str, int], struct_name: str, fields: List[str],
                  fields_layout: List[Tuple[int, int]], base: int = 0) -> None:
    """Each field's (offset + base, size) is what the header says."""
    for field, (offset, size) in zip(fields, fields_layout):
        assert (offset + base, size) == (c[f"offset {struct_name}.{field}"], c[f"size {struct_name}.{field}"]), \
            f"struct {struct_name}.{field}: library has offset {offset + base} size {size}, " \
            f"the header says offset {c[f'offset {struct_name}.{field}']} size {c[f'size {struct_name}.{field}']}"
