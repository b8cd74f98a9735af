"""House limits, enforced: small modules and functions, no import cycle in the library, no ``sys.path`` edits.

The limits (500 lines a module, 60 lines a function without its docstring) hold for every Python file
of the package and its scripts (``common/``, ``benchmarks/``, ``studies/``, ``finetuned/``, ``tools/``
and the top-level scripts); tests are exempt. An exception needs an entry in :data:`ALLOWED` with its
reason, and the list stays short.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_LINES = 500
FUNCTION_LINES = 60
CODE_ROOTS = ("common", "benchmarks", "studies", "finetuned", "tools")

ALLOWED: dict[str, str] = {}
"""``path`` or ``path:function`` -> why it may exceed its limit."""


def _code_files() -> list[Path]:
    files = [p for root in CODE_ROOTS for p in (REPO / root).rglob("*.py")]
    files += [p for p in REPO.glob("*.py")]
    return sorted(p for p in files if not p.name.startswith("test_") and ".venv" not in p.parts)


def _rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


def _function_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of ``fn`` from its ``def`` to its end, its docstring excluded."""
    n = fn.end_lineno - fn.lineno + 1
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        n -= first.end_lineno - first.lineno + 1
    return n


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, ast.AST]]:
    out = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((prefix + node.name, node))
            out += _functions(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            out += _functions(node, prefix + node.name + ".")
    return out


def test_allow_list_is_short_and_current():
    assert len(ALLOWED) <= 5, "the allow-list is for a few exceptions with a reason, not a second limit"
    for key, why in ALLOWED.items():
        assert why.strip(), f"{key}: give the reason"
        assert (REPO / key.split(":")[0]).is_file(), f"{key}: no such file (remove the entry)"


def test_modules_are_small():
    big = {
        _rel(p): n
        for p in _code_files()
        if (n := len(p.read_text().splitlines())) > MODULE_LINES and _rel(p) not in ALLOWED
    }
    assert not big, f"modules over {MODULE_LINES} lines (split them by what they hold): {big}"


def test_functions_are_short():
    long = {}
    for p in _code_files():
        for name, fn in _functions(ast.parse(p.read_text())):
            n = _function_lines(fn)
            if n > FUNCTION_LINES and f"{_rel(p)}:{name}" not in ALLOWED:
                long[f"{_rel(p)}:{name}"] = n
    assert not long, f"functions over {FUNCTION_LINES} lines without their docstring: {long}"


def _library_modules() -> dict[str, Path]:
    out = {}
    for p in (REPO / "common").rglob("*.py"):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``module -> library modules it imports``, counting every import in the file (inside functions and
    under ``TYPE_CHECKING`` too: a deferred import still ties the two modules together)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_the_library():
    graph = import_graph(_library_modules())
    # a package's __init__ re-exporting its modules is not a cycle; a module importing its package is
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_sys_path_edits():
    tracked = subprocess.run(["git", "ls-files", "*.py", "*.ipynb"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("needs a git checkout")
    bad = [
        f
        for f in tracked.stdout.split()
        if not f.startswith("tests/") and not f.endswith(".ipynb") and "sys.path" in (REPO / f).read_text()
    ]
    assert not bad, f"import the installed package instead of editing sys.path: {bad}"
