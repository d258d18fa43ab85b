"""Local (or shared POSIX) disk: atomic writes by temp file + fsync + rename, durable directories.

The one atomic write (`_atomic_file`) serves both `write_bytes` and `open_write`: data goes to a
hidden temp file next to the target, is fsynced, then renamed over the target (or, create-only,
hard-linked, because link() never replaces an existing name: exactly one racing creator wins),
and the directory is fsynced so the new name survives a crash. Errors are never transient here,
so nothing is retried.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import functools
import os
import shutil
import uuid
from typing import IO, Any

from orchestrator.storage.base import AtomicWriter

_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _sync_file_range() -> Any:
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range  # libc, already loaded
    except (OSError, AttributeError):  # not Linux: start_writeback does nothing
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk now, without waiting for them (Linux
    `sync_file_range(SYNC_FILE_RANGE_WRITE)`, what RocksDB's bytes_per_sync does): a writer
    that calls this as it goes overlaps the disk's work with its own, and its final fsync waits
    only for the rest (figures: bench/README.md, "Sync save: done", writeback). Durability is
    still the fsync's; where the call is missing or fails, nothing happens."""
    call = _sync_file_range()
    if call is not None:
        call(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # offset 0, nbytes 0: the whole file


def _atomic_file(dst: str, *, create_only: bool = False) -> AtomicWriter:
    """A writer whose bytes appear at `dst` only on a clean close, fsynced with their name."""
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-{uuid.uuid4().hex}")
    f = open(tmp, "xb")  # noqa: SIM115 -- the returned writer owns and closes it

    def commit() -> None:
        f.flush()
        os.fsync(f.fileno())
        f.close()
        try:
            if create_only:
                os.link(tmp, dst)  # raises FileExistsError for every racer but one
            else:
                os.replace(tmp, dst)
        finally:
            if os.path.lexists(tmp):  # the link's source, or a failed rename's
                os.unlink(tmp)
        _fsync_path(parent)

    def drop() -> None:
        f.close()
        os.unlink(tmp)

    return AtomicWriter(f, commit, drop)


class LocalBackend:
    """Paths are absolute local paths; a pickled Store may run in another working directory."""

    renames_dirs = True
    fsyncs = True
    local_paths = True

    def root_url(self, url: str) -> str:
        _, scheme, path = url.partition("://")  # file:///abs/path
        return os.path.abspath(path if scheme else url)

    # --- files -------------------------------------------------------------------------------

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def read_into(self, path: str, start: int, into: memoryview) -> int:
        """pread: no file position shared between threads."""
        fd = os.open(path, os.O_RDONLY)
        try:
            got = 0
            while got < len(into):
                n = os.preadv(fd, [into[got:]], start + got)
                if n == 0:
                    break
                got += n
            return got
        finally:
            os.close(fd)

    def write_bytes(self, path: str, data: bytes, *, create_only: bool) -> None:
        with _atomic_file(path, create_only=create_only) as f:
            f.write(data)

    def append_bytes(self, path: str, data: bytes) -> None:
        """Appends and flushes in place: one writer per log, and a torn last line is tolerable."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "ab") as f:
            f.write(data)

    def open_read(self, path: str) -> IO[bytes]:
        return open(path, "rb")

    def open_write(self, path: str) -> AtomicWriter:
        return _atomic_file(path)

    # --- listing and metadata ----------------------------------------------------------------

    def list(self, path: str) -> builtins.list[str]:
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def walk_files(self, path: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for root, _, files in os.walk(path):
            for name in files:
                full = os.path.join(root, name)
                out[os.path.relpath(full, path).replace(os.sep, "/")] = os.path.getsize(full)
        return out

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    # --- mutation ----------------------------------------------------------------------------

    def delete(self, path: str, *, recursive: bool) -> None:
        if recursive and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def rename_dir(self, src: str, dst: str) -> None:
        """rename(2) is atomic; fsyncing both parents makes the move survive a crash."""
        if os.path.lexists(dst):  # rename() would silently replace an empty directory
            raise FileExistsError(errno.EEXIST, "rename target exists", dst)
        os.rename(src, dst)
        for parent in {os.path.dirname(src), os.path.dirname(dst)}:
            _fsync_path(parent)

    def fsync_tree(self, path: str) -> None:
        """fsync every file and directory below `path`, children before parents."""
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files + dirs:
                _fsync_path(os.path.join(root, name))
            _fsync_path(root)

    def abort_multipart_uploads(self, path: str, older_than_s: float) -> int:
        return 0  # local writes have no half-finished uploads to collect

    # --- fsspec, for torch DCP ---------------------------------------------------------------

    def fsspec_filesystem(self) -> Any:
        import fsspec

        return fsspec.filesystem("file")
