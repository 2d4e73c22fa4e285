"""The pure core (grammar, ir, codegen) never touches the system, and imports flow one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE = {"grammar": "bpfilter.grammar", "ir": "bpfilter.ir", "codegen": "bpfilter.codegen"}
# Modules that reach the kernel or other processes; the pure core must not import them.
SYSTEM_MODULES = {"subprocess", "ctypes", "socket", "pyroute2", "fcntl", "mmap", "signal"}
# Which pure package may import which: text -> IR -> instructions.
ALLOWED = {
    "grammar": {"bpfilter.grammar", "bpfilter.ir", "bpfilter.codegen.uapi"},
    "ir": {"bpfilter.ir", "bpfilter.codegen.uapi"},
    "codegen": {"bpfilter.codegen", "bpfilter.ir"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def _pure_files() -> list[tuple[str, Path]]:
    return [(pkg, p) for pkg in PURE for p in sorted((ROOT / pkg).glob("*.py"))]


@pytest.mark.parametrize(("pkg", "path"), _pure_files(), ids=lambda v: str(v))
def test_pure_core_imports(pkg: str, path: Path) -> None:
    problems = []
    for lineno, name in _imports(path):
        top = name.split(".")[0]
        if name.startswith("."):
            problems.append(f"{path.name}:{lineno}: relative import {name!r}; use bpfilter.{pkg}")
        elif top in SYSTEM_MODULES:
            problems.append(f"{path.name}:{lineno}: pure module imports {name!r}")
        elif top in PURE:
            problems.append(f"{path.name}:{lineno}: imports {name!r}; use {PURE[top]}")
        elif top == "bpfilter" and name.count(".") >= 1:
            sub = ".".join(name.split(".")[:2])
            if sub in ("bpfilter.grammar", "bpfilter.ir", "bpfilter.codegen"):
                if not any(name == a or name.startswith(a + ".") for a in ALLOWED[pkg]):
                    problems.append(f"{path.name}:{lineno}: {pkg} may not import {name!r}")
            elif sub != "bpfilter.__version__":
                problems.append(f"{path.name}:{lineno}: pure module imports system layer {name!r}")
    assert not problems, "\n".join(problems)


def test_os_calls_absent_from_pure_core() -> None:
    # os.path and os.environ lookups are harmless; anything that acts on the system is not.
    acting = ("os.system", "os.popen", "os.open(", "os.mount", "os.setns", "os.unshare", "os.fork")
    bad = [
        f"{p.relative_to(ROOT)}: {call}"
        for _, p in _pure_files()
        for call in acting
        if call in p.read_text()
    ]
    assert not bad, "\n".join(bad)
