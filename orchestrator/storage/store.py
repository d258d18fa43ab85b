"""`Store`: a directory-like root (local path or s3://bucket/prefix) with small, safe operations.

The facade asks the registry for its backend once, by the URL's scheme, and owns what every
backend shares: the root, the rule that paths are relative and stay inside it, and pickling.
What differs between backends lives in them; what a caller may rely on is asked through the
capabilities `renames_dirs`, `fsyncs` and `local_paths`, never by testing which backend this is.

A pickled Store is its URL and StorageOptions only: no filesystem, no client, no credentials.
"""

from __future__ import annotations

import builtins
from typing import IO, Any

from orchestrator.storage import registry
from orchestrator.storage.base import AtomicWriter, Backend
from orchestrator.storage.options import StorageOptions


def _clean_rel(rel: str) -> str:
    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
    if rel.startswith("/") or ".." in parts:
        raise ValueError(f"storage path must be relative and stay inside the store: {rel!r}")
    return "/".join(parts)


class Store:
    """A directory-like root (local path or s3://bucket/prefix) with small, safe operations.

    `options` is the config's whole `storage:` section; only the URL's backend reads it. A URL
    no backend serves is a ConfigError naming the schemes there are (registry.py)."""

    def __init__(self, url: str, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()
        self._backend: Backend = registry.open_backend(url, self.options)
        self.url = self._backend.root_url(url)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __reduce__(self) -> tuple[type[Store], tuple[str, StorageOptions]]:
        return Store, (self.url, self.options)  # rebuilt in the new process, filesystems lazily

    # --- capabilities: what callers may rely on, instead of asking which backend this is -----

    @property
    def renames_dirs(self) -> bool:
        """True where `rename_dir` is atomic (local disk); S3 has no rename (copy + delete)."""
        return self._backend.renames_dirs

    @property
    def fsyncs(self) -> bool:
        """True where fsync makes writes durable (local disk); S3 writes are durable on return."""
        return self._backend.fsyncs

    @property
    def local_paths(self) -> bool:
        """True where `path()` names a file on this machine (local disk), not on S3."""
        return self._backend.local_paths

    # --- paths and filesystems ---------------------------------------------------------------

    def child(self, *parts: str) -> Store:
        return Store(self.path("/".join(parts)), self.options)

    def path(self, rel: str = "") -> str:
        rel = _clean_rel(rel)
        return f"{self.url}/{rel}" if rel else self.url

    def local_path(self, rel: str = "") -> str | None:
        """`rel` as a path on this machine, for libraries that only write local files
        (TensorBoard's writer); None where the store is not a local filesystem (S3)."""
        return self.path(rel) if self.local_paths else None

    def fsspec_filesystem(self) -> Any:
        """The backend's own fsspec filesystem, for torch DCP's shard writer and reader: the
        shard bytes go through the same backend, settings and retries as everything else."""
        return self._backend.fsspec_filesystem()

    def check_writable(self) -> None:
        """Probe that this root can be written, read and deleted (the leader, at start-up);
        a StorageSetupError (exit 2) whose one line names the fix otherwise."""
        from orchestrator.storage.check import check_writable

        check_writable(self)

    # --- small objects -----------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes:
        return self._backend.read_bytes(self.path(rel))

    def read_into(self, rel: str, start: int, into: memoryview) -> int:
        """Fill `into` from byte `start` of a file, in one request (a ranged GET on S3); threads
        may read one file at once, and a caller may reuse its buffers (sparing the page faults
        of fresh ones). Returns the bytes read: fewer only where the file ends first."""
        return self._backend.read_into(self.path(rel), start, into)

    def write_bytes(self, rel: str, data: bytes, *, create_only: bool = False) -> None:
        """Atomic write: readers see the old object or the new one, never a part.

        `create_only` raises FileExistsError if the object exists, even against a racing writer
        in another process or on another node: exactly one creator wins (a commit record)."""
        self._backend.write_bytes(self.path(rel), data, create_only=create_only)

    def append_bytes(self, rel: str, data: bytes) -> None:
        """Append to a small log object (one writer only); on S3 a read and a whole rewrite."""
        self._backend.append_bytes(self.path(rel), data)

    # --- streams -----------------------------------------------------------------------------

    def open_read(self, rel: str) -> IO[bytes]:
        return self._backend.open_read(self.path(rel))

    def open_write(self, rel: str) -> AtomicWriter:
        """Streaming write that lands only on a clean `close()`/`with` exit (discarded on error)."""
        return self._backend.open_write(self.path(rel))

    # --- listing and metadata ----------------------------------------------------------------

    def list(self, rel: str = "") -> builtins.list[str]:
        """Names of the immediate children (files and directories/prefixes); [] if missing."""
        return self._backend.list(self.path(rel))

    def walk_files(self, rel: str = "") -> dict[str, int]:
        """Every file below rel, as a posix path relative to rel -> size in bytes."""
        return self._backend.walk_files(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self._backend.exists(self.path(rel))

    def size(self, rel: str) -> int:
        return self._backend.size(self.path(rel))

    # --- mutation ----------------------------------------------------------------------------

    def delete(self, rel: str, *, recursive: bool = False) -> None:
        """Remove a file (or, recursive, everything below rel). Missing is fine."""
        self._backend.delete(self.path(rel), recursive=recursive)

    def makedirs(self, rel: str) -> None:
        """Create a directory (local); S3 has none: a prefix exists once a key below it does."""
        self._backend.makedirs(self.path(rel))

    def rename_dir(self, src_rel: str, dst_rel: str) -> None:
        """Atomically move a directory into place and make the move durable.

        Only where `renames_dirs`; raises NotImplementedError elsewhere, and FileExistsError if
        the target exists."""
        self._backend.rename_dir(self.path(src_rel), self.path(dst_rel))

    def fsync_tree(self, rel: str = "") -> None:
        """fsync every file and directory below rel, children first (no-op unless `fsyncs`)."""
        self._backend.fsync_tree(self.path(rel))

    def abort_multipart_uploads(self, rel: str = "", older_than_s: float = 0) -> int:
        """Abort unfinished multipart uploads below rel started over `older_than_s` ago (S3)."""
        return self._backend.abort_multipart_uploads(self.path(rel), older_than_s)
