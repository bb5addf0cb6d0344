"""The package's layers (docs/architecture.md): a module imports only from its own or lower layers,
and the import graph has no cycle. Imports inside functions count (they are parsed, not run), so a
lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "distdm"

# lowest first; a module not listed here fails the test, so a new module must be placed
LAYERS: dict[str, tuple[str, ...]] = {
    "core": (
        "errors", "config", "progress", "executors", "store", "objectives", "intervals", "synset",
        "models", "data", "userdata", "presets", "datamodel", "engine", "hessian", "ekfac", "scores",
        "runtime", "clusters", "task", "metrics", "figures", "damping", "eigen",
    ),
    "methods": ("distill_shared", "distill_influence", "distill", "attribution"),
    "evaluation": ("evaluate", "applications", "verify", "pack"),
    "pipeline": ("run",),
    "presentation": ("report",),
    "cli": ("cli", "__main__"),
}  # fmt: skip
# re-exporting package roots: they sit above what they export and import nothing else
PACKAGE_ROOTS = ("distdm", "distdm.attribution", "distdm.applications")


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, mod: str | None = None) -> set[str]:
    """Every distdm module a file imports, at any depth of the syntax tree (mod: its module name)."""
    mod = mod or _module(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("distdm")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("distdm"):
                continue
            if node.module is None:  # from . import x: x is a module of the package
                found |= {f"{target}.{a.name}" for a in node.names}
            else:
                found.add(target)
    return {t for t in found if t != mod}


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in SRC.rglob("*.py")}

    def resolve(name: str) -> str:
        while name not in modules and "." in name:  # from .x import attribute
            name = name.rsplit(".", 1)[0]
        return name

    return {m: {resolve(t) for t in _imports(p)} for m, p in modules.items()}


def layer_of(module: str) -> int:
    """The index of a module's layer (by its first name below distdm)."""
    top = module.split(".")[1]
    for i, names in enumerate(LAYERS.values()):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: place it in LAYERS here and in docs/architecture.md")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_every_module_imports_only_its_own_or_lower_layers():
    graph = _graph()
    bad = [
        f"{m} ({list(LAYERS)[layer_of(m)]}) imports {t} ({list(LAYERS)[layer_of(t)]})"
        for m, targets in sorted(graph.items())
        if m not in PACKAGE_ROOTS
        for t in sorted(targets)
        if t not in PACKAGE_ROOTS and layer_of(t) > layer_of(m)
    ]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    graph = {m: ts - set(PACKAGE_ROOTS) for m, ts in _graph().items() if m not in PACKAGE_ROOTS}
    assert _cycle(graph) is None, "import cycle: " + " -> ".join(_cycle(graph) or [])


def test_the_checks_catch_a_lazy_upward_import_and_a_cycle(tmp_path):
    """The parser sees imports inside functions, and the cycle search finds a loop."""
    f = tmp_path / "mod.py"
    f.write_text("def late():\n    from ..run import Run\n    import distdm.cli\n    return Run\n")
    assert _imports(f, "distdm.applications.probe") == {"distdm.run", "distdm.cli"}
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("distdm.somewhere_new")
