"""What only the S3 backend promises, beyond the contract (test_storage_contract.py): retries
over real HTTP, no credentials anywhere, multipart clean-up, settings over the environment.

The server is `moto_server` in its own process (devtools/s3server.py); faults are injected by
an HTTP proxy in front of it, so retries are exercised through s3fs/botocore over real HTTP.
"""

from __future__ import annotations

import logging
import pickle

import pytest

from devtools.s3server import REGION, FaultProxy, S3Server
from orchestrator.errors import StorageError
from orchestrator.storage import S3Options, StorageOptions, Store
from tests.fixtures.s3 import FAST, s3_storage

SECRET = "sEcReT-9f3b1c77-do-not-log"
ACCESS_KEY = "AKIADISTINCTIVE0042"


@pytest.fixture
def faulty(s3_faults: FaultProxy, s3_bucket: str) -> tuple[Store, FaultProxy, str]:
    """A Store that talks to moto through the fault proxy; returns (store, proxy, key prefix)."""
    store = Store(f"{s3_bucket}/root", s3_storage(s3_faults.endpoint_url, **FAST))
    return store, s3_faults, "/" + s3_bucket.removeprefix("s3://") + "/root/"


@pytest.mark.s3
def test_s3_has_no_rename_fsync_or_local_paths(s3_server: S3Server, s3_bucket: str) -> None:
    store = Store(s3_bucket, s3_storage(s3_server.endpoint_url))
    assert not (store.renames_dirs or store.fsyncs or store.local_paths)
    assert store.local_path("tb") is None
    store.write_bytes("tmp/x", b"x")
    with pytest.raises(NotImplementedError, match="atomic rename"):
        store.rename_dir("tmp", "step-1")
    assert store.read_bytes("tmp/x") == b"x"


def test_transient_503_is_retried(
    faulty: tuple[Store, FaultProxy, str], caplog: pytest.LogCaptureFixture
) -> None:
    store, proxy, prefix = faulty
    proxy.fail(prefix + "w", status=503, times=2)
    proxy.fail(prefix + "r", status=500, times=2)
    with caplog.at_level(logging.WARNING, logger="orchestrator.storage"):
        store.write_bytes("w", b"data")
        store.write_bytes("r", b"data")  # eats the two 500s, then succeeds
        assert store.read_bytes("w") == b"data"
    assert proxy.seen(prefix + "w", "PUT") == 3
    retries = [r.getMessage() for r in caplog.records if r.name == "orchestrator.storage"]
    assert len(retries) == 4
    assert "write" in retries[0] and "attempt 1/5" in retries[0] and store.path("w") in retries[0]


def test_connection_reset_is_retried(faulty: tuple[Store, FaultProxy, str]) -> None:
    store, proxy, prefix = faulty
    # aiohttp itself re-sends once over a fresh connection when a kept-alive one drops,
    # so reset more often than that to make our layer do the work.
    proxy.reset(prefix + "k", times=3)
    store.write_bytes("k", b"survived")
    assert store.read_bytes("k") == b"survived"
    assert proxy.seen(prefix + "k", "PUT") == 4


def test_403_is_not_retried(faulty: tuple[Store, FaultProxy, str]) -> None:
    store, proxy, prefix = faulty
    proxy.fail(prefix + "secret", status=403, times=None)
    with pytest.raises(PermissionError):
        store.read_bytes("secret")
    assert proxy.seen(prefix + "secret") == 1


def test_exhausted_retries_raise_storage_error_without_credentials(
    faulty: tuple[Store, FaultProxy, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto does not check signatures
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    store, proxy, prefix = faulty
    proxy.fail(prefix + "down", status=503, times=None)
    with caplog.at_level(logging.DEBUG, logger="orchestrator"), pytest.raises(StorageError) as ei:
        store.write_bytes("down", b"x")
    message = str(ei.value)
    assert "write" in message and store.path("down") in message and "\n" not in message
    assert proxy.seen(prefix + "down") == store.options.s3.max_attempts
    fs_settings = store.fsspec_filesystem().storage_options
    shown = [message, repr(store), caplog.text, repr(fs_settings), repr(ei.value)]
    shown.append(pickle.dumps(store).decode("latin-1"))
    for text in shown:
        assert SECRET not in text and ACCESS_KEY not in text


def test_streams_retry_per_request_in_botocore(faulty: tuple[Store, FaultProxy, str]) -> None:
    # A half-read stream cannot be replayed from above, so streams use botocore's own retries.
    store, proxy, prefix = faulty
    store.write_bytes("stream", b"payload")
    proxy.fail(prefix + "stream", status=503, times=2)
    with store.open_read("stream") as f:
        assert f.read() == b"payload"
    assert proxy.seen(prefix + "stream") == 5  # 1 PUT, then 2 failures + HEAD + GET


def test_shard_filesystem_retries_per_request_too(faulty: tuple[Store, FaultProxy, str]) -> None:
    # DCP writes the shard files through this filesystem (format/dcp_write.py): the store's own,
    # so storage.s3.max_attempts reaches the shard bytes as well.
    store, proxy, prefix = faulty
    proxy.fail(prefix + "ckpt/__0_0.distcp", status=503, times=2)
    with store.fsspec_filesystem().open(store.path("ckpt/__0_0.distcp"), "wb") as f:
        f.write(b"shard")
    assert store.read_bytes("ckpt/__0_0.distcp") == b"shard"
    assert proxy.seen(prefix + "ckpt/__0_0.distcp", "PUT") == 3


@pytest.mark.s3
def test_abort_multipart_uploads(s3_server: S3Server, s3_bucket: str) -> None:
    import boto3

    store = Store(f"{s3_bucket}/run", s3_storage(s3_server.endpoint_url))
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name=REGION)
    bucket = s3_bucket.removeprefix("s3://")
    for key in ("run/ckpt/shard-0", "run/ckpt/shard-1", "other/x"):
        client.create_multipart_upload(Bucket=bucket, Key=key)
    # moto reports every upload as initiated on 2010-11-10: "younger than 20 years" keeps them.
    twenty_years = 20 * 365 * 86400
    assert store.abort_multipart_uploads("ckpt", older_than_s=twenty_years) == 0
    assert store.abort_multipart_uploads() == 2
    left = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in left] == ["other/x"]


def test_explicit_options_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)

    def settings(store: Store) -> dict:
        return dict(store.fsspec_filesystem().storage_options)

    env_only = settings(Store("s3://b/p"))
    assert env_only["endpoint_url"] == "http://generic:1"
    assert env_only["client_kwargs"] == {"region_name": "eu-west-1"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    assert settings(Store("s3://b/p"))["endpoint_url"] == "http://s3-specific:2"
    opts = S3Options(endpoint_url="http://config:3", region="ap-south-1", profile="team")
    explicit = settings(Store("s3://b/p", StorageOptions(s3=opts)))
    assert explicit["endpoint_url"] == "http://config:3" and explicit["profile"] == "team"
    assert explicit["client_kwargs"] == {"region_name": "ap-south-1"}


def test_s3_urls_are_checked() -> None:
    with pytest.raises(ValueError, match="environment"):
        Store("s3://KEY:SECRET@bucket/prefix")
    assert repr(Store("s3://b/p/")) == "Store('s3://b/p')"


def test_streams_upload_parts_in_parallel_and_land_whole(
    s3_faults: FaultProxy, s3_bucket: str
) -> None:
    # 5 MiB parts (S3's minimum), 3 at once: parts go up while later bytes are written, and the
    # object appears only at close, byte for byte; a discarded stream leaves no upload behind.
    store = Store(f"{s3_bucket}/root", s3_storage(s3_faults.endpoint_url, upload_part_mb=5,
                                                  upload_concurrency=3))  # fmt: skip
    prefix = "/" + s3_bucket.removeprefix("s3://") + "/root/"
    data = bytes(range(256)) * (42 << 10)  # 10.5 MiB: parts of 5, 5 and 0.5
    with store.open_write("big") as f:
        f.write(data[:1000])
        f.write(memoryview(data)[1000 : 10 << 20])  # one write across two parts
        assert f.tell() == 10 << 20
        assert not store.exists("big")  # two parts are up (or going), nothing shows yet
        f.write(data[10 << 20 :])
    assert store.read_bytes("big") == data
    parts = [p for m, p in s3_faults.requests if m == "PUT" and p.startswith(prefix + "big?")]
    assert len(parts) == 3 and all("partNumber=" in p for p in parts)
    f = store.open_write("dropped")
    f.write(data)
    f.discard()
    assert not store.exists("dropped") and store.abort_multipart_uploads() == 0
    s3_faults.fail("partNumber=2", status=403, times=None)  # a part fails in the background
    with pytest.raises(PermissionError), store.open_write("failed") as f:
        f.write(data)
    assert not store.exists("failed") and store.abort_multipart_uploads() == 0


def test_rate_capped_proxy_forwards_bytes_exactly(s3_server: S3Server, s3_bucket: str) -> None:
    # The bench's slow remote S3 (FaultProxy(rate_mb_s=...)); its speed is the bench's to show.
    proxy = FaultProxy(upstream=s3_server.endpoint_url, rate_mb_s=500).start()
    try:
        store = Store(f"{s3_bucket}/capped", s3_storage(proxy.endpoint_url, **FAST))
        data = bytes(range(251)) * 12_000  # 3 MB, not a multiple of the proxy's slices
        proxy.fail("/capped/blob", status=503, times=1)  # its body is drained, then answered
        store.write_bytes("blob", data)
        assert store.read_bytes("blob") == data
        assert proxy.seen("/capped/blob", "PUT") == 2
    finally:
        proxy.stop()
