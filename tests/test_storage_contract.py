"""One contract suite for `orchestrator.storage.Store`, run on every backend of the registry.

A backend is added to storage/registry.py with a root to run this suite under in `ROOTS` below:
test_every_backend_has_a_root fails until it has one. S3 runs on `moto_server` in its own
process (devtools/s3server.py), over real HTTP.
"""

from __future__ import annotations

import multiprocessing
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devtools.s3server import S3Server
from orchestrator.storage import Store, registry
from tests.fixtures.s3 import FAST, s3_storage

N_RACERS = 8


def _local_root(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return Store(str(tmp_path / "root"))


def _s3_root(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    server: S3Server = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    return Store(f"{bucket}/root", s3_storage(server.endpoint_url, **FAST))


# registry scheme -> (a fresh, empty root of that backend, the marks its tests carry)
ROOTS: dict[str, tuple[Callable[[pytest.FixtureRequest, Path], Store], list[Any]]] = {
    "": (_local_root, []),
    "s3": (_s3_root, [pytest.mark.s3]),
}


def test_every_backend_has_a_root() -> None:
    assert sorted(ROOTS) == registry.schemes(), "give the new backend a root in ROOTS"


@pytest.fixture(
    params=[pytest.param(s, marks=ROOTS[s][1], id=s or "local") for s in registry.schemes()]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return ROOTS[request.param][0](request, tmp_path)


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


def test_read_into_fills_from_an_offset(store: Store) -> None:
    store.write_bytes("f", bytes(range(10)))
    into = memoryview(bytearray(4))
    assert store.read_into("f", 3, into) == 4 and bytes(into) == bytes([3, 4, 5, 6])
    assert store.read_into("f", 8, into) == 2 and bytes(into[:2]) == bytes([8, 9])


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


def test_discarded_stream_leaves_nothing(store: Store) -> None:
    store.write_bytes("keep", b"old")
    f = store.open_write("keep")
    f.write(b"new but abandoned")
    f.discard()
    f.close()  # after discard, close must not commit
    assert store.read_bytes("keep") == b"old"
    assert store.list() == ["keep"]


def test_fsspec_filesystem_is_the_same_storage(store: Store) -> None:
    # What DCP writes the shard files through (checkpoint/format/dcp_write.py): one object per
    # store, seeing what the store wrote and showing the store what it writes.
    fs = store.fsspec_filesystem()
    assert store.fsspec_filesystem() is fs
    store.write_bytes("ckpt/.metadata", b"meta")
    assert fs.cat_file(store.path("ckpt/.metadata")) == b"meta"
    with fs.open(store.path("ckpt/__0_0.distcp"), "wb") as f:
        f.write(b"shard")
    assert store.read_bytes("ckpt/__0_0.distcp") == b"shard"


def test_child_and_path(store: Store) -> None:
    child = store.child("checkpoints", "step-1")
    assert child.path("x") == store.path("checkpoints/step-1/x")
    assert child.options == store.options
    child.write_bytes("x", b"c")
    assert store.read_bytes("checkpoints/step-1/x") == b"c"
    with pytest.raises(ValueError):
        store.path("../escape")


def test_local_path_only_where_paths_are_local_files(store: Store) -> None:
    store.write_bytes("tb/k", b"v")
    where = store.local_path("tb/k")
    assert (where is not None) is store.local_paths
    assert where is None or Path(where).read_bytes() == b"v"


def test_pickled_store_works(store: Store) -> None:
    store.write_bytes("k", b"v")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.url == store.url and clone.options == store.options
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


def test_abort_multipart_uploads_on_a_clean_store_finds_none(store: Store) -> None:
    store.write_bytes("ckpt/shard", b"s")
    assert store.abort_multipart_uploads("ckpt") == 0
    assert store.read_bytes("ckpt/shard") == b"s"


def test_makedirs_and_fsync_tree(store: Store) -> None:
    store.makedirs("ckpt/tmp")
    store.write_bytes("ckpt/tmp/shard", b"s")
    store.fsync_tree("ckpt")  # local: fsyncs every file and dir; S3: nothing to do
    assert store.read_bytes("ckpt/tmp/shard") == b"s"


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
