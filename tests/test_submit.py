"""`stockpot submit` without a cluster: launcher -> sbatch parameters, golden sbatch scripts,
sweep expansion, the job objects, jobs.json and `--dry-run` through the real console script.

Golden files: `STOCKPOT_UPDATE_GOLDEN=1 pytest tests/test_submit.py` rewrites tests/golden/*.sbatch
from the current code; review the diff before committing it.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from launch import executor, job, jobs
from orchestrator import config
from orchestrator.errors import ConfigError
from orchestrator.storage import Store

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
STOCKPOT = str(Path(sys.executable).parent / "stockpot")
UPDATE_GOLDEN = os.environ.get("STOCKPOT_UPDATE_GOLDEN") == "1"

TWO_NODES = [
    "launcher.nodes=2", "launcher.tasks_per_node=4", "launcher.cpus_per_task=8",
    "launcher.gpus_per_node=4", "launcher.mem_gb=480", "launcher.timeout_min=240",
    "launcher.partition=gpu", "launcher.signal_delay_s=180", "launcher.account=ml",
    "launcher.qos=high", "launcher.constraint=a100", "launcher.exclusive=true",
    "launcher.setup=[module load cuda/12.4,export NCCL_DEBUG=WARN]",
    "launcher.additional_parameters.reservation=big-run",
]  # fmt: skip


def demo_slurm(*overrides: str) -> config.Config:
    return config.load(str(REPO / "configs" / "demo-slurm.yaml"), list(overrides))


# --- launcher -> submitit parameters --------------------------------------------------------


def test_slurm_parameters_of_the_demo() -> None:
    params = executor.slurm_parameters(demo_slurm(), job_name="demo")
    setup = params.pop("setup")  # stockpot's supervisor: scontrol found first, then the loop
    assert setup[0] == executor.SCONTROL_FIRST[0] and "srun " in "\n".join(setup)
    assert params == {
        "job_name": "demo",
        "partition": "debug",
        "nodes": 1,
        "ntasks_per_node": 2,
        "cpus_per_task": 1,
        "time": 60,
        "signal_delay_s": 60,
        "additional_parameters": {"requeue": True, "open-mode": "append"},
    }


def test_slurm_parameters_map_every_launcher_field() -> None:
    params = executor.slurm_parameters(demo_slurm(*TWO_NODES), job_name="x")
    assert params["nodes"] == 2 and params["ntasks_per_node"] == 4
    assert params["cpus_per_task"] == 8 and params["gpus_per_node"] == 4
    assert params["mem"] == "480G" and params["time"] == 240 and params["signal_delay_s"] == 180
    assert (params["partition"], params["account"], params["qos"]) == ("gpu", "ml", "high")
    assert params["constraint"] == "a100" and params["exclusive"] is True
    # launcher.setup runs after scontrol is found (it may change PATH), before the supervisor
    assert params["setup"][1:3] == ["module load cuda/12.4", "export NCCL_DEBUG=WARN"]
    assert params["additional_parameters"] == {
        "requeue": True,
        "open-mode": "append",
        "reservation": "big-run",
    }


@pytest.mark.parametrize(("gb", "text"), [(16, "16G"), (1.5, "1536M"), (0.25, "256M")])
def test_memory_in_gb_becomes_sbatch_units(gb: float, text: str) -> None:
    assert executor.mem_string(gb) == text


def test_additional_parameters_cannot_bypass_launcher_fields() -> None:
    cfg = demo_slurm("launcher.additional_parameters.time=5")
    with pytest.raises(ConfigError, match=r"additional_parameters.time: set launcher.timeout_min"):
        executor.slurm_parameters(cfg, job_name="x")


def test_a_dependency_also_cancels_on_a_failed_dependency() -> None:
    params = executor.slurm_parameters(demo_slurm(), job_name="x", dependency="afterok:7")
    assert params["dependency"] == "afterok:7"
    assert params["additional_parameters"]["kill-on-invalid-dep"] == "yes"


def test_local_parameters_and_one_node_only() -> None:
    cfg = demo_slurm("launcher.kind=local")
    assert executor.local_parameters(cfg) == {
        "tasks_per_node": 2,
        "timeout_min": 60,
        "signal_delay_s": 60,
        "gpus_per_node": 0,
    }
    with pytest.raises(ConfigError, match=r"launcher\.nodes must be 1"):
        executor.local_parameters(demo_slurm("launcher.kind=local", "launcher.nodes=2"))


# --- golden sbatch scripts ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "overrides"), [("demo-1node", []), ("demo-2node", TWO_NODES)], ids=["1node", "2node"]
)
def test_sbatch_text_matches_golden(name: str, overrides: list[str]) -> None:
    text = executor.sbatch_text(demo_slurm(*overrides), job_name="demo", python="python")
    path = GOLDEN / f"{name}.sbatch"
    if UPDATE_GOLDEN:
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; STOCKPOT_UPDATE_GOLDEN=1 to rewrite it"


def test_sbatch_text_is_deterministic_and_has_the_requeue_settings() -> None:
    text = executor.sbatch_text(demo_slurm(), job_name="demo")
    assert text == executor.sbatch_text(demo_slurm(), job_name="demo")
    for line in ("#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=USR2@60"):
        assert line in text.splitlines()
    assert executor.PLACEHOLDER_FOLDER in text


def test_array_and_dependency_in_the_script() -> None:
    text = executor.sbatch_text(demo_slurm(), job_name="d", array=3, dependency="afterok:9")
    lines = text.splitlines()
    assert "#SBATCH --array=0-2%3" in lines and "#SBATCH --dependency=afterok:9" in lines
    assert "#SBATCH --kill-on-invalid-dep=yes" in lines


# --- sweeps ---------------------------------------------------------------------------------


def test_sweep_expands_to_the_cartesian_product(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"defaults: [{REPO}/configs/demo]\n"
        "run: {dir: /runs/s}\n"
        "sweep: {optim.lr: [1e-3, 3e-3], run.seed: [0, 1]}\n"
    )
    cfg = config.load(str(path))
    assert cfg.sweep == {"optim.lr": (1e-3, 3e-3), "run.seed": (0, 1)}
    elements = config.expand_sweep(cfg)
    assert [(e.optim.lr, e.run.seed) for e in elements] == [
        (1e-3, 0), (1e-3, 1), (3e-3, 0), (3e-3, 1),
    ]  # fmt: skip
    assert [e.run.dir for e in elements] == [
        "/runs/s/0-optim.lr=0.001,run.seed=0",
        "/runs/s/1-optim.lr=0.001,run.seed=1",
        "/runs/s/2-optim.lr=0.003,run.seed=0",
        "/runs/s/3-optim.lr=0.003,run.seed=1",
    ]
    assert all(e.sweep == {} for e in elements)
    rest = {k: v for k, v in elements[0].to_dict().items() if k not in ("optim", "run", "sweep")}
    assert rest == {k: v for k, v in cfg.to_dict().items() if k not in ("optim", "run", "sweep")}


def test_sweep_as_nested_keys_and_task_params() -> None:
    cfg = config.load(None, ["sweep.task.hidden=[8,16]", "sweep.trainer.batch_size=[4]"])
    assert cfg.sweep == {"task.hidden": (8, 16), "trainer.batch_size": (4,)}
    elements = config.expand_sweep(cfg)
    assert [e.task.params["hidden"] for e in elements] == [8, 16]
    assert config.from_dict(cfg.to_dict()) == cfg


def test_sweep_labels_are_filesystem_safe() -> None:
    cfg = config.load(None, ["run.dir=s3://b/p/", "sweep.task.name=['a b/c', 'x*y']"])
    dirs = [e.run.dir for e in config.expand_sweep(cfg)]
    assert dirs == ["s3://b/p/0-task.name=a_b_c", "s3://b/p/1-task.name=x_y"]


def test_sweep_is_not_part_of_the_computation() -> None:
    plain = config.load(None, [])
    swept = config.load(None, ["sweep.run.seed=[0,1]"])
    assert config.computation_view(plain) == config.computation_view(swept)
    (first, _) = config.expand_sweep(swept)
    assert not any(k.startswith("sweep") for k in config.computation_view(first))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sweep.optim.nope=[1]", r"sweep.optim.nope: unknown config key 'optim.nope'"),
        ("sweep.optim.lr=[]", r"sweep.optim.lr must be a non-empty list"),
        ("sweep.optim.lr=0.1", r"sweep.optim.lr must be a non-empty list of values \(got 0.1\)"),
        ("sweep.launcher.nodes=[1,2]", r"sweep.launcher.nodes: launcher cannot be swept"),
        ("sweep.run.dir=[a,b]", r"sweep.run.dir: run.dir cannot be swept"),
    ],
)
def test_bad_sweeps_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(None, [override])


def test_a_bad_element_is_refused_naming_it() -> None:
    cfg = config.load(None, ["sweep.optim.lr=[0.1,-1]"])
    with pytest.raises(ConfigError, match=r"sweep element 1 \(optim.lr=-1\): optim.lr must be > 0"):
        config.expand_sweep(cfg)


def test_no_sweep_is_one_element() -> None:
    cfg = config.load(None, [])
    assert config.expand_sweep(cfg) == [cfg]


# --- the job objects ------------------------------------------------------------------------


@pytest.mark.parametrize("limit_min", [10, 15, 60, 100, 120, 240])
def test_timeout_rule_is_submitits_own(limit_min: int) -> None:
    """stockpot calls a stop a time-out exactly when submitit's own signal handler does
    (`SignalHandler.has_timed_out`, which decides whether submitit requeues): compared at run
    times half a second either side of every 12 s mark from 0 to the limit."""
    import time

    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import DelayedSubmission

    delayed = DelayedSubmission(print)
    delayed.set_timeout(limit_min, max_num_timeout=3)
    handler = SignalHandler(None, None, delayed)  # type: ignore[arg-type]  # only the clock is used
    marks = range(0, 60 * limit_min + 1, 12)
    for elapsed in (max(0.0, mark + side) for mark in marks for side in (-0.5, 0.5)):
        handler._start_time = time.time() - elapsed  # the job started `elapsed` s ago
        assert job.counts_as_timeout(elapsed, limit_min) == handler.has_timed_out(), elapsed


def test_training_job_pickles_plain_data_only() -> None:
    cfg = demo_slurm()
    work = job.TrainingJob(cfg.to_dict())
    back = pickle.loads(pickle.dumps(work))
    assert back.cfg == cfg.to_dict() and config.from_dict(back.cfg) == cfg
    assert set(work.__getstate__()) == {"cfg"}


@pytest.mark.parametrize("kind", ["train", "soup"])
@pytest.mark.parametrize(("restarts", "requeued"), [("", True), ("2", True), ("3", False)])
def test_checkpoint_requeues_until_max_requeues(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    restarts: str,
    requeued: bool,
) -> None:
    from submitit.helpers import DelayedSubmission

    from launch.soup_job import SoupJob

    monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
    cfg = demo_slurm("launcher.max_requeues=3").to_dict()
    work = job.TrainingJob(cfg) if kind == "train" else SoupJob(cfg, ["runs/a"])
    again = work.checkpoint()
    assert isinstance(again, DelayedSubmission) is requeued
    if requeued:
        assert again.function is work
        assert f"requeuing: restart {int(restarts or 0) + 1} of at most 3; " in caplog.text
    else:
        assert "NOT requeuing: this run is restart 3 and launcher.max_requeues=3; " in caplog.text


# --- jobs.json and the CLI ------------------------------------------------------------------


def test_jobs_json_appends(tmp_path: Path) -> None:
    run = Store(str(tmp_path / "run"))
    assert jobs.read_jobs(run) == []
    jobs.append_jobs(run, [{"job_id": "1", "kind": "train"}])
    jobs.append_jobs(run, [{"job_id": "2", "kind": "export", "dependency": "afterok:1"}])
    assert [j["job_id"] for j in jobs.read_jobs(run)] == ["1", "2"]
    assert json.loads((tmp_path / "run" / "jobs.json").read_text())[1]["kind"] == "export"


def stockpot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STOCKPOT, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path: Path) -> None:
    logs, run = tmp_path / "logs", tmp_path / "run"
    out = stockpot(
        "submit", "configs/demo-slurm.yaml", f"run.dir={run}", f"launcher.log_dir={logs}",
        "soup.enabled=true", "sweep.run.seed=[0,1,2]", "--dry-run",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "#!/bin/bash" and "#SBATCH --array=0-2%3" in lines
    assert f"#SBATCH --output={logs}/%A_%a_0_log.out" in lines
    assert "#SBATCH --dependency=afterok:JOBID" in lines
    assert f"#   [2] {run}/2-run.seed=2" in lines
    assert not logs.exists() and not run.exists()


def test_dry_run_of_a_bad_sweep_is_one_line() -> None:
    out = stockpot("submit", "configs/demo-slurm.yaml", "sweep.optim.lr=[1,-1]", "--dry-run")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "sweep element 1" in out.stderr


def test_status_shows_recorded_jobs_before_any_checkpoint(tmp_path: Path) -> None:
    run = Store(str(tmp_path))
    jobs.append_jobs(run, [{"job_id": "999999", "kind": "train", "executor": "slurm"}])
    out = stockpot("status", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    (recorded,) = report["jobs"]
    assert recorded["job_id"] == "999999"
    assert recorded["state"] in ("NOT_IN_QUEUE", "UNKNOWN")  # UNKNOWN where Slurm is absent
    assert "restarts" not in report  # no metrics.jsonl yet


def test_local_executor_runs_both_ranks(tmp_path: Path) -> None:
    """`launcher.kind: local`: submitit's LocalExecutor, ranks from SUBMITIT_LOCAL_*; each task
    leaves (os._exit) only after writing its result pickle."""
    import pickle as pkl
    import time

    from orchestrator.checkpoint import catalog

    run, logs = tmp_path / "run", tmp_path / "logs"
    out = stockpot(
        "submit", "configs/demo.yaml", "trainer.max_steps=10", "task.n_train=1024",
        "task.n_eval=128", "launcher.tasks_per_node=2", f"run.dir={run}", f"launcher.log_dir={logs}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (record,) = jobs.read_jobs(Store(str(run)))
    assert record["executor"] == "local" and record["kind"] == "train"
    pickles = [logs / f"{record['job_id']}_{rank}_result.pkl" for rank in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(p.exists() for p in pickles):
        assert time.monotonic() < deadline, "local job did not finish in 120 s"
        time.sleep(0.1)
    results = [pkl.loads(p.read_bytes()) for p in pickles]
    assert [(kind, r["rank"], r["finished"], r["step"]) for kind, r in results] == [
        ("success", 0, True, 10),
        ("success", 1, True, 10),
    ]
    latest = catalog.scan(Store(str(run))).latest()
    assert latest is not None and latest.manifest.world_size == 2
