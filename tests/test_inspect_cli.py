"""`stockpot status`, `verify` and `export` against real checkpoints, through the real console script.

Checkpoints are written by the real Checkpointer in this process (single process, no group);
the commands run as subprocesses, on local disk and on the real S3 server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file
from torch import nn

from devtools.s3server import S3Server
from launch.cli import main
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.export import export_checkpoint
from orchestrator.checkpoint.weights import choose_prefix
from orchestrator.state import ModelAndOptimizer, RNGState
from orchestrator.storage import Store
from tests.fixtures.s3 import s3_storage

REPO = Path(__file__).resolve().parents[1]
STOCKPOT = str(Path(sys.executable).parent / "stockpot")
STEPS = (1, 2)
PLAIN_NAMES = {"0.weight", "0.bias", "2.weight", "2.bias"}


def stockpot(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STOCKPOT, *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip


def train_and_save(run: Store, steps: tuple[int, ...] = STEPS) -> dict[str, torch.Tensor]:
    """Train a tiny model, checkpoint after each step; the weights at the last save."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    ckpt = Checkpointer(run)
    ckpt.register("train", ModelAndOptimizer(model, optim))
    ckpt.register("rng", RNGState(), per_rank=True)
    for step in steps:
        loss = model(torch.randn(16, 4)).pow(2).mean()
        loss.backward()
        optim.step()
        optim.zero_grad()
        ckpt.save(step, metrics={"loss": float(loss.detach()), "lr": 0.1})
    ckpt.close()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class Run:
    path: Path
    weights: dict[str, torch.Tensor]  # the model at the last save (step 2)
    t0: float

    def ckpt(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step-{step:09d}"

    def shard(self, step: int) -> Path:
        (shard,) = self.ckpt(step).rglob("*_0.distcp")  # the model part
        return shard


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Run:
    t0 = time.time()
    path = tmp_path_factory.mktemp("pristine") / "run"
    return Run(path, train_and_save(Store(str(path))), t0)


@pytest.fixture
def run(pristine: Run, tmp_path: Path) -> Run:
    """A private copy of the pristine run, free to damage."""
    shutil.copytree(pristine.path, tmp_path / "run")
    return Run(tmp_path / "run", pristine.weights, pristine.t0)


def add_leftovers(run: Run) -> tuple[Path, Path]:
    uncommitted = run.path / "checkpoints" / "step-000000099"
    uncommitted.mkdir()
    shutil.copy(run.shard(2), uncommitted / "__0_0.distcp")  # a shard, but no manifest
    tmp = run.path / "checkpoints" / ".tmp-step-000000100-0123abcd"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"partial")
    return uncommitted, tmp


def add_escaping_manifest(run: Run) -> Path:
    """step 7 whose manifest names `../x`: corrupt, never a checkpoint."""
    bad = run.ckpt(7)
    bad.mkdir()
    body = json.loads((run.ckpt(1) / "MANIFEST.json").read_text())
    body["step"] = 7
    body["files"]["../x"] = {"size": 1, "checksum": "0" * 32}
    (bad / "MANIFEST.json").write_text(json.dumps(body))
    return bad


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    return out.stderr


# --- status ------------------------------------------------------------------------------


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


# --- verify ------------------------------------------------------------------------------


def test_verify_good_run_and_single_checkpoint(run: Run) -> None:
    add_leftovers(run)  # not checkpoints: neither checked nor failures
    out = stockpot("verify", run.path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "2 checkpoint(s) verified (sizes and checksums)"
    single = stockpot("verify", run.ckpt(2), "--json")
    assert single.returncode == 0, single.stderr
    assert json.loads(single.stdout) == {
        "ok": True,
        "checked": [{"path": str(run.ckpt(2)), "step": 2, "ok": True, "problems": []}],
    }


def test_verify_names_the_flipped_shard_and_exits_3(run: Run) -> None:
    shard = run.shard(1)
    flip_byte(shard)
    out = stockpot("verify", run.path)
    assert out.returncode == 3
    problems, summary = out.stderr.splitlines()
    assert str(shard) in problems and "checksum mismatch" in problems
    assert summary == "stockpot: error: 1 of 2 checkpoint(s) failed verification"
    assert "FAILED  step 1" in out.stdout and "ok      step 2" in out.stdout

    single = stockpot("verify", run.ckpt(1), "--json")
    assert single.returncode == 3
    report = json.loads(single.stdout)
    assert report["ok"] is False
    (checked,) = report["checked"]
    assert checked["step"] == 1 and checked["ok"] is False and checked["path"] == str(run.ckpt(1))
    assert len(checked["problems"]) == 1 and str(shard) in checked["problems"][0]


def test_verify_truncated_file_reports_its_size(run: Run) -> None:
    metadata = run.ckpt(2) / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:-10])
    out = stockpot("verify", run.ckpt(2))
    assert out.returncode == 3
    problem = out.stderr.splitlines()[0]
    assert str(metadata) in problem and "size" in problem


def test_verify_counts_a_corrupt_manifest_as_a_failure(run: Run) -> None:
    bad = add_escaping_manifest(run)
    out = stockpot("verify", run.path, "--json")
    assert out.returncode == 3
    report = json.loads(out.stdout)
    assert report["ok"] is False
    assert [(c["step"], c["ok"]) for c in report["checked"]] == [(1, True), (2, True), (7, False)]
    assert str(bad) in report["checked"][2]["path"] and "escapes" in out.stderr


def test_verify_neither_run_nor_checkpoint_exits_2(tmp_path: Path) -> None:
    out = stockpot("verify", tmp_path)
    assert out.returncode == 2
    assert "neither a run directory" in one_line_error(out)


# --- export ------------------------------------------------------------------------------


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
        assert (
            got[name].reshape(-1).view(torch.uint8).equal(tensor.reshape(-1).view(torch.uint8))
        ), name


def test_export_writes_plain_names_bit_equal(run: Run, tmp_path: Path) -> None:
    dst = tmp_path / "out" / "model.safetensors"
    out = stockpot("export", run.ckpt(2), "--out", dst)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # no tqdm off a TTY, no torch warnings
    assert os.listdir(dst.parent) == ["model.safetensors"]  # no temp file left behind
    tensors = load_file(dst)
    assert set(tensors) == PLAIN_NAMES
    assert_bit_equal(tensors, run.weights)
    from safetensors import safe_open

    with safe_open(str(dst), "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "2", "source": str(run.ckpt(2))}


def test_export_refuses_a_corrupt_checkpoint(run: Run, tmp_path: Path) -> None:
    shard = run.shard(2)
    shard.write_bytes(shard.read_bytes()[:-1])  # sizes are checked before anything is read
    dst = tmp_path / "out" / "model.safetensors"
    out = stockpot("export", run.ckpt(2), "--out", dst)
    assert out.returncode == 3
    assert str(shard) in one_line_error(out) and "refusing to export" in out.stderr
    assert not dst.parent.exists()


def test_export_leaves_nothing_when_the_data_does_not_load(run: Run, tmp_path: Path) -> None:
    shard = run.shard(2)
    shard.write_bytes(bytes(shard.stat().st_size))  # right size, garbage content
    dst = tmp_path / "model.safetensors"
    out = stockpot("export", run.ckpt(2), "--out", dst)
    assert out.returncode == 3
    assert "stockpot verify" in one_line_error(out)
    assert sorted(os.listdir(tmp_path)) == ["run"]


@pytest.mark.parametrize("name", ["model.pt", "model", "model.safetensors.tmp"])
def test_export_bad_out_suffix_exits_2(run: Run, tmp_path: Path, name: str) -> None:
    out = stockpot("export", run.ckpt(2), "--out", tmp_path / name)
    assert out.returncode == 2
    assert "--out must name a .safetensors file, e.g. --out" in one_line_error(out)
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_export_of_a_run_dir_points_at_its_checkpoints(run: Run, tmp_path: Path) -> None:
    out = stockpot("export", run.path, "--out", tmp_path / "m.safetensors")
    assert out.returncode == 2 and "pass one of its checkpoints/step-*" in one_line_error(out)


# In-process (the same `main`): cases that would otherwise each pay a torch import.


def test_export_with_two_models_needs_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(2, 2), nn.Linear(3, 1)
    ckpt = Checkpointer(Store(str(tmp_path / "run")))
    ckpt.register("student", ModelAndOptimizer(a))
    ckpt.register("teacher", ModelAndOptimizer(b))
    ckpt.save(3)
    src = tmp_path / "run" / "checkpoints" / "step-000000003"
    dst = tmp_path / "m.safetensors"
    assert main(["export", str(src), "--out", str(dst)]) == 2
    assert (
        "prefixes: student.model., teacher.model.; choose one with --prefix"
        in capsys.readouterr().err
    )
    assert main(["export", str(src), "--out", str(dst), "--prefix", "teacher.model"]) == 0
    assert_bit_equal(load_file(dst), {k: v.detach() for k, v in b.state_dict().items()})


def test_export_keeps_every_dtype(tmp_path: Path) -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.low = nn.Linear(3, 5).to(torch.bfloat16)
            self.norm = nn.BatchNorm1d(3)  # num_batches_tracked: a 0-d int64
            self.register_buffer("mask", torch.tensor([True, False, True]))
            self.register_buffer("empty", torch.zeros(0, 4, dtype=torch.float16))

    model = Mixed()
    ckpt = Checkpointer(Store(str(tmp_path / "run")))
    ckpt.register("train", ModelAndOptimizer(model))
    ckpt.save(1)
    dst = tmp_path / "m.safetensors"
    src = tmp_path / "run" / "checkpoints" / "step-000000001"
    assert main(["export", str(src), "--out", str(dst)]) == 0
    raw = dst.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert (8 + header_len) % 8 == 0  # tensors start aligned
    assert_bit_equal(load(raw), {k: v.detach() for k, v in model.state_dict().items()})


def test_choose_prefix() -> None:
    keys = dict.fromkeys(["train.model.w", "train.optim.state.0.x", "ema.model.w", "rng.x"])
    assert choose_prefix(keys, "ema.model.") == "ema.model."
    with pytest.raises(
        Exception, match=r"prefixes: ema.model., train.model.; choose one with --prefix"
    ):
        choose_prefix(keys, "auto")
    assert choose_prefix({"train.model.w": None, "train.optim.x": None}, "auto") == "train.model."
    with pytest.raises(Exception, match=r"top-level prefixes: a., b.; choose one"):
        choose_prefix({"a.x": None, "b.y": None}, "auto")
    with pytest.raises(Exception, match=r"no tensors under --prefix 'nope.'"):
        choose_prefix(keys, "nope")


# --- S3 ----------------------------------------------------------------------------------


@pytest.fixture
def s3_env(s3_server: S3Server) -> dict[str, str]:
    """The subprocess environment: the fixture's fake credentials plus the endpoint."""
    return {**os.environ, "AWS_ENDPOINT_URL": s3_server.endpoint_url}


@pytest.mark.s3
def test_status_verify_export_on_s3(
    s3_server: S3Server, s3_bucket: str, s3_env: dict[str, str], tmp_path: Path
) -> None:
    url = f"{s3_bucket}/run"
    store = Store(url, s3_storage(s3_server.endpoint_url))
    weights = train_and_save(store)
    store.write_bytes("checkpoints/step-000000099/__0_0.distcp", b"uncommitted shard")

    status = stockpot("status", url, "--json", env=s3_env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert [c["path"] for c in report["checkpoints"]] == [
        f"{url}/checkpoints/step-{s:09d}" for s in STEPS
    ]
    assert report["leftovers"] == [f"{url}/checkpoints/step-000000099"]
    assert report["corrupt"] == []

    src = f"{url}/checkpoints/step-000000002"
    verify = stockpot("verify", src, env=s3_env)
    assert verify.returncode == 0, verify.stderr

    dst = f"{s3_bucket}/exports/model.safetensors"
    export = stockpot("export", src, "--out", dst, env=s3_env)
    assert export.returncode == 0, export.stderr
    exports = Store(f"{s3_bucket}/exports", s3_storage(s3_server.endpoint_url))
    assert exports.list() == ["model.safetensors"]
    tensors = load(exports.read_bytes("model.safetensors"))
    assert set(tensors) == PLAIN_NAMES
    assert_bit_equal(tensors, weights)


@pytest.mark.s3
def test_s3_endpoint_given_only_in_the_config(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """`submit`'s jobs record, `status` and an export open the run dir with the config's
    storage section, as `run` does: no AWS_ENDPOINT_URL anywhere (the s3_server fixture removes it).
    The chained soup job's own test is in tests/test_soup_workflow.py."""
    from launch import submit
    from orchestrator import config

    assert "AWS_ENDPOINT_URL" not in os.environ and "AWS_ENDPOINT_URL_S3" not in os.environ
    url = f"{s3_bucket}/run"
    overrides = [f"run.dir={url}", f"storage.s3.endpoint_url={s3_server.endpoint_url}"]
    cfg = config.load(str(REPO / "configs" / "demo.yaml"), overrides)
    store = Store(url, s3_storage(s3_server.endpoint_url))
    weights = train_and_save(store)

    submit._write_records(cfg, [cfg], [{"job_id": "7", "kind": "train", "executor": "local"}])
    assert json.loads(store.read_bytes("jobs.json"))[0]["job_id"] == "7"

    status = stockpot("status", "configs/demo.yaml", *overrides, "--json", env=dict(os.environ))
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert [c["step"] for c in report["checkpoints"]] == list(STEPS)
    assert [j["job_id"] for j in report["jobs"]] == ["7"]

    latest = catalog.scan(store).latest()
    assert latest is not None
    done = export_checkpoint(store.child(latest.rel), store.child("export"), "model.safetensors")
    assert done.path == f"{url}/export/model.safetensors"
    assert_bit_equal(load(store.read_bytes("export/model.safetensors")), weights)


def test_overrides_need_a_config_file(run: Run) -> None:
    out = stockpot("status", run.path, "trainer.max_steps=3")
    assert out.returncode == 2
    assert "key=value overrides (trainer.max_steps=3, ...) need a config file" in out.stderr
