"""The library runs no program but mkfs.<fs> (and a checker the USER names): a static check.

Every module under dmflakey_ioctl/, subpackages included, is parsed, and every
place that could start a process is found: subprocess, os.system/exec*/spawn*/
posix_spawn*/fork, pty, asyncio subprocesses, multiprocessing, process pools,
and libc's system/exec*/fork/posix_spawn through ctypes; also the lookup of a
program (shutil.which) and an import of subprocess by a string.  Each such
place must be inside a function of ALLOWED.  The runtime side (an audit hook
that sees what is really started while a device is made, used and removed) is
tests/kernel/test_nodes.py::test_no_dmsetup_losetup_or_mount_program_is_needed.
"""

from __future__ import annotations

import ast
import os
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Tuple

PACKAGE = Path(__file__).resolve().parents[2] / "dmflakey_ioctl"

# (module relative to the package, or None for "the one module that defines it", function) -> why
ALLOWED: Dict[Tuple[Optional[str], str], str] = {
    ("fs.py", "mkfs"): "mkfs.<fs>, the one program the library itself needs",
    (None, "run_user_program"): "a checker program whose argv the USER gave (e.g. fsck in the crash "
                                "explorer); it must be defined in one module only",
    (None, "require_program"): "looks up (shutil.which) a checker program the USER named, before "
                               "the explorer runs it for every state; defined in one module only",
}

# module -> its functions that start a process (None: every attribute of the module)
SPAWNERS: Dict[str, Optional[set]] = {
    "subprocess": None,
    "os": {"system", "popen", "posix_spawn", "posix_spawnp", "fork", "forkpty", "execv", "execve",
           "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
           "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"},
    "pty": {"spawn", "fork"},
    "asyncio": {"create_subprocess_exec", "create_subprocess_shell"},
    "multiprocessing": None,
    "concurrent.futures": {"ProcessPoolExecutor"},
    "shutil": {"which"},
}
# attributes that start a process whatever object they are read from (ctypes' libc.system, ...)
LIBC_SPAWNERS = {"system", "popen", "fork", "vfork", "clone", "clone3", "forkpty", "execv", "execve",
                 "execvp", "execvpe", "execl", "execle", "execlp", "fexecve", "execveat", "posix_spawn",
                 "posix_spawnp"}
SPAWN_MODULES = {"subprocess", "pty", "multiprocessing"}
# programs the library promises never to run
FORBIDDEN = {"dmsetup", "losetup", "mount", "umount", "udevadm", "blkid", "modprobe", "blockdev", "fsck",
             "sh", "bash"}

Site = Tuple[str, int, str]   # (enclosing function, line, what)


def spawn_sites(tree: ast.Module) -> List[Site]:
    """Every place in one parsed module that starts a process, names a spawning API or looks up a program."""
    modules: Dict[str, str] = {}     # local name -> module, for `import x` / `import x as y`
    functions: Dict[str, str] = {}   # local name -> "module.attr", for `from x import attr`
    sites: List[Site] = []

    def spawning(module: str, attr: str) -> bool:
        return module in SPAWNERS and (SPAWNERS[module] is None or attr in SPAWNERS[module])  # type: ignore

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    modules[alias.asname or alias.name.split(".")[0]] = \
                        alias.name if alias.asname else alias.name.split(".")[0]
                    if alias.name.split(".")[0] in SPAWN_MODULES:
                        sites.append((function, child.lineno, f"import {alias.name}"))
            elif isinstance(child, ast.ImportFrom) and child.module:
                for alias in child.names:
                    functions[alias.asname or alias.name] = f"{child.module}.{alias.name}"
                    if child.module.split(".")[0] in SPAWN_MODULES or spawning(child.module, alias.name):
                        sites.append((function, child.lineno, f"from {child.module} import {alias.name}"))
            elif isinstance(child, ast.Attribute):
                base = child.value
                dotted = None
                if isinstance(base, ast.Name):
                    dotted = modules.get(base.id) or functions.get(base.id)
                elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
                    root = modules.get(base.value.id)
                    dotted = f"{root}.{base.attr}" if root else None
                if dotted is not None and spawning(dotted, child.attr):
                    sites.append((function, child.lineno, f"{dotted}.{child.attr}"))
                elif child.attr in LIBC_SPAWNERS and dotted is None:
                    sites.append((function, child.lineno, f"<object>.{child.attr}"))
            elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load) and child.id in functions:
                module, _, attr = functions[child.id].rpartition(".")
                if spawning(module, attr):
                    sites.append((function, child.lineno, functions[child.id]))
            elif isinstance(child, ast.Call) and isinstance(child.func, (ast.Name, ast.Attribute)):
                called = child.func.id if isinstance(child.func, ast.Name) else child.func.attr
                if called in ("import_module", "__import__") and child.args and \
                        isinstance(child.args[0], ast.Constant) and \
                        str(child.args[0].value).split(".")[0] in SPAWN_MODULES:
                    sites.append((function, child.lineno, f"{called}({child.args[0].value!r})"))
            visit(child, function)

    visit(tree, "<module>")
    return sites


def parse_package() -> Dict[str, ast.Module]:
    return {m.relative_to(PACKAGE).as_posix(): ast.parse(m.read_text(), str(m))
            for m in sorted(PACKAGE.rglob("*.py"))}


def defined_functions(tree: ast.Module) -> set:
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def disallowed(trees: Dict[str, ast.Module]) -> Dict[str, List[Site]]:
    """The sites outside ALLOWED, per module."""
    owners = {function: [name for name, tree in trees.items() if function in defined_functions(tree)]
              for module, function in ALLOWED if module is None}
    out = {}
    for name, tree in trees.items():
        allowed_here = {function for (module, function) in ALLOWED
                        if module == name or (module is None and owners[function] == [name])}
        bad = [site for site in spawn_sites(tree)
               if site[0] not in allowed_here
               # a module that holds an allowed function may import the spawning module at its top
               and not (site[0] == "<module>" and allowed_here and site[2].startswith(("import ", "from ")))]
        if bad:
            out[name] = bad
    return out


# --------------------------------------------------------------------------- the package itself

def test_every_module_of_the_package_is_checked():
    on_disk = {os.path.relpath(os.path.join(folder, f), PACKAGE).replace(os.sep, "/")
               for folder, _dirs, files in os.walk(PACKAGE) for f in files if f.endswith(".py")}
    trees = parse_package()
    assert set(trees) == on_disk
    assert {"fs.py", "flakey.py", "cli/__init__.py", "kernel/dm.py", "kernel/loop.py", "kernel/nodes.py",
            "kernel/mountinfo.py", "tables/flakey.py"} <= set(trees)


def test_the_package_starts_processes_only_where_allowed():
    trees = parse_package()
    assert not disallowed(trees), f"process-starting code outside {sorted(map(str, ALLOWED))}: {disallowed(trees)}"
    # the allow-list is not stale: mkfs is where the package runs its one program
    assert any(site[0] == "mkfs" and site[2] == "subprocess.run" for site in spawn_sites(trees["fs.py"]))
    # at most one module defines the user-program runner, so its entry cannot be borrowed
    runners = [name for name, tree in trees.items() if "run_user_program" in defined_functions(tree)]
    assert len(runners) <= 1, runners


def test_the_kernel_layer_starts_nothing_at_all():
    trees = parse_package()
    for name in trees:
        if name.startswith(("kernel/", "tables/")):
            assert spawn_sites(trees[name]) == [], name


def test_mkfs_runs_the_program_it_looked_up_as_mkfs_fs():
    source = (PACKAGE / "fs.py").read_text()
    mkfs = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == "mkfs")
    text = ast.get_source_segment(source, mkfs)
    assert text is not None and 'f"mkfs.{' in text


def test_no_spawning_call_names_a_forbidden_program():
    for name, tree in parse_package().items():
        lines = {line for _, line, _ in spawn_sites(tree)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.lineno in lines:
                words = {os.path.basename(c.value.split(" ", 1)[0]) for c in ast.walk(node)
                         if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value.strip()}
                assert not words & FORBIDDEN, f"{name}:{node.lineno} runs {words & FORBIDDEN}"


# --------------------------------------------------------------------------- the checker can fail

def sites_of(source: str) -> List[Site]:
    return spawn_sites(ast.parse(textwrap.dedent(source)))


def test_the_checker_finds_every_way_to_start_a_process():
    found = sites_of("""
        import subprocess as sp, os, pty
        import ctypes
        import multiprocessing
        from os import posix_spawn as ps
        from concurrent.futures import ProcessPoolExecutor
        from importlib import import_module

        def a(): sp.run(["dmsetup", "ls"])
        def b(): os.system("losetup -a")
        def c(): ps("/sbin/udevadm", ["udevadm"], {})
        def d(): pty.spawn("sh")
        def e(): ctypes.CDLL(None).system(b"mount /x")
        def f(): runner = sp.Popen; runner(["x"])
        def g(): multiprocessing.Process(target=print).start()
        def h(): ProcessPoolExecutor()
        def i(): import_module("subprocess").run(["x"])
        def j(): os.execvp("blkid", ["blkid"])
        def k():
            from subprocess import check_output
            check_output(["x"])
    """)
    functions = {function for function, _, _ in found}
    assert functions >= set("abcdefghijk"), sorted(found)


def test_the_checker_leaves_harmless_code_alone():
    assert sites_of("""
        import os, fcntl, ctypes
        from os import path
        def a(fd): fcntl.ioctl(fd, 0x4C00, 3); os.register_at_fork(after_in_child=print)
        def b(): return ctypes.CDLL(None, use_errno=True).mount, os.path.join("a", "b"), path.exists("/")
        def c(): return {"system": 1}["system"], os.getpid(), os.open("/dev/null", os.O_RDONLY)
    """) == []


def test_a_process_started_outside_the_allow_list_fails_the_check():
    fs_tree = ast.parse("import subprocess\ndef mkfs(): subprocess.run(['mkfs.ext4'])\n"
                        "def helper(): subprocess.run(['fsck'])\n")
    other = ast.parse("def run_user_program(argv):\n    import subprocess\n    subprocess.run(argv)\n")
    assert disallowed({"fs.py": fs_tree, "check.py": other}) == {
        "fs.py": [("helper", 3, "subprocess.run")]}
    # the user-program entry holds for one module only: a second definition is not covered
    again = ast.parse("def run_user_program(argv):\n    import os\n    os.system(argv)\n")
    assert set(disallowed({"fs.py": fs_tree, "check.py": other, "other.py": again})) == \
        {"fs.py", "check.py", "other.py"}
