"""The `stockpot` console script, run as a real subprocess from the venv."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STOCKPOT = str(Path(sys.executable).parent / "stockpot")


def stockpot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STOCKPOT, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def test_help_lists_every_subcommand() -> None:
    out = stockpot("--help")
    assert out.returncode == 0
    for name in ("run", "submit", "status", "verify", "export", "soup"):
        assert f"    {name} " in out.stdout


def test_python_dash_m_launch_is_the_same_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "launch", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0 and "usage: stockpot" in out.stdout


def test_unknown_key_exits_2_with_one_line_naming_it() -> None:
    out = stockpot("run", "configs/demo.yaml", "no_such_key=1")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "no_such_key" in out.stderr and "Traceback" not in out.stderr


def test_debug_shows_the_traceback() -> None:
    out = stockpot("--debug", "run", "configs/demo.yaml", "no_such_key=1")
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr


def test_missing_config_file_is_one_line() -> None:
    out = stockpot("run", "configs/nope.yaml")
    assert (
        out.returncode == 2
        and out.stderr.strip() == "stockpot: error: config file not found: configs/nope.yaml"
    )


def test_print_config_shows_resolved_yaml_with_hash() -> None:
    out = stockpot("run", "configs/demo.yaml", "trainer.max_steps=9", "--print-config")
    assert out.returncode == 0
    assert out.stdout.startswith("# stockpot resolved config; hash ")
    assert "max_steps: 9" in out.stdout


def test_soup_of_something_that_is_no_run_says_so_in_one_line() -> None:
    out = stockpot("soup", "configs/demo.yaml")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "configs/demo.yaml is not a run dir, a sweep dir, a committed checkpoint" in out.stderr


def test_cli_import_stays_light() -> None:
    code = "import sys, launch.cli; print(sorted(m for m in ('torch', 'fsspec', 'submitit') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
