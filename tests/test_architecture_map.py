"""docs/architecture.md cannot go stale either way: every module its tables name exists, every
module of orchestrator/ and launch/ is in its tables, and every path or class it names in
backticks (or a class in its diagram) is there.

A table row names modules in its first cell, relative to the table's plane (`orchestrator/` or
`launch/`); a bare name after a path takes that path's folder (`checkpoint/manifest`, `layout`
is checkpoint/layout). A name ending in `/` is a package, and covers every module under it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.runs import REPO

MAP = REPO / "docs" / "architecture.md"
PLANES = ("orchestrator", "launch")
# Names in the map that are not stockpot's: the libraries it talks about.
LIBRARY_NAMES = {"OmegaConf"}


def table_names(text: str) -> dict[str, list[str]]:
    """Per plane, the names in the first cells of its table: `soup/reader`, `config/`, ..."""
    names: dict[str, list[str]] = {plane: [] for plane in PLANES}
    plane = None
    for line in text.splitlines():
        heading = re.match(r"^## (\w+)/", line)
        if heading or line.startswith("## "):
            plane = heading.group(1) if heading and heading.group(1) in PLANES else None
        elif plane and line.startswith("| `"):
            folder = ""
            for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
                folder = name.rpartition("/")[0] + "/" if "/" in name.rstrip("/") else folder
                full = name if "/" in name.rstrip("/") else folder + name
                names[plane].append(full)
    return names


def modules(plane: str) -> list[str]:
    """The plane's modules, relative and without .py (`soup/reader`); dunder files left out."""
    root = REPO / plane
    return sorted(
        str(p.relative_to(root).with_suffix(""))
        for p in root.rglob("*.py")
        if not p.name.startswith("__")
    )


def test_every_module_the_tables_name_exists() -> None:
    missing = []
    for plane, names in table_names(MAP.read_text()).items():
        assert names, f"no table of {plane}/ modules found in {MAP.name}"
        for name in names:
            where = REPO / plane / name
            ok = where.is_dir() if name.endswith("/") else where.with_suffix(".py").is_file()
            if not ok:
                missing.append(f"{plane}/{name}")
    assert not missing, f"{MAP.name} names modules that do not exist (fix their rows): {missing}"


def test_every_module_is_in_the_tables() -> None:
    unnamed = []
    for plane, names in table_names(MAP.read_text()).items():
        packages = tuple(n for n in names if n.endswith("/"))
        for module in modules(plane):
            if module not in names and not module.startswith(packages):
                unnamed.append(f"{plane}/{module}")
    assert not unnamed, f"not in {MAP.name}'s tables (add a row or add it to one): {unnamed}"


def test_every_path_in_backticks_exists() -> None:
    """`docs/config.md`, `config/schema.py`, `storage/base.Backend`: a repo path, or a path in
    one of the planes, with an optional `.Name` that the module must define."""
    bad = []
    for token in set(re.findall(r"`([\w./]+/[\w./]*)`", MAP.read_text())):
        if not any(_exists(root / token) for root in (REPO, *(REPO / p for p in PLANES))):
            bad.append(token)
    assert not bad, f"{MAP.name} names paths that do not exist: {sorted(bad)}"


def _exists(where: Path) -> bool:
    if where.exists() or Path(f"{where}.py").is_file():
        return True
    module, _, name = str(where).rpartition(".")
    source = Path(module + ".py")
    return bool(module) and source.is_file() and name in _defined(source)


def test_every_class_it_names_is_defined() -> None:
    text = MAP.read_text()
    diagram = "\n".join(re.findall(r"```\n(.*?)```", text, re.S))
    named = set(re.findall(r"`([A-Z][a-z]+[A-Z]\w*|[A-Z][a-z]+)`", text))
    named |= set(re.findall(r"\b[A-Z][a-z]+[A-Z]\w*\b", diagram)) - LIBRARY_NAMES
    defined = set().union(*(_defined(p) for plane in PLANES for p in (REPO / plane).rglob("*.py")))
    assert named <= defined, f"{MAP.name} names classes that do not exist: {named - defined}"


def _defined(source: Path) -> set[str]:
    """The names a module defines at its top level (classes, functions, assignments)."""
    tree = ast.parse(source.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names
