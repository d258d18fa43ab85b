"""Bad inputs: corrupted files in a run dir, and storage that cannot work as configured.

Corruption: a finished 12-step run is copied, one file of its newest checkpoint (or its
config.yaml) is damaged by random bytes, truncation or a bit flip, and the run is continued to
the end: it must exit 0 with no traceback, never resume from the damaged checkpoint, and end
bit-identical to the uninterrupted run.

Bad set-up: the leader's start-up check must end the job with exit 2 and one line that names
the fix, before any training, with no other rank speaking and no traceback.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

from bench.chaos import jobs
from bench.chaos.jobs import EVERY, Trial, argv_for, check
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.format import MANIFEST_NAME, rank_state_name
from orchestrator.storage import Store

TARGETS = ("MANIFEST.json", ".metadata", "shard", "rank-state", "config.yaml")
DAMAGES = ("random-bytes", "truncate", "bit-flip")
HALF = 12  # the corrupted run stopped here; the newest checkpoint is this step's
SETUPS = ("no-credentials", "forbidden-403", "unknown-bucket", "unreachable", "read-only-dir")
SETUP_FIX = {  # the words the one line must contain
    "no-credentials": "AWS_ACCESS_KEY_ID",
    "forbidden-403": "access denied",
    "unknown-bucket": "does not exist",
    "unreachable": "endpoint_url",
    "read-only-dir": "not writable",
}


def damage(path: Path, how: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    check(len(data) > 1, f"{path} is empty")
    if how == "truncate":
        data = data[: rng.randrange(len(data))]
    elif how == "bit-flip":
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    else:
        start = rng.randrange(len(data))
        n = min(len(data) - start, rng.randint(1, 64))
        data[start : start + n] = rng.randbytes(n)
    path.write_bytes(bytes(data))


def target_file(run_dir: Path, target: str) -> Path:
    if target == "config.yaml":
        return run_dir / "config.yaml"
    info = catalog.scan(Store(str(run_dir))).latest()
    if info is None or info.step != HALF:
        raise jobs.TrialFailed(f"no checkpoint at step {HALF}")
    ckpt = run_dir / info.data_rel
    if target == "MANIFEST.json":
        return run_dir / info.rel / MANIFEST_NAME
    if target == "rank-state":
        return ckpt / rank_state_name(1)
    if target == "shard":
        return sorted(ckpt.glob("*.distcp"))[0]
    return ckpt / target


def corrupt(trial: Trial, work: Path, refs, rng: random.Random, base: Path) -> None:
    """`base`: a 2-rank ddp run stopped at step HALF (made once, copied per trial)."""
    target, how = trial.variant.split(":")
    run_dir = work / "run"
    shutil.copytree(base, run_dir)
    damage(target_file(run_dir, target), how, rng)
    trial.faults += 1
    log = work / "resume.log"
    jobs.finish(argv_for(str(run_dir), "trainer.parallel=ddp"), log)
    resumed = jobs.resumed_from(log)
    check(len(resumed) == 1, f"resumed {resumed}")
    if target in ("config.yaml",) or resumed[0] == HALF:
        # Only harmless damage may still resume from HALF: final weights show it was harmless.
        trial.notes["resumed_from"] = resumed[0]
    else:
        check(resumed[0] == HALF - EVERY, f"resumed from {resumed[0]}, not {HALF - EVERY}")
    jobs.judge(Store(str(run_dir)), refs("ddp"), log, verify=False)


def make_base(work: Path) -> Path:
    base = work / "corrupt-base"
    code = jobs.run(argv_for(str(base), "trainer.parallel=ddp", f"trainer.max_steps={HALF}"),
                    work / "corrupt-base.log")  # fmt: skip
    check(code == 0, f"the base run for corruption exited {code}")
    return base


def bad_setup(trial: Trial, work: Path, s3) -> None:
    """One bad storage set-up; `s3`: the chaos S3 environment (moto + proxy)."""
    case = trial.variant
    log = work / "run.log"
    env: dict[str, str] = {}
    if case == "read-only-dir":
        return _read_only(trial, work, log)
    url, env = s3.url_for(case)
    trial.faults += 1
    code = jobs.run(argv_for(url, "trainer.parallel=ddp", "storage.s3.max_attempts=2"), log, env)
    _judge_setup(case, code, log)


def _read_only(trial: Trial, work: Path, log: Path) -> None:
    where = work / "ro"
    where.mkdir()
    os.system(f"mount -t tmpfs -o size=1m,ro tmpfs {where}")
    try:
        trial.faults += 1
        code = jobs.run(argv_for(str(where / "run"), "trainer.parallel=ddp"), log)
    finally:
        os.system(f"umount -l {where}")
    _judge_setup("read-only-dir", code, log)


def _judge_setup(case: str, code: int, log: Path) -> None:
    text = log.read_text(errors="replace")
    errors = [line for line in text.splitlines() if " ERROR " in line]
    check(code == 2, f"{case}: exit {code}, not 2")
    check(len(errors) == 1, f"{case}: {len(errors)} error lines, not one: {errors[:3]}")
    check(SETUP_FIX[case] in errors[0], f"{case}: the line does not name the fix: {errors[0]}")
    check("[rank 0]" in errors[0], f"{case}: not the leader's line")
    check("Traceback" not in text and "gloo" not in text.lower(), f"{case}: crash noise")
    check(not re.search(r"step \d+.*loss", text), f"{case}: trained before the check")
