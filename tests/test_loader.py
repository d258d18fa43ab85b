"""The resumable data loader: the same batches (augmentations included) for any number of worker
processes, a position that counts only the batches taken, and a real 2-rank run with workers,
SIGKILLed and resumed, that ends bit-identical to one without workers and never interrupted."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.data import ResumableSampler
from orchestrator.env import EXIT_STOPPED
from orchestrator.loader import ResumableLoader
from orchestrator.tasks.base import Tensors
from tests import runs
from tests.augmented_task import Augmented
from tests.ckpt_helpers import assert_same, final_state


def augmented(n: int = 20) -> Augmented:
    return Augmented(Tensors(torch.arange(2.0 * n).reshape(n, 2), torch.arange(n)))


def take(loader: ResumableLoader, k: int) -> list:
    return [next(loader) for _ in range(k)]


def rng_states() -> tuple:
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()


def workers_of_this_process() -> set[int]:
    return set(runs.child_pids(os.getpid()))


def test_the_same_batches_and_augmentations_for_0_1_and_2_workers() -> None:
    torch.manual_seed(1)
    before = rng_states()
    got = {}
    for workers in (0, 1, 2):
        loader = ResumableLoader(augmented(), 3, rank=1, world_size=2, seed=7, num_workers=workers)
        got[workers] = take(loader, 8)  # 3 batches an epoch: two epoch ends and then some
        loader.close()
    assert_same(got[0], got[1])
    assert_same(got[0], got[2])
    assert_same(rng_states(), before)  # loading in this process left its RNG streams alone
    # rank 1's indices as the bare sampler gives them; the augmentation really changed x
    sampler = ResumableSampler(20, 3, 1, 2, seed=7)
    for x, y in got[0]:
        assert y.tolist() == sampler.next_indices().tolist()
        assert not torch.equal(x.abs(), torch.stack([2.0 * y, 2.0 * y + 1], 1))


def test_state_counts_taken_batches_and_a_fresh_loader_resumes_at_the_next_one() -> None:
    straight = take(ResumableLoader(augmented(), 3, seed=3), 9)
    loader = ResumableLoader(augmented(), 3, seed=3, num_workers=2)
    first = take(loader, 4)
    time.sleep(0.2)  # the workers have fetched ahead by now
    state = loader.state_dict()
    sampler = ResumableSampler(20, 3, 0, 1, seed=3)
    for _ in range(4):
        sampler.next_indices()
    assert state == sampler.state_dict()  # the bare sampler's keys: old checkpoints resume
    for workers in (0, 2):
        fresh = ResumableLoader(augmented(), 3, seed=999, num_workers=workers)  # saved seed wins
        fresh.load_state_dict(state)
        assert_same(first + take(fresh, 5), straight)
        fresh.close()
    loader.load_state_dict({**state, "index": 0, "epoch": 0, "samples_seen": 0})  # restarts
    assert_same(take(loader, 2), straight[:2])
    loader.close()


def test_epochs_roll_over_as_the_sampler_does_and_no_worker_outlives_close() -> None:
    before = workers_of_this_process()
    loader = ResumableLoader(augmented(10), 3, num_workers=2)  # 3 batches an epoch, 1 dropped
    sampler = ResumableSampler(10, 3, 0, 1, seed=0)
    assert len(loader) == 3
    for _ in range(10):
        next(loader)
        sampler.next_indices()
        assert (loader.epoch, loader.epoch_just_ended) == (sampler.epoch, sampler.epoch_just_ended)
    assert loader.epoch == 3 and len(workers_of_this_process() - before) == 2
    loader.close()
    assert workers_of_this_process() == before


def test_map_style_dataset_with_default_and_own_collate() -> None:
    class Samples:
        def __len__(self) -> int:
            return 12

        def __getitem__(self, i: int) -> dict:
            return {"x": torch.full((2,), float(i)) + torch.rand(2), "id": i, "r": random.random()}

    def ids_only(samples: list[dict]) -> list[int]:
        return [s["id"] for s in samples]

    batches = {}
    for workers in (0, 2):
        loader = ResumableLoader(Samples(), 4, num_workers=workers)
        batches[workers] = take(loader, 4)
        loader.close()
    assert_same(batches[0], batches[2])
    first = batches[0][0]
    assert first["x"].shape == (4, 2) and first["id"].dtype == torch.int64
    assert first["r"].dtype == torch.float64  # python floats, collated by default_collate
    own = ResumableLoader(Samples(), 4, collate_fn=ids_only)
    assert next(own) == first["id"].tolist()


@pytest.mark.parametrize(
    ("make", "error", "says"),
    [
        (lambda: ResumableLoader(augmented(), 3, num_workers=-1), ValueError, "num_workers"),
        (lambda: ResumableLoader(object(), 3), TypeError, "has no __len__"),
        (lambda: ResumableLoader(range(3).__iter__(), 3), TypeError, "has no __len__"),
        (lambda: ResumableLoader(augmented(), 3, collate_fn=list), ValueError, "drop collate_fn"),
        (lambda: ResumableLoader(augmented(), 0), ValueError, "batch_size must be >= 1"),
        (lambda: ResumableLoader(augmented(), 30), ValueError, "exceeds the dataset"),
        (
            lambda: ResumableLoader(augmented(), 3).load_state_dict({"epoch": 1}),
            ValueError,
            "sampler state lacks index",
        ),
    ],
)
def test_bad_input_is_refused_in_one_line(make, error: type, says: str) -> None:
    with pytest.raises(error, match=says) as caught:
        make()
    assert "\n" not in str(caught.value)


def test_a_dataset_with_neither_getitem_nor_batch_is_refused() -> None:
    class Sized:
        def __len__(self) -> int:
            return 4

    with pytest.raises(TypeError, match="neither __getitem__"):
        ResumableLoader(Sized(), 2)


def test_workers_outlive_stop_signals_but_not_the_loader() -> None:
    before = workers_of_this_process()
    loader = ResumableLoader(augmented(), 2, num_workers=2)
    want = take(ResumableLoader(augmented(), 2), 6)
    got = take(loader, 2)
    workers = workers_of_this_process() - before
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)  # what Slurm sends every process of the step
        os.kill(pid, signal.SIGUSR2)
    time.sleep(0.3)
    assert workers_of_this_process() - before == workers  # still there, still serving
    assert_same(got + take(loader, 4), want)
    started = time.monotonic()
    loader.close()
    assert time.monotonic() - started < 2.0 and workers_of_this_process() == before


_EXITS_WITHOUT_CLOSE = """
import os, time, torch
from orchestrator.loader import ResumableLoader
class Slow:  # a worker's second batch takes a minute: both are fetching when the rank leaves
    calls = 0
    def __len__(self):
        return 8
    def batch(self, indices):
        Slow.calls += 1
        time.sleep(60 if Slow.calls > 1 else 0)
        return (indices,)
loader = ResumableLoader(Slow(), 1, num_workers=2)
next(loader)
time.sleep(0.2)
print(*open(f"/proc/self/task/{os.getpid()}/children").read().split(), flush=True)
os._exit(0)  # as a rank leaves (worker.exit_now)
"""


def test_busy_workers_die_with_a_rank_that_leaves_by_os_exit() -> None:
    rank = subprocess.Popen(
        [sys.executable, "-c", _EXITS_WITHOUT_CLOSE],
        stdout=subprocess.PIPE, text=True, cwd=runs.REPO,
    )  # fmt: skip
    assert rank.stdout is not None
    workers = [int(pid) for pid in rank.stdout.readline().split()]
    assert rank.wait(timeout=60) == 0 and len(workers) == 2
    runs.wait_until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), "workers", timeout=2
    )


# A real run: 2 ranks, 2 loader workers each, a random augmentation. At ~130 steps/s, 80 steps
# leave time to catch it between its early commits and its end.
MAX_STEPS, EVERY = 80, 4
BASE = [
    "configs/demo.yaml", "task._target_=tests.augmented_task.AugmentedSynthetic",
    f"trainer.max_steps={MAX_STEPS}", "trainer.log_every=1", "trainer.eval_every=40",
    f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=2", *runs.SMALL_DATA,
]  # fmt: skip


def test_stopped_and_killed_run_with_workers_ends_bit_identical_to_one_without(
    tmp_path: Path,
) -> None:
    """Reference: no workers, never interrupted. The run: 2 workers per rank, stopped by a
    SIGUSR2 to every process of the job (as Slurm signals a step), which the workers outlive
    until their rank has saved; resumed, SIGKILLed once; resumed with 1 worker per rank."""
    ref, run_dir, log = tmp_path / "ref", tmp_path / "run", tmp_path / "run.log"
    code = runs.stockpot_run([*BASE, f"run.dir={ref}", "trainer.num_workers=0"], log=log)
    assert code == 0, log.read_text()[-3000:]
    argv = [*BASE, f"run.dir={run_dir}", "trainer.num_workers=2"]
    stopped = _stop_by_group_signal(argv, run_dir, log)
    job = runs.start_job(argv, log)
    goal = stopped + EVERY  # a commit of its own: it has resumed and said so
    runs.wait_until(lambda: runs.newest_step(run_dir) >= goal or job.poll() is not None, "goal")
    assert job.poll() is None, f"the run ended before the kill after step {goal}"
    os.killpg(job.pid, signal.SIGKILL)
    killed = runs.newest_step(run_dir)  # the one kill, and the step it must resume from
    assert job.wait() == -signal.SIGKILL and goal <= killed < MAX_STEPS
    resumed = [*argv, "trainer.num_workers=1"]  # another worker count continues it exactly too
    assert runs.stockpot_run(resumed, log=log) == 0, log.read_text()[-3000:]
    runs.assert_resumed_from(run_dir, log.read_text(), [stopped, killed])
    assert_same(final_state(ref, MAX_STEPS), final_state(run_dir, MAX_STEPS))
    want, got = runs.losses(ref), runs.losses(run_dir)
    assert sorted(want) == list(range(1, MAX_STEPS + 1)) and got == want


def _stop_by_group_signal(argv: list[str], run_dir: Path, log: Path) -> int:
    """Start the run, freeze it after its step-8 commit, check its ranks' workers, SIGUSR2 every
    process of it and let it go: it must save and stop (exit 75). The step it stopped at."""
    job = runs.start_job(argv, log)
    runs.wait_until(lambda: runs.newest_step(run_dir) >= 8 or job.poll() is not None, "step 8")
    assert job.poll() is None, "the run ended before it was frozen"
    os.killpg(job.pid, signal.SIGSTOP)
    ranks = runs.child_pids(job.pid)
    workers = [w for rank in ranks for w in runs.child_pids(rank)]
    assert len(ranks) == 2 and len(workers) == 4, (ranks, workers)
    assert all(runs.ignores(w, signal.SIGTERM) and runs.ignores(w, signal.SIGUSR2) for w in workers)
    os.killpg(job.pid, signal.SIGUSR2)
    os.killpg(job.pid, signal.SIGCONT)
    assert job.wait(timeout=120) == EXIT_STOPPED, log.read_text()[-3000:]
    assert "stop requested (SIGUSR2)" in log.read_text()
    runs.wait_until(lambda: not any(Path(f"/proc/{w}").exists() for w in workers), "workers", 2)
    stopped = runs.newest_step(run_dir)
    assert 8 <= stopped < MAX_STEPS
    return stopped
