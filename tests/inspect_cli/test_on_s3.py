"""`stockpot status`, `verify` and `export` on a run on the real S3 server, and the config's
storage.s3 as the only place the endpoint is given."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load

from devtools.s3server import S3Server
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.export import export_checkpoint
from orchestrator.storage import Store
from tests.fixtures.s3 import s3_storage
from tests.inspect_cli.saved_run import (
    PLAIN_NAMES,
    REPO,
    STEPS,
    assert_bit_equal,
    stockpot,
    train_and_save,
)


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
