"""Real `stockpot run` jobs for the chaos suite: start, watch, kill, and judge what they left.

Every trial ends with the same checks (`judge`): every committed checkpoint verifies, the last
run finished (exit 0), and its final weights equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from orchestrator import standby
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.format import CHECKPOINTS_DIR, TMP_PREFIX, load_flat, stored_items
from orchestrator.storage import Store

REPO = Path(__file__).resolve().parents[2]
STOCKPOT = str(Path(sys.executable).parent / "stockpot")
MAX_STEPS = 24
EVERY = 3  # checkpoint.every_steps
# A tiny job: 2 ranks, ~1 MB checkpoints (hidden 256 with AdamW), a few seconds of training.
BASE = [
    "configs/demo.yaml", f"trainer.max_steps={MAX_STEPS}", "trainer.log_every=1",
    "trainer.eval_every=12", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=3",
    "task.n_train=2048", "task.n_eval=256", "task.hidden=256",
    # The LR horizon fixed, not max_steps as of the first start: a run stopped early by a
    # shorter max_steps (the corruption base) then computes what the 24-step run does.
    f"scheduler.decay_steps={MAX_STEPS}",
]  # fmt: skip
RUN_TIMEOUT_S = 300.0


class TrialFailed(AssertionError):
    """What a trial found wrong, in one line."""


def check(ok: bool, why: str) -> None:
    if not ok:
        raise TrialFailed(why)


@dataclass
class Trial:
    scenario: str
    variant: str
    kills: int = 0
    faults: int = 0
    ok: bool = True
    why: str = ""
    seconds: float = 0.0
    notes: dict[str, object] = field(default_factory=dict)


def argv_for(run_dir: str, *overrides: str) -> list[str]:
    return [*BASE, f"run.dir={run_dir}", *overrides]


def start(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`stockpot run ARGV` in its own session (so the whole job can be killed at once)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [STOCKPOT, "run", *argv],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # An empty value unsets the variable (the no-credentials set-up).
            env={k: v for k, v in {**os.environ, **(env or {})}.items() if v != ""},
        )


def run(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> int:
    job = start(argv, log, env)
    try:
        return job.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_job(job)
        raise TrialFailed(f"stockpot run did not end within {RUN_TIMEOUT_S:.0f} s") from None


def kill_job(job: subprocess.Popen) -> None:
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def ranks_of(job: subprocess.Popen) -> list[int]:
    """The rank processes the spawner started, in rank order (not its standbys, which
    launch/standby.py starts beside them)."""
    try:
        text = Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split() if not _is_standby(int(c))]


def _is_standby(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == standby.COMM
    except OSError:
        return False  # gone: not a rank either, but the caller's signal will say so


def newest_step(store: Store) -> int:
    latest = catalog.scan(store).latest()
    return latest.step if latest else 0


def saving_now(run_dir: str) -> bool:
    """A save in progress on local disk: a temp attempt directory exists."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    return root.is_dir() and any(p.name.startswith(TMP_PREFIX) for p in root.iterdir())


def wait_for(ok, job: subprocess.Popen, what: str, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        check(job.poll() is None, f"the job exited ({job.returncode}) before {what}")
        check(time.monotonic() < deadline, f"no {what} within {timeout:.0f} s")
        time.sleep(0.01)


def verify_all(store: Store) -> catalog.Scan:
    """Every committed checkpoint verifies; nothing is both committed and a leftover."""
    scan = catalog.scan(store)
    for info in scan.committed:
        problems = catalog.verify(store.child(info.rel), info.manifest)
        check(not problems, f"committed {info.rel} fails verification: {problems}")
    check(not {c.rel for c in scan.committed} & set(scan.leftovers), "committed dir listed twice")
    return scan


WEIGHTS = (".model.",)  # the tensors `judge` compares: the model's
STATE = (".model.", ".optim.state.")  # and the optimizer's (AdamW's moments and step counts)


def final_weights(store: Store, parts: Sequence[str] = WEIGHTS) -> dict[str, torch.Tensor]:
    """The final checkpoint's tensors whose names contain one of `parts`."""
    scan = catalog.scan(store)
    found = [c for c in scan.committed if c.step == MAX_STEPS]
    check(bool(found), f"no committed checkpoint at step {MAX_STEPS}")
    rel = found[0].data_rel
    keys = [k for k in stored_items(store, rel) if any(p in k for p in parts)]
    return load_flat(store, rel, keys)


def judge(
    store: Store,
    reference: Store,
    log: Path,
    *,
    verify: bool = True,
    parts: Sequence[str] = WEIGHTS,
) -> None:
    """The checks every resuming trial ends with (`verify`: every commit must verify; off where
    the trial damaged one on purpose; `parts`: which tensors must equal the reference's)."""
    if verify:
        verify_all(store)
    mine, ref = final_weights(store, parts), final_weights(reference, parts)
    check(sorted(mine) == sorted(ref), "final checkpoints hold different tensors")
    differ = [k for k in ref if not torch.equal(mine[k], ref[k])]
    check(not differ, f"final state differs from the uninterrupted run's: {differ[:3]}")
    check("Traceback" not in log.read_text(errors="replace"), f"a traceback in {log}")


def resumed_from(log: Path) -> list[int]:
    """The steps each run of this log resumed from ("resumed from step N")."""
    import re

    return [int(m) for m in re.findall(r"resumed from step (\d+)", log.read_text(errors="replace"))]


def finish(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
    code = run(argv, log, env)
    check(code == 0, f"the resumed run exited {code} (log {log})")


def pick(rng: random.Random, items: Sequence[str]) -> str:
    return items[rng.randrange(len(items))]
