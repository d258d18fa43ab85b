"""What a storage backend is: the small Protocol `Store` delegates to, and the atomic writer.

As in fsspec, a backend takes full paths (`/abs/dir/file` or `s3://bucket/key`) and raises the
standard exceptions (`FileNotFoundError`, `FileExistsError`, `PermissionError`); `Store` owns the
root and the relative-path rules, and the registry (registry.py) picks a backend by URL scheme.
As in torchtitan's CheckpointStorage, callers ask a backend what it can do (`renames_dirs`,
`fsyncs`, `local_paths`) instead of which backend it is.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Protocol


class Backend(Protocol):
    """One kind of storage. Every path is a full path under the backend's own `root_url` rules."""

    # `rename_dir` is atomic (a directory can be committed by renaming it into place).
    renames_dirs: bool
    # fsync is what makes a write durable; where False, a write is durable when it returns.
    fsyncs: bool
    # Paths are files on this machine, which libraries that only write local files may use.
    local_paths: bool

    def root_url(self, url: str) -> str:
        """The canonical form of a root URL (absolute path, no trailing slash); checks it."""
        ...

    def read_bytes(self, path: str) -> bytes: ...

    def read_into(self, path: str, start: int, into: memoryview) -> int:
        """Fill `into` from byte `start` of a file; returns the bytes read (fewer only where the
        file ends first)."""
        ...

    def write_bytes(self, path: str, data: bytes, *, create_only: bool) -> None:
        """Atomic: readers see the old object or the new one; `create_only` never replaces."""
        ...

    def append_bytes(self, path: str, data: bytes) -> None: ...

    def open_read(self, path: str) -> IO[bytes]: ...

    def open_write(self, path: str) -> AtomicWriter: ...

    def list(self, path: str) -> builtins.list[str]:
        """Sorted names of the immediate children; [] if `path` is missing."""
        ...

    def walk_files(self, path: str) -> dict[str, int]:
        """Every file below `path`, as a posix path relative to it -> size in bytes."""
        ...

    def exists(self, path: str) -> bool: ...

    def size(self, path: str) -> int: ...

    def delete(self, path: str, *, recursive: bool) -> None:
        """Remove a file (or, recursive, everything below `path`). Missing is fine."""
        ...

    def makedirs(self, path: str) -> None: ...

    def rename_dir(self, src: str, dst: str) -> None:
        """Move a directory into place atomically, or raise NotImplementedError."""
        ...

    def fsync_tree(self, path: str) -> None: ...

    def abort_multipart_uploads(self, path: str, older_than_s: float) -> int: ...

    def fsspec_filesystem(self) -> Any:
        """The fsspec filesystem over the same storage, for torch DCP's shard files: built once
        per backend and reused (no secrets in it that the backend does not hold)."""
        ...


@dataclass
class AtomicWriter:
    """File object that appears at its destination only on a clean close; `discard()` leaves
    nothing. Used as a context manager, an exception inside the block discards."""

    f: Any
    commit: Callable[[], None]
    drop: Callable[[], None]
    _done: bool = field(default=False)

    def __getattr__(self, name: str) -> Any:  # write, tell, seek, flush ... of the real file
        return getattr(self.f, name)

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.commit()

    def discard(self) -> None:
        if not self._done:
            self._done = True
            self.drop()
