"""Soups of real multi-rank checkpoints: `stockpot run` on 2 gloo ranks, DDP and FSDP, and the
same run read back from the real S3 server (moto_server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from devtools.s3server import S3Server
from launch.cli import main
from orchestrator.soup.ingredients import Ingredient
from orchestrator.soup.reader import open_source
from orchestrator.soup.schedules import window_weights
from orchestrator.storage import Store
from tests import runs
from tests.fixtures.s3 import s3_storage
from tests.soup_fixtures import (
    assert_bitwise,
    assert_close_to_rounding,
    ckpt_dir,
    dcp_model,
    f64_mean,
    mixer_reference,
    soup_tensors,
)

# The session's uninterrupted demo runs (tests/fixtures/reference.py) keep their newest 3.
STEPS = tuple(runs.REFERENCE_STEPS - k * runs.REFERENCE_EVERY for k in (2, 1, 0))
LAST = STEPS[-1]


@pytest.fixture
def runs_by(demo_reference) -> dict[str, Path]:
    """The 2-rank DDP and FSDP demo runs, read only."""
    return {p: demo_reference(p) for p in ("ddp", "fsdp")}


def test_fsdp_pieces_are_stitched_like_dcp_does(runs_by: dict[str, Path], tmp_path: Path) -> None:
    ckpt = ckpt_dir(runs_by["fsdp"], LAST)
    source = open_source(Ingredient(str(ckpt), "dcp", "test"))
    assert max(len(p) for p in source.pieces.values()) == 2  # really sharded over 2 ranks
    outs = {}
    for parallel, run in runs_by.items():
        outs[parallel] = tmp_path / parallel
        assert main(["soup", str(run), "--out", str(outs[parallel])]) == 0
        want = f64_mean([dcp_model(ckpt_dir(run, s)) for s in STEPS])
        assert_close_to_rounding(soup_tensors(outs[parallel]), want)
    ddp, fsdp = soup_tensors(outs["ddp"]), soup_tensors(outs["fsdp"])
    assert ddp.keys() == fsdp.keys()
    for name in ddp:  # the same training under DDP and FSDP: the same soup, to float noise
        assert torch.allclose(ddp[name], fsdp[name], rtol=1e-4, atol=1e-5), name


def test_ddp_and_fsdp_checkpoints_mix(runs_by: dict[str, Path], tmp_path: Path) -> None:
    pair = [ckpt_dir(runs_by["ddp"], LAST), ckpt_dir(runs_by["fsdp"], LAST)]
    out = tmp_path / "mixed"
    assert main(["soup", *map(str, pair), "--out", str(out)]) == 0
    assert_close_to_rounding(soup_tensors(out), f64_mean([dcp_model(p) for p in pair]))


def _upload(local: Path, store: Store) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.write_bytes(path.relative_to(local).as_posix(), path.read_bytes())


@pytest.mark.s3
def test_s3_input_gives_bit_identical_output(
    runs_by: dict[str, Path], s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    s3 = s3_storage(s3_server.endpoint_url)
    url = f"{s3_bucket}/fsdp"
    _upload(runs_by["fsdp"], Store(url, s3))
    endpoint = f"storage.s3.endpoint_url={s3_server.endpoint_url}"
    local, from_s3 = tmp_path / "local", tmp_path / "from-s3"
    assert main(["soup", str(runs_by["fsdp"]), "--out", str(local)]) == 0
    assert main(["soup", url, "--out", str(from_s3), endpoint, "--workers", "8"]) == 0
    want = (local / "model.safetensors").read_bytes()
    assert (from_s3 / "model.safetensors").read_bytes() == want
    # ... and written to S3: committed by a create-only SOUP.json, files in its data_dir
    assert main(["soup", url, "--name", "u", endpoint]) == 0
    out = Store(f"{url}/soups/u", s3)
    record = json.loads(out.read_bytes("SOUP.json"))
    assert record["data_dir"] and record["ingredients"][0]["path"].startswith("s3://")
    assert out.read_bytes(f"{record['data_dir']}/model.safetensors") == want
    assert main(["soup", url, "--name", "u", endpoint]) == 1  # never committed twice


def test_ddp_window_is_the_stated_mean_bit_for_bit(
    runs_by: dict[str, Path], tmp_path: Path
) -> None:
    out, run = tmp_path / "window", runs_by["ddp"]
    assert main(["soup", str(run), "--recipe", "window", "--weights", "minus-sqrt",
                 "--out", str(out)]) == 0  # fmt: skip
    weights = window_weights(STEPS, "decay:minus-sqrt").weights
    want = mixer_reference([dcp_model(ckpt_dir(run, s)) for s in STEPS], weights)
    assert_bitwise(soup_tensors(out), want)
    # the run's task is known: the merge scored itself on the held-out split
    scores = json.loads((out / "SOUP.json").read_text())["soup_scores"]
    assert 0 < scores["eval/loss"] < 10 and "eval/accuracy" in scores, scores


@pytest.mark.s3
def test_fsdp_window_from_s3_is_the_stated_mean_bit_for_bit(
    runs_by: dict[str, Path], s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    url = f"{s3_bucket}/fsdp-window"
    _upload(runs_by["fsdp"], Store(url, s3_storage(s3_server.endpoint_url)))
    out = tmp_path / "window"
    argv = ["soup", url, "--recipe", "window", "--schedule", "linear", "--steps", f"{STEPS[1]}:"]
    assert (
        main([*argv, "--out", str(out), f"storage.s3.endpoint_url={s3_server.endpoint_url}"]) == 0
    )
    record = json.loads((out / "SOUP.json").read_text())
    weights = window_weights(STEPS[1:], "linear").weights
    assert [i["weight"] for i in record["ingredients"]] == weights
    assert weights == pytest.approx([1 / 3, 2 / 3])  # d_i (s_i - a): 4 * 4, 4 * 8
    want = mixer_reference([dcp_model(ckpt_dir(runs_by["fsdp"], s)) for s in STEPS[1:]], weights)
    assert_bitwise(soup_tensors(out), want)


def test_an_fsdp_runs_ema_exports_and_soups_by_name(
    runs_by: dict[str, Path], tmp_path: Path
) -> None:
    """trainer.ema's average (`ema_9`, sharded like its parameters under FSDP) is a model an
    export and a soup read by name; `auto` keeps meaning the trained model."""
    run = runs_by["fsdp"]
    averages = [dcp_model(ckpt_dir(run, s), "ema_9.model.") for s in STEPS]
    source = open_source(Ingredient(str(ckpt_dir(run, LAST)), "dcp", "test"), prefix="ema_9")
    assert max(len(p) for p in source.pieces.values()) == 2  # sharded like its parameters
    assert averages[-1].keys() >= dcp_model(ckpt_dir(run, LAST)).keys()  # and the buffers
    out = tmp_path / "ema.safetensors"
    assert main(["export", str(ckpt_dir(run, LAST)), "--out", str(out), "--prefix", "ema_9"]) == 0
    assert_close_to_rounding(load_file(out), averages[-1])
    assert main(["soup", str(run), "--out", str(tmp_path / "soup"), "--prefix", "ema_9"]) == 0
    assert_close_to_rounding(soup_tensors(tmp_path / "soup"), f64_mean(averages))
    record = json.loads((tmp_path / "soup" / "SOUP.json").read_text())
    assert record["params"]["prefix"] == "ema_9"  # the provenance says which model
