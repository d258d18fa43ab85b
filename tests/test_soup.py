"""`stockpot soup` on real checkpoints written by the real Checkpointer (model + optimizer).

Numerics against an independent float64 mean of the checkpoints as DCP itself loads them;
integer buffers, tied weights, mismatches, corruption, unrelated ingredients, the eval-driven
recipes, the committed output and its use by `model.init_from`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from subprocess import CompletedProcess

import pytest
import torch
from torch import nn

from launch.cli import main
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.weights import read_weights
from orchestrator.state import ModelAndOptimizer
from orchestrator.storage import Store
from tests.soup_fixtures import (
    assert_close_to_rounding,
    ckpt_dir,
    dcp_model,
    f64_mean,
    soup_tensors,
    stockpot,
    train_run,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("soup") / "run"
    train_run(path, saves=(25, 50, 75, 100))
    return path


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same task trained from an independent initialisation."""
    path = tmp_path_factory.mktemp("soup") / "stranger"
    train_run(path, init_seed=7, saves=(100,))
    return path


def in_process(capsys: pytest.CaptureFixture[str], *args: object) -> CompletedProcess[str]:
    """`stockpot ARGS` through the CLI's main in this process (no torch import to wait for):
    its exit code and output, shaped like `stockpot`'s. The tests whose assertions count the
    lines a user sees run the console script instead."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return CompletedProcess(["stockpot", *map(str, args)], code, out, err)


def record_of(out: Path) -> dict:
    return json.loads((out / "SOUP.json").read_text())


def test_uniform_equals_an_independent_float64_mean(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "uniform"
    got = stockpot("soup", run, "--recipe", "uniform", "--out", out)
    assert got.returncode == 0, got.stderr
    assert "uniform soup of 4 of 4 ingredients" in got.stdout
    want = f64_mean([dcp_model(ckpt_dir(run, s)) for s in (25, 50, 75, 100)])
    assert_close_to_rounding(soup_tensors(out), want)
    record = record_of(out)
    assert [i["step"] for i in record["ingredients"]] == [25, 50, 75, 100]
    assert all(len(i["manifest_checksum"]) == 32 for i in record["ingredients"])
    assert (
        record["files"]["model.safetensors"]["size"] == (out / "model.safetensors").stat().st_size
    )
    assert record["related_check"]["cosine"] > 0.5
    assert {"torch", "stockpot", "python"} <= set(record["versions"])
    assert record["memory"]["peak_rss_bytes"] > 0 and record["timings"]["total_s"] > 0
    assert not list(tmp_path.glob(".tmp-*"))  # committed by rename: no temp dir left


def test_weighted_equals_the_weighted_float64_mean(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "weighted"
    code = main(
        ["soup", str(run), "--recipe", "weighted", "--weights", "1,0,2,5", "--out", str(out)]
    )
    assert code == 0
    states = [dcp_model(ckpt_dir(run, s)) for s in (25, 50, 75, 100)]
    assert_close_to_rounding(soup_tensors(out), f64_mean(states, [1, 0, 2, 5]))
    assert record_of(out)["details"]["weights"] == [0.125, 0.0, 0.25, 0.625]
    assert (
        main(
            [
                "soup",
                str(run),
                "--recipe",
                "weighted",
                "--weights",
                "1,-1,1,1",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "soup.weights must be >= 0" in capsys.readouterr().err
    assert (
        main(
            [
                "soup",
                str(run),
                "--recipe",
                "weighted",
                "--weights",
                "1,1",
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert "--weights has 2 values for 4 ingredients" in capsys.readouterr().err


def test_default_out_dir_dry_run_and_no_second_commit(run: Path, capsys) -> None:
    assert main(["soup", str(run), "--steps", "50:", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"{run}/soups/soup (3 ingredients)" in text and "steps 50: kept 3 of 4" in text
    assert "the soup reads" in text and "hashed as it reads them" in text
    assert not (run / "soups").exists()
    assert main(["soup", str(run), "--name", "once", "--last", "2"]) == 0
    assert (run / "soups/once/SOUP.json").exists()
    assert main(["soup", str(run), "--name", "once", "--last", "2"]) == 1
    assert "already committed" in capsys.readouterr().err


def test_int_buffers_survive_and_tied_weights_stay_tied(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.bn = nn.Embedding(16, 8), nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.bn(self.emb(x)))

    paths = []
    for k, n_steps in enumerate((3, 5)):
        torch.manual_seed(0)
        model = Tied()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ckpt = Checkpointer(Store(str(tmp_path / f"r{k}")))
        ckpt.register("train", ModelAndOptimizer(model, opt))
        gen = torch.Generator().manual_seed(k)
        for _ in range(n_steps):
            x = torch.randint(16, (32,), generator=gen)
            nn.functional.cross_entropy(model(x), x).backward()
            opt.step()
            opt.zero_grad()
        ckpt.save(n_steps)
        ckpt.close()
        paths.append(ckpt_dir(tmp_path / f"r{k}", n_steps))
    out = tmp_path / "out"
    assert main(["soup", *map(str, paths), "--out", str(out)]) == 0
    soup = soup_tensors(out)
    assert soup["bn.num_batches_tracked"].dtype == torch.int64
    assert int(soup["bn.num_batches_tracked"]) == 3  # from the first ingredient, not averaged
    assert torch.equal(soup["emb.weight"], soup["head.weight"])
    assert record_of(out)["tied"] == {"head.weight": "emb.weight"}
    model = Tied()
    model.load_state_dict(soup)
    assert model.head.weight is model.emb.weight  # loads into the tied model, still tied


def test_mismatched_shapes_name_the_key_and_both_ingredients(run: Path, tmp_path: Path) -> None:
    from orchestrator.tasks.synthetic import SyntheticClassification

    other = SyntheticClassification(split="finetune", hidden=129).build_model()
    ckpt = Checkpointer(Store(str(tmp_path / "other")))
    ckpt.register("train", ModelAndOptimizer(other))
    ckpt.save(1)
    ckpt.close()
    got = stockpot(
        "soup", ckpt_dir(run, 100), ckpt_dir(tmp_path / "other", 1), "--out", tmp_path / "o"
    )
    assert got.returncode == 2
    (line,) = got.stderr.strip().splitlines()
    assert "0.bias has shape [128] vs [129]" in line
    assert str(ckpt_dir(run, 100)) in line and str(ckpt_dir(tmp_path / "other", 1)) in line


def test_a_flipped_byte_names_the_ingredient(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    (shard,) = ckpt_dir(copy, 75).glob("*_0.distcp")  # the model part
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    got = stockpot("soup", copy, "--out", tmp_path / "o")
    assert got.returncode == 3, got.stderr
    (line,) = got.stderr.strip().splitlines()
    assert "ingredient step 75" in line and str(shard) in line and "checksum mismatch" in line
    assert not (tmp_path / "o").exists()


def test_independently_initialised_ingredients_are_refused(
    run: Path, stranger: Path, tmp_path: Path, capsys
) -> None:
    pair = [str(ckpt_dir(run, 100)), str(ckpt_dir(stranger, 100))]
    got = in_process(capsys, "soup", *pair, "--out", tmp_path / "u")
    assert (
        got.returncode == 2
        and "look unrelated: the mean cosine between their weights" in got.stderr
    )
    assert "--allow-unrelated" in got.stderr and not (tmp_path / "u").exists()
    # greedy has the task: the midpoint check (run dirs carry config.yaml)
    got = in_process(capsys, "soup", run, stranger, "--recipe", "greedy", "--out", tmp_path / "g")
    assert got.returncode == 2 and "their midpoint has held-out loss" in got.stderr, got.stderr
    got = in_process(capsys, "soup", *pair, "--allow-unrelated", "--out", tmp_path / "a")
    assert got.returncode == 0, got.stderr


def test_greedy_is_never_worse_than_its_best_ingredient(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "greedy"
    flags = ["--recipe", "greedy", "--metric", "eval/accuracy", "--report", "--out", out]
    got = in_process(capsys, "soup", run, *flags)
    assert got.returncode == 0, got.stderr
    record = record_of(out)
    scores = [i["scores"]["eval/accuracy"] for i in record["ingredients"]]
    assert record["soup_scores"]["eval/accuracy"] >= max(scores)
    assert record["details"]["chosen"][0] == record["details"]["order"][0]
    assert "test/accuracy" in record["soup_scores"]  # the report's test split
    assert "best single ingredient" in got.stdout and "soup (greedy)" in got.stdout
    assert (out / "soup.png").read_bytes()[:4] == b"\x89PNG"
    chosen = [i for i in record["ingredients"] if i["in_soup"]]
    want = f64_mean(
        [
            dcp_model(i["path"])
            for i in sorted(
                chosen, key=lambda i: record["details"]["chosen"].index(f"step {i['step']}")
            )
        ]
    )
    assert_close_to_rounding(soup_tensors(out), want)
    # A sibling scored by a hook under the same metric name does not reuse the task's scores;
    # the next sibling scored by that hook reuses the hook's (tests/test_soup_eval.py: the rest).
    from tests import soup_eval_hooks

    flags = ["--recipe", "greedy", "--metric", "eval/accuracy"]
    for name, calls in (("hooked", 4 + 3 + 1), ("hooked-again", 3 + 1)):
        soup_eval_hooks.CALLS.clear()
        hook = ["--eval-hook", "tests.soup_eval_hooks:counted", "--out", tmp_path / name]
        assert in_process(capsys, "soup", run, *flags, *hook).returncode == 0
        assert len(soup_eval_hooks.CALLS) == calls, name


@pytest.mark.parametrize("per_layer", [False, True])
def test_learned_stays_convex_and_respects_the_memory_bound(
    run: Path, tmp_path: Path, per_layer: bool, capsys
) -> None:
    flags = ["--per-layer"] if per_layer else []
    got = in_process(
        capsys, "soup", run, "--recipe", "learned", *flags, "--epochs", "1", "--out", tmp_path / "l"
    )
    assert got.returncode == 0, got.stderr
    details = record_of(tmp_path / "l")["details"]
    rows = list(details["coefficients"].values()) if per_layer else [details["weights"]]
    for row in rows:
        assert len(row) == 4 and min(row) >= 0 and abs(sum(row) - 1) < 1e-9
    got = in_process(
        capsys, "soup", run, "--recipe", "learned", "--max-memory", "1e-6", "--out", tmp_path / "m"
    )
    assert got.returncode == 2 and "over --max-memory" in got.stderr


def test_out_checkpoint_is_usable_by_init_from(run: Path, tmp_path: Path, capsys) -> None:
    out, ckpt_run = tmp_path / "soup", tmp_path / "from-soup"
    got = in_process(capsys, "soup", run, "--last", "2", "--out", out, "--out-checkpoint", ckpt_run)
    assert got.returncode == 0, got.stderr
    weights, where = read_weights(str(ckpt_run))
    assert "step 100" in where
    soup = soup_tensors(out)
    assert weights.keys() == soup.keys() and all(torch.equal(weights[k], soup[k]) for k in soup)
    verify = in_process(capsys, "verify", ckpt_run)
    assert verify.returncode == 0, verify.stderr


def test_sharded_output_has_an_index(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    assert main(["soup", str(run), "--out", str(out), "--shard-mb", "0.004"]) == 0
    record = record_of(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(record["shards"]) > 1 and record["index"] == "model.safetensors.index.json"
    assert sorted(set(index["weight_map"].values())) == record["shards"]
    assert record["shards"][0] == f"model-00001-of-{len(record['shards']):05d}.safetensors"
    assert index["metadata"]["total_size"] == record["nbytes"]
    want = f64_mean([dcp_model(ckpt_dir(run, s)) for s in (25, 50, 75, 100)])
    assert_close_to_rounding(soup_tensors(out), want)
