"""Tiered checkpoints (`checkpoint.local_dir`), on real 2-rank `stockpot run` jobs: every save
commits on the node first and is made durable in run.dir by the background uploader; a resume
reads the node's copy when it holds one that verifies, else the durable one; a kill mid-upload
leaves no durable commit; a stop makes its step durable within the grace window or says which
step is not; an S3 outage leaves training going on the local tier, the steps at risk counted,
until the uploads catch up."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from devtools.s3server import FaultProxy
from orchestrator.checkpoint import catalog
from orchestrator.errors import ConfigError
from orchestrator.metrics import read_metrics
from orchestrator.storage import Store
from tests import runs
from tests.ckpt_helpers import assert_same, final_state, load_dump
from tests.ranks import run_ranks
from tests.runs import REPO, STOCKPOT, losses, newest_step

MAX_STEPS, EVERY = runs.REFERENCE_STEPS, runs.REFERENCE_EVERY


def _local_steps(local: Path) -> list[int]:
    return [c.step for c in catalog.scan(Store(str(local))).committed]


def test_kills_resume_from_the_node_copy_then_from_the_durable_one(
    tmp_path: Path, demo_reference
) -> None:
    """SIGKILL the job twice: the first restart restores from the local tier; the local tier is
    wiped before the second, which restores from the durable tier. Bit-identical at the end."""
    ref = demo_reference("ddp")
    run_dir, local, log = tmp_path / "run", tmp_path / "node", tmp_path / "run.log"
    argv = [*runs.REFERENCE, f"run.dir={run_dir}", f"checkpoint.local_dir={local}"]
    at = []
    for goal in (12, 28):  # SIGKILL the whole job right after the durable commit of `goal`
        job = runs.start_job(argv, log)
        goal = max([goal, *(s + 1 for s in at)])
        runs.wait_until(
            lambda g=goal, j=job: newest_step(run_dir) >= g or j.poll() is not None, "a commit"
        )
        assert job.poll() is None, "the run ended before the kill"
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        at.append(newest_step(run_dir))
        # The node's copy is at least as new as the durable one: the restart reads it.
        assert max(_local_steps(local)) >= at[-1]
    text = log.read_text()
    assert "from the local tier" in text and "2 rank(s) read only their node's copy" in text
    shutil.rmtree(local)
    assert runs.stockpot_run(argv, log=log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "restored step" in text.split("from the local tier")[-1]
    assert "from the durable tier" in text, text[-3000:]
    assert_same(final_state(ref, MAX_STEPS), final_state(run_dir, MAX_STEPS))
    assert losses(run_dir) == losses(ref)
    durable = [r for r in read_metrics(Store(str(run_dir))) if r.get("event") == "durable"]
    assert durable and all("checkpoint/steps_at_risk" in r for r in durable)
    assert _local_steps(local)[-1] == MAX_STEPS and len(_local_steps(local)) <= 2
    assert at[-1] < MAX_STEPS


def test_a_kill_mid_upload_leaves_no_durable_commit(tmp_path: Path) -> None:
    """Uploads capped slow: the job is SIGKILLed while one is under way. The durable tier has no
    commit of that step and its newest one verifies; the node's copy resumes the run."""
    run_dir, local, log = tmp_path / "run", tmp_path / "node", tmp_path / "run.log"
    argv = ["configs/demo.yaml", f"run.dir={run_dir}", f"checkpoint.local_dir={local}",
            "trainer.max_steps=150", "checkpoint.every_steps=10", "checkpoint.upload_mb_s=0.2",
            *runs.SMALL_DATA]  # fmt: skip
    job = runs.start_job(argv, log)
    ckpts = run_dir / "checkpoints"

    def uploading() -> bool:  # a durable attempt dir (local disk: a temp sibling) is being filled
        return newest_step(run_dir) >= 10 and any(
            p.name.startswith(".tmp-") and any(p.iterdir()) for p in ckpts.iterdir()
        )

    runs.wait_until(uploading, "an upload under way after the first durable commit", 120)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    pending = [p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    assert pending, "the kill landed mid-upload"
    durable = newest_step(run_dir)
    assert f"step-{durable:09d}" not in pending[0]
    check = subprocess.run([STOCKPOT, "verify", str(run_dir)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert max(_local_steps(local)) > durable, "the node holds a newer commit than the durable one"
    newest = max(_local_steps(local))
    assert runs.stockpot_run(argv, log=log) == 0, log.read_text()[-3000:]
    assert f"restored step {newest} from the local tier" in log.read_text()
    assert newest_step(run_dir) == 150


def test_a_stop_makes_its_step_durable_or_says_it_is_not(tmp_path: Path) -> None:
    """USR2: the stop's step is durable before the job exits. With a grace window too short
    for the (capped) upload, the log names the step that is not durable, and the newest that is."""
    for grace, cap, durable_expected in (("120", "5", True), ("1", "0.02", False)):
        run_dir, local = tmp_path / f"run{grace}", tmp_path / f"node{grace}"
        log = tmp_path / f"stop{grace}.log"
        args = [STOCKPOT, "run", "configs/demo.yaml", f"run.dir={run_dir}",
                f"checkpoint.local_dir={local}", "trainer.max_steps=400",
                "checkpoint.every_steps=1000", f"launcher.signal_delay_s={grace}",
                f"checkpoint.upload_mb_s={cap}", "trainer.log_every=1", *runs.SMALL_DATA]  # fmt: skip
        with open(log, "wb") as out:
            job = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "step 5/400" not in log.read_text():
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR2)
        assert job.wait(timeout=180) == 75, log.read_text()[-2000:]
        text = log.read_text()
        stopped = max(_local_steps(local))
        if durable_expected:
            assert newest_step(run_dir) == stopped, text[-2000:]
        else:
            assert newest_step(run_dir) == 0
            assert f"step {stopped} is committed on the local tier only" in text, text[-2000:]


def test_an_s3_outage_leaves_training_on_the_local_tier_until_it_catches_up(
    tmp_path: Path, s3_faults: FaultProxy, s3_bucket: str
) -> None:
    """S3 stops answering mid-run, every request of the run's bucket (checkpoints and metrics
    alike): training goes on on the local tier, the steps at risk grow and are recorded, the
    metrics lines are held; once S3 answers again the newest step becomes durable and every
    line is in metrics.jsonl."""
    url = f"{s3_bucket}/tiers"
    local, log = tmp_path / "node", tmp_path / "run.log"
    argv = ["configs/demo.yaml", f"run.dir={url}", f"checkpoint.local_dir={local}",
            f"storage.s3.endpoint_url={s3_faults.endpoint_url}", "trainer.max_steps=160",
            "checkpoint.every_steps=10", "storage.s3.max_attempts=1", *runs.SMALL_DATA]  # fmt: skip
    store = Store(url, runs_storage(s3_faults.endpoint_url))
    job = runs.start_job(argv, log)
    runs.wait_until(lambda: newest_step_of(store) > 0, "a durable commit before the outage", 120)
    s3_faults.fail(s3_bucket.removeprefix("s3://"), status=503, times=None)
    first = max(_local_steps(local))
    text = lambda: log.read_text()  # noqa: E731
    runs.wait_until(lambda: max(_local_steps(local)) >= first + 30, "local commits", 120)
    runs.wait_until(lambda: "upload of step" in text(), "a failed upload logged", 120)
    runs.wait_until(lambda: "metrics: cannot append" in text(), "the metrics held", 120)
    assert job.poll() is None, text()[-3000:]
    with s3_faults._lock:
        s3_faults.rules.clear()
    assert job.wait(timeout=300) == 0, text()[-3000:]
    assert "held line(s) written" in text()
    if "tensorboard: cannot upload" in text():  # when its flush came within the outage
        assert "events uploaded" in text()
    assert "no longer logging" not in text(), "TensorBoard is kept through the outage"
    assert newest_step_of(store) == 160
    records = read_metrics(store)
    risk = [r["checkpoint/steps_at_risk"] for r in records if r.get("event") == "commit"]
    assert max(risk) >= 20, risk
    assert any(r.get("event") == "durable" for r in records)
    assert sorted({r["step"] for r in records if "loss" in r}) == list(range(25, 161, 25))


def runs_storage(endpoint: str):  # type: ignore[no-untyped-def]
    from tests.fixtures.s3 import s3_storage

    return s3_storage(endpoint)


def newest_step_of(store: Store) -> int:
    latest = catalog.scan(store).latest()
    return latest.step if latest else 0


def _ranks(run: Path, log: Path, nproc: int, *args: str) -> None:
    run_ranks("tests.workers.ckpt_worker", [str(run), *args], nproc, log_dir=log, timeout=240)


def test_each_node_reads_its_own_copy_and_a_step_some_rank_cannot_reach_is_skipped(
    tmp_path: Path,
) -> None:
    """Two ranks as two nodes (a local dir each). FSDP saves steps 1-4, durable every 2nd step.
    Restoring step 4, each rank reads the files its node holds from there and the rest (DCP puts
    replicated optimizer items in one rank's file) from the durable tier. Once step 4's durable
    copy is removed it is committed on the nodes only, and no rank can read it whole: two FSDP
    ranks, two DDP ranks and one rank all restore step 2 from the durable tier."""
    run, nodes = tmp_path / "run", str(tmp_path / "node{rank}")
    saved, at2 = tmp_path / "saved.pt", tmp_path / "at2.pt"
    common = ["--local-dir", nodes, "--durable-every", "2", "--save-every", "1"]
    _ranks(run, tmp_path, 2, "--parallel", "fsdp", "--steps", "4", *common,
           "--dump", str(saved))  # fmt: skip
    _ranks(tmp_path / "run2", tmp_path, 2, "--parallel", "fsdp", "--steps", "4",
           "--dump-at", "2", "--dump", str(at2))  # fmt: skip
    assert [c.step for c in catalog.scan(Store(str(run))).committed] == [2, 4]
    for rank in (0, 1):
        node = _local_steps(tmp_path / f"node{rank}")
        assert node == [3, 4], node
        files = {p.name for p in (tmp_path / f"node{rank}/checkpoints/step-000000004").iterdir()}
        assert ".metadata" in files and f"__{rank}_0.distcp" in files
        assert f"__{1 - rank}_0.distcp" not in files, "each node holds only its ranks' files"

    back = tmp_path / "back.pt"
    _ranks(run, tmp_path, 2, "--parallel", "fsdp", "--steps", "0", "--restore",
           "--local-dir", nodes, "--dump", str(back))  # fmt: skip
    assert_same(load_dump(saved), load_dump(back))
    text = (tmp_path / "rank0.log").read_text()
    assert "restored step 4 from the durable+local tier" in text, text[-2000:]

    # A node copy that no longer matches the manifest (checked by the load that reads it) is
    # removed, and the step loaded again with that file from the durable tier.
    bad = tmp_path / "node0/checkpoints/step-000000004/__0_0.distcp"
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    (tmp_path / "rank0.log").unlink()
    _ranks(run, tmp_path, 2, "--parallel", "fsdp", "--steps", "0", "--restore",
           "--local-dir", nodes, "--dump", str(back))  # fmt: skip
    assert_same(load_dump(saved), load_dump(back))
    text = (tmp_path / "rank0.log").read_text()
    assert "step 4: a node copy failed verification" in text and "__0_0.distcp" in text, text
    assert "restored step 4 from the durable+local tier" in text, text[-2000:]
    assert not bad.exists(), "the bad node copy is removed"

    shutil.rmtree(run / "checkpoints" / "step-000000004")
    for nproc, parallel in ((2, "fsdp"), (2, "ddp"), (1, "fsdp")):
        (tmp_path / "rank0.log").unlink()
        out = tmp_path / f"back-{nproc}-{parallel}.pt"
        _ranks(run, tmp_path, nproc, "--parallel", parallel, "--steps", "0", "--restore",
               "--local-dir", nodes, "--dump", str(out))  # fmt: skip
        assert_same(load_dump(at2), load_dump(out))
        text = (tmp_path / "rank0.log").read_text()
        assert "step 4 cannot be restored" in text, text[-2000:]
        assert "committed on other nodes only" in text
        assert "restored step 2 from the durable tier" in text


def test_a_local_tier_of_another_run_is_swept_and_one_of_this_run_kept(tmp_path: Path) -> None:
    """The tier names its run (TIER.json): a requeue of the same run keeps its commits, another
    run's are removed when this run claims the dir, and so is an interrupted local save."""
    from orchestrator.checkpoint.tiers import LocalTier, local_store

    run, other, node = Store(str(tmp_path / "run")), Store(str(tmp_path / "other")), tmp_path / "n"
    step = node / "checkpoints" / "step-000000010"
    step.mkdir(parents=True)
    (step / "MANIFEST.json").write_text("{}")
    (node / "checkpoints" / ".tmp-step-000000020-abc").mkdir()
    LocalTier(local_store(str(node), run), run)
    assert (step / "MANIFEST.json").exists(), "this run's commits stay"
    assert not (node / "checkpoints" / ".tmp-step-000000020-abc").exists()
    LocalTier(local_store(str(node), other), other)
    assert not step.exists(), "another run's commits are swept"
    assert other.url in (node / "TIER.json").read_text()
    with pytest.raises(ConfigError, match=r"checkpoint\.local_dir is run\.dir"):
        local_store(str(tmp_path / "run"), run)
    with pytest.raises(ConfigError, match="must be a directory on the node"):
        local_store("s3://bucket/x", run)
