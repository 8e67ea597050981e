"""The packages' modules import without cycles, so each can be imported first, alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("proxy", "cache")


def modules() -> dict[str, Path]:
    """Every module of the packages, subpackages included, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(path: Path, known: set[str]) -> set[str]:
    """Modules of ours that a file imports anywhere, `if TYPE_CHECKING:` and functions included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & known


def test_no_module_imports_itself_through_others() -> None:
    """A cycle even of type-only imports ties the modules together; the graph must be a DAG."""
    paths = modules()
    graph = {name: imported(path, set(paths)) - {name} for name, path in paths.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = [*trail[trail.index(name) :], name]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert {"proxy.access.policy", "proxy.registries", "proxy.units"} <= graph["proxy.config"]  # the parse sees imports


def test_each_module_imports_first_in_a_fresh_interpreter() -> None:
    """Imported first, a module in a cycle finds its partner half-initialised and fails."""
    names = [name for name in modules() if name != "proxy.__main__"]  # that one runs the CLI
    script = f"""
import importlib, sys, traceback
failed = []
for name in {names!r}:
    for loaded in [m for m in sys.modules if m.split(".")[0] in {PACKAGES!r}]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=-1).strip().splitlines()[-1])
print("\\n".join(failed))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "", done.stdout
