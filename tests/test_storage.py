"""Storage settings, the backend registry and the pure retry helpers: what needs no backend.

The contract every backend keeps is tests/test_storage_contract.py; what only one backend
promises is tests/test_storage_local.py and tests/test_storage_s3.py.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.errors import ConfigError
from orchestrator.storage import (
    S3Options,
    StorageOptions,
    Store,
    backoff_delay,
    is_transient,
    redact,
    registry,
)

SECRET = "sEcReT-9f3b1c77-do-not-log"
NO_BACKEND = r"no storage backend for 'gs://'; supported: local paths, file://, s3://$"


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"storage\.s3\.max_attempts must be >= 1 \(got 0\)"):
        S3Options(max_attempts=0)
    with pytest.raises(ConfigError, match=r"storage\.s3\.backoff_s must be >= 0"):
        S3Options(backoff_s=-1)


def test_config_storage_section_is_storage_options() -> None:
    # One type for `storage:` and the backends: the config cannot accept what a backend refuses.
    from orchestrator.config import Config, from_dict

    assert isinstance(Config().storage, StorageOptions)
    cfg = from_dict({"storage": {"s3": {"endpoint_url": "http://h:1", "max_backoff_s": 2}}})
    assert cfg.storage == StorageOptions(s3=S3Options(endpoint_url="http://h:1", max_backoff_s=2))
    with pytest.raises(ConfigError, match=r"storage\.s3\.max_attempts must be >= 1"):
        from_dict({"storage": {"s3": {"max_attempts": 0}}})


def test_registry_picks_the_backend_by_scheme() -> None:
    assert registry.schemes() == ["", "s3"]
    assert [registry.scheme(u) for u in ("/a", "a/b", "file:///a", "s3://b/k")] == [
        "",
        "",
        "",
        "s3",
    ]
    assert Store("file:///tmp/x").local_paths and not Store("s3://b/p").local_paths


def test_an_unknown_scheme_is_one_line_naming_those_there_are() -> None:
    from orchestrator.config import load

    with pytest.raises(ConfigError, match="^gs://b/x: " + NO_BACKEND):
        Store("gs://b/x")
    with pytest.raises(ConfigError, match="^run.dir gs://b/x: " + NO_BACKEND):
        load(None, ["run.dir=gs://b/x"])  # on load: before any job is submitted
    with pytest.raises(ConfigError, match="^model.init_from gs://b/x: " + NO_BACKEND):
        load(None, ["model.init_from=gs://b/x"])
    with pytest.raises(ConfigError, match="^soup.out gs://b/x: " + NO_BACKEND):
        load(None, ["soup.out=gs://b/x"])


def test_import_is_lazy() -> None:
    # The CLI imports this package; fsspec/s3fs/botocore load only when a store first needs them.
    code = (
        "import sys, orchestrator.storage as s; s.Store('s3://b/p'); s.Store('/tmp').path('x');"
        "print(sorted(m for m in ('fsspec', 's3fs', 'botocore', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_redact_masks_env_credentials_and_signed_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    text = redact(f"bad {SECRET} at https://h/k?X-Amz-Signature=abc123&X-Amz-Credential=AK%2F1")
    assert SECRET not in text and "abc123" not in text and "AK%2F1" not in text


def _client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    response: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "PutObject")


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [
        (500, "InternalError", True),
        (502, "502", True),
        (503, "SlowDown", True),
        (504, "504", True),
        (429, "429", True),
        (400, "Throttling", True),
        (400, "RequestLimitExceeded", True),
        (409, "ConditionalRequestConflict", True),
        (403, "AccessDenied", False),
        (404, "NoSuchKey", False),
        (412, "PreconditionFailed", False),
        (400, "InvalidArgument", False),
    ],
)
def test_is_transient_http(status: int, code: str, transient: bool) -> None:
    from s3fs.errors import translate_boto_error

    error = _client_error(status, code)
    assert is_transient(error) is transient
    assert is_transient(translate_boto_error(error)) is transient  # as s3fs raises it


def test_is_transient_connection_errors() -> None:
    from botocore import exceptions as bc

    url = "http://127.0.0.1:1/b/k"
    transient = [
        bc.EndpointConnectionError(endpoint_url=url),
        bc.ReadTimeoutError(endpoint_url=url),
        bc.ConnectTimeoutError(endpoint_url=url),
        bc.ConnectionClosedError(endpoint_url=url),
        ConnectionResetError(104, "reset"),
        TimeoutError(),
    ]
    permanent = [
        bc.NoCredentialsError(),
        ValueError("x"),
        FileNotFoundError("k"),
        PermissionError("k"),
        FileExistsError("k"),
    ]
    assert all(is_transient(e) for e in transient)
    assert not any(is_transient(e) for e in permanent)


@given(
    attempt=st.integers(1, 30),
    base=st.floats(0, 5),
    cap=st.floats(0, 60),
    rand=st.floats(0, 1),
)
def test_backoff_is_capped_with_jitter(attempt: int, base: float, cap: float, rand: float) -> None:
    ceiling = min(cap, base * 2 ** (attempt - 1))
    assert ceiling / 2 <= backoff_delay(attempt, base, cap, rand) <= ceiling
