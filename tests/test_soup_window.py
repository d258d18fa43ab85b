"""`stockpot soup RUN --recipe window --weights RULE`: a run's checkpoints at uneven steps (every
4, then every 2), merged with the weights schedules.py states, bit for bit; SOUP.json and
--dry-run say the rule, the formula and each ingredient's weight; a bad rule commits nothing.
The multi-rank (DDP, FSDP on S3) window soups are in test_soup_dist.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cli import main
from orchestrator.soup.schedules import window_weights
from tests.soup_fixtures import (
    assert_bitwise,
    ckpt_dir,
    dcp_model,
    mixer_reference,
    soup_tensors,
    train_run,
)

STEPS = (8, 12, 14, 16)  # of saves 4, 8, 12, 14, 16: --steps 8:16, spans 4, 4, 2, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("window") / "run"
    train_run(path, saves=(4, *STEPS))
    return path


def test_cosine_window_is_the_stated_mean_bit_for_bit(run: Path, capsys) -> None:
    argv = ["soup", str(run), "--recipe", "window", "--weights", "decay:cosine", "--steps", "8:16"]
    assert main([*argv, "--dry-run"]) == 0
    want = window_weights(STEPS, "decay:cosine")
    listed = capsys.readouterr().out
    for step, w in zip(STEPS, want.weights, strict=True):
        assert f"step {step}  weight={w:.4f}" in listed, listed
    assert "window decay:cosine: c_1 = 1 - m_1" in listed
    assert main([*argv, "--name", "cos"]) == 0
    out = run / "soups" / "cos"
    record = json.loads((out / "SOUP.json").read_text())
    assert record["recipe"] == "window" and record["params"]["schedule"] == "decay:cosine"
    details = record["details"]
    assert details["formula"] == want.formula and details["steps"] == list(STEPS)
    assert details["weights"] == want.weights  # as the mixer used them (they sum to exactly 1)
    assert [i["weight"] for i in record["ingredients"]] == want.weights
    assert details["covers"] == [[4, 8], [8, 12], [12, 14], [14, 16]]
    states = [dcp_model(ckpt_dir(run, s)) for s in STEPS]
    assert_bitwise(soup_tensors(out), mixer_reference(states, want.weights))


def test_uniform_window_weighs_the_steps_each_checkpoint_covers(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "uniform"
    assert main(["soup", str(run), "--recipe", "window", "--steps", "8:", "--out", str(out)]) == 0
    record = json.loads((out / "SOUP.json").read_text())
    assert record["details"]["weights"] == pytest.approx([1 / 3, 1 / 3, 1 / 6, 1 / 6])
    states = [dcp_model(ckpt_dir(run, s)) for s in STEPS]
    assert_bitwise(soup_tensors(out), mixer_reference(states, record["details"]["weights"]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--weights", "cosine"],
            "soup.schedule: unknown window rule 'cosine'; use one of uniform, linear, decay:linear",
        ),
        (["--steps", "16:"], "a soup needs at least 2 ingredients"),
        (["--schedule", "linear", "--recipe", "uniform"], "soup.schedule linear is for recipe"),
    ],
)
def test_a_bad_window_is_one_line_and_commits_nothing(
    run: Path, tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    out = tmp_path / "bad"
    capsys.readouterr()
    assert main(["soup", str(run), "--recipe", "window", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_checkpoints_of_several_runs_are_no_window(run: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    train_run(other, saves=(2,))
    capsys.readouterr()
    assert (
        main(["soup", str(run), str(other), "--recipe", "window", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "a window merge is over one run's checkpoints; got 2 runs" in capsys.readouterr().err
