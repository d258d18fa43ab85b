"""Generated docs never drift: docs/config.md and docs/troubleshooting.md equal what
`python -m launch.docs` makes from the source now, and the errors the real CLI prints are the
ones the troubleshooting page lists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.docs import CONFIG_DOC, TROUBLESHOOTING_DOC, field_comments
from launch.docs_errors import find_errors
from tests.runs import REPO, STOCKPOT


def test_generated_docs_are_current() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "launch.docs", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr  # stale: run `python -m launch.docs`


def test_every_config_key_is_documented() -> None:
    from orchestrator.config.schema import Config, flatten

    text = CONFIG_DOC.read_text()
    rows = re.findall(r"^\| `([^`]+)` \| `[^`]*` \| `[^`]*` \| (.*) \|$", text, re.M)
    assert rows and all(about.strip() for _, about in rows), "a key without a description"
    documented = {key for key, _ in rows}
    # A top-level key that is not a section (entrypoint): its own heading, then its description.
    documented |= set(re.findall(r"^## `(\w+)`\n\n\w.*\n\nDefault: ", text, re.M))
    for key in flatten(Config().to_dict()):
        if key.startswith(("task.", "sweep")):
            continue  # free-form: the task's own keywords; the sweep mapping
        assert key in documented, f"{key} is missing from docs/config.md"


def test_field_comments_reads_the_block_above_each_field() -> None:
    from orchestrator.config.schema import SchedulerConfig

    about = field_comments(SchedulerConfig)
    assert about["decay_steps"].startswith("Steps over which the cosine decays; null:")
    assert "(kept on resume" in about["decay_steps"]  # both comment lines


def test_inherited_fields_keep_their_comments() -> None:
    """CheckpointConfig is a SaveSchedule and a RetentionPolicy; each comments its own fields."""
    from orchestrator.config.checkpoint import CheckpointConfig

    about = field_comments(CheckpointConfig)
    assert about["every_steps"].startswith("Save every N optimizer steps")  # SaveSchedule's
    assert about["keep_last"].startswith("Keep the newest N committed")  # RetentionPolicy's
    assert about["async_save"].startswith("Write and commit in the background")  # its own
    row = f"| `checkpoint.keep_last` | `int \\| None` | `3` | {about['keep_last']} |"
    assert row in CONFIG_DOC.read_text().splitlines()


def _patterns() -> list[re.Pattern[str]]:
    entries = re.findall(r"^- `(.+?)` \(", TROUBLESHOOTING_DOC.read_text(), re.M)
    return [
        re.compile("^" + ".+".join(re.escape(p) for p in re.split(r"<[^<>]*>", e)) + "$")
        for e in entries
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "configs/demo.yaml", "no_such_key=1"],
        ["run", "configs/demo.yaml", "optim.lr=-1"],
        ["run", "configs/demo.yaml", "trainer.max_steps"],
        ["run", "configs/demo.yaml", "task._target_=nowhere.Task", "trainer.nproc=1"],
        ["status", "/nonexistent/run"],
        ["init", "not-an-identifier"],
        ["plot", "configs", "--out", "x.png"],
    ],
)
def test_what_the_cli_prints_is_on_the_page(argv: list[str]) -> None:
    out = subprocess.run([STOCKPOT, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    # The CLI's own line, or a rank's log line (`... [rank 0] ERROR stockpot: <message>`).
    errors = re.findall(r"(?:^stockpot: error: | ERROR stockpot: )(.+)$", out.stderr, re.M)
    assert out.returncode == 2 and errors, out.stderr[-2000:]
    message = " ".join(errors[-1].replace("`", "'").split())
    assert any(p.match(message) for p in _patterns()), f"not on troubleshooting.md: {message}"


def test_a_new_error_makes_the_page_stale(tmp_path: Path) -> None:
    (tmp_path / "orchestrator").mkdir()
    (tmp_path / "launch").mkdir()
    (tmp_path / "orchestrator" / "new.py").write_text(
        "def f(x):\n    raise ConfigError(f'trainer.x must be odd (got {x.value})')\n"
        "def g(y):\n    require(y, 'bad y', error=CheckpointCorrupt)\n"
    )
    found = {(s.kind, s.message) for s in find_errors(tmp_path)}
    assert found == {
        ("ConfigError", "trainer.x must be odd (got <value>)"),
        ("CheckpointCorrupt", "bad y"),
    }
