"""The package's import graph: no cycles, and imports go down the layers only.

Every ``import prefopt...`` statement counts, also those inside functions (a function-local import
still makes one module depend on the other). The layers, lowest first, are the ones
``docs/architecture.md`` draws: a module may import from its own layer and the ones below.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "prefopt"

# Lowest first. Modules of one layer may import each other (the module graph must still be acyclic).
LAYERS = [
    {"errors", "io", "digest", "memory", "progress", "toy", "losses", "trl_compat"},
    {"config", "data"},
    {"modeling"},
    {"training", "objectives"},
    {"evaluation"},
    {"recipes", "online"},
    {"demo"},
    {"cli", "__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from prefopt.x import y` may name a submodule y
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "prefopt":
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else module
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module}: its top-level name {top!r} is in no layer; add it to LAYERS and the docs")


def test_the_graph_is_read():
    graph = import_graph()
    assert "prefopt.recipes" in graph and "prefopt.training.trainer" in graph["prefopt.recipes"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_go_down_the_layers():
    upward = [f"{m} -> {t}" for m, targets in import_graph().items() for t in targets
              if m != "prefopt" and layer_of(t) > layer_of(m)]
    assert not upward, "imports that climb a layer:\n" + "\n".join(sorted(upward))


def test_every_module_is_in_the_architecture_table():
    table = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [str(p.relative_to(PACKAGE.parent)) for p in sorted(PACKAGE.rglob("*.py"))
               if p.name != "__init__.py" and f"src/{p.relative_to(PACKAGE.parent)}" not in table]
    assert not missing, "docs/architecture.md does not name: " + ", ".join(missing)


def test_no_comment_names_an_issue_number():
    import re

    hits = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(r"\bissues? ?#?\d", line, re.IGNORECASE)]
    assert not hits, "ticket history in the code: " + ", ".join(hits)
