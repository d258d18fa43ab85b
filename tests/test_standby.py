"""Warm standby ranks (launch/standby.py, orchestrator/standby.py) under the local supervisor,
with real processes and a probe rank that needs no torch (tests/standby_probe.py): a restart
takes the standbys, each gets its new life's environment, and standbys left when the run ends
are killed without ever running. The same path with real training, bit-identical after a
kill: tests/test_recovery.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from launch.supervise import supervise_local
from tests.standby_probe import OUT_VAR

REPO = Path(__file__).resolve().parents[1]
ARGV = [sys.executable, "-m", "tests.standby_probe"]


def supervise(out: Path, codes: str, max_restarts: int, *flags: str) -> int:
    out.mkdir(exist_ok=True)
    env = {OUT_VAR: str(out), "PYTHONPATH": str(REPO)}
    return supervise_local([*ARGV, codes, *flags], 2, max_restarts=max_restarts, env=env,
                           grace_s=5, standby_after_s=0)  # fmt: skip


def lives(out: Path) -> dict[tuple[int, int], dict[str, str]]:
    found = {}
    for path in out.glob("life-*-rank-*.json"):
        _, life, _, rank = path.stem.split("-")
        found[int(life), int(rank)] = json.loads(path.read_text())
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_restart_takes_the_standbys_and_the_rest_are_killed_unused(tmp_path: Path) -> None:
    assert supervise(tmp_path, "1,0", 2, "0,1") == 0
    seen = lives(tmp_path)
    assert sorted(seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # no third life ran
    warm = {int(p.name.split("-")[1]) for p in tmp_path.glob("warm-*")}
    assert len(warm) == 4  # standbys for life 1, then for a life 2 that never came
    for rank in (0, 1):
        first, second = seen[0, rank], seen[1, rank]
        assert first["pid"] not in warm and second["pid"] in warm  # life 1 ran in standbys
        assert second["RANK"] == str(rank)
        assert second["STOCKPOT_LIFE_ID"].endswith("-1")
        assert second["STOCKPOT_END_DIR"].endswith("/1")
        assert second["MASTER_PORT"] == seen[1, 0]["MASTER_PORT"]
    unused = warm - {seen[1, r]["pid"] for r in (0, 1)}
    assert not any(alive(pid) for pid in unused)  # killed, and reaped by the spawner


def test_no_standby_for_a_life_no_restart_may_follow(tmp_path: Path) -> None:
    assert supervise(tmp_path, "1,1", 1, "0") == 1  # life 1 is the last one allowed
    assert sorted(lives(tmp_path)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len(list(tmp_path.glob("warm-*"))) == 2  # life 1's, none for a life 2
    assert supervise(tmp_path / "none", "1", 0) == 1
    assert not list((tmp_path / "none").glob("warm-*"))
