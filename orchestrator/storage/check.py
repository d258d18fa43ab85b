"""The start-up storage check: can this run write, read and delete under its run.dir?

Run once by the leader before any training (runner), so a bad set-up (no credentials, a 403, an
unknown bucket, an unreachable endpoint, a read-only directory) ends in one line that names the
fix, instead of a traceback from every rank at the first checkpoint. The probe is a tiny object
written, read back and deleted, through the same Store calls a checkpoint uses.
"""

from __future__ import annotations

import errno
import uuid
from typing import Protocol

from orchestrator.errors import ConfigError, StorageError
from orchestrator.storage.retry import cause_chain, redact, server_answer


class _Root(Protocol):
    """What the probe needs of a Store (not imported: Store.check_writable imports this)."""

    url: str

    def path(self, rel: str = "") -> str: ...
    def read_bytes(self, rel: str) -> bytes: ...
    def write_bytes(self, rel: str, data: bytes, *, create_only: bool = False) -> None: ...
    def delete(self, rel: str, *, recursive: bool = False) -> None: ...


PROBE_PREFIX = ".stockpot-write-check-"
_CREDENTIALS = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / storage.s3.profile)"
)


class StorageSetupError(ConfigError):
    """run.dir cannot be used as configured (exit 2: a set-up problem, not a crash)."""

    leader_only = True  # every rank raises it alike; the leader's line is enough (worker.py)


def check_writable(store: _Root) -> None:
    """Write, read back and delete a probe under `store`; StorageSetupError naming the fix."""
    probe = f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
    data = b"stockpot write check\n"
    try:
        store.write_bytes(probe, data)
        if store.read_bytes(probe) != data:
            raise StorageError(f"{store.path(probe)} read back different bytes than written")
        store.delete(probe)
    except Exception as exc:
        raise StorageSetupError(explain(store.url, exc)) from exc


def explain(url: str, exc: BaseException) -> str:
    """One line: what is wrong with `url` and how to fix it."""
    where = f"run.dir {url}"
    for err in cause_chain(exc):
        names = {cls.__name__ for cls in type(err).__mro__}
        answer = server_answer(err) or (None, None)
        if names & {"NoCredentialsError", "PartialCredentialsError"}:
            return f"{where}: no S3 credentials found: {_CREDENTIALS}"
        if answer[1] in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"{where}: the S3 credentials were refused ({answer[1]}): {_CREDENTIALS}"
        if answer[0] == 403 or answer[1] == "AccessDenied":
            return (
                f"{where}: access denied (403): give these credentials s3:GetObject, "
                "s3:PutObject, s3:DeleteObject and s3:ListBucket on it, or use other credentials"
            )
        if answer[1] == "NoSuchBucket" or "NoSuchBucket" in str(err):
            bucket = url.removeprefix("s3://").split("/", 1)[0]
            return f"{where}: bucket {bucket!r} does not exist: create it or fix run.dir"
        if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return (
                f"{where} is not writable ({err.strerror}): choose a writable run.dir "
                "or fix its permissions/mount"
            )
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return f"{where}: no space left on device: free space or choose another run.dir"
    if url.startswith("s3://") and isinstance(exc, StorageError):
        cause = type(exc.__cause__).__name__ if exc.__cause__ else "no answer"
        return (
            f"{where}: S3 endpoint unreachable ({cause}, every attempt): check "
            "storage.s3.endpoint_url / AWS_ENDPOINT_URL and the network"
        )
    return f"{where}: cannot write there ({redact(str(exc))[:200] or type(exc).__name__})"
