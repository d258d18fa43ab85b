"""`stockpot soup --eval CMD` / `--eval-hook MOD:FN`: soups scored by the user's own evaluation
(no task, no training run): .safetensors ingredients at known distances from a target, scored
by a tiny script (minus the distance) that greedy must follow."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.soup_eval_hooks import TARGET
from tests.test_soup import in_process, record_of

# The candidate comes as argv[1] and in the env; scores: minus its distance to argv[2].
SCRIPT = """\
import json, os, sys
import numpy as np
from safetensors.numpy import load_file
model, target = sys.argv[1], sys.argv[2]
assert os.environ["STOCKPOT_SOUP_MODEL"] == model
with open(sys.argv[3], "a") as f:
    f.write(model + "\\n")
print("loading", model)  # the metrics are on the LAST line
d = float(np.linalg.norm(load_file(model)["w"] - load_file(target)["w"]))
print(json.dumps({"eval/score": -d, "eval/error": d}))
"""

# Offsets from TARGET, in distinct places: a and b cancel out (their mean is near TARGET),
# c is far and pulls any mean away from it.
OFFSETS = {"a.safetensors": (0, 1.0), "b.safetensors": (0, -1.2), "c.safetensors": (9, 3.0)}


def _offset(where: int, by: float) -> torch.Tensor:
    w = TARGET.clone()
    w.view(-1)[where] += by
    return w


@pytest.fixture
def kitchen(tmp_path: Path) -> Path:
    for name, (where, by) in OFFSETS.items():
        save_file({"w": _offset(where, by), "b": torch.ones(8), "n": torch.tensor(3)},
                  tmp_path / name)  # fmt: skip
    save_file({"w": TARGET}, tmp_path / "target.safetensors")
    (tmp_path / "score.py").write_text(SCRIPT)
    return tmp_path


def _cmd(dir: Path) -> str:
    return f"{sys.executable} {dir}/score.py {{model}} {dir}/target.safetensors {dir}/calls"


def _soup(capsys: pytest.CaptureFixture[str], dir: Path, *args: str):  # type: ignore[no-untyped-def]
    paths = [dir / n for n in OFFSETS]
    return in_process(capsys, "soup", *paths, *args)


def test_greedy_follows_the_command_and_records_its_scores(
    capsys: pytest.CaptureFixture[str], kitchen: Path
) -> None:
    cmd = _cmd(kitchen)
    got = _soup(capsys, kitchen, "--recipe", "greedy", "--eval", cmd, "--metric", "eval/score",
                "--out", str(kitchen / "one"))  # fmt: skip
    assert got.returncode == 0, got.stderr
    record = record_of(kitchen / "one")
    assert record["details"]["order"] == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert record["details"]["chosen"] == ["a.safetensors", "b.safetensors"]
    assert [t["accepted"] for t in record["details"]["tries"]] == [True, False]
    want = [-1.0, -1.2, -3.0]
    got_scores = [i["scores"]["eval/score"] for i in record["ingredients"]]
    assert got_scores == pytest.approx(want, abs=1e-5)
    assert [i["in_soup"] for i in record["ingredients"]] == [True, True, False]
    assert record["soup_scores"]["eval/score"] == pytest.approx(-0.1, abs=1e-5)
    assert record["evaluation"] == {"command": cmd, "metric": "eval/score", "mode": "max"}
    calls = (kitchen / "calls").read_text().split()
    assert len(calls) == 6  # 3 ingredients, 2 tries, the soup as written
    assert not any(os.path.exists(c) for c in calls)  # every temp file removed


def test_a_uniform_soup_records_the_hooks_scores(
    capsys: pytest.CaptureFixture[str], kitchen: Path
) -> None:
    hook = "tests.soup_eval_hooks:distance"
    got = _soup(capsys, kitchen, "--eval-hook", hook, "--out", str(kitchen / "u"))
    assert got.returncode == 0, got.stderr
    record = record_of(kitchen / "u")
    mean = sum(_offset(*o) for o in OFFSETS.values()) / 3
    want = float((mean - TARGET).norm())
    assert record["soup_scores"] == {"eval/error": pytest.approx(want, rel=1e-5)}
    assert record["evaluation"] == {"hook": hook, "metric": "eval/error", "mode": "min"}
    assert "soup scores: eval/error=" in got.stdout


def test_a_uniform_soup_needs_no_metric_to_record_the_commands_scores(
    capsys: pytest.CaptureFixture[str], kitchen: Path
) -> None:
    cmd = _cmd(kitchen)
    got = _soup(capsys, kitchen, "--eval", cmd, "--out", str(kitchen / "u"))
    assert got.returncode == 0, got.stderr
    record = record_of(kitchen / "u")
    assert set(record["soup_scores"]) == {"eval/score", "eval/error"}
    assert record["evaluation"] == {"command": cmd}  # nothing was ranked
    assert len((kitchen / "calls").read_text().split()) == 1  # the soup as written, only


@pytest.mark.parametrize(
    ("cmd", "says"),
    [
        ("echo doomed >&2; exit 3", "exit code 3; last stderr line: doomed"),
        ("echo warming up >&2; echo 'not json'", "is not a JSON object of numbers"),
    ],
)
def test_a_failing_command_is_one_line_and_commits_nothing(
    capsys: pytest.CaptureFixture[str], kitchen: Path, cmd: str, says: str
) -> None:
    got = _soup(capsys, kitchen, "--eval", cmd, "--out", str(kitchen / "bad"))
    assert got.returncode == 2
    line = got.stderr.strip().splitlines()[-1]
    assert line.startswith("stockpot: error: --eval ") and cmd in line and says in line
    assert not (kitchen / "bad" / "SOUP.json").exists()
    assert not (kitchen / "bad").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--recipe", "learned", "--eval", "true"], "recipe learned runs the task's own model"),
        (["--recompute-bn", "--eval-hook", "m:f"], "--recompute-bn runs the task's own model"),
        (["--eval", "true", "--eval-hook", "m:f"], "set one"),
        (["--eval-hook", "tests.soup_eval_hooks:broken"], "returned list, not a dict"),
        (["--eval-hook", "tests.soup_eval_hooks:nope"], "has no function nope"),
        (["--recipe", "greedy"], "or score with your own --eval CMD"),
        (["--eval-hook", "tests.soup_eval_hooks:raises"], "raised RuntimeError: no GPU here"),
        (["--recipe", "greedy", "--eval", "SCRIPT"], "say which one ranks soups with --metric"),
    ],
)
def test_what_a_user_evaluation_cannot_do_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], kitchen: Path, args: list[str], says: str
) -> None:
    args = [_cmd(kitchen) if a == "SCRIPT" else a for a in args]
    got = _soup(capsys, kitchen, *args, "--out", str(kitchen / "no"))
    assert got.returncode == 2
    assert says in got.stderr and len(got.stderr.strip().splitlines()) == 1, got.stderr
    assert not (kitchen / "no").exists()
