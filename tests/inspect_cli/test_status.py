"""`stockpot status` on a saved run, through the real console script: the JSON report's
shape, the human table with leftovers and corrupt steps, the exit code for a directory that
is not a run, and overrides without a config file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.inspect_cli.saved_run import (
    STEPS,
    Run,
    add_escaping_manifest,
    add_leftovers,
    one_line_error,
    stockpot,
)


def test_status_json_shape(run: Run) -> None:
    uncommitted, tmp = add_leftovers(run)
    bad = add_escaping_manifest(run)
    out = stockpot("status", run.path, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report) == {"checkpoints", "leftovers", "corrupt"}
    assert [c["step"] for c in report["checkpoints"]] == list(STEPS)
    for c in report["checkpoints"]:
        assert set(c) == {"step", "path", "metrics", "bytes", "created_at", "kind"}
        assert c["kind"] == "full"  # "weights" once retention drops its optimizer state
        ckpt = run.ckpt(c["step"])
        assert c["path"] == str(ckpt)
        assert set(c["metrics"]) == {"loss", "lr"} and c["metrics"]["lr"] == 0.1
        on_disk = sum(
            f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and f.name != "MANIFEST.json"
        )
        assert c["bytes"] == on_disk
        assert run.t0 <= c["created_at"] <= time.time()
    assert report["leftovers"] == [str(tmp), str(uncommitted)]
    (corrupt,) = report["corrupt"]
    assert set(corrupt) == {"path", "reason"}
    assert corrupt["path"] == str(bad) and "'../x' escapes the checkpoint" in corrupt["reason"]


def test_status_human_table(run: Run) -> None:
    add_leftovers(run)
    add_escaping_manifest(run)
    out = stockpot("status", run.path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{run.path}: 2 committed checkpoints"
    assert lines[1].split() == ["STEP", "CREATED", "(UTC)", "SIZE", "KIND", "METRICS"]
    for line, step in zip(lines[2:4], STEPS, strict=True):
        assert (
            line.split()[0] == str(step) and "loss=" in line and "lr=0.1" in line and "kB" in line
        )
        assert " full " in line  # not a weights-only one (retention dropped no optimizer state)
    rest = lines[4:]
    assert rest[0].startswith("leftover") and ".tmp-step-000000100" in rest[0]
    assert rest[1].startswith("leftover") and rest[1].endswith("step-000000099")
    assert rest[2].startswith("corrupt") and "step-000000007" in rest[2] and "escapes" in rest[2]
    assert len(rest) == 3


@pytest.mark.parametrize("make", ["missing", "no_checkpoints_dir"])
def test_status_of_a_non_run_dir_exits_2(tmp_path: Path, make: str) -> None:
    target = tmp_path / "nope"
    if make == "no_checkpoints_dir":
        target.mkdir()
    out = stockpot("status", target)
    assert out.returncode == 2
    assert str(target) in one_line_error(out)


def test_overrides_need_a_config_file(run: Run) -> None:
    out = stockpot("status", run.path, "trainer.max_steps=3")
    assert out.returncode == 2
    assert "key=value overrides (trainer.max_steps=3, ...) need a config file" in out.stderr
