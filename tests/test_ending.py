"""orchestrator/ending.py's pure parts: the class of a failure, of a life from its ranks' words,
and the per-life summary `stockpot status` shows."""

from __future__ import annotations

from orchestrator import ending
from orchestrator.errors import CheckpointCorrupt, ConfigError, StorageError

T, D = ending.TRANSIENT, ending.DETERMINISTIC


def rec(life: str, rank: int, klass: str, cause: str, step: int | None = 5, sig: str = "",
        world: int = 2, time: float = 0.0) -> ending.EndRecord:  # fmt: skip
    return ending.EndRecord(life, rank, klass, cause, step, "h", time, sig, world)


def test_a_bug_is_transient_once_and_deterministic_when_it_repeats_at_the_same_step() -> None:
    bug = ValueError("boom")
    assert ending.classify(bug, 5, []) == T
    earlier = [rec("a", 1, T, "rank 1: ValueError: boom", 5, ending.signature(bug))]
    assert ending.classify(bug, 5, earlier) == D
    assert ending.classify(bug, 6, earlier) == T  # another step: not the same failure
    assert ending.classify(ValueError("other"), 5, earlier) == T
    assert ending.classify(KeyError("boom"), 5, earlier) == T


def test_config_errors_and_corruption_never_retry_storage_and_lost_peers_always_do() -> None:
    assert ending.classify(ConfigError("x"), 1, []) == D
    assert ending.classify(CheckpointCorrupt("x"), 1, []) == D
    outage = StorageError("down")
    earlier = [rec("a", 0, T, "down", 1, ending.signature(outage))]
    assert ending.classify(outage, 1, earlier) == T
    assert ending.classify(RuntimeError("gloo"), 1, earlier, lost_peer=True) == T


def test_a_life_is_finished_or_stopped_only_when_every_rank_says_so() -> None:
    def words(*klasses: str) -> dict[int, tuple[str, str]]:
        return {r: (k, "") for r, k in enumerate(klasses)}

    assert ending.life_class(words("finished", "finished"), 2) == ending.FINISHED
    assert ending.life_class(words("stopped", "stopped"), 2) == ending.STOPPED
    assert ending.life_class(words("finished"), 2) == T  # rank 1 silent: killed
    assert ending.life_class(words("transient", "deterministic"), 2) == D
    assert ending.life_class({}, 2) == T
    assert ending.worst(["finished", "transient", "stopped"]) == T


def test_lives_name_the_cause_not_the_peers_echo_and_count_silent_ranks() -> None:
    ends = [
        rec("j-0-0", 0, T, "rank 0: a collective failed", 7, time=1.0),
        rec("j-0-1", 0, T, "rank 0: a collective failed", 9, time=2.0),
        rec("j-0-1", 1, T, "rank 1: ValueError: boom", 9, "builtins.ValueError: boom", time=2.1),
        rec("j-0-2", 0, ending.FINISHED, "finished", 20, time=3.0),
    ]
    got = ending.lives(ends)
    assert [(x["life"], x["class"], x["step"]) for x in got] == [
        ("j-0-0", T, 7), ("j-0-1", T, 9), ("j-0-2", ending.FINISHED, 20),
    ]  # fmt: skip
    assert got[0]["cause"].startswith("rank(s) 1 left no record")
    assert got[1]["cause"] == "rank 1: ValueError: boom"


def test_a_record_round_trips_and_a_cut_one_is_skipped(tmp_path) -> None:
    from orchestrator.storage import Store

    store = Store(str(tmp_path))
    end = rec("j-0-0", 1, T, "rank 1 was killed by SIGKILL", None, "was killed by SIGKILL")
    end_dir = tmp_path / "ends"
    end_dir.mkdir()
    ending.record(store, {ending.END_DIR_VAR: str(end_dir)}, end)
    (tmp_path / "lives" / "j-0-0" / "rank-00000.json").write_text('{"life": "j-0')
    assert ending.read_ends(store) == [end]
    assert ending.read_words(str(end_dir)) == {1: (T, "rank 1 was killed by SIGKILL")}


def test_a_message_that_names_a_temp_file_still_repeats() -> None:
    first = RuntimeError("write failed: .tmp-step-000000006-52fed46bfa01/__0_optim.distcp")
    again = RuntimeError("write failed: .tmp-step-000000006-70a45bce8df7/__0_optim.distcp")
    earlier = [rec("a", 0, T, "x", 6, ending.signature(first))]
    assert ending.classify(again, 6, earlier) == D


def test_a_full_disk_is_never_restarted() -> None:
    from orchestrator.checkpoint.format.dcp_io import DiskFull

    assert ending.classify(DiskFull("no space left on device"), 6, []) == D
