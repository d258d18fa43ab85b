"""Tiered checkpoints for one Checkpointer (`checkpoint.local_dir` set): how a save commits on
every node's local tier (tiers.py) and is offered to the uploader (uploader.py), which makes it
durable in run.dir; restores are tiered_restore.py's.

The save is the Checkpointer's, with the local tier as the store: the leader picks the attempt's
name, every rank writes its files into it on its node, the leader builds the manifest (and
sends DCP's index along, which only its node holds), then each node commits its copy. The
training-facing save time is the local one. Whether the step is then made durable follows
`durable_every_steps` / `durable_every_minutes` (every save when both are null); the final
save and a stop's save always are (`make_durable`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from orchestrator import dist
from orchestrator.checkpoint import tiered_restore
from orchestrator.checkpoint.catalog import CheckpointInfo
from orchestrator.checkpoint.commit import Attempt
from orchestrator.checkpoint.committer import Committer
from orchestrator.checkpoint.format import MANIFEST_NAME, Manifest, save_shards, step_rel
from orchestrator.checkpoint.snapshot import Snapshot
from orchestrator.checkpoint.tiered_restore import Restored
from orchestrator.checkpoint.tiers import LocalTier, local_store
from orchestrator.checkpoint.uploader import Offer, Uploader
from orchestrator.config.checkpoint import CheckpointConfig
from orchestrator.dist import Group
from orchestrator.errors import CheckpointError
from orchestrator.logs import LEADER_ONLY
from orchestrator.storage import Store

log = logging.getLogger("orchestrator.checkpoint.checkpointer")

# What the leader sends every rank before the local commits: the manifest, DCP's index (for
# the nodes without it) and whether the step is to be made durable.
Built = tuple[bytes, bytes | None, bool]
OnDurable = Callable[[int, float, int], None]  # step, upload seconds, steps still at risk


class Tiered:
    """Built by every rank alike (collective: the tier's node map, the uploader's group)."""

    def __init__(
        self,
        run: Store,
        config: CheckpointConfig,
        committer: Committer,
        *,
        on_durable: OnDurable | None = None,
    ) -> None:
        assert config.local_dir is not None
        self.run, self.config, self._committer = run, config, committer
        self._on_durable = on_durable
        self.tier = LocalTier(local_store(config.local_dir, run), run)
        self.uploader = Uploader(
            self.tier.store, run, prepare=self._prepare, commit=self._commit,
            mb_s=config.upload_mb_s,
        )  # fmt: skip
        self.newest_local: int | None = None
        self._newest_offer: Offer | None = None  # this rank's newest local commit
        self._offered: int | None = None
        self._offered_at = time.monotonic()  # the leader's clock for durable_every_minutes

    # -- saving (every rank; `group` is the save's) ------------------------------------------

    def write(
        self,
        snap: Snapshot,
        group: Group,
        write_rank_state: Callable[[Store, str, bytes | None], Any],
    ) -> CheckpointInfo:
        step = snap.step
        t0 = time.perf_counter()
        rel = dist.leader_decides(
            lambda: LocalTier.attempt_rel(step, uuid.uuid4().hex[:12]), group
        ).or_raise(CheckpointError, f"step {step} not saved: ")
        store = self.tier.store
        try:
            self.tier.begin(rel)
            records = save_shards(snap.shared, store, rel, group, snap.lazy)
        finally:
            if snap.lazy is not None:
                snap.lazy.done()
        local = write_rank_state(store, rel, snap.per_rank)
        gathered = dist.gather_objects((records, local), dst=dist.LEADER, group=group)
        snap.timings["write_s"] = time.perf_counter() - t0
        attempt = Attempt(step_rel(step), rel)
        built = dist.leader_decides(lambda: self._build(attempt, snap, gathered), group)
        manifest_json, metadata, durable = built.or_raise(
            CheckpointError, f"step {step} not committed: "
        )
        t1 = time.perf_counter()
        problem = self.tier.commit(rel, step, manifest_json, metadata)
        problems = [p for p in dist.all_gather_objects(problem, group) if p]
        if problems:
            raise CheckpointError(f"step {step} not committed: {problems[0]}")
        manifest = Manifest.from_json(manifest_json)
        self.newest_local = step
        mine = tuple(sorted([*records, *local[0]]))
        self._newest_offer = Offer(step, manifest, mine)
        if durable:
            self._offer(self._newest_offer)
        self.tier.prune(self.config.local_keep, spare=self._spared())
        if dist.rank() == dist.LEADER:
            return self._committer.committed(
                step_rel(step), manifest, snap, time.perf_counter() - t1, store,
                steps_at_risk=self.at_risk(),
            )  # fmt: skip
        return CheckpointInfo(step, step_rel(step), manifest)

    def _build(self, attempt: Attempt, snap: Snapshot, gathered: Any) -> Built:
        """On the leader: the manifest, DCP's index for the other nodes, and whether to upload."""
        manifest = self._committer.manifest(attempt, snap, gathered)
        metadata = self.tier.metadata(attempt.write_rel) if self.tier.nodes > 1 else None
        every, minutes = self.config.durable_every_steps, self.config.durable_every_minutes
        durable = (every is None and minutes is None) or (
            every is not None and snap.step % every == 0
        )
        if minutes is not None and time.monotonic() - self._offered_at >= minutes * 60:
            durable = True
        if durable:
            self._offered_at = time.monotonic()
        return manifest.to_json(), metadata, durable

    def make_durable(self) -> None:
        """Offer the newest local commit for upload if it was not (the final or a stop's save)."""
        if self._newest_offer is not None:
            self._offer(self._newest_offer)

    def _offer(self, offer: Offer) -> None:
        if self._offered is None or offer.step > self._offered:
            self._offered = offer.step
            self.uploader.offer(offer)

    def _spared(self) -> set[int]:
        """Local commits the tier must keep beyond local_keep: the upload's, and the newest
        offered until it is durable."""
        spare = {s for s in (self.uploader.uploading, self._offered) if s is not None}
        durable = self.uploader.durable_step
        return {s for s in spare if durable is None or s > durable or s == self.uploader.uploading}

    def at_risk(self) -> int:
        """Steps between the newest local commit and the newest durable one."""
        newest = self.newest_local or 0
        return max(0, newest - (self.uploader.durable_step or 0))

    def flush(self, deadline: float) -> tuple[bool, int | None]:
        """Make the newest local commit durable before `deadline` (monotonic): (done, the
        newest durable step)."""
        self.make_durable()
        if self.newest_local is None:
            return True, self.uploader.durable_step
        done = self.uploader.flush(self.newest_local, deadline)
        return done, self.uploader.durable_step

    def close(self) -> None:
        self.make_durable()
        self.uploader.close()

    # -- restoring (every rank) -----------------------------------------------------------

    def restore(
        self, shared: dict[str, Any], optional: list[str], step: int | None, group: Group
    ) -> Restored | None:
        """tiered_restore.restore; afterwards the uploader knows the newest durable step, and a
        restored step that is not durable yet is offered for upload (it is at risk)."""
        found = tiered_restore.candidates(self.tier, self.run, None, group)
        durable = [c.step for c in found if c.durable is not None]
        self.uploader.durable_step = max(durable) if durable else None
        done = tiered_restore.restore(
            self.tier, self.run, shared, optional, step, group,
            checksums=self.config.verify_checksums, found=found,
        )  # fmt: skip
        if done is None:
            return None
        self.newest_local = done.info.step
        c = next(c for c in found if c.step == done.info.step)
        counts = dist.all_gather_objects(done.tier, group)
        if dist.rank() == dist.LEADER:
            log.info(
                "restore of step %d: %d rank(s) read only their node's copy, %d read from %s",
                c.step, sum(t == "local" for t in counts), sum(t != "local" for t in counts),
                self.run.path(), extra=LEADER_ONLY,
            )  # fmt: skip
        if c.durable is None:  # at risk: make it durable, each file from one node that holds it
            held = sorted(self.tier.store.walk_files(step_rel(c.step))) if c.local else []
            everyone = dist.all_gather_objects(
                held if dist.rank() in self.tier.node_ranks else [], group
            )
            holders: dict[str, list[int]] = {}
            for rank, names in enumerate(everyone):
                for name in names:
                    holders.setdefault(name, []).append(rank)
            owner = {n: rs[i % len(rs)] for i, (n, rs) in enumerate(sorted(holders.items()))}
            if set(c.manifest.files) <= set(owner):
                mine = tuple(
                    n for n, r in owner.items() if r == dist.rank() and n in c.manifest.files
                )
                self._newest_offer = Offer(c.step, c.manifest, mine)
                self.make_durable()
            elif dist.rank() == dist.LEADER:
                log.warning("step %d is on no tier whole: it cannot be made durable", c.step)
        return done

    # -- the durable side (the leader, on the upload thread) ------------------------------

    def _prepare(self, step: int) -> Attempt | None:
        self._committer.collect_garbage_once()  # an upload a kill cut, even if none follows
        if self.run.exists(f"{step_rel(step)}/{MANIFEST_NAME}"):
            return None
        return self._committer.prepare(step)

    def _commit(self, attempt: Attempt, manifest: Manifest, seconds: float) -> None:
        self._committer.commit_copy(attempt, manifest)
        self._committer.start_retention(protected=())
        log.info(
            "durable %s (%.1f MB uploaded in %.2f s)",
            self.run.path(attempt.final_rel),
            manifest.total_bytes / 1e6,
            seconds,
            extra=LEADER_ONLY,
        )
        if self._on_durable is not None:
            at_risk = max(0, (self.newest_local or 0) - manifest.step)
            self._on_durable(manifest.step, seconds, at_risk)
