"""Retry policy for whole small-object operations: which errors are worth a retry, how long to
wait, what may be logged, and the loop that ties them together.

Only operations that can be replayed from scratch (one GET, one PUT, one LIST) go through
`with_retries`; botocore/s3fs retries are switched off for them (see `s3.py`) so that
`max_attempts` means what it says instead of multiplying with two hidden retry layers.

Everything here is pure (no botocore/aiohttp import): exceptions are matched by class name over
the MRO, so the CLI can import this package without loading the S3 stack.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from orchestrator.errors import StorageError

# One logger for the whole package, so `orchestrator.storage` is the one name to filter on.
log = logging.getLogger("orchestrator.storage")
T = TypeVar("T")


class RetryPolicy(Protocol):
    """What the loop reads of a backend's settings (S3Options has these; so may the next's)."""

    @property
    def max_attempts(self) -> int: ...
    @property
    def backoff_s(self) -> float: ...
    @property
    def max_backoff_s(self) -> float: ...


_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
# fmt: off
# 409 ConditionalRequestConflict / OperationAborted: AWS's answer to a conditional write racing
# another one is "please try again"; the retry then gets a definite 412.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestThrottled",
    "RequestTimeout", "TooManyRequestsException", "InternalError", "ServiceUnavailable",
    "ConditionalRequestConflict", "OperationAborted",
})
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


def server_answer(exc: BaseException) -> tuple[int | None, str | None] | None:
    """(HTTP status, error code) if `exc` carries a botocore-style server response, else None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status, response.get("Error", {}).get("Code")


def cause_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then its causes: s3fs wraps botocore's ClientError in OSError subclasses."""
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
    for err in cause_chain(exc):
        answer = server_answer(err)
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


def with_retries(op: str, where: str, fn: Callable[[], T], policy: RetryPolicy) -> T:
    """Run `fn`, retrying transient errors up to `policy.max_attempts` tries in all.

    Permanent errors (404, 403, 412, ...) pass through unchanged, as the standard exceptions
    s3fs maps them to; running out of attempts raises a one-line, redacted StorageError.
    """
    attempts = policy.max_attempts
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            why = redact(f"{type(exc).__name__}: {exc}").replace("\n", " ")[:300]
            if attempt == attempts:
                raise StorageError(f"{op} {where} failed after {attempts} attempts: {why}") from exc
            delay = backoff_delay(attempt, policy.backoff_s, policy.max_backoff_s)
            log.warning(
                "storage: %s %s failed (attempt %d/%d, retry in %.2fs): %s",
                *(op, where, attempt, attempts, delay, why),
            )
            time.sleep(delay)
    raise AssertionError("unreachable")
