"""Layer rules that import-linter does not express: sibling services and the pure core.

The agencies are separate services run by separate organizations: neither may import the
other.  The core (crypto, domain, policy, engines, sessions, accounting) is sans-I/O: it
starts no processes or threads, opens no files or sockets and reads no clock; the clock is
injected (docs/architecture.md, Layers; Clock and time).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ("crypto", "domain", "policy", "engines", "sessions", "accounting", "report")

#: Modules whose import alone means I/O, processes or a user interface.
FORBIDDEN_MODULES = frozenset({
    "argparse", "asyncio", "concurrent.futures", "multiprocessing", "shutil", "socket",
    "sqlite3", "subprocess", "tempfile",
})
#: Calls that start threads, touch files or read the wall clock.
FORBIDDEN_CALLS = frozenset({
    "open", "date.today", "datetime.now", "datetime.utcnow", "datetime.today", "time.time",
    "threading.Thread", "os.replace", "os.fsync", "os.open", "os.fdopen",
})
FORBIDDEN_METHODS = frozenset({"write_text", "write_bytes", "read_text", "read_bytes"})


def _python_files(*parts: str) -> list[Path]:
    return sorted(ROOT.joinpath(*parts).rglob("*.py"))


def _imported(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize(("service", "sibling"), [("agency_a", "agency_b"),
                                                  ("agency_b", "agency_a")])
def test_an_agency_never_imports_the_other(service: str, sibling: str) -> None:
    offending = [
        f"{_relative(path)}:{line} imports {name}"
        for path in _python_files(service)
        for line, name in _imported(ast.parse(path.read_text(encoding="utf-8")))
        if name == sibling or name.startswith(f"{sibling}.")
    ]
    assert offending == []


@pytest.mark.parametrize("layer", CORE)
def test_the_core_does_no_io_and_reads_no_clock(layer: str) -> None:
    offending = []
    for path in _python_files("protocol", layer):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for line, name in _imported(tree):
            if name in FORBIDDEN_MODULES or name.split(".")[0] in FORBIDDEN_MODULES:
                offending.append(f"{_relative(path)}:{line} imports {name}")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            method = node.func.attr if isinstance(node.func, ast.Attribute) else None
            if name is not None and (name in FORBIDDEN_CALLS
                                     or any(name.endswith(f".{c}") for c in FORBIDDEN_CALLS)):
                offending.append(f"{_relative(path)}:{node.lineno} calls {name}")
            elif method in FORBIDDEN_METHODS:
                offending.append(f"{_relative(path)}:{node.lineno} calls .{method}()")
    assert offending == []
