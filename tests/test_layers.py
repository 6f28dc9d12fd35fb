"""The package's import graph: no cycle, and no module imports from a layer above its own.

The layer order is the one docs/architecture.md §18 documents:
a module may import from its own layer and the layers below it. Imports inside functions count too:
a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_qwen35"

# Lowest first. The public entry points at the top (the lazy API, ``python -m``, the re-exports at the
# old public paths) may import anything; nothing below imports them.
LAYERS = [
    ("foundation", ["mlx_qwen35.errors", "mlx_qwen35.config"]),
    ("kernels", ["mlx_qwen35.kernels"]),
    ("model", ["mlx_qwen35.model"]),
    ("processing", ["mlx_qwen35.processing"]),
    ("weights", ["mlx_qwen35.weights"]),
    ("runtime", ["mlx_qwen35.runtime"]),
    ("surfaces", ["mlx_qwen35.surfaces"]),
    ("entry points", ["mlx_qwen35", "mlx_qwen35.__main__", "mlx_qwen35.cache", "mlx_qwen35.conversation"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The index in LAYERS of the most specific prefix that owns ``module``."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact_only = index == len(LAYERS) - 1  # the entry points are single modules, not subtrees
            if (module == prefix or (not exact_only and module.startswith(prefix + "."))) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS and to docs/architecture.md"
    return best


def imports_of(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules that module ``name`` imports (``from x import y`` counts y when y is a module)."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("mlx_qwen35")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("mlx_qwen35"):
                target = node.module
            else:
                continue
            submodules = {f"{target}.{alias.name}" for alias in node.names} & modules
            found |= submodules or {target}
    return {m for m in found if m in modules} - {name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p.read_text(), module_name(p), p.name == "__init__.py", modules) for p in paths}


def test_every_module_imports_only_its_layer_and_below():
    graph = import_graph()
    upward = [
        f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
        for src, targets in graph.items()
        for dst in targets
        if layer_of(dst) > layer_of(src)
    ]
    assert not upward, "\n".join(upward)


def test_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_an_upward_lazy_import():
    """Relative imports inside functions resolve: a model module importing the runtime lazily is caught."""
    modules = {"mlx_qwen35.model.deltanet", "mlx_qwen35.runtime", "mlx_qwen35.runtime.generation"}
    source = "def f():\n    from ..runtime.generation import prefill\n"
    found = imports_of(source, "mlx_qwen35.model.deltanet", is_package=False, modules=modules)
    assert found == {"mlx_qwen35.runtime.generation"}
    assert layer_of("mlx_qwen35.runtime.generation") > layer_of("mlx_qwen35.model.deltanet")
    # ``from .. import load`` in a surface names the top-level API, an entry point above every layer.
    found = imports_of("from .. import load\n", "mlx_qwen35.surfaces.cli", False, {"mlx_qwen35"})
    assert found == {"mlx_qwen35"} and layer_of("mlx_qwen35") > layer_of("mlx_qwen35.surfaces.cli")
