"""Selection rules: pure functions on hand-built candidates, and on hand-built manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.checkpoint.format import Manifest
from orchestrator.config import SoupConfig
from orchestrator.errors import ConfigError, UsageError
from orchestrator.metric_rules import improved_any, metric_mode
from orchestrator.soup.ingredients import Candidate, parse_steps, resolve, select, top_k

C = [
    Candidate(10, {"eval/loss": 2.0, "eval/acc": 0.50}),
    Candidate(20, {"eval/loss": 1.5, "eval/acc": 0.40}),  # loss improved
    Candidate(30, {"eval/loss": 1.7, "eval/acc": 0.45}),  # nothing improved
    Candidate(40, {"eval/loss": 1.6, "eval/acc": 0.55}),  # acc improved
    Candidate(50, {"eval/loss": 1.4, "eval/acc": 0.52}),  # loss improved
    Candidate(60, {}),  # unscored
]


def steps(cands: list[Candidate]) -> list[int]:
    return [c.step for c in cands]


def test_improved_any_keeps_each_checkpoint_that_beats_all_earlier_on_some_metric() -> None:
    assert steps(improved_any(C, ["eval/loss", "eval/acc"])) == [10, 20, 40, 50]
    assert steps(improved_any(C, ["eval/acc"])) == [10, 40]
    assert steps(improved_any(list(reversed(C)), ["eval/loss"])) == [10, 20, 50]  # step order


def test_top_uses_the_metric_direction_and_returns_step_order() -> None:
    assert steps(top_k(C, 2, "eval/loss", "min")) == [20, 50]
    assert steps(top_k(C, 2, "eval/acc", "max")) == [40, 50]
    assert metric_mode("eval/loss", None) == "min" and metric_mode("eval/acc", None) == "max"
    assert metric_mode("eval/loss", "max") == "max"


def test_rules_apply_in_order_and_say_what_each_kept() -> None:
    cfg = SoupConfig(steps="20:50", every=20, last=1)
    kept, trail = select(C, cfg)
    assert steps(kept) == [40]
    assert trail == [
        "6 committed",
        "steps 20:50 kept 4 of 6",
        "every 20 kept 2 of 4",
        "last 1 kept 1 of 2",
    ]
    kept, _ = select(C, SoupConfig(steps=":30"))
    assert steps(kept) == [10, 20, 30]
    kept, _ = select(C, SoupConfig(steps="40:"))
    assert steps(kept) == [40, 50, 60]
    kept, _ = select(C, SoupConfig(top=3, metric="eval/acc"))
    assert steps(kept) == [10, 40, 50]
    kept, _ = select(C, SoupConfig(improved_any=("eval/loss",), last=2))
    assert steps(kept) == [20, 50]


def test_bad_rules_are_one_line_errors() -> None:
    with pytest.raises(UsageError, match="--steps must be A:B"):
        parse_steps("10-20")
    with pytest.raises(ConfigError, match=r"soup\.steps must be A:B"):
        SoupConfig(steps="10")
    with pytest.raises(ConfigError, match=r"soup\.weights must be >= 0"):
        SoupConfig(recipe="weighted", weights=(1.0, -1.0))
    with pytest.raises(ConfigError, match=r"soup\.last must be >= 1"):
        SoupConfig(last=0)


def _hand_built_run(root: Path, metrics: dict[int, dict[str, float]]) -> Path:
    """Committed checkpoints as far as selection can tell: just manifests (no tensors)."""
    for step, m in metrics.items():
        d = root / "checkpoints" / f"step-{step:09d}"
        d.mkdir(parents=True)
        (d / "MANIFEST.json").write_bytes(Manifest(step, {}, 1, metrics=m).to_json())
    (root / "checkpoints" / "step-000000099").mkdir()  # no manifest: not committed, never chosen
    return root


def test_rules_select_exactly_from_manifests(tmp_path: Path) -> None:
    run = _hand_built_run(tmp_path / "run", {c.step: dict(c.metrics) for c in C})
    chosen = resolve([str(run)], SoupConfig(improved_any=("eval/loss", "eval/acc")))
    assert [i.step for i in chosen] == [10, 20, 40, 50]
    assert all("improved_any" in i.why and i.manifest_checksum for i in chosen)
    assert [i.step for i in resolve([str(run)], SoupConfig(every=20))] == [20, 40, 60]
    assert [i.step for i in resolve([str(run)], SoupConfig(last=3))] == [40, 50, 60]
    assert [i.step for i in resolve([str(run)], SoupConfig(top=2))] == [20, 50]


def test_fewer_than_two_ingredients_says_which_rule_left_how_many(tmp_path: Path) -> None:
    run = _hand_built_run(tmp_path / "run", {c.step: dict(c.metrics) for c in C})
    with pytest.raises(UsageError) as err:
        resolve([str(run)], SoupConfig(steps="15:45", every=40))
    msg = str(err.value)
    assert "steps 15:45 kept 3 of 6" in msg and "every 40 kept 1 of 3" in msg and "(left 1)" in msg
    assert "\n" not in msg


def test_several_runs_give_one_ingredient_each(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for k in range(3):
        _hand_built_run(
            sweep / f"{k}-seed={k}", {10: {"eval/loss": 1.0 - k / 10}, 20: {"eval/loss": 2.0}}
        )
    (sweep / "notes").mkdir()
    latest = resolve([str(sweep)], SoupConfig())
    assert [(Path(i.run or "").name, i.step) for i in latest] == [
        ("0-seed=0", 20),
        ("1-seed=1", 20),
        ("2-seed=2", 20),
    ]
    best = resolve(
        [str(sweep / "0-seed=0"), str(sweep / "1-seed=1")], SoupConfig(metric="eval/loss")
    )
    assert [i.step for i in best] == [10, 10] and "best by eval/loss" in best[0].why
    record = json.loads((sweep / "0-seed=0/checkpoints/step-000000010/MANIFEST.json").read_text())
    assert record["step"] == 10


@pytest.mark.parametrize(
    ("run_dir", "out", "where"),
    [
        ("runs/demo", None, "runs/demo/soups/mix"),
        ("s3://bucket/sweep/", None, "s3://bucket/sweep/soups/mix"),
        ("runs/demo", "s3://bucket/elsewhere", "s3://bucket/elsewhere"),
    ],
)
def test_a_soup_is_written_to_soup_out_else_under_the_run_dir(run_dir, out, where) -> None:
    from orchestrator.config.soup import soup_out_dir

    assert soup_out_dir(run_dir, SoupConfig(name="mix", out=out)) == where
