"""The package layout is the layer diagram: every import inside quantlab points down, and none circles.

The floors, lowest first, are listed in ``quantlab/__init__.py``; this test reads every module's imports
(lazy and TYPE_CHECKING ones included, since a lazy upward import is still a dependency) with ``ast``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "quantlab"

# Lowest floor first. A unit may import only units on a strictly lower floor (or itself).
FLOORS = [
    "__init__", "errors", "device", "numerics", "models", "texts", "recipe", "evaluation",
    "calibrate", "algorithms", "runs", "analysis", "bundled", "cli", "__main__",
]
RANK = {name: rank for rank, name in enumerate(FLOORS)}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every quantlab module ``path`` imports, as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "quantlab":
            if node.module == "quantlab":
                found.update(f"quantlab.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "quantlab")
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    # "from quantlab.models import loading" names a module; "from quantlab.recipe import X" names a symbol
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_unit_has_a_floor():
    units = {_unit(m) for m in _graph()}
    assert units <= set(RANK), f"add these to FLOORS (and quantlab/__init__.py): {sorted(units - set(RANK))}"


def test_imports_point_downward_only():
    upward = [
        f"{src} -> {dst}" for src, dsts in _graph().items() for dst in dsts
        if _unit(dst) != _unit(src) and RANK[_unit(dst)] >= RANK[_unit(src)] and _unit(dst) != "__init__"
    ]
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_engine_never_imports_streamlit():
    offenders = [str(p) for p in PACKAGE.rglob("*.py") if "import streamlit" in p.read_text()]
    assert not offenders


def test_model_structure_is_resolved_once_and_matches_the_walk(bundled_lm):
    from quantlab.models.architectures import describe, find_linears

    structure = bundled_lm.structure
    assert structure is bundled_lm.structure  # cached on the loaded model, not walked again
    assert structure == describe(bundled_lm.model)
    assert list(structure.linears) == find_linears(bundled_lm.model)
    assert structure.block_path == "model.layers" and structure.n_blocks == 4
    assert set(structure.block_linears(0)) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    }
    assert structure.blocks(bundled_lm.model) is bundled_lm.model.model.layers
