"""The durable half of tiered checkpoints: copy local commits to the durable tier (`run.dir`) on
a thread of its own, each with its own commit there.

Every rank copies the files it wrote itself (tiers.py keeps them on its node), hashing them as
they go: a local copy that no longer matches the manifest is never made durable. The leader
then commits the step on the durable tier through commit.py's protocol, with the same manifest
(only its data dir differs), and applies retention there: nothing new to trust.

The uploads talk on their own gloo group and every rank takes part in every one, in the same
order. Offers (`offer`, after each local commit that is due) reach every rank alike; when the
uploader is behind, it skips to the newest offer every rank holds. A failed upload (storage
unreachable after its retries) is retried with a growing pause, always of the newest offer, so
training never waits for it and the steps at risk are reported (`on_durable`) until it catches
up. `flush` waits, up to a deadline, until a step is durable (a preemption's grace window);
`close` gives the last upload `FINAL_PATIENCE_S` of retries.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator import dist
from orchestrator.checkpoint.commit import Attempt
from orchestrator.checkpoint.format import FileEntry, Hasher, Manifest, step_rel
from orchestrator.dist import Group, one_line
from orchestrator.logs import LEADER_ONLY
from orchestrator.storage import Store

log = logging.getLogger(__name__)

CHUNK = 8 << 20
FIRST_PAUSE_S, MAX_PAUSE_S = 2.0, 60.0
FINAL_PATIENCE_S = 600.0  # at the end of training, how long the last upload is retried


@dataclass(frozen=True)
class Offer:
    """A local commit to make durable: its manifest and the files this rank wrote."""

    step: int
    manifest: Manifest
    mine: tuple[str, ...]


_CLOSE = None


class Uploader:
    """Created by every rank alike (a gloo group: collective); `close()` on every rank ends it."""

    def __init__(
        self,
        local: Store,
        durable: Store,
        *,
        prepare: Callable[[int], Attempt | None],
        commit: Callable[[Attempt, Manifest, float], None],
        mb_s: float | None = None,
    ) -> None:
        """`local`: this node's tier (a step's files under `checkpoints/step-*`). On the leader,
        `prepare(step)` says where the durable copy is written (None: it is durable already),
        `commit(attempt, manifest, seconds)` commits it there (and applies retention, records
        the metrics). `mb_s` caps this rank's upload rate."""
        self._local, self._durable = local, durable
        self._prepare, self._commit = prepare, commit
        self._mb_s = mb_s
        self.group: Group = dist.new_gloo_group()
        self._offers: queue.Queue[Offer | None] = queue.Queue()
        self._held: dict[int, Offer] = {}  # offers taken from the queue, not yet uploaded
        self._cond = threading.Condition()
        self.durable_step: int | None = None  # newest step committed durable by this uploader
        self.failed_step: int | None = None  # newest step whose upload failed (not durable yet)
        self.uploading: int | None = None
        self._deadline: float | None = None  # give up retrying after it (monotonic)
        self._thread = threading.Thread(target=self._run, name="stockpot-upload", daemon=True)
        self._thread.start()

    # -- the training thread's side --------------------------------------------------------

    def offer(self, offer: Offer) -> None:
        """Make `offer.step` durable (or a newer offer, if one comes before its turn)."""
        self._offers.put(offer)

    def flush(self, step: int, deadline: float) -> bool:
        """Wait until `step` (offered already) is durable, or until `deadline` (monotonic) when
        the pending upload is given up; True if it is durable."""
        with self._cond:
            self._deadline = deadline
            while not self._durable_at(step) and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0 and self.uploading is None:
                    break
                self._cond.wait(timeout=min(1.0, max(left, 0.05)))
            done = self._durable_at(step)
            if done:  # later uploads (and close) get their own patience again
                self._deadline = None
            return done

    def close(self, patience_s: float = FINAL_PATIENCE_S) -> None:
        """Finish the offers (retrying failures for up to `patience_s`), then stop the thread."""
        with self._cond:
            if self._deadline is None:
                self._deadline = time.monotonic() + patience_s
        self._offers.put(_CLOSE)
        self._thread.join()

    def _durable_at(self, step: int) -> bool:
        return self.durable_step is not None and self.durable_step >= step

    # -- the upload thread -----------------------------------------------------------------

    def _run(self) -> None:
        closing, pause = False, FIRST_PAUSE_S
        while True:
            # A rank enters each round holding an offer, or closing (after its last offer).
            closing = self._drain(block=not self._held and not closing) or closing
            newest = max(self._held) if self._held else None
            views = dist.all_gather_objects(newest, self.group)
            if all(step is None for step in views):
                return
            # Every rank holds every offer up to the oldest of the ranks' newest ones.
            target = min(step for step in views if step is not None)
            if self._upload(self._held[target]):
                self._drop_through(target)
                pause = FIRST_PAUSE_S
                continue
            if dist.leader_decides(self._past_deadline, self.group).value:
                log.warning(
                    "step %d is NOT durable: its upload to %s failed until the deadline "
                    "(newest durable step: %s)",
                    target,
                    self._durable.path(),
                    self.durable_step,
                    extra=LEADER_ONLY,
                )
                self._drop_through(target)
                continue
            time.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE_S)

    def _drain(self, *, block: bool) -> bool:
        """Hold every offer queued (waiting for one if `block`); True once close() was asked."""
        closing = False
        while True:
            try:
                item = self._offers.get(block=block)
            except queue.Empty:
                return closing
            block = False
            if item is _CLOSE:
                closing = True
            else:
                self._held[item.step] = item

    def _drop_through(self, step: int) -> None:
        for old in [s for s in self._held if s <= step]:
            del self._held[old]

    def _past_deadline(self) -> bool:
        with self._cond:
            return self._deadline is not None and time.monotonic() >= self._deadline

    def _upload(self, offer: Offer) -> bool:
        """Copy this rank's files of `offer`, then the leader commits; collective, agreed."""
        with self._cond:
            self.uploading = offer.step
        t0 = time.monotonic()
        try:
            attempt = dist.leader_decides(lambda: self._prepare(offer.step), self.group)
            problem = attempt.problem
            if problem is None and attempt.value is not None:
                problem = self._copy_mine(offer, attempt.value.write_rel)
            problems = [p for p in dist.all_gather_objects(problem, self.group) if p]
            if attempt.value is None and not problems:  # committed durable already
                self._durable_done(offer.step)
                return True
            if problems:
                raise RuntimeError(problems[0])
            where = attempt.value
            assert where is not None
            decision = dist.leader_decides(
                lambda: self._commit(where, offer.manifest, time.monotonic() - t0),
                self.group,
            )
            if decision.problem is not None:
                raise RuntimeError(decision.problem)
            self._durable_done(offer.step)
            return True
        except Exception as exc:
            with self._cond:
                self.failed_step = offer.step
            log.warning(
                "upload of step %d to %s failed (training goes on; retrying): %s",
                offer.step,
                self._durable.path(),
                one_line(exc),
                extra=LEADER_ONLY,
            )
            return False
        finally:
            with self._cond:
                self.uploading = None
                self._cond.notify_all()

    def _durable_done(self, step: int) -> None:
        with self._cond:
            self.durable_step = max(step, self.durable_step or step)
            self._cond.notify_all()

    def _copy_mine(self, offer: Offer, write_rel: str) -> str | None:
        """This rank's files of the step, local -> durable, each hashed against the manifest."""
        src = f"{step_rel(offer.step)}"
        try:
            for name in offer.mine:
                self._copy(f"{src}/{name}", f"{write_rel}/{name}", offer.manifest.files[name])
        except Exception as exc:  # reported through the gather: a raise here would hang the others
            return f"rank {dist.rank()}: {one_line(exc)}"
        return None

    def _copy(self, src: str, dst: str, expected: FileEntry) -> None:
        hasher = Hasher()
        started = time.monotonic()
        with self._local.open_read(src) as reader, self._durable.open_write(dst) as writer:
            while block := reader.read(CHUNK):
                hasher.update(block)
                writer.write(block)
                if self._mb_s:
                    ahead = hasher.size / (self._mb_s * 1e6) - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
                if self._past_deadline():
                    raise TimeoutError("the deadline to make it durable passed")
            if hasher.entry() != expected:
                raise ValueError(f"{self._local.path(src)} does not match its manifest")
        # (a raise inside `with` discards the durable copy: nothing half-written stays)
