"""What only the local-disk backend promises, beyond the contract (test_storage_contract.py):
no temp files left, durable renames, the writeback hint, file:// URLs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from orchestrator.storage import Store, local, start_writeback


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


def test_local_capabilities_and_no_s3_machinery(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    assert store.renames_dirs and store.fsyncs and store.local_paths
    assert store.local_path("tb") == str(tmp_path / "tb")
    assert store.abort_multipart_uploads() == 0
    assert store.fsspec_filesystem().protocol[0] == "file"


def test_file_urls_and_relative_paths_are_absolute_local_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert Store(f"file://{tmp_path}/run/").url == str(tmp_path / "run")
    assert Store("run").url == str(tmp_path / "run")  # a pickled Store may run elsewhere
    Store(f"file://{tmp_path}/run").write_bytes("x", b"1")
    assert (tmp_path / "run" / "x").read_bytes() == b"1"


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
