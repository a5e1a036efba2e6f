"""The package's shape, checked from its sources: no import cycle, small modules, no module reaching
into another's private names (docs/design.md, "Layout")."""
import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450


def _modules() -> Dict[str, Path]:
    """Every module of the installed package by dotted name; kernels/ is cure_fast.kernels."""
    found = {}
    for base, package in ((ROOT / "cure_fast", "cure_fast"), (ROOT / "kernels", "cure_fast.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package] + parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> Iterator[Tuple[str, List[str], int]]:
    """(imported module, imported names, line) for every import of module ``name``, at any depth
    (function-level and ``TYPE_CHECKING`` imports included)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base, [alias.name for alias in node.names], node.lineno


def _graph() -> Dict[str, Set[str]]:
    """Edges between the package's modules: to an imported module, or to an imported submodule."""
    edges: Dict[str, Set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for target, names, _ in _imports(name):
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if submodules:
                edges[name].update(submodules)
            if target in MODULES and len(submodules) < len(names) or (target in MODULES and not names):
                edges[name].add(target)
    return edges


def _cycle(edges: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as a list of modules, or [] when there is none."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_the_package():
    edges = _graph()
    assert "cure_fast.engine.bounded" in edges["cure_fast.engine"]
    assert "cure_fast.ops.registry" in edges["cure_fast.kernels.affine"]


def test_modules_are_short():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_private_name_is_imported_from_another_module():
    found = []
    for name in MODULES:
        for target, names, line in _imports(name):
            if not target.startswith("cure_fast"):
                continue
            private = [n for n in names if n.startswith("_") and f"{target}.{n}" not in MODULES]
            if private:
                found.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {', '.join(private)} from {target}")
    assert not found, "\n".join(found)


def test_no_private_attribute_of_another_module_is_used():
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for target, names, _ in _imports(name):
            for n in names:
                if f"{target}.{n}" in MODULES:
                    aliases[n] = f"{target}.{n}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)
