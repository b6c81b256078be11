"""The floors of the package: a module imports only from floors below it (or its own package,
without cycles); no imports inside functions except optional third-party packages; onnxruntime only
inside ``runtime/``; nothing in the package imports ``testing``.

The import graph is read from the *installed* package: every module is found through the import
system (``importlib.util.find_spec``), so ``onnxprune.handlers`` and ``onnxprune.models``, which an
editable install maps to the top-level ``handlers/`` and ``models/`` folders through an import hook,
are read like every other module. The rules are checked first on synthetic module graphs (so the
test is shown to fail on an upward import, a cycle and a function-level import), then on the real
package.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

# bottom to top; a module may import from floors strictly below its own
FLOORS = ["errors", "ir", "runtime", "analysis", "handlers", "planning", "rewrite", "measure", "pipeline",
          "api", "cli"]
# outside the floors: the test scaffolding (may import anything, imported by nothing in the package)
# and the model zoo (torch; imports only itself)
APART = {"testing", "models"}
# third-party packages a function body may import (optional dependencies; the zoo and the test
# scaffolding may also run onnxruntime directly)
LAZY_OK = {"torch", "torchvision", "matplotlib", "onnxruntime", "onnxscript", "torch_pruning",
           "transformers",  # models.hf: tiny random Hugging Face models (the hf extra)
           "onnx.reference"}  # onnx.reference: 0.8 s to import, needed only for partly known shape values
# package modules a function body may import: the zoo needs torch (the demo's optional extra)
# and the gradient criteria import torch (through runtime.torch_exec), so the plan and the pipeline
# import them only when a gradient criterion is asked for; distillation (--finetune) likewise
LAZY_PACKAGE_OK = {("onnxprune.cli.cmd_demo", "onnxprune.models"),
                   ("onnxprune.cli.args", "onnxprune.rewrite.distill"),
                   ("onnxprune.pipeline", "onnxprune.rewrite.distill"),
                   ("onnxprune.pipeline", "onnxprune.planning.grad_importance"),
                   ("onnxprune.pipeline", "onnxprune.runtime.gradients"),
                   ("onnxprune.planning.plan", "onnxprune.planning.grad_importance")}
ONLY_IN_RUNTIME = "onnxruntime"


@dataclass(frozen=True)
class Import:
    target: str  # absolute module name
    line: int
    in_function: bool


def floor_of(module: str) -> str:
    """The floor name of an onnxprune module: its first component below ``onnxprune``."""
    parts = module.split(".")
    if parts[0] != "onnxprune":
        raise ValueError(module)
    return parts[1] if len(parts) > 1 else "errors"  # the package's __init__ sits at the bottom


def _lazy_package_ok(mod: str, target: str) -> bool:
    return any(mod == m and (target == t or target.startswith(t + ".")) for m, t in LAZY_PACKAGE_OK)


def violations(graph: dict[str, list[Import]]) -> list[str]:
    """Every broken rule in a module graph {module: its imports} (onnxprune modules as keys)."""
    out: list[str] = []
    for mod, imports in sorted(graph.items()):
        f = floor_of(mod)
        for imp in imports:
            top = imp.target.split(".")[0]
            where = f"{mod}:{imp.line}"
            if imp.in_function and not (top in LAZY_OK or imp.target in LAZY_OK or _lazy_package_ok(mod, imp.target)):
                out.append(f"{where}: function-level import of {imp.target}")
            if top == ONLY_IN_RUNTIME and f not in ("runtime", *APART):
                out.append(f"{where}: imports onnxruntime outside runtime/")
            if top != "onnxprune":
                continue
            g = floor_of(imp.target)
            if g == "testing" and f != "testing":
                out.append(f"{where}: imports the test scaffolding {imp.target}")
            elif f == "models" and g != "models":
                out.append(f"{where}: the zoo imports {imp.target}")
            elif f in APART:
                continue
            elif g in APART:
                if not _lazy_package_ok(mod, imp.target):
                    out.append(f"{where}: imports {imp.target}")
            elif g != f and FLOORS.index(g) >= FLOORS.index(f):
                out.append(f"{where}: upward import of {imp.target} (floor {g} from floor {f})")
    out.extend(f"import cycle: {' -> '.join(c)}" for c in cycles(graph))
    return out


def cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Module-level import cycles among the graph's modules (function-level imports do not cycle)."""
    edges = {m: sorted({i.target for i in imps if i.target in graph and not i.in_function and i.target != m})
             for m, imps in graph.items()}
    found, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for n in edges[m]:
            if state.get(n) == 1:
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    return found


# ----------------------------------------------------------------------------------------------
# reading the installed package


def _imports(source: str, module: str, is_package: bool) -> list[Import]:
    tree = ast.parse(source)
    out: list[Import] = []

    def walk(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend(Import(a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module if is_package else module.rsplit(".", 1)[0]
                    for _ in range(child.level - 1):
                        pkg = pkg.rsplit(".", 1)[0]
                    base = f"{pkg}.{base}" if base else pkg
                if base == "__future__":
                    continue
                for a in child.names:  # ``from pkg import module`` imports that module
                    full = f"{base}.{a.name}"
                    out.append(Import(full if _find_spec_safe(full) else base, child.lineno,
                                      in_function))
            walk(child, fn)

    walk(tree, False)
    return out


def _find_spec_safe(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):
        return False


def declared_packages() -> set[str]:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    return set(tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["packages"])


def installed_modules() -> dict[str, Path]:
    """Every module of the installed package, found through the import system (so import hooks that
    map ``onnxprune.handlers`` to ``handlers/`` count): each declared package, and the modules in it."""
    found: dict[str, Path] = {}
    for name in sorted(declared_packages()):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin and spec.submodule_search_locations is not None, name
        found[name] = Path(spec.origin)
        for info in pkgutil.iter_modules(spec.submodule_search_locations, f"{name}."):
            if info.ispkg:
                assert info.name in declared_packages(), f"{info.name} is not in pyproject's packages"
                continue
            sub = importlib.util.find_spec(info.name)
            found[info.name] = Path(sub.origin)
    return found


def package_graph() -> dict[str, list[Import]]:
    mods = installed_modules()
    return {m: _imports(p.read_text(), m, p.name == "__init__.py") for m, p in mods.items()}


# ----------------------------------------------------------------------------------------------
# the rules shown on synthetic graphs


def _g(**mods: list[tuple[str, bool]]) -> dict[str, list[Import]]:
    return {m.replace("__", "."): [Import(t, 1, f) for t, f in imps] for m, imps in mods.items()}


def test_a_clean_graph_passes():
    g = _g(onnxprune__ir__io=[("onnxprune.errors", False), ("numpy", False)],
           onnxprune__errors=[],
           onnxprune__analysis__coupling=[("onnxprune.ir.io", False), ("onnxprune.analysis.contract", False)],
           onnxprune__analysis__contract=[],
           onnxprune__cli__main=[("onnxprune.pipeline", False), ("matplotlib", True)],
           onnxprune__pipeline=[("onnxprune.analysis.coupling", False)])
    assert violations(g) == []


def test_an_upward_import_fails():
    g = _g(onnxprune__ir__io=[("onnxprune.analysis.coupling", False)], onnxprune__analysis__coupling=[])
    assert violations(g) == ["onnxprune.ir.io:1: upward import of onnxprune.analysis.coupling "
                             "(floor analysis from floor ir)"]


def test_a_sideways_import_between_floors_fails_and_one_inside_a_floor_passes():
    g = _g(onnxprune__planning__plan=[("onnxprune.rewrite.apply", False), ("onnxprune.planning.options", False)],
           onnxprune__rewrite__apply=[], onnxprune__planning__options=[])
    assert [v.split(": ")[1] for v in violations(g)] == [
        "upward import of onnxprune.rewrite.apply (floor rewrite from floor planning)"]


def test_a_cycle_fails():
    g = _g(onnxprune__analysis__a=[("onnxprune.analysis.b", False)],
           onnxprune__analysis__b=[("onnxprune.analysis.a", False)])
    assert violations(g) == ["import cycle: onnxprune.analysis.a -> onnxprune.analysis.b -> onnxprune.analysis.a"]


def test_a_function_level_import_fails_unless_optional():
    g = _g(onnxprune__measure__sweep=[("onnxprune.measure.stats", True), ("matplotlib", True), ("json", True)],
           onnxprune__measure__stats=[])
    assert violations(g) == ["onnxprune.measure.sweep:1: function-level import of onnxprune.measure.stats",
                             "onnxprune.measure.sweep:1: function-level import of json"]


def test_onnxruntime_only_in_runtime_and_testing_imported_by_nobody():
    g = _g(onnxprune__measure__latency=[("onnxruntime", False)],
           onnxprune__runtime__session=[("onnxruntime", True)],
           onnxprune__pipeline=[("onnxprune.testing", False)], onnxprune__testing=[])
    assert sorted(v.split(": ")[1] for v in violations(g)) == [
        "imports onnxruntime outside runtime/", "imports the test scaffolding onnxprune.testing"]


def test_reader_sees_function_level_and_relative_imports():
    src = "import os\nfrom . import b\n\ndef f():\n    import json\n    from onnxprune.errors import UserError\n"
    imps = _imports(src, "onnxprune.ir.a", is_package=False)
    assert [(i.target, i.in_function) for i in imps] == [
        ("os", False), ("onnxprune.ir", False), ("json", True), ("onnxprune.errors", True)]


# ----------------------------------------------------------------------------------------------
# the real package


def test_every_declared_package_is_installed_and_read():
    declared = declared_packages()
    mods = installed_modules()
    assert declared <= set(mods), declared - set(mods)
    assert "onnxprune.handlers.conv" in mods and mods["onnxprune.handlers.conv"].parent.name == "handlers"
    assert {floor_of(m) for m in mods} <= set(FLOORS) | APART


def test_the_package_keeps_its_floors():
    problems = violations(package_graph())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("floor", FLOORS[1:])
def test_every_floor_is_a_real_place(floor):
    assert any(floor_of(m) == floor for m in installed_modules())


@pytest.mark.parametrize("module,target", [("onnxprune.ir.io", "onnxprune.analysis.coupling"),
                                           ("onnxprune.handlers.conv", "onnxprune.planning.plan"),
                                           ("onnxprune.measure.stats", "onnxprune.pipeline")])
def test_an_upward_import_added_to_the_real_package_fails(module, target):
    graph = package_graph()
    graph[module] = [*graph[module], Import(target, 999, False)]
    assert any(v.startswith(f"{module}:999: upward import of {target}") for v in violations(graph))
