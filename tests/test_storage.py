"""One contract suite for `orchestrator.storage.Store`, run on local disk and on a real S3 server.

The S3 backend is `moto_server` in its own process (devtools/s3server.py); faults are injected by
an HTTP proxy in front of it, so retries are exercised through s3fs/botocore over real HTTP.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devtools.s3server import REGION, FaultProxy, S3Server
from orchestrator.errors import ConfigError, StorageError
from orchestrator.storage import (
    S3Options,
    Store,
    backoff_delay,
    is_s3_url,
    is_transient,
    local,
    redact,
    start_writeback,
)

SECRET = "sEcReT-9f3b1c77-do-not-log"
ACCESS_KEY = "AKIADISTINCTIVE0042"
FAST: dict[str, Any] = {"backoff_s": 0.01, "max_backoff_s": 0.05}  # keep retry tests quick
N_RACERS = 8


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "root"))
    server: S3Server = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    return Store(f"{bucket}/root", S3Options(endpoint_url=server.endpoint_url, **FAST))


@pytest.fixture
def faulty(s3_faults: FaultProxy, s3_bucket: str) -> tuple[Store, FaultProxy, str]:
    """A Store that talks to moto through the fault proxy; returns (store, proxy, key prefix)."""
    store = Store(f"{s3_bucket}/root", S3Options(endpoint_url=s3_faults.endpoint_url, **FAST))
    return store, s3_faults, "/" + s3_bucket.removeprefix("s3://") + "/root/"


# --- contract: every backend ---------------------------------------------------------------


def test_round_trip_and_overwrite(store: Store) -> None:
    store.write_bytes("a/b.bin", b"one")
    assert store.read_bytes("a/b.bin") == b"one"
    store.write_bytes("a/b.bin", b"two!")
    assert store.read_bytes("a/b.bin") == b"two!"


def test_list_and_walk(store: Store) -> None:
    for rel, data in {"a/b/c.bin": b"123", "a/d.txt": b"4", "ab/x": b"", "top": b"56"}.items():
        store.write_bytes(rel, data)
    assert store.list() == ["a", "ab", "top"]
    assert store.list("a") == ["b", "d.txt"]
    assert store.list("missing") == []
    assert store.walk_files() == {"a/b/c.bin": 3, "a/d.txt": 1, "ab/x": 0, "top": 2}
    assert store.walk_files("a") == {"b/c.bin": 3, "d.txt": 1}  # "ab/" is not under "a/"
    assert store.walk_files("missing") == {}


def test_exists_and_size(store: Store) -> None:
    store.write_bytes("d/f", b"12345")
    assert store.exists("d/f") and store.exists("d")
    assert not store.exists("d/g") and not store.exists("e")
    assert store.size("d/f") == 5
    with pytest.raises(FileNotFoundError):
        store.size("d/g")


def test_missing_file_raises_file_not_found(store: Store) -> None:
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nope")
    with pytest.raises(FileNotFoundError):
        store.open_read("nope")


def test_delete_file_and_recursive(store: Store) -> None:
    for rel in ("a/1", "a/sub/2", "ab/3", "b"):
        store.write_bytes(rel, b"x")
    store.delete("b")
    store.delete("b")  # missing is fine
    assert not store.exists("b")
    store.delete("a", recursive=True)
    store.delete("a", recursive=True)
    assert store.walk_files() == {"ab/3": 1}


def test_append_bytes_grows_a_log(store: Store) -> None:
    store.append_bytes("logs/m.jsonl", b"a\n")
    store.append_bytes("logs/m.jsonl", b"b\n")
    assert store.read_bytes("logs/m.jsonl") == b"a\nb\n"


def test_create_only_refuses_second_write(store: Store) -> None:
    store.write_bytes("MANIFEST.json", b"first", create_only=True)
    with pytest.raises(FileExistsError):
        store.write_bytes("MANIFEST.json", b"second", create_only=True)
    assert store.read_bytes("MANIFEST.json") == b"first"


def test_streams_land_on_close_and_vanish_on_error(store: Store) -> None:
    with store.open_write("big.bin") as f:
        for i in range(4):
            f.write(bytes([i]) * 1000)
    with store.open_read("big.bin") as f:
        assert f.read() == b"".join(bytes([i]) * 1000 for i in range(4))
    with pytest.raises(RuntimeError), store.open_write("broken.bin") as f:
        f.write(b"partial")
        raise RuntimeError("writer died")
    assert not store.exists("broken.bin")
    assert store.list() == ["big.bin"]  # no temp files either


def test_child_and_path(store: Store) -> None:
    child = store.child("checkpoints", "step-1")
    assert child.path("x") == store.path("checkpoints/step-1/x")
    child.write_bytes("x", b"c")
    assert store.read_bytes("checkpoints/step-1/x") == b"c"
    with pytest.raises(ValueError):
        store.path("../escape")


def test_pickled_store_works(store: Store) -> None:
    store.write_bytes("k", b"v")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.url == store.url and clone.is_s3 == store.is_s3
    assert clone.read_bytes("k") == b"v"
    clone.write_bytes("k2", b"w")
    assert store.read_bytes("k2") == b"w"


def test_rename_dir_where_the_backend_can(store: Store) -> None:
    # The capability is the contract: callers ask `renames_dirs`, never which backend this is.
    store.write_bytes("ckpt/.tmp-1/shard", b"s")
    if store.renames_dirs:
        store.rename_dir("ckpt/.tmp-1", "ckpt/step-1")
        assert store.list("ckpt") == ["step-1"]
    else:
        with pytest.raises(NotImplementedError):
            store.rename_dir("ckpt/.tmp-1", "ckpt/step-1")
        assert store.list("ckpt") == [".tmp-1"]
    assert store.fsyncs == store.renames_dirs == (not store.is_s3)


def test_abort_multipart_uploads_on_a_clean_store_finds_none(store: Store) -> None:
    store.write_bytes("ckpt/shard", b"s")
    assert store.abort_multipart_uploads("ckpt") == 0
    assert store.read_bytes("ckpt/shard") == b"s"


def test_discarded_stream_leaves_nothing(store: Store) -> None:
    store.write_bytes("keep", b"old")
    f = store.open_write("keep")
    f.write(b"new but abandoned")
    f.discard()
    f.close()  # after discard, close must not commit
    assert store.read_bytes("keep") == b"old"
    assert store.list() == ["keep"]


def test_makedirs_and_fsync_tree(store: Store) -> None:
    store.makedirs("ckpt/tmp")
    store.write_bytes("ckpt/tmp/shard", b"s")
    store.fsync_tree("ckpt")  # local: fsyncs every file and dir; S3: nothing to do
    assert store.read_bytes("ckpt/tmp/shard") == b"s"


def test_start_writeback_starts_the_disk_on_a_local_file(tmp_path: Path) -> None:
    """Linux has sync_file_range: the shard writer's writeback hint is really made (a missing
    libc call would silently make it a no-op), and it leaves the bytes as written."""
    assert sys.platform != "linux" or local._sync_file_range() is not None
    path = tmp_path / "f.bin"
    with open(path, "wb") as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        start_writeback(f.fileno())
        f.write(b"y")
    assert path.read_bytes() == b"x" * (1 << 20) + b"y"


def test_create_only_race_threads(store: Store) -> None:
    barrier = threading.Barrier(N_RACERS)
    results: list[str] = []

    def racer(i: int) -> None:
        results.append(_race(store, "COMMIT", f"writer-{i}".encode(), barrier))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(N_RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    _assert_one_winner(store, results)


def test_create_only_race_processes(store: Store) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(N_RACERS)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_race_process, args=(store, f"writer-{i}".encode(), barrier, queue))
        for i in range(N_RACERS)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    _assert_one_winner(store, results)


def _race(store: Store, rel: str, payload: bytes, barrier: Any) -> str:
    store.exists("warm-up")  # connect before the barrier, so the writes really race
    barrier.wait(timeout=60)
    try:
        store.write_bytes(rel, payload, create_only=True)
        return "won:" + payload.decode()
    except FileExistsError:
        return "exists"


def _race_process(store: Store, payload: bytes, barrier: Any, queue: Any) -> None:
    try:
        queue.put(_race(store, "COMMIT", payload, barrier))
    except BaseException as exc:  # report, don't hang the parent on queue.get
        queue.put(f"error:{exc!r}")


def _assert_one_winner(store: Store, results: list[str]) -> None:
    winners = [r for r in results if r.startswith("won:")]
    assert len(results) == N_RACERS
    assert len(winners) == 1, results
    assert results.count("exists") == N_RACERS - 1, results
    assert store.read_bytes("COMMIT") == winners[0].removeprefix("won:").encode()


# --- local only ----------------------------------------------------------------------------


def test_local_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.write_bytes("d/f", b"1")
    store.write_bytes("d/f", b"2")
    with pytest.raises(FileExistsError):
        store.write_bytes("d/f", b"3", create_only=True)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["f"]
    assert (tmp_path / "d" / "f").read_bytes() == b"2"


def test_local_rename_dir(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.write_bytes("checkpoints/.tmp-step-1/shard", b"s")
    store.rename_dir("checkpoints/.tmp-step-1", "checkpoints/step-1")
    assert store.list("checkpoints") == ["step-1"]
    assert store.read_bytes("checkpoints/step-1/shard") == b"s"
    store.write_bytes("checkpoints/.tmp-again/shard", b"t")
    with pytest.raises(FileExistsError):
        store.rename_dir("checkpoints/.tmp-again", "checkpoints/step-1")
    assert store.read_bytes("checkpoints/step-1/shard") == b"s"


def test_local_has_no_s3_machinery(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    assert not store.is_s3 and store.storage_options() == {}
    assert store.abort_multipart_uploads() == 0
    assert store.fsspec_filesystem().protocol[0] == "file"


# --- S3 only -------------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_rename_dir_refuses(s3_server: S3Server, s3_bucket: str) -> None:
    store = Store(s3_bucket, S3Options(endpoint_url=s3_server.endpoint_url))
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
    assert proxy.seen(prefix + "down") == store.s3.max_attempts
    shown = [message, repr(store), caplog.text, repr(store.storage_options()), repr(ei.value)]
    shown.append(pickle.dumps(store).decode("latin-1"))
    for text in shown:
        assert SECRET not in text and ACCESS_KEY not in text


@pytest.mark.s3
def test_abort_multipart_uploads(s3_server: S3Server, s3_bucket: str) -> None:
    import boto3

    store = Store(f"{s3_bucket}/run", S3Options(endpoint_url=s3_server.endpoint_url))
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


@pytest.mark.s3
def test_fsspec_filesystem_for_dcp(s3_server: S3Server, s3_bucket: str) -> None:
    from fsspec.core import url_to_fs

    store = Store(s3_bucket, S3Options(endpoint_url=s3_server.endpoint_url))
    store.write_bytes("ckpt/.metadata", b"meta")
    assert store.fsspec_filesystem().cat_file(store.path("ckpt/.metadata")) == b"meta"
    fs, path = url_to_fs(store.path("ckpt"), **store.storage_options())  # what DCP does
    assert fs.cat_file(path + "/.metadata") == b"meta"


# --- settings, pure helpers ----------------------------------------------------------------


def test_explicit_options_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    env_only = Store("s3://b/p").storage_options()
    assert env_only["endpoint_url"] == "http://generic:1"
    assert env_only["client_kwargs"] == {"region_name": "eu-west-1"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    assert Store("s3://b/p").storage_options()["endpoint_url"] == "http://s3-specific:2"
    opts = S3Options(endpoint_url="http://config:3", region="ap-south-1", profile="team")
    explicit = Store("s3://b/p", opts).storage_options()
    assert explicit["endpoint_url"] == "http://config:3" and explicit["profile"] == "team"
    assert explicit["client_kwargs"] == {"region_name": "ap-south-1"}


def test_urls_and_options_are_validated() -> None:
    assert is_s3_url("s3://b/p") and not is_s3_url("/tmp/x")
    with pytest.raises(ValueError, match="environment"):
        Store("s3://KEY:SECRET@bucket/prefix")
    with pytest.raises(ConfigError, match=r"storage\.s3\.max_attempts must be >= 1 \(got 0\)"):
        S3Options(max_attempts=0)
    with pytest.raises(ConfigError, match=r"storage\.s3\.backoff_s must be >= 0"):
        S3Options(backoff_s=-1)
    assert repr(Store("s3://b/p/")) == "Store('s3://b/p')"


def test_config_schema_is_s3_options() -> None:
    # One type for `storage.s3.*` and the backend: the config cannot accept what S3 refuses.
    from orchestrator.config import Config, from_dict

    assert isinstance(Config().storage.s3, S3Options)
    cfg = from_dict({"storage": {"s3": {"endpoint_url": "http://h:1", "max_backoff_s": 2}}})
    assert cfg.storage.s3 == S3Options(endpoint_url="http://h:1", max_backoff_s=2.0)
    with pytest.raises(ConfigError, match=r"storage\.s3\.max_attempts must be >= 1"):
        from_dict({"storage": {"s3": {"max_attempts": 0}}})


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


def test_streams_retry_per_request_in_botocore(faulty: tuple[Store, FaultProxy, str]) -> None:
    # A half-read stream cannot be replayed from above, so streams use botocore's own retries.
    store, proxy, prefix = faulty
    store.write_bytes("stream", b"payload")
    proxy.fail(prefix + "stream", status=503, times=2)
    with store.open_read("stream") as f:
        assert f.read() == b"payload"
    assert proxy.seen(prefix + "stream") == 5  # 1 PUT, then 2 failures + HEAD + GET
