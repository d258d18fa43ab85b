"""The commit protocol: a directory of files becomes visible all at once, or never.

A directory is committed if and only if its record file (MANIFEST.json for a checkpoint,
SOUP.json for a soup) exists and parses; readers ignore anything else. Writing one goes:

    strategy = commit_strategy(store, record="SOUP.json")   # chosen once, from the store
    attempt = strategy.prepare("soups/uniform")              # CheckpointError if committed
    store.write_bytes(f"{attempt.write_rel}/model.safetensors", data)   # any number of files,
    record = {..., "data_dir": attempt.data_dir,                        # by any number of ranks
              "files": {attempt.final_name("model.safetensors"): ...}}
    strategy.commit(attempt, json.dumps(record).encode())    # the record is written LAST

The record must say where the files are: `attempt.data_dir` ("" on local disk) is the
sub-directory of the committed directory that holds them, and `attempt.final_name(name)` is a
file's name relative to the committed directory. In a multi-rank job the leader prepares and
commits, and broadcasts the attempt in between (`dist.leader_decides`); a single process (the
soup writer) calls both itself.

Two strategies, picked by what the store can do, never by which backend it is:

- `RenameCommit` (stores with an atomic directory rename: local disk): files go into a temp
  sibling `<parent>/.tmp-<name>-<nonce>/`; commit fsyncs the tree, writes the record last and
  renames the sibling into place. A kill before the rename leaves only the temp dir.
- `NonceCommit` (no rename: S3, where "rename" is copy + delete): files go into a fresh nonce
  dir inside the final prefix, `<final>/<nonce>/`; commit is one create-only PUT of the record,
  so of two writers racing for one directory exactly one commits. The loser's nonce dir stays
  inside the committed prefix as a stale attempt.

`collect_garbage` removes what interrupted or losing attempts left behind: temp dirs, the
uncommitted dirs the caller judges dead, stale attempts inside committed dirs, and unfinished
multipart uploads.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.checkpoint.format import TMP_PREFIX, FileEntry
from orchestrator.dist import one_line
from orchestrator.errors import CheckpointError
from orchestrator.storage import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attempt:
    """One try at committing `final_rel` (picklable: the leader broadcasts it to the ranks)."""

    final_rel: str  # the directory once committed, relative to the store root
    write_rel: str  # where the files are written now, relative to the store root
    data_dir: str = ""  # where the files are inside final_rel once committed ("": at its top)

    def final_name(self, name: str) -> str:
        """`name` (relative to write_rel) as the record lists it, relative to final_rel."""
        return f"{self.data_dir}/{name}" if self.data_dir else name


class CommitStrategy:
    """How directories under one store are committed; see the module docstring."""

    def __init__(self, store: Store, record: str) -> None:
        self.store, self.record = store, record

    def prepare(self, final_rel: str) -> Attempt:
        """A fresh place to write `final_rel`'s files; CheckpointError if it is committed."""
        if self.store.exists(f"{final_rel}/{self.record}"):
            raise CheckpointError(f"{self.store.path(final_rel)} is already committed")
        return self._attempt(final_rel, uuid.uuid4().hex[:12])

    def commit(self, attempt: Attempt, record: bytes) -> None:
        """Make the attempt's files visible as `attempt.final_rel`, with `record` as its record
        file. Every file must be written (and closed) by every writer before this is called."""
        raise NotImplementedError

    def collect_garbage(
        self, under: str, *, dead: Iterable[str] = (), committed: Mapping[str, str] | None = None
    ) -> list[str]:
        """Remove leftovers under `under`: this protocol's temp dirs, `dead` (uncommitted dirs
        the caller knows no writer still uses) and, in each committed dir (`committed`: its rel
        -> its data_dir), every attempt but the committed one. Returns what was removed; a
        failed delete is logged and left for the next time."""
        temp = [f"{under}/{n}" for n in self.store.list(under) if n.startswith(TMP_PREFIX)]
        doomed = [*temp, *dead, *self._stale_attempts(committed or {})]
        for rel in doomed:
            try:
                self.store.delete(rel, recursive=True)
            except Exception as exc:
                log.warning("could not remove leftover %s: %s", self.store.path(rel), one_line(exc))
        aborted = self._abort_uploads(under)
        if doomed or aborted:
            log.info(
                "garbage collected: %d leftover dirs, %d multipart uploads", len(doomed), aborted
            )
        return doomed

    def _attempt(self, final_rel: str, nonce: str) -> Attempt:
        raise NotImplementedError

    def _stale_attempts(self, committed: Mapping[str, str]) -> list[str]:
        return []

    def _abort_uploads(self, under: str) -> int:
        return 0


class RenameCommit(CommitStrategy):
    """Temp sibling dir, fsync, record last, atomic rename into place."""

    def _attempt(self, final_rel: str, nonce: str) -> Attempt:
        parent, _, name = final_rel.rpartition("/")
        temp = f"{TMP_PREFIX}{name}-{nonce}"
        write_rel = f"{parent}/{temp}" if parent else temp
        self.store.makedirs(write_rel)
        return Attempt(final_rel, write_rel)

    def commit(self, attempt: Attempt, record: bytes) -> None:
        self.store.fsync_tree(attempt.write_rel)  # the files are durable before the record
        self.store.write_bytes(f"{attempt.write_rel}/{self.record}", record)
        self.store.rename_dir(attempt.write_rel, attempt.final_rel)


class NonceCommit(CommitStrategy):
    """Nonce data dir inside the final prefix, create-only record PUT."""

    def _attempt(self, final_rel: str, nonce: str) -> Attempt:
        return Attempt(final_rel, f"{final_rel}/{nonce}", nonce)

    def commit(self, attempt: Attempt, record: bytes) -> None:
        final = attempt.final_rel
        try:  # create-only: two writers can never both commit one directory
            self.store.write_bytes(f"{final}/{self.record}", record, create_only=True)
        except FileExistsError:
            raise CheckpointError(
                f"another writer committed {self.store.path(final)} first"
            ) from None

    def _stale_attempts(self, committed: Mapping[str, str]) -> list[str]:
        stale = []
        for rel, data_dir in committed.items():
            keep = {self.record, data_dir}
            stale += [f"{rel}/{name}" for name in self.store.list(rel) if name not in keep]
        return stale

    def _abort_uploads(self, under: str) -> int:
        return self.store.abort_multipart_uploads(under)


def commit_strategy(store: Store, record: str) -> CommitStrategy:
    """The strategy for `store`, by capability: atomic directory rename or not."""
    return RenameCommit(store, record) if store.renames_dirs else NonceCommit(store, record)


def gathered_files(attempt: Attempt, gathered: Any) -> dict[str, FileEntry]:
    """Every rank's files, as the manifest lists them; a rank's write error fails the commit."""
    errors = [err for _, (_, err) in gathered if err]
    if errors:
        raise CheckpointError("; ".join(errors))
    files: dict[str, FileEntry] = {}
    for records, (local, _) in gathered:
        for name, entry in [*records.items(), *local.items()]:
            files[attempt.final_name(name)] = entry
    return files
