"""The import graph of ``src/diffllama`` has no cycles, and no import of a diffllama module hides inside a function
unless it says why.

The graph is read from the source with ``ast`` (nothing is imported): one node per module (``pkg/__init__.py`` is the
node ``pkg``), one edge per ``import diffllama.x`` / ``from diffllama.x import y`` / relative import, whether at
module level or inside a function. ``from pkg import name`` is an edge to the submodule ``pkg.name`` when that file
exists, else to ``pkg`` itself (its ``__init__``). Importing ``a.b.c`` also runs ``a`` and ``a.b``, but those edges
are left out: a package ``__init__`` that re-exports its submodules would otherwise close a cycle with every
submodule, and the rule that matters is that submodules import siblings directly (``from diffllama.config import
X``), never through the package's ``__init__``, which the edge to ``pkg`` does catch.

Function-level imports: an import of a diffllama module inside a function (or method) must carry a comment
``# lazy: <why>`` on its first line. Lazy imports are for startup time or optional dependencies (the CLI loads each
subcommand's modules only when it runs); an import that is lazy only to break a cycle is what this test forbids, and
the cycle check would find it anyway once it moves to the top. Imports of other packages are not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "diffllama"
ROOT = Path(__file__).resolve().parent.parent / "src" / PACKAGE


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    files = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(module: str, path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported diffllama module, line, inside a function) for each import statement of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                source = child.module or ""
                if child.level:
                    source = _resolve_relative(module, path.name == "__init__.py", child.level, child.module)
                for alias in child.names:
                    submodule = f"{source}.{alias.name}"
                    targets.append(submodule if submodule in modules else source)
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    found.append((target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """The import graph (module -> modules it imports) and the unjustified function-level imports."""
    files = _module_files()
    graph: dict[str, set[str]] = {name: set() for name in files}
    unjustified = []
    for module, path in files.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, line, in_function in _imports(module, path, set(files)):
            if target not in files:
                raise AssertionError(f"{path}:{line} imports {target}, which is not a module of the package")
            if target != module:
                graph[module].add(target)
            if in_function and "# lazy:" not in lines[line - 1]:
                unjustified.append(f"{path.relative_to(ROOT.parent)}:{line}: {lines[line - 1].strip()}")
    return graph, unjustified


def _cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(one cycle as a path a -> ... -> a, all the modules of its knot) per strongly connected component of more
    than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [(_cycle_in(graph, component), sorted(component)) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module (by name) of a strongly connected component (breadth first)."""
    start = min(component)
    parents = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & component):
            if nxt == start:
                path = [node]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return path[::-1] + [start]
            if nxt not in parents:
                parents[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"no cycle found in the component {sorted(component)}")


def test_cycle_finder_reports_a_known_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert _cycles(graph) == [(["a", "b", "c", "a"], ["a", "b", "c"])]


def test_relative_and_package_imports_resolve_to_modules(tmp_path):
    path = tmp_path / "__init__.py"
    path.write_text("from . import config\nfrom .config import X\ndef f():\n    from diffllama import Y  # lazy: test\n")
    found = _imports("diffllama", path, {"diffllama", "diffllama.config"})
    assert found == [("diffllama.config", 1, False), ("diffllama.config", 2, False), ("diffllama", 4, True)]


def test_no_import_cycles():
    cycles = _cycles(_graph()[0])
    assert not cycles, "import cycles among diffllama's modules:\n" + "\n".join(
        f"{' -> '.join(cycle)}  (the knot: {', '.join(knot)})" for cycle, knot in cycles)


def test_function_level_imports_say_why():
    unjustified = _graph()[1]
    assert not unjustified, ("imports of diffllama modules inside functions need a '# lazy: <why>' comment on the "
                             "same line (startup time, an optional dependency; never to dodge a cycle):\n"
                             + "\n".join(unjustified))
