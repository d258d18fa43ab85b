"""TensorBoard event files for a run, written by the leader under `<run.dir>/tb/`.

A resumed run opens its writer with `purge_step` = the resumed step: TensorBoard then hides every
event an earlier life wrote at the checkpoint's step and past it (the steps that were lost and
are trained again), so each step shows once, with the value `metrics.jsonl`'s last line has for
it. The checkpoint's own step is drawn again by the resumed life (metrics._redraw), with the
mark of the commit it resumed from: the life that committed it may have been killed before it
flushed that mark, or after, and the mark shows once either way.

Where the files go: a local run dir gets them directly in `<run.dir>/tb/`. SummaryWriter only
writes local files, so an `s3://` run writes to a local scratch dir and uploads each event file
whole to `<run.dir>/tb/` at every flush (before each checkpoint commits and at the end); every
life writes its own file, so uploads never overwrite another life's events. An upload that
fails (an S3 outage) is said once and done again at the next flush: the scratch dir keeps the
events meanwhile.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

from orchestrator.errors import StorageError, one_line
from orchestrator.storage import Store, redact

log = logging.getLogger(__name__)

TB_DIR = "tb"


def available() -> bool:
    """Whether the tensorboard package is installed (torch's writer needs it)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardWriter:
    """Scalars and text for one life of a run; `purge_step` hides what earlier lives wrote there
    and later."""

    def __init__(self, run: Store, purge_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: pulls tensorboard + protobuf

        self.run = run
        local = run.local_path(TB_DIR)
        self._remote = local is None  # an object store: write here, upload at each flush
        self.local_dir = local or tempfile.mkdtemp(prefix="stockpot-tb-")
        # flush_secs: a killed run keeps what it logged up to ~10 s before the kill; what is
        # lost is re-trained after the resume anyway.
        self._writer = SummaryWriter(self.local_dir, purge_step=purge_step, flush_secs=10)
        self._behind = False  # an upload failed; the next flush uploads again

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        self._writer.flush()
        if self._remote:
            self._upload()

    def close(self) -> None:
        self._writer.close()
        if self._remote:
            self._upload()
            if self._behind:
                log.warning("tensorboard: this life's last events are not in %s; they are in %s",
                            self.run.path(TB_DIR), self.local_dir)  # fmt: skip

    def _upload(self) -> None:
        try:
            for name in sorted(os.listdir(self.local_dir)):
                with open(os.path.join(self.local_dir, name), "rb") as f:
                    self.run.write_bytes(f"{TB_DIR}/{name}", f.read())
        except (StorageError, OSError) as exc:
            if not self._behind:
                log.warning(
                    "tensorboard: cannot upload to %s (%s); the events wait in %s for the next "
                    "flush",
                    self.run.path(TB_DIR),
                    redact(one_line(exc)),
                    self.local_dir,
                )
            self._behind = True
            return
        if self._behind:
            log.warning("tensorboard: %s answers again; events uploaded", self.run.path(TB_DIR))
            self._behind = False


def writer_opener(
    run: Store, *, enabled: bool, start_step: int
) -> Callable[[], TensorBoardWriter] | None:
    """What opens the leader's writer (metrics.py opens it after the life's first step: its
    import takes ~0.2 s), or None when off or when tensorboard is not installed (said once)."""
    if not enabled:
        return None
    if not available():
        log.warning("logging.tensorboard: the tensorboard package is not installed; skipping")
        return None
    return functools.partial(TensorBoardWriter, run, purge_step=start_step)


def scalar_values(values: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of a metrics line: what TensorBoard can plot."""
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float)
        and not isinstance(v, bool)
        and v == v
        and abs(v) != float("inf")
    }
