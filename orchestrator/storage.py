"""One small store over local paths and `s3://bucket/prefix` URLs; the only fsspec/s3fs importer.

Retries: whole small-object operations (read_bytes, write_bytes, list, ...) are retried HERE on
transient errors, and botocore/s3fs retries are switched off for them so that `max_attempts`
means what it says. Streams (`open_read`/`open_write`) and the filesystem handed to torch DCP
cannot be replayed from outside, so they use botocore's own "standard" retry mode with the same
attempt budget, per HTTP request.

Credentials are never held here: botocore reads them (env, profile, instance role) in each
process, so a pickled Store carries none and `repr`/logs cannot show them.
"""

from __future__ import annotations

import builtins
import errno
import functools
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

from orchestrator.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
# fmt: off
# 409 ConditionalRequestConflict / OperationAborted: AWS's answer to a conditional write racing
# another one is "please try again"; the retry then gets a definite 412.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestThrottled",
    "RequestTimeout", "TooManyRequestsException", "InternalError", "ServiceUnavailable",
    "ConditionalRequestConflict", "OperationAborted",
})
# Matched by class name over the MRO so this stays a pure function (no botocore/aiohttp import).
# HTTPClientError is botocore's base of ConnectionClosedError, ReadTimeoutError, ...;
# ResponseParserError: throttling answers can come with broken XML (s3fs issue 484).
_TRANSIENT_CLASSES = frozenset({
    "HTTPClientError", "ConnectionError", "EndpointConnectionError", "ConnectTimeoutError",
    "ReadTimeoutError", "ResponseStreamingError", "IncompleteReadError", "ResponseParserError",
    "ClientPayloadError", "ServerDisconnectedError", "FSTimeoutError",
})
# fmt: on
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
_SIGNED_PARAM = re.compile(r"(?i)(x-amz-(?:signature|credential|security-token)=)[^&\s\"']+")


@dataclass(frozen=True)
class S3Options:
    """S3 settings from config `storage.s3.*`; unset fields fall back to the AWS_* environment."""

    endpoint_url: str | None = None  # else AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL
    region: str | None = None  # else AWS_REGION, then AWS_DEFAULT_REGION
    profile: str | None = None  # else AWS_PROFILE (read by botocore itself)
    max_attempts: int = 5  # total tries of one operation on transient errors
    backoff_s: float = 0.2  # first backoff; doubles per attempt, with jitter
    max_backoff_s: float = 10.0  # cap of one backoff

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"storage.s3.max_attempts must be >= 1, got {self.max_attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("storage.s3.backoff_s and max_backoff_s must be >= 0")


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def _response_of(exc: BaseException) -> tuple[int | None, str | None] | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status, response.get("Error", {}).get("Code")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def is_transient(exc: BaseException) -> bool:
    """True if retrying the same request may succeed (5xx, throttling, dropped connections).

    s3fs turns botocore's ClientError into OSError subclasses with the original as `__cause__`,
    so the cause chain is walked; the first definite answer wins.
    """
    for err in _chain(exc):
        answer = _response_of(err)
        if answer is not None:  # the server answered: its status decides
            status, code = answer
            return status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
        if isinstance(err, _PERMANENT):
            return False
        if isinstance(err, ConnectionError | TimeoutError):
            return True
        if any(cls.__name__ in _TRANSIENT_CLASSES for cls in type(err).__mro__):
            return True
    return False


def backoff_delay(attempt: int, base_s: float, cap_s: float, rand: float | None = None) -> float:
    """Seconds to wait after failed try `attempt` (1-based): capped exponential, equal jitter."""
    ceiling = min(cap_s, base_s * 2 ** (attempt - 1))
    r = random.random() if rand is None else rand
    return ceiling * (0.5 + 0.5 * r)  # jitter spreads racing ranks apart


def redact(text: str) -> str:
    """Remove credential values (from env) and signed URL parameters from a message."""
    for name in _SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 6:
            text = text.replace(value, "***")
    return _SIGNED_PARAM.sub(r"\1***", text)


def _clean_rel(rel: str) -> str:
    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
    if rel.startswith("/") or ".." in parts:
        raise ValueError(f"storage path must be relative and stay inside the store: {rel!r}")
    return "/".join(parts)


def _quiet_s3fs_retries() -> None:
    """Turn off s3fs's own retry loop, process-wide: it is a class attribute, not an option.

    Left on, it multiplies with botocore's and ours (5 x 5 tries of a dead endpoint). This module
    is the only s3fs user, and this also covers filesystems DCP builds from storage_options().
    """
    import s3fs

    s3fs.S3FileSystem.retries = 1


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _AtomicWriter:
    """File object that appears at `dst` only on a clean close; `discard()` leaves nothing."""

    f: Any
    commit: Callable[[], None]
    drop: Callable[[], None]
    _done: bool = field(default=False)

    def __getattr__(self, name: str) -> Any:  # write, tell, seek, flush ... of the real file
        return getattr(self.f, name)

    def __enter__(self) -> _AtomicWriter:
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


class Store:
    """A directory-like root (local path or s3://bucket/prefix) with small, safe operations."""

    def __init__(self, url: str, s3: S3Options | None = None) -> None:
        url = url.removeprefix("file://")
        self.is_s3 = is_s3_url(url)
        if self.is_s3:
            if "@" in url.split("/")[2]:
                raise ValueError("put S3 credentials in the environment, not in the URL")
            self.url = url.rstrip("/")
        else:
            self.url = os.path.abspath(url)  # a pickled Store may run in another cwd
        self.s3 = s3 or S3Options()
        self._fs_cache: dict[bool, Any] = {}

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # --- capabilities: what callers may rely on, instead of asking which backend this is -----

    @property
    def renames_dirs(self) -> bool:
        """True where `rename_dir` is atomic (local disk); S3 has no rename (copy + delete)."""
        return not self.is_s3

    @property
    def fsyncs(self) -> bool:
        """True where fsync makes writes durable (local disk); S3 writes are durable on return."""
        return not self.is_s3

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "is_s3": self.is_s3, "s3": self.s3}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fs_cache = {}

    # --- paths and filesystems ---------------------------------------------------------------

    def child(self, *parts: str) -> Store:
        return Store(self.path("/".join(parts)), self.s3)

    def path(self, rel: str = "") -> str:
        rel = _clean_rel(rel)
        return f"{self.url}/{rel}" if rel else self.url

    def _p(self, rel: str) -> str:
        """Path as the filesystem wants it (no s3:// prefix: s3fs returns `bucket/key`)."""
        return self.path(rel).removeprefix("s3://")

    def storage_options(self) -> dict[str, Any]:
        """fsspec kwargs for this store (no secrets), with botocore retries per request."""
        if not self.is_s3:
            return {}
        _quiet_s3fs_retries()
        return self._s3_kwargs(self.s3.max_attempts)

    def _s3_kwargs(self, attempts: int) -> dict[str, Any]:
        env = os.environ.get
        endpoint = self.s3.endpoint_url or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL")
        region = self.s3.region or env("AWS_REGION") or env("AWS_DEFAULT_REGION")
        kwargs: dict[str, Any] = {
            "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": attempts}},
            "use_listings_cache": False,  # other ranks write too: never trust a cached listing
        }
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        if region:
            kwargs["client_kwargs"] = {"region_name": region}
        if self.s3.profile:
            kwargs["profile"] = self.s3.profile
        return kwargs

    def fsspec_filesystem(self) -> Any:
        """The fsspec filesystem for torch DCP's FsspecWriter/Reader and streams."""
        return self._fs(streaming=True)

    def _fs(self, streaming: bool = False) -> Any:
        if streaming not in self._fs_cache:
            import fsspec

            if self.is_s3:
                _quiet_s3fs_retries()
                attempts = self.s3.max_attempts if streaming else 1
                self._fs_cache[streaming] = fsspec.filesystem("s3", **self._s3_kwargs(attempts))
            else:
                self._fs_cache[streaming] = fsspec.filesystem("file")
        return self._fs_cache[streaming]

    def _retry(self, op: str, rel: str, fn: Callable[[], T]) -> T:
        attempts = self.s3.max_attempts if self.is_s3 else 1  # local errors are not transient
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                why = redact(f"{type(exc).__name__}: {exc}").replace("\n", " ")[:300]
                if attempt == attempts:
                    msg = f"{op} {self.path(rel)} failed after {attempts} attempts: {why}"
                    raise StorageError(msg) from exc
                delay = backoff_delay(attempt, self.s3.backoff_s, self.s3.max_backoff_s)
                log.warning(
                    "storage: %s %s failed (attempt %d/%d, retry in %.2fs): %s",
                    *(op, self.path(rel), attempt, attempts, delay, why),
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    # --- small objects -----------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes:
        if not self.is_s3:
            with open(self._p(rel), "rb") as f:
                return f.read()
        data: bytes = self._retry("read", rel, lambda: self._fs().cat_file(self._p(rel)))
        return data

    def write_bytes(self, rel: str, data: bytes, *, create_only: bool = False) -> None:
        """Atomic write: readers see the old object or the new one, never a part."""
        if self.is_s3:
            self._retry("write", rel, lambda: self._put(rel, data, create_only))
        else:
            self._write_local(self._p(rel), data, create_only)

    def append_bytes(self, rel: str, data: bytes) -> None:
        """Append to a small log object (one writer only). Local disk appends and flushes;
        S3 has no append, so the object is read and rewritten whole (fine for metrics logs)."""
        if not self.is_s3:
            os.makedirs(os.path.dirname(self._p(rel)), exist_ok=True)
            with open(self._p(rel), "ab") as f:
                f.write(data)
            return
        try:
            old = self.read_bytes(rel)
        except FileNotFoundError:
            old = b""
        self.write_bytes(rel, old + data)

    def _put(self, rel: str, data: bytes, create_only: bool) -> None:
        mode = "create" if create_only else "overwrite"  # "create" sends If-None-Match: *
        try:
            self._fs().pipe_file(self._p(rel), data, mode=mode)
        except OSError as exc:  # s3fs maps 412 only when the server names the condition
            if create_only and any(_response_of(e) == (412, "PreconditionFailed") for e in _chain(exc)):  # fmt: skip
                raise FileExistsError(errno.EEXIST, "object exists", self.path(rel)) from exc
            raise

    def _write_local(self, dst: str, data: bytes, create_only: bool) -> None:
        parent = os.path.dirname(dst)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # link() never replaces an existing name: exactly one racing creator wins.
            if create_only:
                os.link(tmp, dst)
            else:
                os.replace(tmp, dst)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        _fsync_path(parent)

    # --- streams -----------------------------------------------------------------------------

    def open_read(self, rel: str) -> IO[bytes]:
        if not self.is_s3:
            return open(self._p(rel), "rb")
        f: IO[bytes] = self._fs(streaming=True).open(self._p(rel), "rb")
        return f

    def open_write(self, rel: str) -> _AtomicWriter:
        """Streaming write that lands only on a clean `close()`/`with` exit (discarded on error)."""
        if self.is_s3:  # an S3 upload only becomes visible when it completes, at close
            f = self._fs(streaming=True).open(self._p(rel), "wb")

            def abort() -> None:
                f.discard()  # aborts the multipart upload, if one was started
                f.closed = True  # else fsspec's __del__ would try to upload the dropped buffer

            return _AtomicWriter(f, f.close, abort)
        dst = self._p(rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.tmp-{uuid.uuid4().hex}")
        f = open(tmp, "xb")  # noqa: SIM115 -- the returned writer owns and closes it

        def commit() -> None:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, dst)
            _fsync_path(os.path.dirname(dst))

        def drop() -> None:
            f.close()
            os.unlink(tmp)

        return _AtomicWriter(f, commit, drop)

    # --- listing and metadata ----------------------------------------------------------------

    def list(self, rel: str = "") -> list[str]:
        """Names of the immediate children (files and directories/prefixes); [] if missing."""
        p = self._p(rel)
        if not self.is_s3:
            try:
                return sorted(os.listdir(p))
            except (FileNotFoundError, NotADirectoryError):
                return []
        try:
            found = self._retry("list", rel, lambda: self._fs().ls(p, detail=False))
        except FileNotFoundError:
            return []
        names = {x.rstrip("/").rsplit("/", 1)[-1] for x in found if x.rstrip("/") != p}
        return sorted(names)

    def walk_files(self, rel: str = "") -> dict[str, int]:
        """Every file below rel, as a posix path relative to rel -> size in bytes."""
        p = self._p(rel)
        if not self.is_s3:
            out: dict[str, int] = {}
            for root, _, files in os.walk(p):
                for name in files:
                    full = os.path.join(root, name)
                    out[os.path.relpath(full, p).replace(os.sep, "/")] = os.path.getsize(full)
            return out
        found = self._retry("walk", rel, lambda: self._fs().find(p, detail=True))
        prefix = p + "/"
        return {
            name[len(prefix) :]: int(info["size"])
            for name, info in found.items()
            if name.startswith(prefix) and info.get("type") == "file"
        }

    def exists(self, rel: str) -> bool:
        if not self.is_s3:
            return os.path.exists(self._p(rel))
        found: bool = self._retry("exists", rel, lambda: self._fs().exists(self._p(rel)))
        return found

    def size(self, rel: str) -> int:
        if not self.is_s3:
            return os.path.getsize(self._p(rel))
        return int(self._retry("size", rel, lambda: self._fs().size(self._p(rel))))

    # --- mutation ----------------------------------------------------------------------------

    def delete(self, rel: str, *, recursive: bool = False) -> None:
        """Remove a file (or, recursive, everything below rel). Missing is fine."""
        p = self._p(rel)
        if not self.is_s3:
            if recursive and os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                os.unlink(p)
            return
        if recursive:
            # Not s3fs rm(recursive=True): at the store root that would also delete the bucket.
            keys = [f"{p}/{k}" for k in self.walk_files(rel)]
            if keys:
                self._retry("delete", rel, lambda: self._fs().rm(keys))
        if rel:
            self._retry("delete", rel, lambda: self._fs().rm_file(p))

    def makedirs(self, rel: str) -> None:
        if not self.is_s3:  # S3 has no directories: prefixes exist once a key does
            os.makedirs(self._p(rel), exist_ok=True)

    def rename_dir(self, src_rel: str, dst_rel: str) -> None:
        """Atomically move a directory into place (local only) and make the move durable."""
        if self.is_s3:
            raise NotImplementedError("S3 has no atomic rename (it is copy + delete)")
        src, dst = self._p(src_rel), self._p(dst_rel)
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "rename target exists", dst)
        os.rename(src, dst)
        for parent in {os.path.dirname(src), os.path.dirname(dst)}:
            _fsync_path(parent)

    def fsync_tree(self, rel: str = "") -> None:
        """fsync every file and directory below rel, children before parents (local only)."""
        if self.is_s3:
            return
        for root, dirs, files in os.walk(self._p(rel), topdown=False):
            for name in files + dirs:
                _fsync_path(os.path.join(root, name))
            _fsync_path(root)

    def abort_multipart_uploads(self, rel: str = "", older_than_s: float = 0) -> int:
        """Abort unfinished multipart uploads below rel started over `older_than_s` ago."""
        if not self.is_s3:
            return 0
        bucket, _, key = self._p(rel).partition("/")
        prefix = f"{key}/" if key else ""
        uploads = self._retry("list uploads", rel, lambda: self._uploads(bucket, prefix))
        cutoff = time.time() - older_than_s
        stale = [u for u in uploads if u["Initiated"].timestamp() <= cutoff]
        for u in stale:
            abort = functools.partial(self._abort_upload, bucket, u["Key"], u["UploadId"])
            self._retry("abort upload", rel, abort)
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
