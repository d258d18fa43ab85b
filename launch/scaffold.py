"""`stockpot init NAME`: a task package to start from, so a user's own model trains in minutes.

    NAME/__init__.py
    NAME/task.py       the Task protocol filled in: a small MLP on in-memory data (templates/)
    NAME/config.yaml   a config that trains it: `stockpot run NAME/config.yaml`

The package is importable from the directory `stockpot run` starts in (its ranks run with that
directory on sys.path), so `task._target_: NAME.task.Task` finds it with no install step.
"""

from __future__ import annotations

import argparse
import keyword
import string
from importlib import resources
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError


def add_parser(sub: Any) -> None:
    init = sub.add_parser("init", help="scaffold a task package and a config that trains it")
    init.add_argument("name", help="package name: a Python identifier, e.g. my_task")
    init.add_argument("--dir", default=".", help="where to create NAME/ (default: here)")
    init.set_defaults(handler=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    made = scaffold(args.name, Path(args.dir))
    for path in made:
        print(f"created {path}")
    config = made[-1]
    print(f"next: stockpot run {config}   (from {Path(args.dir)}; edit {made[1]} first)")
    return 0


def check_name(name: str) -> None:
    if not name.isidentifier() or keyword.iskeyword(name) or name in {"orchestrator", "launch"}:
        raise UsageError(
            f"stockpot init: {name!r} is not usable as a package name; use a Python identifier "
            "such as my_task (letters, digits, underscores; not a keyword or a stockpot package)"
        )


def scaffold(name: str, parent: Path) -> list[Path]:
    """Write NAME/{__init__.py, task.py, config.yaml} under `parent`; returns their paths.
    Refuses to touch an existing NAME/ (UsageError)."""
    check_name(name)
    root = parent / name
    if root.exists():
        raise UsageError(f"stockpot init: {root} already exists; pick another name or remove it")
    templates = resources.files("launch.templates")
    task = templates.joinpath("task.py").read_text().replace("NAME", name)
    config = string.Template(templates.joinpath("config.yaml").read_text()).substitute(name=name)
    root.mkdir(parents=True)
    files = {
        "__init__.py": f'"""{name}: a stockpot task package (made by `stockpot init`)."""\n',
        "task.py": task,
        "config.yaml": config,
    }
    for filename, text in files.items():
        (root / filename).write_text(text)
    return [root / filename for filename in files]
