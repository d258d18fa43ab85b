"""Names inside a run directory: where checkpoints live and how their directories are called.

<run.dir>/checkpoints/step-000001000/        committed iff MANIFEST.json inside parses
<run.dir>/checkpoints/.tmp-step-000001000-<nonce>/   local disk: being written

Inside a step (under its manifest's data dir), DCP's `.metadata` says where every tensor piece
is, and each rank writes its optimizer state to its own file (`__<rank>_optim.distcp`) apart
from the model's (`__<rank>_0.distcp`), so retention can drop the optimizer part of a
checkpoint it keeps for soups without rewriting the model part.
"""

from __future__ import annotations

import re

CHECKPOINTS_DIR = "checkpoints"
MANIFEST_NAME = "MANIFEST.json"
METADATA_NAME = ".metadata"  # DCP's index of every stored piece (a pickle; dcp_io reads it)
TMP_PREFIX = ".tmp-"
RANK_STATE_DIR = "ranks"
OPTIM_KEY = "optim"  # ModelAndOptimizer's flat DCP keys: <registered name>.optim.<...>
MODEL_KEY = ".model."  # ModelAndOptimizer's flat DCP keys: <registered name>.model.<param>
SHARD_SUFFIX = ".distcp"  # DCP's data files (its filesystem.DEFAULT_SUFFIX; dcp_write names them)
_OPTIM_FILE_RE = re.compile(r"__\d+_optim\.distcp")
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


def is_optimizer_item(fqn: str) -> bool:
    """A flat DCP key of optimizer state (`train.optim.state.0.exp_avg`)."""
    return fqn.split(".", 2)[1:2] == [OPTIM_KEY]


def optimizer_file_name(rank: int) -> str:
    return f"__{rank}_{OPTIM_KEY}.distcp"


def is_optimizer_file(name: str) -> bool:
    """A file (by its name relative to the checkpoint, data dir included) of optimizer state."""
    return _OPTIM_FILE_RE.fullmatch(name.rsplit("/", 1)[-1]) is not None


def is_shard_file(name: str) -> bool:
    """A DCP data file (`__0_0.distcp`): big, read piece by piece into tensors. Every other file
    of a checkpoint (DCP's `.metadata`, the per-rank state JSON) is small and parsed whole."""
    return name.endswith(SHARD_SUFFIX)
