"""The chained soup job: `soup.enabled: true` makes `stockpot submit` run it `afterok` on the
training job (or on the whole array of a sweep), so it starts only once every run succeeded.

It holds the submitted config as plain data (`Config.to_dict()`) and the run dirs it trained, so
it opens every run dir and the soup's output with the config's `storage` section (an S3
endpoint given only in the config is honoured; the environment's AWS_* settings still apply
underneath), as `stockpot soup --config` does.

What it soups (the config's `soup:` section, as `stockpot soup --config` would):
- `soup.sources` when given; else the trained run dirs: one run -> a checkpoint soup of its
  committed checkpoints (weights-only ones included), a sweep -> one ingredient per run.
- Output: `soup.out`, else `<run.dir>/soups/<soup.name>` (the sweep's root for a sweep).

Preemptible: the soup is committed all at once (SOUP.json last, through the checkpoint commit
protocol), so an interrupted soup leaves nothing that looks committed. `checkpoint()` (submitit,
on USR2) requeues the job, which starts over; a soup already committed (requeued after its
commit) is left as it is and its path returned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.config import Config, from_dict
from orchestrator.config.soup import soup_out_dir

log = logging.getLogger("stockpot.soup_job")


class SoupJob:
    def __init__(self, cfg: Mapping[str, Any], run_dirs: Sequence[str]) -> None:
        self.cfg = dict(cfg)  # Config.to_dict(): plain data
        self.run_dirs = list(run_dirs)

    def __call__(self) -> str:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        return cook_soup(from_dict(self.cfg), self.run_dirs)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue (nothing to save), at most launcher.max_requeues times."""
        from launch.job import requeue

        return requeue(
            self,
            from_dict(self.cfg).launcher.max_requeues,
            again="the soup job starts over (nothing of it was committed)",
            stays="no soup is made (make it with `stockpot soup`)",
        )


def cook_soup(cfg: Config, run_dirs: Sequence[str]) -> str:
    """Make the config's soup of `run_dirs` (or soup.sources); returns where it is committed."""
    from orchestrator.soup import cook, writer
    from orchestrator.storage import Store

    out = soup_out_dir(cfg.run.dir, cfg.soup)
    if Store(out, cfg.storage).exists(writer.RECORD):
        log.info("soup %s is already committed (a requeue after its commit): kept", out)
        return out
    t0 = time.monotonic()
    kitchen = cook.prepare(list(cfg.soup.sources) or list(run_dirs), cfg.soup, cfg.storage, out=out)
    record = cook.cook(kitchen)
    chosen = sum(1 for i in record["ingredients"] if i["in_soup"])
    scores = " ".join(f"{k}={v:.4g}" for k, v in sorted((record.get("soup_scores") or {}).items()))
    log.info(
        "committed %s soup %s: %d of %d ingredients in %.1f s %s",
        cfg.soup.recipe,
        out,
        chosen,
        len(record["ingredients"]),
        time.monotonic() - t0,
        scores,
    )
    return out
