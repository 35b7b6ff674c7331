"""The package's layout rules, checked on its source (ast, nothing imported):

- imports flow one way: no module imports one that imports it back, directly or through others
  (imports inside functions count: a lazy import is still a dependency);
- no module takes a `_private` name from a module of another package;
- the compiler's stages keep their order: devices (cpu/, cuda/) never import each other, and nothing
  below the registry imports it, tuning or build;
- `forgeml.runtime` imports nothing from the compiler, bench, zoo or targets (except the host CPU check).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "forgeml"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _package_of(module: str) -> str:
    """The package a module belongs to (a package's __init__ belongs to the package itself)."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(importer).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None, ast.AST]]:
    """(imported module, name taken from it or None, node) for every forgeml import in `module`."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node) for alias in node.names if alias.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:  # `from pkg import module`
                    found.append((f"{source}.{alias.name}", None, node))
                elif source in MODULES:
                    found.append((source, alias.name, node))
    return found


def _module_aliases(module: str) -> dict[str, str]:
    """Local names bound to forgeml modules (`from forgeml.compiler.tuning import search` -> search)."""
    aliases = {}
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES:
                    aliases[alias.asname] = alias.name
    return aliases


GRAPH = {m: sorted({target for target, _, _ in _imports(m) if target != m}) for m in MODULES}


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return components


def test_the_checker_sees_the_package():
    assert "forgeml.compiler.build" in MODULES and "forgeml.runtime.session" in MODULES
    assert "forgeml.compiler.graph" in GRAPH["forgeml.compiler.cpu.pipeline"]
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_no_private_names_from_other_packages():
    leaks = []
    for module in MODULES:
        for target, name, node in _imports(module):
            private = name is not None and name.startswith("_") and not name.startswith("__")
            if private and _package_of(target) != _package_of(module):
                leaks.append(f"{module}:{node.lineno} imports {name} from {target}")
        aliases = _module_aliases(module)
        for node in ast.walk(ast.parse(MODULES[module].read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and _package_of(aliases[node.value.id]) != _package_of(module)):
                leaks.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert leaks == []


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


# The compiler's stages, lowest first: a module may import its own stage and the ones below it.
STAGES = [
    ("forgeml.compiler.frontend", "forgeml.compiler.graph", "forgeml.compiler.tensor_intrinsics",
     "forgeml.compiler.verify", "forgeml.compiler.nonfinite", "forgeml.compiler.float16"),
    ("forgeml.compiler.cpu", "forgeml.compiler.cuda"),
    ("forgeml.compiler.tuning",),
    ("forgeml.compiler.pipeline",),
    ("forgeml.compiler.build",),
]


def _stage(module: str) -> int | None:
    return next((i for i, packages in enumerate(STAGES) if _under(module, *packages)), None)


@pytest.mark.parametrize("module", [m for m in MODULES if _stage(m) is not None])
def test_compiler_stages_import_downwards(module):
    upward = [t for t in GRAPH[module] if _stage(t) is not None and _stage(t) > _stage(module)]
    assert upward == [], f"{module} imports a later stage"
    if _under(module, "forgeml.compiler.cpu"):
        assert not [t for t in GRAPH[module] if _under(t, "forgeml.compiler.cuda")]
    if _under(module, "forgeml.compiler.cuda"):
        assert not [t for t in GRAPH[module] if _under(t, "forgeml.compiler.cpu")]


@pytest.mark.parametrize("module", [m for m in MODULES if _under(m, "forgeml.runtime")])
def test_runtime_imports_no_compiler_bench_or_targets(module):
    allowed = {"forgeml.targets.host", "forgeml.errors", "forgeml.version"}
    outside = [t for t in GRAPH[module] if not _under(t, "forgeml.runtime") and t not in allowed]
    assert outside == []
