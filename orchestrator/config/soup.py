"""The `soup:` section of the config: which checkpoints go into a model soup and how they mix.

Its own module because it is as large as the rest of the schema; `orchestrator.soup` reads it,
`stockpot soup` turns its flags into these keys, and the chained soup job carries it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from orchestrator.errors import require
from orchestrator.soup.schedules import rule_problem
from orchestrator.storage.registry import check_url


@dataclass(frozen=True)
class SoupConfig:
    # After training, merge checkpoints into a model soup in a dependent job.
    enabled: bool = False
    # How to merge: `uniform` mean, `weighted` mean (soup.weights), `greedy` (add an ingredient
    # only if the held-out score does not drop), `learned` (mixing coefficients fit on held-out),
    # `window` (one run's checkpoints weighted by step, soup.schedule; for pretraining).
    recipe: Literal["uniform", "weighted", "greedy", "learned", "window"] = "uniform"
    # Name of the soup; it is written to <run.dir>/soups/<name>/ unless soup.out is set.
    name: str = "soup"
    # Where the ingredients come from: run dirs, a sweep dir, committed checkpoints or
    # .safetensors files (local or s3://); empty: this config's run.dir.
    sources: tuple[str, ...] = ()
    # Output directory (local or s3://); null: <run.dir>/soups/<name>/.
    out: str | None = None
    # `weighted` only: one weight per ingredient, in ingredient order; normalised to sum 1.
    weights: tuple[float, ...] = ()
    # `window` only: how the checkpoints weigh, by the steps each covers: `uniform`, `linear`
    # (later heavier), or the LR cooldown it emulates: `decay:linear`, `decay:cosine`,
    # `decay:minus-sqrt` (alias `minus-sqrt`); see docs/soups.md.
    schedule: str = "uniform"
    # Keep checkpoints with step in [A, B] (`A:B`; either side may be empty); null: all.
    steps: str | None = None
    # Keep checkpoints whose step is a multiple of this; null: all.
    every: int | None = None
    # Keep the newest K checkpoints (after the rules above); null: all.
    last: int | None = None
    # Keep the K best by soup.metric (after the rules above); null: all.
    top: int | None = None
    # Metric that ranks checkpoints (`top`, a sweep run's best) and scores soups (`greedy`,
    # `learned`, the report), e.g. eval/accuracy; null: eval/loss.
    metric: str | None = None
    # Whether a larger (`max`) or smaller (`min`) soup.metric is better; null: min for names
    # with loss/error/perplexity in them, else max.
    mode: Literal["max", "min"] | None = None
    # The checkpoint-soup rule: keep a checkpoint if it beats every earlier one on at least one
    # of these metrics (in step order), e.g. [eval/loss, eval/accuracy].
    improved_any: tuple[str, ...] = ()
    # `learned` only: one coefficient per ingredient and tensor instead of per ingredient.
    per_layer: bool = False
    # `learned` only: passes over the held-out set to fit the coefficients.
    learned_epochs: int = 10
    # `learned` only: AdamW's learning rate for the coefficients.
    learned_lr: float = 0.05
    # `learned` holds every ingredient's tensors at once: refuse when that exceeds this many
    # GB; null: no bound.
    max_memory_gb: float | None = None
    # Recompute BatchNorm running statistics on training data after merging (torch update_bn).
    recompute_bn: bool = False
    # Skip the shared-starting-point check (a midpoint far worse than both ingredients).
    allow_unrelated: bool = False
    # Print a score table and write <out>/soup.png (needs the run's task).
    report: bool = False
    # Also write the soup as a committed stockpot checkpoint under this run dir (model only).
    out_checkpoint: str | None = None
    # Check every file the soup reads against its ingredient's manifest before committing:
    # `checksums` (hashed as it is read, no second pass) or `sizes` (catches truncation only).
    verify: Literal["checksums", "sizes"] = "checksums"
    # Largest output .safetensors file in MB; a larger soup is sharded with an index, as
    # Hugging Face does.
    shard_mb: float = 5000.0
    # Parallel range reads (S3 especially); memory grows with read-ahead, not with this.
    read_workers: int = 4
    # Samples per batch when scoring on held-out data.
    eval_batch_size: int = 256
    # Score soups with this shell command instead of the run's task (greedy, --report, the
    # soup's scores): it gets the candidate model as a .safetensors file, its path in place of
    # `{model}` (quoted) and in $STOCKPOT_SOUP_MODEL, and prints a JSON object of metrics on its
    # last stdout line, e.g. {"eval/accuracy": 0.91}. See docs/soups.md.
    eval_cmd: str | None = None
    # Score soups with this Python function instead (`pkg.module:function`): given the state
    # dict (name -> tensor), it returns a dict of metrics.
    eval_hook: str | None = None
    # Which model of each DCP checkpoint to mix: `auto` the trained one, or a name such as
    # `ema_999` (trainer.ema's average with decay 0.999), or a flat key prefix (`train.model.`).
    prefix: str = "auto"

    def __post_init__(self) -> None:
        require(
            bool(self.name) and "/" not in self.name,
            f"soup.name must be a plain name (got {self.name!r})",
        )
        require(
            all(w >= 0 for w in self.weights) and (not self.weights or sum(self.weights) > 0),
            f"soup.weights must be >= 0 and not all 0 (got {list(self.weights)})",
        )
        require(
            not self.weights or self.recipe == "weighted",
            f"soup.weights is for recipe weighted (recipe is {self.recipe})",
        )
        self._check_schedule()
        for key in ("every", "last", "top"):
            value = getattr(self, key)
            require(
                value is None or value >= 1, f"soup.{key} must be >= 1 (got {value}); null: off"
            )
        require(self.shard_mb > 0, f"soup.shard_mb must be > 0 (got {self.shard_mb})")
        for key in ("learned_epochs", "read_workers", "eval_batch_size"):
            value = getattr(self, key)
            require(value >= 1, f"soup.{key} must be >= 1 (got {value})")
        require(self.learned_lr > 0, f"soup.learned_lr must be > 0 (got {self.learned_lr})")
        require(
            self.max_memory_gb is None or self.max_memory_gb > 0,
            f"soup.max_memory_gb must be > 0 (got {self.max_memory_gb}); use null to disable",
        )
        require(
            self.steps is None or self.steps.count(":") == 1,
            f"soup.steps must be A:B, e.g. 100:500 or 200: (got {self.steps!r})",
        )
        require(bool(self.prefix), "soup.prefix must not be empty; `auto` picks the trained model")
        self._check_urls()
        self._check_eval()

    def _check_eval(self) -> None:
        require(
            not (self.eval_cmd and self.eval_hook),
            "soup.eval_cmd and soup.eval_hook are two ways to score soups: set one",
        )
        hook = self.eval_hook
        require(
            hook is None or (":" in hook and all(hook.split(":", 1))),
            f"soup.eval_hook must be pkg.module:function (got {hook!r})",
        )
        user = "--eval" if self.eval_cmd else "--eval-hook" if hook else None
        for what, on in (("recipe learned", self.recipe == "learned"),
                         ("--recompute-bn", self.recompute_bn)):  # fmt: skip
            require(
                not (user and on),
                f"{what} runs the task's own model, which {user} does not give; use greedy "
                f"(or uniform/weighted) with {user}, or drop {user} to use the run's task",
            )

    def _check_schedule(self) -> None:
        problem = rule_problem(self.schedule)
        require(problem is None, f"soup.schedule: {problem}")
        require(
            self.schedule == "uniform" or self.recipe == "window",
            f"soup.schedule {self.schedule} is for recipe window (recipe is {self.recipe}); "
            "set soup.recipe=window (--recipe window)",
        )

    def _check_urls(self) -> None:
        """A URL no storage backend serves fails on load, not when the soup job starts."""
        named = [("soup.out", self.out), ("soup.out_checkpoint", self.out_checkpoint)]
        for key, url in [*named, *(("soup.sources", s) for s in self.sources)]:
            if url:
                check_url(url, key)


def soup_out_dir(run_dir: str, soup: SoupConfig) -> str:
    """Where a soup is written: soup.out, else <run_dir>/soups/<soup.name>."""
    return soup.out or f"{run_dir.rstrip('/')}/soups/{soup.name}"
