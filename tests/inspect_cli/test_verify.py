"""`stockpot verify` on a saved run or one checkpoint, through the real console script: what
it reports for a good run, a flipped byte, a truncated file and a corrupt manifest, and its
exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from tests.inspect_cli.saved_run import (
    Run,
    add_escaping_manifest,
    add_leftovers,
    one_line_error,
    stockpot,
)


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


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
