"""The architecture, enforced: pure analysis does no I/O, and `tuner` never imports Locust
(it monkey-patches the process with gevent on import)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TUNER = Path(__file__).parents[1] / "tuner"
#: what touches processes, sockets, HTTP, files-as-databases or the cluster
IO_MODULES = ("subprocess", "socket", "selectors", "ssl", "http", "httpx", "urllib.request",
              "sqlite3", "kubernetes", "locust", "gevent", "tuner.lab", "tuner.load",
              "tuner.kube", "tuner.store", "tuner.probe", "tuner.experiment", "tuner.sidecar")


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function ("from a import b"
    counts as both a and a.b: b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(TUNER.parent).with_suffix("").parts).removesuffix(
        ".__init__")


def test_analysis_is_pure() -> None:
    modules = sorted((TUNER / "analysis").glob("*.py"))
    assert len(modules) >= 6
    for module in modules:
        for name in _imports(module):
            assert not any(name == io or name.startswith(io + ".") for io in IO_MODULES), \
                f"{module.name} imports {name}"


def test_no_import_circles() -> None:
    """A module that imports another, even inside a function, must not be imported back
    through any chain: circles hide which layer depends on which."""
    modules = {_module_name(p): p for p in TUNER.rglob("*.py")}
    graph = {name: sorted(m for m in _imports(path) if m in modules and m != name)
             for name, path in modules.items()}
    for start in graph:
        # depth-first from each module: a path back to it is a circle
        stack = [(start, [start])]
        seen = set()
        while stack:
            name, path = stack.pop()
            for nxt in graph[name]:
                assert nxt != start, "import circle: " + " -> ".join([*path, start])
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))


def test_tuner_never_imports_locust() -> None:
    modules = [".".join(p.relative_to(TUNER.parent).with_suffix("").parts)
               for p in TUNER.rglob("*.py") if p.name != "locust_keepalive.py"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('locust', 'gevent')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"
