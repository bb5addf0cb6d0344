"""Packaging: every third-party module distdm (and its tests) imports is a declared requirement, the
pins in constraints.txt agree with the ranges in pyproject.toml, and `python -m distdm` works.

A missing requirement stays hidden wherever another package happens to pull the module in (click came
with ray), so the import check reads the source, not the environment."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10: the dev extra installs tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "distdm"
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints.txt"
# the distributions of optional imports, for where they are not installed (packages_distributions()
# only knows installed ones)
UNINSTALLED_DISTRIBUTIONS = {"ray": "ray", "pandas": "pandas", "tomli": "tomli"}
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares it (Scikit_Learn -> scikit-learn)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_requirements(pyproject: Path) -> tuple[set[str], dict[str, set[str]]]:
    """The base requirement names and {extra: names} of a pyproject.toml (self-references expanded)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    own = normalize(project["name"])

    def names(reqs: list[str]) -> tuple[set[str], set[str]]:
        found, included = set(), set()
        for r in map(Requirement, reqs):
            if normalize(r.name) == own:
                included |= r.extras  # e.g. all = ["distdm[ray,pandas]"]
            else:
                found.add(normalize(r.name))
        return found, included

    base, _ = names(project.get("dependencies", []))
    raw = {e: names(reqs) for e, reqs in project.get("optional-dependencies", {}).items()}
    extras = {
        e: found.union(*(raw[i][0] for i in included if i in raw)) for e, (found, included) in raw.items()
    }
    return base, extras


@dataclass(frozen=True)
class Import:
    """One absolute import statement: its top-level module and whether the importing module loads
    without it (inside a function, under `try: ... except ImportError`, or `if TYPE_CHECKING:`)."""

    module: str
    path: Path
    line: int
    guarded: bool


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in _IMPORT_ERRORS for t in types)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_in(path: Path) -> list[Import]:
    """The absolute imports of one source file, with where they sit (relative imports are skipped)."""
    found: list[Import] = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(a.name.split(".")[0], path, node.lineno, guarded) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.append(Import(node.module.split(".")[0], path, node.lineno, guarded))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for child in ast.iter_child_nodes(node):
                visit(child, True)  # runs only when called, not when the module is imported
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            body_guarded = guarded or any(_catches_import_error(h) for h in node.handlers)
            for child in node.body:
                visit(child, body_guarded)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, guarded)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, guarded)
        else:
            for child in ast.iter_child_nodes(node):
                visit(child, guarded)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    """The distributions that provide a top-level module, installed or known optional; empty if none."""
    dists = {normalize(d) for d in _installed().get(module, [])}
    if not dists and module in UNINSTALLED_DISTRIBUTIONS:
        dists = {UNINSTALLED_DISTRIBUTIONS[module]}
    return dists


def undeclared_imports(
    root: Path, base: set[str], extras: dict[str, set[str]], local: set[str] = frozenset()
) -> list[str]:
    """One message per import under `root` that no declared requirement provides: base requirements
    may be imported anywhere, an extra's only where the module still loads without it."""
    skip = set(sys.stdlib_module_names) | set(local)
    problems = []
    for path in sorted(root.rglob("*.py")):
        for imp in imports_in(path):
            if imp.module in skip:
                continue
            shown = path.relative_to(ROOT if path.is_relative_to(ROOT) else root.parent)
            where = f"{shown}:{imp.line}"
            dists = distributions_of(imp.module)
            in_extras = sorted(e for e, names in extras.items() if dists & names)
            if not dists:
                problems.append(
                    f"{where}: imports {imp.module!r}, which is not installed and not a known optional "
                    f"package: declare its distribution in pyproject.toml (or drop the import)"
                )
            elif dists & base:
                continue
            elif not in_extras:
                problems.append(
                    f"{where}: imports {imp.module!r} (distribution {', '.join(sorted(dists))}), which "
                    f"pyproject.toml does not declare: add it to [project] dependencies or drop the import"
                )
            elif not imp.guarded:
                problems.append(
                    f"{where}: imports {imp.module!r}, which only the extra(s) {', '.join(in_extras)} "
                    f"install, when the module is imported: import it inside the function that needs it "
                    f"or under try/except ImportError"
                )
    return problems


def test_the_package_imports_only_declared_requirements():
    base, extras = declared_requirements(PYPROJECT)
    problems = undeclared_imports(PACKAGE, base, extras, local={"distdm"})
    assert not problems, "\n".join(problems)


def test_the_tests_import_only_base_and_dev_requirements():
    base, extras = declared_requirements(PYPROJECT)
    tests = Path(__file__).parent
    # the benchmark scripts are local modules too: their helpers' tests import them by path
    benchmarks = tests.parent / "benchmarks"
    local = {"distdm", *(p.stem for p in [*tests.glob("*.py"), *benchmarks.glob("*.py")])}
    problems = undeclared_imports(tests, base | extras["dev"], extras, local=local)
    assert not problems, "\n".join(problems)


def test_the_checker_reports_undeclared_and_unguarded_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """\
            import os
            import numpy as np
            from . import sub
            import click
            try:
                import pandas
            except ImportError:
                pandas = None
            import ray.util
            """
        )
    )
    (pkg / "sub" / "lazy.py").write_text(
        textwrap.dedent(
            """\
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                import ray
            def fetch():
                import requests
                from ray import get
                return requests, get
            """
        )
    )
    problems = undeclared_imports(pkg, {"numpy"}, {"ray": {"ray"}, "pandas": {"pandas"}}, local={"pkg"})
    assert len(problems) == 3, problems
    click, ray, requests = problems
    assert click.startswith("pkg/__init__.py:4: imports 'click'") and "pyproject.toml" in click
    assert ray.startswith("pkg/__init__.py:9: imports 'ray'") and "only the extra(s) ray" in ray
    assert requests.startswith("pkg/sub/lazy.py:5: imports 'requests'")
    # base requirements anywhere and an extra's module imported lazily pass
    (pkg / "__init__.py").write_text("import numpy\nfrom . import sub\n")
    (pkg / "sub" / "lazy.py").write_text("def fetch():\n    import ray\n    return ray\n")
    assert undeclared_imports(pkg, {"numpy"}, {"ray": {"ray"}}, local={"pkg"}) == []


def test_declared_requirements_read_names_extras_and_self_references(tmp_path):
    base, extras = declared_requirements(PYPROJECT)
    assert {"torch", "numpy", "scikit-learn", "typer", "filelock"} <= base
    assert "ray" not in base and "pandas" not in base
    assert extras["ray"] == {"ray"} and extras["pandas"] == {"pandas"} and "pytest" in extras["dev"]
    toml = tmp_path / "pyproject.toml"
    toml.write_text(
        '[project]\nname = "demo_pkg"\n'
        'dependencies = ["Scikit_Learn>=1.4", "tomli; python_version<\'3.11\'"]\n'
        '[project.optional-dependencies]\nx = ["ray[default]>=2"]\nall = ["demo-pkg[x]", "pandas"]\n'
    )
    base, extras = declared_requirements(toml)
    assert base == {"scikit-learn", "tomli"} and extras == {"x": {"ray"}, "all": {"ray", "pandas"}}


def _pins(path: Path) -> dict[str, Requirement]:
    reqs = [
        Requirement(line.split("#")[0])
        for line in path.read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    return {normalize(r.name): r for r in reqs}


def test_constraints_pin_every_requirement_within_its_declared_range():
    pins = _pins(CONSTRAINTS)
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    declared = [
        *project["dependencies"],
        *(r for reqs in project["optional-dependencies"].values() for r in reqs),
    ]
    for req in map(Requirement, declared):
        pin = pins.get(normalize(req.name))
        assert pin is not None, f"constraints.txt pins no version of {req.name}"
        (spec,) = pin.specifier
        assert spec.operator == "==", f"constraints.txt: {pin} is not an exact pin"
        assert req.specifier.contains(spec.version, prereleases=True), (
            f"constraints.txt pins {pin}, outside pyproject.toml's {req}"
        )


def test_python_m_distdm_runs_the_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "distdm", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "Usage: distdm" in out.stdout and "demo" in out.stdout


def test_the_wheel_ships_the_typing_marker_main_and_declared_ranges(tmp_path):
    pytest.importorskip("setuptools")  # the build backend: built without build isolation, offline
    project = tmp_path / "project"  # a copy, so that the build leaves nothing in the checkout
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(PACKAGE, project / "src" / "distdm", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    built = subprocess.run(
        [*pip, "-w", str(tmp_path / "out"), str(project)], capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "out").glob("distdm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta).decode()
    assert {"distdm/py.typed", "distdm/__main__.py", "distdm/cli.py"} <= names
    shipped = {
        str(Requirement(line.split(":", 1)[1])) for line in metadata.splitlines() if "Requires-Dist" in line
    }
    base = {str(Requirement(r)) for r in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]}
    assert base <= shipped and any('extra == "ray"' in r for r in shipped)


def _needs_ray(fn: ast.FunctionDef) -> bool:
    """A test that takes the ray_executor fixture or skips itself without ray."""
    if "ray_executor" in [a.arg for a in fn.args.args]:
        return True
    return any(
        isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "importorskip"
        and n.args
        and isinstance(n.args[0], ast.Constant)
        and n.args[0].value == "ray"
        for n in ast.walk(fn)
    )


def test_every_ray_test_is_marked_so_ci_runs_it_with_ray_installed():
    unmarked = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for fn in ast.parse(path.read_text()).body:
            if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_") and _needs_ray(fn):
                marks = {ast.unparse(d) for d in fn.decorator_list}
                if "pytest.mark.ray" not in marks:
                    unmarked.append(f"{path.name}::{fn.name}")
    assert unmarked == [], f"add @pytest.mark.ray (CI runs `pytest -m ray` after installing ray): {unmarked}"
