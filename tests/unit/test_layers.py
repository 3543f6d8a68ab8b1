"""The package's shape: imports go one way, layer by layer (README's layer table), and no
module imports one that imports it back, lazily or not."""
from __future__ import annotations

import ast
from pathlib import Path

import vlab

PACKAGE = Path(vlab.__file__).parent
# Each package may import only from the packages listed for it (and from itself).
ALLOWED = {
    "vlab.x86": set(),
    "vlab.kvm": {"vlab.x86"},
    "vlab.accel": {"vlab.x86", "vlab.kvm"},
    "vlab.devices": {"vlab.x86"},
    "vlab.machine": {"vlab.x86", "vlab.kvm", "vlab.accel", "vlab.devices"},
    "vlab.lab": {"vlab.x86", "vlab.kvm", "vlab.accel", "vlab.devices", "vlab.machine"},
    "vlab.widgets": {"vlab.x86", "vlab.kvm", "vlab.accel", "vlab.devices", "vlab.machine",
                     "vlab.lab"},
    "vlab.grading": {"vlab.x86", "vlab.kvm", "vlab.accel", "vlab.devices", "vlab.machine"},
}


def modules() -> dict[str, Path]:
    """vlab's modules by name; a compiled extension counts, with no imports of its own."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    for path in PACKAGE.rglob("*.so"):
        parts = path.relative_to(PACKAGE.parent).parts
        found[".".join(parts[:-1] + (path.name.split(".")[0],))] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every vlab module `name` imports, at the top or inside a function (TYPE_CHECKING
    blocks included: they describe the same dependency)."""
    if path.suffix != ".py":
        return set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + [node.module]) if node.module else ".".join(base)
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known.keys()
            # `from . import name` names submodules (a compiled one may not be built)
            found.update(submodules if submodules or not node.module else {target} & known.keys())
    return found - {name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_layer_imports_only_the_layers_below():
    wrong = []
    for name, targets in graph().items():
        layer = next((p for p in ALLOWED if name == p or name.startswith(p + ".")), None)
        if layer is None:
            continue
        for target in targets:
            other = next((p for p in ALLOWED if target == p or target.startswith(p + ".")), None)
            if other not in (None, layer) and other not in ALLOWED[layer]:
                wrong.append(f"{name} imports {target}")
    assert wrong == []
