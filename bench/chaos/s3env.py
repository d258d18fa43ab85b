"""S3 for the chaos suite: one moto_server, and a proxy in front of it that fails a share of
requests at random (500, 503 SlowDown, connection resets, slow answers).

The proxy is the tests' real HTTP fault injector (devtools/s3server.py) with a random rule.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
import uuid
from pathlib import Path

from bench.chaos import jobs
from bench.chaos.jobs import EVERY, MAX_STEPS, Trial, argv_for, check
from devtools.s3server import (
    FAKE_ENV,
    FaultProxy,
    Rule,
    free_port,
    make_bucket,
    start_moto_server,
    stop,
)
from orchestrator.storage import Store

FAULT_KINDS = ("500", "503-SlowDown", "reset", "slow")
SLOW_S = 0.5


class RandomFaultProxy(FaultProxy):
    """Fails each request with probability `rate`, cycling the fault kinds at random."""

    def __init__(self, upstream: str, rate: float, seed: int) -> None:
        super().__init__(upstream=upstream)
        self.rate, self.rng, self.injected = rate, random.Random(seed), 0
        self.enabled = True
        self._pick = threading.Lock()

    def decide(self, method: str, path: str) -> Rule | None:
        self.record(method, path)  # counted as the parent counts them: the report's figure
        with self._pick:
            hit = self.enabled and self.rng.random() < self.rate
            kind = self.rng.choice(FAULT_KINDS) if hit else ""
            self.injected += hit
        if kind == "slow":
            time.sleep(SLOW_S)  # then answered normally
            return None
        if kind == "reset":
            return Rule("", "reset")
        return Rule("", "status", 500 if kind == "500" else 503) if kind else None


class S3Env:
    """moto_server started on first use; `close()` stops it."""

    def __init__(self, work: Path, rate: float) -> None:
        self.work, self.rate = work, rate
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""

    def _up(self) -> str:
        if self.proc is None:
            self.endpoint, self.proc = start_moto_server(self.work / "moto.log")
        return self.endpoint

    def bucket(self) -> str:
        return make_bucket(self._up(), "chaos")

    def env(self, endpoint: str) -> dict[str, str]:
        return {**FAKE_ENV, "AWS_ENDPOINT_URL": endpoint}

    def url_for(self, case: str) -> tuple[str, dict[str, str]]:
        """A run.dir and environment that fail the start-up check the way `case` names."""
        url, env = f"{self.bucket()}/run", self.env(self._up())
        if case == "no-credentials":
            env.update(AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
        elif case == "unknown-bucket":
            url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run"
        elif case == "unreachable":
            env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
        elif case == "forbidden-403":
            proxy = FaultProxy(upstream=self._up()).start()
            proxy.fail("", status=403, times=None)
            env["AWS_ENDPOINT_URL"] = proxy.endpoint_url  # left running: tiny, ends with us
        return url, env

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def s3_faults(trial: Trial, work: Path, refs, rng: random.Random, s3: S3Env) -> None:
    """A run on S3 through the random-fault proxy, SIGKILLed once after a commit, resumed
    (faults still on) to the end: bit-identical to the uninterrupted run."""
    url = f"{s3.bucket()}/run"
    proxy = RandomFaultProxy(s3._up(), s3.rate, rng.randrange(1 << 30))
    proxy.start()
    env = s3.env(proxy.endpoint_url)
    argv = argv_for(url, "trainer.parallel=ddp", "storage.s3.max_attempts=8")
    log = work / "run.log"
    try:
        check_store = _store(url, s3)
        target = rng.randrange(EVERY, MAX_STEPS - EVERY, EVERY)
        job = jobs.start(argv, log, env)
        try:
            jobs.wait_for(lambda: jobs.newest_step(check_store) >= target, job, f"commit {target}")
            jobs.kill_job(job)
            trial.kills += 1
        finally:
            jobs.kill_job(job)
        at_kill = jobs.newest_step(check_store)
        jobs.finish(argv, work / "resume.log", env)
        check(jobs.resumed_from(work / "resume.log") == [at_kill], f"not resumed from {at_kill}")
        trial.faults += proxy.injected
        trial.notes["requests"] = len(proxy.requests)
        jobs.judge(check_store, refs("ddp"), work / "resume.log")
    finally:
        proxy.stop()


def _store(url: str, s3: S3Env) -> Store:
    """The run's store as seen from here, straight to moto (no faults in the judging)."""
    import os

    os.environ.update(s3.env(s3._up()))
    return Store(url)
