"""The package layout the README describes: no import cycles between hf_compress modules (function-level imports
counted, ``if TYPE_CHECKING:`` blocks not: they never run), at most 8 modules directly in hf_compress/, and no
module over 350 lines."""

from __future__ import annotations

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[2] / "hf_compress"
MAX_ROOT_MODULES = 8
MAX_LINES = 350


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import statement at any depth, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(name: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The hf_compress modules an import statement runs: the named module (or submodule for ``from pkg import
    sub``) and the packages above it that are not already above the importer."""
    if isinstance(node, ast.Import):
        named = [a.name for a in node.names]
    else:
        if node.level:
            base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        named = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
    out = set()
    own = name.split(".")
    for target in named:
        if not target.startswith("hf_compress"):
            continue
        parts = target.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if own[:i] == parts[:i] and mod != target:
                continue  # a package above the importer is already running
            out.add(mod)
    out.discard(name)
    out.discard("hf_compress")  # the root package runs before any of its modules; it imports them, not vice versa
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = set().union(*(_targets(name, path, n, modules) for n in _imports(tree)))
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, on, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles between hf_compress modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_every_internal_import_names_a_module():
    """A moved module leaves no import of its old path behind (a lazy one would fail only when it runs)."""
    modules = _modules()
    missing = []
    for name, path in modules.items():
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                wanted = [a.name for a in node.names]
            elif node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                wanted = [".".join(base + ([node.module] if node.module else []))]
            else:
                wanted = [node.module or ""]
            missing += [f"{name}:{node.lineno} {w}" for w in wanted if w.startswith("hf_compress") and w not in modules]
    assert not missing, missing


def test_at_most_eight_root_modules():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def test_no_module_over_350_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
