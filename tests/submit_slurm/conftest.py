"""One run of every scenario for the whole package: the cluster runs one 2-rank job at a time,
so the scenarios run concurrently (one thread each): while one job waits in the queue after a
requeue, another runs. Each test then reads its scenario's outcome; what is left of the jobs is
cancelled when the package's tests are done."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.submit_slurm.scenarios import FIGURES, GONE, SCENARIOS, TERMINAL, Submitted, sh, state


@pytest.fixture(scope="package")
def scenarios(slurm_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("submit")
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(SCENARIOS)) as pool:
        futures = {name: pool.submit(run, root) for name, run in SCENARIOS.items()}
        done: dict[str, Submitted | BaseException] = {}
        for name, future in futures.items():
            try:
                done[name] = future.result()
            except BaseException as exc:  # reported by that scenario's test
                done[name] = exc
    print(f"\nslurm scenarios: {time.monotonic() - t0:.1f} s wall for {len(SCENARIOS)} scenarios")
    yield done
    _cancel_leftovers(root, done)
    for name, figures in FIGURES.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in figures.items()))


def _cancel_leftovers(root: Path, done: dict[str, Any]) -> None:
    ids = [str(j["job_id"]) for p in root.rglob("jobs.json") for j in json.loads(p.read_text())]
    ids += [s.facts["high_job"] for s in done.values() if isinstance(s, Submitted)
            and "high_job" in s.facts]  # fmt: skip
    alive = [i for i in set(ids) if state(i) not in (*TERMINAL, GONE)]
    if alive:
        sh("scancel", *alive, check=False)
