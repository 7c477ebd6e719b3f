"""The package's layout rules (ARCHITECTURE.md): no import cycle, the library never imports the
application, ``import gradlora`` loads no CLI or plotting code, no function-level import of
gradlora code, files under 400 lines, and ARCHITECTURE.md names every module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "gradlora"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, ast.AST, bool]]:
    """(imported gradlora module, node, inside a function) for every import in the module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inside |= {id(n) for n in ast.walk(node) if n is not node}
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub where there is one
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            targets = subs or [base]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("gradlora"):
                found.append((target, node, id(node) in inside))
    return found


GRAPH = {name: {t for t, _, _ in _imports(name, path)} - {name} for name, path in MODULES.items()}


def test_no_import_cycle_lazy_imports_included():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def _application(name: str) -> bool:
    """The ``gradlora`` command: gradlora.cli and ``python -m gradlora`` (never imported by the
    library)."""
    return name.startswith("gradlora.cli") or name == "gradlora.__main__"


def test_the_library_never_imports_the_application():
    offenders = [
        (name, target)
        for name, targets in GRAPH.items()
        if not _application(name)
        for target in targets
        if target.startswith("gradlora.cli")
    ]
    assert offenders == []


def test_no_function_level_import_of_gradlora_and_late_imports_explained():
    for name, path in MODULES.items():
        for target, node, lazy in _imports(name, path):
            assert not lazy, f"{name} line {node.lineno} imports {target} inside a function"
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    here = lines[node.lineno - 1] + lines[node.lineno - 2]
                    assert "#" in here, (
                        f"{name} line {node.lineno}: a late import needs a comment saying why"
                    )


def test_import_gradlora_loads_the_library_only():
    code = (
        "import sys, gradlora; "
        "bad = sorted(m for m in sys.modules if m.startswith(('gradlora.cli', 'matplotlib'))); "
        "print(repr(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_files_stay_under_400_lines():
    files = [
        *PACKAGE.rglob("*.py"),
        *(ROOT / "tests").glob("*.py"),
        *(ROOT / "benchmarks").glob("*.py"),
    ]
    long = {
        str(f.relative_to(ROOT)): n
        for f in files
        if (n := len(f.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_architecture_md_names_every_module():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    missing = [
        str(p.relative_to(ROOT)) for p in MODULES.values() if str(p.relative_to(ROOT)) not in text
    ]
    assert missing == []


def test_the_repository_is_self_contained():
    for doc in ("README.md", "ARCHITECTURE.md", "docs/algorithms.md", "docs/benchmarks.md"):
        text = (ROOT / doc).read_text()
        assert "../shared" not in text, f"{doc} links outside the repository"
    assert "Apache License" in (ROOT / "LICENSE").read_text()
