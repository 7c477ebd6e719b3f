"""The package's layout rules (ARCHITECTURE.md): the wings import in one direction only, no
import cycle, the library never imports the application, ``import gradlora`` loads no CLI or
plotting code, no function-level import of gradlora code, files under 400 lines and functions
under 120, ARCHITECTURE.md names every module, and every relative link in the docs resolves."""

from __future__ import annotations

import ast
import re
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

# The wings, from the top: a module imports from its own wing and the wings below it only.
# init and optim share a level and never import each other.
HELPERS = ("errors", "precision", "meter", "atomic", "flags", "rates", "_version")
WINGS = [
    ("application", ("cli", "__main__")),
    ("public API", ("",)),  # gradlora/__init__.py
    ("integrations", ("integrations",)),
    ("init", ("init",)),
    ("optim", ("optim",)),
    ("adapter", ("adapter",)),
    ("peft_view", ("peft_view",)),
    ("parallel", ("parallel",)),
    ("helpers", HELPERS),
]
LEVEL = {"application": 0, "public API": 1, "integrations": 2, "init": 3, "optim": 3}
LEVEL |= {"adapter": 4, "peft_view": 5, "parallel": 6, "helpers": 7}


def wing_of(module: str) -> str:
    """The wing of a module, e.g. "init" for gradlora.init.capture."""
    rest = module.removeprefix("gradlora").removeprefix(".")
    top = rest.split(".")[0]
    for wing, tops in WINGS:
        if top in tops:
            return wing
    raise AssertionError(f"{module} belongs to no wing of ARCHITECTURE.md")


def test_every_module_has_a_wing_and_imports_only_downward():
    wrong = []
    for name, targets in GRAPH.items():
        mine = wing_of(name)
        for target in targets:
            theirs = wing_of(target)
            if theirs == mine:
                continue
            if LEVEL[theirs] <= LEVEL[mine]:  # upward, or a sibling (init <-> optim)
                wrong.append(f"{name} ({mine}) imports {target} ({theirs})")
    assert wrong == []


def test_the_wing_rule_is_not_vacuous():
    """The graph the rule checks holds the edges the layout relies on (a broken import parser
    would pass the rule with an empty graph)."""
    assert "gradlora.adapter.offset" in GRAPH["gradlora.init.initialize"]
    assert "gradlora.parallel.sharding" in GRAPH["gradlora.peft_view"]
    assert "gradlora.peft_view" in GRAPH["gradlora.optim.pairing"]
    assert wing_of("gradlora.cli.main") == "application" and wing_of("gradlora") == "public API"


def test_functions_stay_under_120_lines():
    long = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1
                if size >= 120:
                    long[f"{name}.{node.name}"] = size
    assert long == {}


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


def _relative_links(text: str) -> list[str]:
    """Targets of Markdown links and images that are not URLs or in-page anchors."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_every_relative_link_in_readme_and_docs_resolves():
    docs = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for doc in docs:
        links = _relative_links(doc.read_text())
        for link in links:
            if not (doc.parent / link.split("#")[0]).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {link}")
    assert broken == []
    assert len(_relative_links((ROOT / "README.md").read_text())) >= 5  # the README links docs/


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_the_repository_is_self_contained():
    for doc in [
        "README.md",
        "ARCHITECTURE.md",
        *sorted(p.name for p in (ROOT / "docs").glob("*.md")),
    ]:
        path = ROOT / doc if (ROOT / doc).exists() else ROOT / "docs" / doc
        text = path.read_text()
        assert "../shared" not in text, f"{doc} links outside the repository"
    assert "Apache License" in (ROOT / "LICENSE").read_text()
