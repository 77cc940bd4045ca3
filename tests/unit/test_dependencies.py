"""Every third-party package aioqueue imports is declared in pyproject.toml, with bounds.

The scan reads ``aioqueue/**/*.py`` with ``ast``: an import at module level must be a core
dependency; one that is lazy (inside a function, under ``try: ... except ImportError``, under
``if TYPE_CHECKING:``, or a module looked up by name with ``importlib``) may come from an
optional extra instead. ``constraints.txt`` (what scripts/bootstrap and CI install) must pin
every declared package at a version inside its bounds.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "aioqueue"

# Modules that only an extra's own machinery loads, so their module-level imports may come
# from that extra: the pytest plugin, loaded by pytest through the pytest11 entry point.
EXTRA_MODULES = {"aioqueue/testing.py": "testing"}

# Operators that give a requirement an upper bound (~= 1.2 means >= 1.2, == 1.*).
UPPER = {"<", "<=", "==", "===", "~="}


@dataclass(frozen=True)
class Import:
    module: str  # the top-level package imported, e.g. "aio_pika"
    where: str  # path:line
    lazy: bool  # not executed when the importing module is imported


class _Scanner(ast.NodeVisitor):
    def __init__(self, where: str) -> None:
        self.where = where
        self.depth = 0  # > 0 while inside a function, an ImportError guard or TYPE_CHECKING
        self.found: list[Import] = []

    def _add(self, name: str, node: ast.AST, lazy: bool = False) -> None:
        top = name.split(".")[0]
        if top and top != "aioqueue" and top not in sys.stdlib_module_names:
            line = getattr(node, "lineno", 0)
            self.found.append(Import(top, f"{self.where}:{line}", lazy or self.depth > 0))

    def _nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _nested

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(_catches_import_error(handler.type) for handler in node.handlers)
        if guarded:
            self.depth += 1
        for statement in node.body:
            self.visit(statement)
        if guarded:
            self.depth -= 1
        for part in (*node.handlers, *node.orelse, *node.finalbody):
            self.visit(part)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
        if name == "TYPE_CHECKING":
            self.depth += 1
            for statement in node.body:
                self.visit(statement)
            self.depth -= 1
            for statement in node.orelse:
                self.visit(statement)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._add(node.module, node)

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("x"), importlib.util.find_spec("x"): an optional package.
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in {"import_module", "find_spec"} and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                self._add(first.value, node, lazy=True)
        self.generic_visit(node)


def _catches_import_error(handler: ast.expr | None) -> bool:
    names = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
    if handler is None:
        return True
    if isinstance(handler, ast.Tuple):
        return any(_catches_import_error(element) for element in handler.elts)
    return isinstance(handler, ast.Name) and handler.id in names


def scan_source(source: str, where: str) -> list[Import]:
    scanner = _Scanner(where)
    scanner.visit(ast.parse(source))
    return scanner.found


def scan_package() -> list[Import]:
    found: list[Import] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(ROOT).as_posix()
        found += scan_source(path.read_text(encoding="utf-8"), where)
    return found


def distributions(module: str) -> set[str]:
    """The distributions that install top-level ``module`` (its own name when none here does)."""
    names = importlib.metadata.packages_distributions().get(module) or [module]
    return {canonicalize_name(name) for name in names}


def _pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def core_requirements() -> list[Requirement]:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    return [Requirement(text) for text in project["dependencies"]]


def extra_requirements() -> dict[str, list[Requirement]]:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    extras = project.get("optional-dependencies", {})
    return {extra: [Requirement(text) for text in texts] for extra, texts in extras.items()}


def constraints() -> dict[str, str]:
    """constraints.txt as {distribution: pinned version}."""
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def test_scanner_tells_eager_from_lazy_imports() -> None:
    source = (
        "import os, aio_pika.abc\n"
        "from redis.asyncio import Redis\n"
        "from . import sibling\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    import celery\n"
        "try:\n"
        "    import uvloop\n"
        "except ImportError:\n"
        "    uvloop = None\n"
        "def dumps():\n"
        "    import msgpack\n"
        "def has():\n"
        "    return importlib.util.find_spec('gevent')\n"
    )
    got = {(found.module, found.lazy) for found in scan_source(source, "x.py")}
    assert got == {
        ("aio_pika", False), ("redis", False), ("celery", True), ("uvloop", True),
        ("msgpack", True), ("gevent", True),
    }


def test_the_scan_sees_the_package_imports() -> None:
    eager = {found.module for found in scan_package() if not found.lazy}
    assert {"aio_pika", "aiormq", "pamqp", "redis", "anyio", "orjson", "yarl"} <= eager


def test_every_imported_package_is_declared() -> None:
    core = {canonicalize_name(requirement.name) for requirement in core_requirements()}
    extras = {
        extra: {canonicalize_name(requirement.name) for requirement in requirements}
        for extra, requirements in extra_requirements().items()
    }
    anywhere = core.union(*extras.values())
    problems: dict[str, list[str]] = {}
    for found in scan_package():
        dists = distributions(found.module)
        module_extra = EXTRA_MODULES.get(found.where.rsplit(":", 1)[0])
        if found.lazy:
            allowed, what = anywhere, "a core dependency or an optional extra"
        elif module_extra is not None:
            allowed = core | extras.get(module_extra, set())
            what = f"a core dependency or the '{module_extra}' extra"
        else:
            allowed, what = core, "a core dependency (imported at module level)"
        if not dists & allowed:
            problem = (
                f"{found.module!r} (distribution {' or '.join(sorted(dists))}) is not declared"
                f" in pyproject.toml as {what}; imported at"
            )
            problems.setdefault(problem, []).append(found.where)
    assert not problems, "\n".join(
        f"{problem} {', '.join(places)}" for problem, places in sorted(problems.items())
    )


def test_every_core_dependency_and_extra_has_an_upper_bound() -> None:
    requirements = core_requirements() + [
        requirement for group in extra_requirements().values() for requirement in group
    ]
    unbounded = [
        str(requirement)
        for requirement in requirements
        if not any(specifier.operator in UPPER for specifier in requirement.specifier)
    ]
    assert not unbounded, f"no upper bound in pyproject.toml: {unbounded}"
    lower = [
        str(requirement)
        for requirement in requirements
        if not any(specifier.operator in {">=", ">", "==", "~="}
                   for specifier in requirement.specifier)
    ]
    assert not lower, f"no lower bound in pyproject.toml: {lower}"


def test_constraints_pin_every_declared_package_within_its_bounds() -> None:
    pins = constraints()
    requirements = core_requirements() + extra_requirements()["msgpack"]  # what bootstrap installs
    problems = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement}: not pinned in constraints.txt")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{requirement}: constraints.txt pins {pins[name]}, out of bounds")
    assert not problems, "\n".join(problems)
