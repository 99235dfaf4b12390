"""The layering rule, checked on the source with ``ast``: nothing below imports from above.

    benchmarks/                 (CLI on top; may import the package)
    lowrank_geom.init (adapter) data-driven initializations of PEFT models; may use the driver and peft.py
    lowrank_geom  (driver)      optim.py, pairs.py, fallback.py, peft.py, __init__.py
    lowrank_geom.strategies     pure update functions + strategy objects
    lowrank_geom.geometry       pure functions over (..., m, r) tensors

Every module found under ``lowrank_geom/`` is checked, so modules added later (new strategies,
``peft.py``, ...) are covered without touching this file.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "lowrank_geom"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

# Layer (module prefix) -> the internal modules it may import. The most specific prefix wins.
LAYERS: dict[str, tuple[str, ...]] = {
    "lowrank_geom.geometry": ("lowrank_geom.geometry",),
    "lowrank_geom.strategies": ("lowrank_geom.geometry", "lowrank_geom.strategies"),
    "lowrank_geom": ("lowrank_geom",),  # the driver level may use every layer below it
    "lowrank_geom.init": ("lowrank_geom",),  # the adapter level: the driver and everything below
}
# Modules of a layer above the driver: a module outside them may not import them (the driver's
# prefix "lowrank_geom" would otherwise allow it).
ABOVE_DRIVER = ("lowrank_geom.init",)

# Third-party packages only some modules may import; lazy = only inside a function body (or an
# ``if TYPE_CHECKING:`` block), so ``import lowrank_geom`` does not need the optional extra.
RESTRICTED: dict[str, tuple[tuple[str, ...], bool]] = {
    "geoopt": (("lowrank_geom.geometry.manifold",), False),
    "peft": (("lowrank_geom.peft", "lowrank_geom.init"), True),
    "transformers": (("lowrank_geom.peft",), True),
}

# Top-level packages the library must never import.
FORBIDDEN = ("benchmarks", "tests")


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _layer(module: str) -> str:
    return max((p for p in LAYERS if _within(module, p)), key=len)


class _Imports(ast.NodeVisitor):
    """Collects ``(imported module, line, lazy)`` from one module's AST."""

    def __init__(self, module: str, is_package: bool, known_modules: set[str]):
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known_modules
        self.found: list[tuple[str, int, bool]] = []
        self._depth = 0  # > 0 inside a function body or a TYPE_CHECKING block

    def _add(self, name: str, node: ast.AST) -> None:
        self.found.append((name, node.lineno, self._depth > 0))

    def _nested(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _nested

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
        if name == "TYPE_CHECKING":
            self._depth += 1
            for child in node.body:
                self.visit(child)
            self._depth -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            # `from pkg import submodule` imports the submodule; `from pkg import name` imports pkg
            self._add(sub if sub in self.known else target, node)

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("x") / __import__("x") with a literal name
        func = node.func
        fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if fname in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
                self._add(arg.value, node)
        self.generic_visit(node)


def check_module(
    module: str, source: str, *, is_package: bool = False, known_modules: set[str] = frozenset()
) -> list[str]:
    """The layering violations of one module's source, as readable strings (empty if none)."""
    visitor = _Imports(module, is_package, set(known_modules))
    visitor.visit(ast.parse(source))
    allowed = LAYERS[_layer(module)]
    errors = []
    for name, line, lazy in visitor.found:
        where = f"{module}:{line} imports {name}"
        top = name.split(".")[0]
        if top == PACKAGE:
            if not any(_within(name, a) for a in allowed):
                errors.append(f"{where}, but layer {_layer(module)} may import only {allowed}")
            elif any(_within(name, a) and not _within(module, a) for a in ABOVE_DRIVER):
                errors.append(f"{where}, but {name} is above the driver: only it may import itself")
        elif top in FORBIDDEN:
            errors.append(f"{where}: the library never imports {top}")
        elif top in RESTRICTED:
            owners, must_be_lazy = RESTRICTED[top]
            if not any(_within(module, o) for o in owners):
                errors.append(f"{where}: {top} may be imported only by {owners}")
            elif must_be_lazy and not lazy:
                errors.append(f"{where}: {top} must be imported lazily, inside a function")
    return errors


def _package_modules() -> dict[str, tuple[Path, bool]]:
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_package)
    return modules


MODULES = _package_modules()


def test_package_found():
    # guards against a vacuous pass (wrong path, nothing collected)
    assert "lowrank_geom" in MODULES
    assert "lowrank_geom.geometry.factors" in MODULES
    assert all(_layer(m) in LAYERS for m in MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_respects_layers(module):
    path, is_package = MODULES[module]
    errors = check_module(module, path.read_text(encoding="utf-8"), is_package=is_package, known_modules=set(MODULES))
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------- the checker can fail

KNOWN = {
    "lowrank_geom",
    "lowrank_geom.optim",
    "lowrank_geom.pairs",
    "lowrank_geom.geometry",
    "lowrank_geom.geometry.psd",
    "lowrank_geom.geometry.manifold",
    "lowrank_geom.strategies",
    "lowrank_geom.strategies.base",
    "lowrank_geom.init",
}

VIOLATIONS = [
    ("lowrank_geom.geometry.psd", "from lowrank_geom.strategies import base\n", "may import only"),
    ("lowrank_geom.geometry.psd", "import lowrank_geom.optim\n", "may import only"),
    ("lowrank_geom.geometry.psd", "from lowrank_geom import pairs\n", "may import only"),
    ("lowrank_geom.geometry.psd", "from lowrank_geom import LoRAPair\n", "may import only"),
    ("lowrank_geom.geometry.psd", "def f():\n    from ..strategies.base import Strategy\n", "may import only"),
    ("lowrank_geom.strategies.base", "from lowrank_geom.optim import LowRankOptimizer\n", "may import only"),
    ("lowrank_geom.strategies.base", "from .. import pairs\n", "may import only"),
    ("lowrank_geom.optim", "import benchmarks.lowrank_problems\n", "never imports benchmarks"),
    ("lowrank_geom.optim", "import importlib\nimportlib.import_module('benchmarks')\n", "never imports"),
    ("lowrank_geom.geometry.psd", "import geoopt\n", "geoopt may be imported only"),
    ("lowrank_geom.strategies.base", "from geoopt import Manifold\n", "geoopt may be imported only"),
    ("lowrank_geom.peft", "import peft\n", "lazily"),
    ("lowrank_geom.peft", "from transformers import PreTrainedModel\n", "lazily"),
    ("lowrank_geom.optim", "def f():\n    import peft\n", "peft may be imported only"),
    ("lowrank_geom.peft", "from lowrank_geom.init import lora_one\n", "above the driver"),
    ("lowrank_geom.strategies.base", "import lowrank_geom.init\n", "may import only"),
    ("lowrank_geom.init", "import peft\n", "lazily"),
]


@pytest.mark.parametrize("module, source, message", VIOLATIONS)
def test_checker_reports_violations(module, source, message):
    is_package = module in ("lowrank_geom", "lowrank_geom.geometry", "lowrank_geom.strategies")
    errors = check_module(module, source, is_package=is_package, known_modules=KNOWN)
    assert len(errors) == 1 and message in errors[0], errors


ALLOWED = [
    ("lowrank_geom.geometry.psd", "import torch\nfrom lowrank_geom.geometry.factors import balance\n"),
    ("lowrank_geom.geometry.psd", "from . import manifold\nfrom .psd import symmetrize\n"),
    ("lowrank_geom.geometry.manifold", "import geoopt\nfrom geoopt.utils import size2shape\n"),
    ("lowrank_geom.strategies.base", "from lowrank_geom.geometry import inverse_root\nfrom . import base\n"),
    ("lowrank_geom.optim", "from lowrank_geom.strategies import Strategy\nfrom lowrank_geom import pairs\n"),
    ("lowrank_geom.peft", "def lora_pairs(model):\n    import peft\n    from transformers import PreTrainedModel\n"),
    ("lowrank_geom.peft", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import peft\n"),
    ("lowrank_geom.init", "from lowrank_geom.peft import lora_pairs\ndef f():\n    import peft\n"),
]


@pytest.mark.parametrize("module, source", ALLOWED)
def test_checker_accepts_allowed_imports(module, source):
    assert check_module(module, source, known_modules=KNOWN) == []


def test_import_loads_no_optional_or_upper_package():
    # the same rule at runtime: importing the library pulls in neither geoopt (lazy manifold), nor
    # the peft extra, nor the benchmarks
    code = (
        "import sys, lowrank_geom\n"
        "bad = [m for m in ('geoopt', 'peft', 'transformers', 'benchmarks') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function without its docstring."""
    first = node.body[0]
    doc = (
        first.end_lineno - first.lineno + 1
        if (
            isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
        )
        else 0
    )
    return node.end_lineno - node.lineno + 1 - doc


def test_no_function_is_longer_than_60_lines():
    """Functions short enough to read at once: at most 60 lines, docstrings aside."""
    long = [
        f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno} {node.name} ({_body_lines(node)} lines)"
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(node) > 60
    ]
    assert not long, "functions over 60 lines:\n" + "\n".join(long)
