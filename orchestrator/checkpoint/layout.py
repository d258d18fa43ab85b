"""Names inside a run directory: where checkpoints live and how their directories are called.

<run.dir>/checkpoints/step-000001000/        committed iff MANIFEST.json inside parses
<run.dir>/checkpoints/.tmp-step-000001000-<nonce>/   local disk: being written
"""

from __future__ import annotations

import re

CHECKPOINTS_DIR = "checkpoints"
MANIFEST_NAME = "MANIFEST.json"
TMP_PREFIX = ".tmp-"
RANK_STATE_DIR = "ranks"
_STEP_RE = re.compile(r"step-(\d{9})")


def step_dirname(step: int) -> str:
    """`step-000001000`: zero-padded so a lexical listing is also a numeric one."""
    if not 0 <= step < 10**9:
        raise ValueError(f"step must be in [0, 1e9) (got {step})")
    return f"step-{step:09d}"


def step_rel(step: int) -> str:
    """`checkpoints/step-XXXXXXXXX`, relative to the run dir."""
    return f"{CHECKPOINTS_DIR}/{step_dirname(step)}"


def parse_step_dirname(name: str) -> int | None:
    match = _STEP_RE.fullmatch(name)
    return int(match.group(1)) if match else None


def rank_state_name(rank: int) -> str:
    return f"{RANK_STATE_DIR}/rank-{rank:05d}.json"
