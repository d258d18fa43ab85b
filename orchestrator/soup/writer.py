"""The soup's output: sharded safetensors (+ index) and SOUP.json, committed as one directory.

    <out>/model.safetensors                    one file when the soup is <= shard_bytes
    <out>/model-00001-of-00003.safetensors     else shards, and
    <out>/model.safetensors.index.json         Hugging Face's index: {metadata, weight_map}
    <out>/SOUP.json                            the record, written LAST (commit.py): recipe,
                                               ingredients, scores, files with checksums

On S3 the files sit under a nonce sub-directory named by SOUP.json's `data_dir`, and the
record is one create-only PUT (see orchestrator.checkpoint.commit). `load_soup` reads a
committed soup back; `write_checkpoint` turns one into a committed stockpot checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.checkpoint.format import (
    DTYPE_CODES,
    FileEntry,
    Hasher,
    TensorEntry,
    dtype_name,
    hash_bytes,
    safetensors_header,
    write_safetensors_parts,
)
from orchestrator.errors import CheckpointCorrupt, UsageError
from orchestrator.storage import start_writeback

if TYPE_CHECKING:
    import torch

    from orchestrator.soup.reader import TensorSpec
    from orchestrator.storage import StorageOptions, Store

RECORD = "SOUP.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
FORMAT = "stockpot.soup"
WRITEBACK_BYTES = 16 << 20  # as checkpoint/format/dcp_write.py


@dataclass(frozen=True)
class Written:
    files: dict[str, FileEntry]  # name relative to the out dir -> size, checksum
    shards: list[str]
    nbytes: int
    wait_s: float = 0.0  # the producer's time waiting for the writer thread


class _HashingFile:
    """Passes writes to `raw` and hashes them, so the record's checksums cost no re-read.

    Both happen on a thread of its own, one write behind the caller: the mixer makes the next
    part while this one is hashed and copied into the page cache (xxhash, the file write and
    the mixer's numpy/torch kernels all release the GIL, so two cores work). `write` returns
    once the previous write is done, so a part must stay valid until the write after it
    returns (the mixer alternates two output buffers). Writeback to the disk is started every
    WRITEBACK_BYTES (a local file), so the final fsync waits only for the rest."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.hasher = raw, Hasher()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soup-write")
        self._pending: Future[None] | None = None
        self._fd = _fileno(raw)
        self._unsynced = 0
        self.wait_s = 0.0

    def write(self, data: Any) -> int:
        self.wait()
        self._pending = self._thread.submit(self._write, data)
        return memoryview(data).nbytes

    def _write(self, data: Any) -> None:
        self.hasher.update(data)
        self.raw.write(data)
        self._unsynced += memoryview(data).nbytes
        if self._fd is not None and self._unsynced >= WRITEBACK_BYTES:
            self.raw.flush()
            start_writeback(self._fd)
            self._unsynced = 0

    def wait(self) -> None:
        """Until the last write is done (raising its error)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            t0 = time.perf_counter()
            pending.result()
            self.wait_s += time.perf_counter() - t0

    def __enter__(self) -> _HashingFile:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            if exc_type is None:
                self.wait()
            elif self._pending is not None:  # the error in flight says more than this one
                self._pending.exception()
        finally:
            self._thread.shutdown(wait=True)


def _fileno(raw: Any) -> int | None:
    """The local file descriptor under `raw`, or None (S3's upload has none)."""
    try:
        fd = raw.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    return fd if isinstance(fd, int) else None


def split_out(url: str, storage: StorageOptions | None) -> tuple[Store, str]:
    """(the store of the out dir's parent, the out dir's name)."""
    from orchestrator.storage import Store

    trimmed = url.rstrip("/")
    parent, _, name = trimmed.rpartition("/")
    if not name or name in (".", ".."):
        raise UsageError(f"--out must name a directory, e.g. runs/demo/soups/uniform (got {url!r})")
    return Store(parent or ".", storage), name  # no "/" at all: a name in the working dir


def plan_shards(specs: Mapping[str, TensorSpec], shard_bytes: int,
                order: Mapping[str, int] | None = None) -> list[list[TensorEntry]]:  # fmt: skip
    """The output tensors in file order (see `safetensors_header`), split into consecutive
    shards of <= shard_bytes."""
    entries = []
    for name, spec in specs.items():
        dtype = dtype_name(spec.dtype)
        if dtype not in DTYPE_CODES:
            raise UsageError(f"{name} has dtype {dtype}, which safetensors cannot hold")
        entries.append(TensorEntry(name, name, dtype, spec.shape, spec.dtype.itemsize))
    _, ordered = safetensors_header(entries, {}, order)
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in ordered:
        if shards[-1] and size + e.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_files(
    store: Store,
    write_rel: str,
    shards: Sequence[Sequence[TensorEntry]],
    parts: Callable[[str], Iterable[torch.Tensor]],
    metadata: Mapping[str, str],
    *,
    order: Mapping[str, int] | None = None,
    progress: Callable[[int], object] | None = None,
) -> Written:
    """Stream every shard (each tensor as consecutive flat parts from `parts(name)`, in file
    order; each part must stay valid until the part after it is asked for) and the index."""
    names = shard_names(len(shards))
    files: dict[str, FileEntry] = {}
    weight_map: dict[str, str] = {}
    waited = 0.0
    for fname, entries in zip(names, shards, strict=True):
        with store.open_write(f"{write_rel}/{fname}") as raw, _HashingFile(raw) as f:
            write_safetensors_parts(
                f, entries, lambda e: parts(e.name), metadata, order=order, progress=progress
            )
        files[fname] = f.hasher.entry()
        waited += f.wait_s
        weight_map.update({e.name: fname for e in entries})
    total = sum(e.nbytes for entries in shards for e in entries)
    if len(names) > 1:
        body = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        raw_index = (json.dumps(body, indent=1) + "\n").encode()
        store.write_bytes(f"{write_rel}/{INDEX}", raw_index)
        files[INDEX] = hash_bytes(raw_index)
    return Written(files, names, total, waited)


def record_bytes(record: Mapping[str, Any]) -> bytes:
    return (json.dumps({"format": FORMAT, **record}, indent=1, default=str) + "\n").encode()


def read_record(out: Store) -> dict[str, Any]:
    """A committed soup's SOUP.json (UsageError if `out` is not one)."""
    try:
        raw = out.read_bytes(RECORD)
    except FileNotFoundError:
        raise UsageError(f"{out.path()} is not a committed soup (no {RECORD})") from None
    try:
        body = json.loads(raw)
    except ValueError:
        raise CheckpointCorrupt(f"{out.path(RECORD)}: does not parse") from None
    if body.get("format") != FORMAT:
        raise CheckpointCorrupt(f"{out.path(RECORD)}: not a soup record")
    return dict(body)


def load_soup(out: Store) -> dict[str, torch.Tensor]:
    """Every tensor of a committed soup, in memory (the checkpoint writer and tests use it)."""
    from safetensors.torch import load

    record = read_record(out)
    data = record.get("data_dir", "")
    tensors: dict[str, torch.Tensor] = {}
    for name in record["shards"]:
        tensors.update(load(out.read_bytes(f"{data}/{name}" if data else name)))
    return tensors


class _ModelOnly:
    """A Stateful holding plain-named tensors as `<registered name>.model.<param>`."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tensors = dict(state["model"])


def write_checkpoint(out: Store, run_url: str, step: int, storage: StorageOptions | None,
                     metrics: Mapping[str, float]) -> str:  # fmt: skip
    """Write the committed soup at `out` as a committed stockpot checkpoint (model only) of
    the run dir `run_url`, at `step`; returns its path. Holds the model in memory once."""
    from orchestrator.checkpoint.checkpointer import Checkpointer
    from orchestrator.checkpoint.format import step_rel
    from orchestrator.storage import Store

    run = Store(run_url, storage)
    if run.exists(f"{step_rel(step)}/MANIFEST.json"):
        raise UsageError(f"{run.path(step_rel(step))} is already committed; choose another dir")
    ckpt = Checkpointer(run)
    ckpt.register("train", _ModelOnly(load_soup(out)))
    ckpt.save(step, metrics=dict(metrics))
    ckpt.close()
    return run.path(step_rel(step))
