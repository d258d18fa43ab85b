"""The `checkpoint:` section's types, which the checkpoint code reads as they are.

`SaveSchedule` says when `maybe_save` saves, `RetentionPolicy` which committed checkpoints stay;
`CheckpointConfig` is both, plus how a save runs. The runner hands the loaded section to the
Checkpointer, which gives it to `checkpoint.schedule.due` as a SaveSchedule and to
`checkpoint.retention.plan_retention` as a RetentionPolicy. Nothing copies a field, so each key
has one comment (docs/config.md is generated from them) and one error message, which names the
key the user writes, from YAML and from Python alike.

Components depend on their config types, config depends on no component (as in torchtitan):
this module imports nothing of stockpot's but `errors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from orchestrator.errors import require


def _count_or_none(value: object, key: str, off: str = "use null to turn it off") -> None:
    # bool is an int subclass; `keep_last: true` must not silently mean 1.
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    require(ok, f"checkpoint.{key} must be an integer >= 1 (got {value!r}); {off}")


@dataclass(frozen=True)
class KeepBest:
    """Keep the `k` best checkpoints by `metric`; `mode` says whether lower or higher is better."""

    # Metric name from eval (e.g. `eval/loss`); null disables keep-best retention.
    metric: str | None = None
    # `min` keeps the lowest values, `max` the highest.
    mode: Literal["min", "max"] = "min"
    # How many best checkpoints to keep.
    k: int = 1

    def __post_init__(self) -> None:
        require(
            self.metric != "",
            "checkpoint.keep_best.metric must name a metric (got an empty string); "
            "use null to turn keep-best off",
        )
        require(
            self.mode in ("min", "max"),
            f"checkpoint.keep_best.mode must be 'min' or 'max' (got {self.mode!r})",
        )
        # bool is an int subclass; `k: true` must not silently mean 1.
        require(
            isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 1,
            f"checkpoint.keep_best.k must be >= 1 (got {self.k})",
        )


@dataclass(frozen=True)
class SaveSchedule:
    """When `maybe_save` saves: whenever a rule that is set is met (none set: only when told)."""

    # Save every N optimizer steps; null disables step-based saves.
    every_steps: int | None = 50
    # Save at the end of every N epochs; null disables.
    every_epochs: int | None = None
    # Save when N minutes have passed since the last save; null disables.
    every_minutes: float | None = None

    def __post_init__(self) -> None:
        _count_or_none(self.every_steps, "every_steps", "use null to disable step-based saves")
        _count_or_none(self.every_epochs, "every_epochs")
        minutes = self.every_minutes
        require(
            minutes is None
            or (isinstance(minutes, int | float) and not isinstance(minutes, bool) and minutes > 0),
            f"checkpoint.every_minutes must be a number > 0 (got {minutes!r}); "
            "use null to turn it off",
        )


@dataclass(frozen=True)
class RetentionPolicy:
    """Which committed checkpoints stay, whole or as weights only (`checkpoint/retention.py`
    applies it): the rules' keeps are united; a rule at null is off, and with every rule off
    nothing is deleted."""

    # Keep the newest N committed checkpoints; null keeps all (the newest is never deleted).
    keep_last: int | None = 3
    # Also keep the k best by an eval metric (metric null: the rule is off).
    keep_best: KeepBest = field(default_factory=KeepBest)
    # Also keep every checkpoint whose step is a multiple of N (milestones); null disables.
    keep_every_steps: int | None = None
    # Also keep the WEIGHTS (no optimizer state) of every checkpoint whose step is a multiple of
    # N, e.g. soup ingredients; full checkpoints follow the rules above; null disables.
    keep_weights_every_steps: int | None = None
    # Also keep the WEIGHTS of every checkpoint that beat every earlier one on at least one of
    # these metrics, e.g. [eval/loss, eval/accuracy]: the ingredients of `stockpot soup
    # --improved-any` (BirdCLEF 2024's checkpoint soup); needs trainer.eval_every; null disables.
    keep_weights_improved: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _count_or_none(self.keep_last, "keep_last", "use null to keep every checkpoint")
        # Retention runs in the background and never raises: a wrong type must fail here.
        require(
            isinstance(self.keep_best, KeepBest),
            f"checkpoint.keep_best must be a KeepBest (got {self.keep_best!r}); "
            "KeepBest() turns the rule off",
        )
        _count_or_none(self.keep_every_steps, "keep_every_steps")
        _count_or_none(self.keep_weights_every_steps, "keep_weights_every_steps")
        improved = self.keep_weights_improved
        require(
            improved is None
            or (bool(improved) and all(isinstance(m, str) and m for m in improved)),
            "checkpoint.keep_weights_improved must list metric names, e.g. [eval/loss, "
            f"eval/accuracy] (got {improved!r}); use null to turn it off",
        )

    @property
    def has_rules(self) -> bool:
        rules = (self.keep_last, self.keep_best.metric, self.keep_every_steps,
                 self.keep_weights_every_steps, self.keep_weights_improved)  # fmt: skip
        return any(rule is not None for rule in rules)


@dataclass(frozen=True)
class TierPolicy:
    """Tiered checkpoints (checkpoint/tiers.py, uploader.py): each save commits on the node
    first and is made durable in run.dir in the background."""

    # A node-local directory (e.g. /tmp/stockpot/${run.name} or /dev/shm/stockpot/...): every
    # save commits there first, and a background upload makes it durable in run.dir with its
    # own commit; a restore takes each file from the node's copy when it verifies. null: saves
    # go straight to run.dir.
    local_dir: str | None = None
    # How many local commits each node keeps (the durable tier follows keep_* above).
    local_keep: int = 2
    # Make every Nth step's local commit durable; with durable_every_minutes also null, every
    # local save is made durable (when the upload is behind, the newest one). The final save
    # and a stop's save are always made durable.
    durable_every_steps: int | None = None
    # Make a local commit durable when N minutes passed since the last one was (null: off).
    durable_every_minutes: float | None = None
    # Cap each rank's upload to the durable tier at N MB/s (null: as fast as it goes).
    upload_mb_s: float | None = None

    def __post_init__(self) -> None:
        require(
            self.local_dir is None or (isinstance(self.local_dir, str) and self.local_dir != ""),
            f"checkpoint.local_dir must be a directory path or null (got {self.local_dir!r})",
        )
        _count_or_none(self.local_keep, "local_keep", "it must keep at least one")
        require(self.local_keep is not None, "checkpoint.local_keep must be an integer >= 1")
        _count_or_none(self.durable_every_steps, "durable_every_steps")
        for key in ("durable_every_minutes", "upload_mb_s"):
            value = getattr(self, key)
            require(
                value is None
                or (isinstance(value, int | float) and not isinstance(value, bool) and value > 0),
                f"checkpoint.{key} must be a number > 0 (got {value!r}); use null to turn it off",
            )


# The bases in this order keep the section's key order (a dataclass lists its bases' fields from
# the last base to the first): the schedule's, retention's, then these.
@dataclass(frozen=True)
class CheckpointConfig(TierPolicy, RetentionPolicy, SaveSchedule):
    """The `checkpoint:` section: a SaveSchedule and a RetentionPolicy, and how saves run."""

    # Write and commit in the background (one save in flight). Parameters and optimizer state
    # are written from live memory; what is unwritten at the next optimizer step is copied then.
    async_save: bool = False
    # On resume, verify the checksums of the chosen checkpoint's shards (sizes, and the checksums
    # of its small files, which are parsed whole, are always checked).
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        SaveSchedule.__post_init__(self)
        RetentionPolicy.__post_init__(self)
        TierPolicy.__post_init__(self)
