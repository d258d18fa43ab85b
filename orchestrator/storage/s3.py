"""S3 (and S3-compatible servers) through s3fs; with the local backend, the only fsspec user.

Retries: whole small-object operations (read_bytes, write_bytes, list, ...) are retried HERE on
transient errors (`retry.with_retries`), and botocore/s3fs retries are switched off for them so
that `max_attempts` means what it says. Streams (`open_read`/`open_write`) and the filesystem
handed to torch DCP (`fsspec_filesystem`, the shard files) cannot be replayed from outside, so
they use botocore's own "standard" retry mode with the same attempt budget, per HTTP request.

Credentials are never held here: botocore reads them (env, profile, instance role) in each
process, so the kwargs built here carry none and logs cannot show them.

S3 has no rename, no fsync and no append: `renames_dirs`/`fsyncs` say so, and a commit is made
with a create-only PUT (`If-None-Match: *`) of a small object instead.
"""

from __future__ import annotations

import builtins
import errno
import functools
import os
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

from orchestrator.storage.base import AtomicWriter
from orchestrator.storage.options import S3Options
from orchestrator.storage.retry import cause_chain, server_answer, with_retries
from orchestrator.storage.s3_upload import stream_filesystem

T = TypeVar("T")


def _quiet_s3fs_retries() -> None:
    """Turn off s3fs's own retry loop, process-wide: it is a class attribute, not an option.

    Left on, it multiplies with botocore's and ours (5 x 5 tries of a dead endpoint). This
    package is the only s3fs user.
    """
    import s3fs

    s3fs.S3FileSystem.retries = 1


def _key(path: str) -> str:
    """Path as s3fs wants and returns it: `bucket/key`, without the scheme."""
    return path.removeprefix("s3://")


class S3Backend:
    """Paths are `s3://bucket/key` URLs; one backend per Store, its filesystems built lazily."""

    renames_dirs = False  # a "rename" on S3 is copy + delete: never atomic
    fsyncs = False  # a PUT is durable when it returns
    local_paths = False

    def __init__(self, options: S3Options) -> None:
        self.options = options
        self._fs_cache: dict[bool, Any] = {}

    def root_url(self, url: str) -> str:
        if "@" in url.split("/")[2]:
            raise ValueError("put S3 credentials in the environment, not in the URL")
        return url.rstrip("/")

    # --- filesystems -------------------------------------------------------------------------

    def fsspec_filesystem(self) -> Any:
        """The streams' filesystem: botocore retries per request (DCP's shard files)."""
        return self._fs(streaming=True)

    def _s3_kwargs(self, attempts: int) -> dict[str, Any]:
        """fsspec kwargs; no secrets: botocore finds the credentials itself."""
        env, opts = os.environ.get, self.options
        endpoint = opts.endpoint_url or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL")
        region = opts.region or env("AWS_REGION") or env("AWS_DEFAULT_REGION")
        kwargs: dict[str, Any] = {
            "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": attempts}},
            "use_listings_cache": False,  # other ranks write too: never trust a cached listing
        }
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        if region:
            kwargs["client_kwargs"] = {"region_name": region}
        if opts.profile:
            kwargs["profile"] = opts.profile
        return kwargs

    def _fs(self, streaming: bool = False) -> Any:
        """Whole operations get a filesystem with one try per request (we retry them above)."""
        if streaming not in self._fs_cache:
            import fsspec

            _quiet_s3fs_retries()
            opts = self.options
            if streaming:  # whose writes are PartUploads (s3_upload.py)
                self._fs_cache[streaming] = stream_filesystem(
                    self._s3_kwargs(opts.max_attempts),
                    opts.upload_part_mb << 20,
                    opts.upload_concurrency,
                )
            else:
                self._fs_cache[streaming] = fsspec.filesystem("s3", **self._s3_kwargs(1))
        return self._fs_cache[streaming]

    def _retry(self, op: str, path: str, fn: Callable[[], T]) -> T:
        return with_retries(op, path, fn, self.options)

    # --- small objects -----------------------------------------------------------------------

    def read_bytes(self, path: str) -> bytes:
        """One GET. (s3fs's cat_file HEADs first to decide whether to read in concurrent
        ranges, and on a missing key also LISTs: three round trips where one answers.)"""
        key = _key(path)
        data: bytes = self._retry("read", path, lambda: self._fs().cat_file(key, max_concurrency=1))
        return data

    def read_into(self, path: str, start: int, into: memoryview) -> int:
        """One ranged GET, copied into `into`."""

        def fetch() -> bytes:
            got: bytes = self._fs().cat_file(_key(path), start=start, end=start + len(into))
            return got

        data = self._retry("read", path, fetch)
        into[: len(data)] = data
        return len(data)

    def write_bytes(self, path: str, data: bytes, *, create_only: bool) -> None:
        """One PUT: S3 shows a new object only once it is complete, so this is atomic."""
        self._retry("write", path, lambda: self._put(path, data, create_only))

    def append_bytes(self, path: str, data: bytes) -> None:
        """S3 has no append: the object is read and rewritten whole (fine for metrics logs)."""
        try:
            old = self.read_bytes(path)
        except FileNotFoundError:
            old = b""
        self.write_bytes(path, old + data, create_only=False)

    def _put(self, path: str, data: bytes, create_only: bool) -> None:
        mode = "create" if create_only else "overwrite"  # "create" sends If-None-Match: *
        try:
            self._fs().pipe_file(_key(path), data, mode=mode)
        except OSError as exc:  # s3fs maps 412 only when the server names the condition
            if create_only and any(
                server_answer(e) == (412, "PreconditionFailed") for e in cause_chain(exc)
            ):
                raise FileExistsError(errno.EEXIST, "object exists", path) from exc
            raise

    # --- streams -----------------------------------------------------------------------------

    def open_read(self, path: str) -> IO[bytes]:
        f: IO[bytes] = self._fs(streaming=True).open(_key(path), "rb")
        return f

    def open_write(self, path: str) -> AtomicWriter:
        """An upload only becomes visible when it completes, at close; discard aborts it. Parts
        go up while later ones are written (s3_upload.PartUpload)."""
        f = self._fs(streaming=True).open(_key(path), "wb")
        return AtomicWriter(f, f.close, f.discard)

    # --- listing and metadata ----------------------------------------------------------------

    def list(self, path: str) -> builtins.list[str]:
        key = _key(path)
        try:
            found = self._retry("list", path, lambda: self._fs().ls(key, detail=False))
        except FileNotFoundError:
            return []
        names = {x.rstrip("/").rsplit("/", 1)[-1] for x in found if x.rstrip("/") != key}
        return sorted(names)

    def walk_files(self, path: str) -> dict[str, int]:
        key = _key(path)
        found = self._retry("walk", path, lambda: self._fs().find(key, detail=True))
        prefix = key + "/"  # so that "ab/x" is not under "a"
        return {
            name[len(prefix) :]: int(info["size"])
            for name, info in found.items()
            if name.startswith(prefix) and info.get("type") == "file"
        }

    def exists(self, path: str) -> bool:
        found: bool = self._retry("exists", path, lambda: self._fs().exists(_key(path)))
        return found

    def size(self, path: str) -> int:
        return int(self._retry("size", path, lambda: self._fs().size(_key(path))))

    # --- mutation ----------------------------------------------------------------------------

    def delete(self, path: str, *, recursive: bool) -> None:
        key = _key(path)
        if recursive:
            # Not s3fs rm(recursive=True): at a bucket's root that would also delete the bucket.
            keys = [f"{key}/{k}" for k in self.walk_files(path)]
            if keys:
                self._retry("delete", path, lambda: self._fs().rm(keys))
        if "/" in key:  # an object of that name; a bare bucket is never deleted
            self._retry("delete", path, lambda: self._fs().rm_file(key))

    def makedirs(self, path: str) -> None:
        pass  # S3 has no directories: a prefix exists once a key below it does

    def rename_dir(self, src: str, dst: str) -> None:
        raise NotImplementedError("S3 has no atomic rename (it is copy + delete)")

    def fsync_tree(self, path: str) -> None:
        pass  # nothing to flush: every completed PUT is already durable

    def abort_multipart_uploads(self, path: str, older_than_s: float) -> int:
        """Abort unfinished multipart uploads below `path` started over `older_than_s` ago.

        A rank killed mid-upload leaves its parts billed and invisible; only an abort frees them.
        """
        bucket, _, key = _key(path).partition("/")
        prefix = f"{key}/" if key else ""
        uploads = self._retry("list uploads", path, lambda: self._uploads(bucket, prefix))
        cutoff = time.time() - older_than_s
        stale = [u for u in uploads if u["Initiated"].timestamp() <= cutoff]
        for u in stale:
            abort = functools.partial(self._abort_upload, bucket, u["Key"], u["UploadId"])
            self._retry("abort upload", path, abort)
        return len(stale)

    def _uploads(self, bucket: str, prefix: str) -> builtins.list[dict[str, Any]]:
        uploads: builtins.list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        while True:
            page = self._fs().call_s3("list_multipart_uploads", **kwargs)
            uploads += page.get("Uploads", [])
            if not page.get("IsTruncated"):
                return uploads
            kwargs["KeyMarker"] = page["NextKeyMarker"]
            kwargs["UploadIdMarker"] = page["NextUploadIdMarker"]

    def _abort_upload(self, bucket: str, key: str, upload_id: str) -> None:
        self._fs().call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
