"""Sharded tensor I/O on torch.distributed.checkpoint (DCP), with checksums, through the
store's own fsspec filesystem (the backend's: its settings and retries).

Writing (each rank's files, hashed as they go out) is dcp_write.py's. DCP's `.metadata` is a
pickle: it is read with a restricted unpickler that only builds DCP's own metadata classes,
never arbitrary objects; tensors and byte items are loaded with `weights_only=True` (DCP's own
planner loads byte items with `weights_only=False`: `_SafeLoadPlanner` replaces it).

DCP reports a failure of any rank as a `CheckpointException` on every rank: a BaseException
whose text is a traceback per rank. It stops here: what leaves this module is CheckpointCorrupt
(a reader found a damaged file), DiskFull, or a one-line CheckpointError.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NoReturn

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.futures import Future

from orchestrator import dist
from orchestrator.checkpoint.format import pieces
from orchestrator.checkpoint.format.dcp_write import (
    LazyPlanner,
    LazyTensors,
    ShardWriter,
    StoreFileSystem,
)
from orchestrator.checkpoint.format.layout import METADATA_NAME
from orchestrator.checkpoint.format.manifest import FileEntry, HashingReader
from orchestrator.dist import one_line
from orchestrator.errors import CheckpointCorrupt, CheckpointError
from orchestrator.storage import Store


class DiskFull(CheckpointError):
    """A save ran out of space (ENOSPC); its attempt is removed, the previous checkpoint stays."""

    restart = "never"  # the disk stays full until someone frees it: free space and run again
    leader_only = True  # every rank raises the same line; the leader says it (worker.py)


class _SafeMetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's own metadata classes and the torch types they hold.

    No functions or modules (no `getattr`, no `os`): a tampered `.metadata` cannot run code.
    """

    _DCP_MODULES = frozenset(
        {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"}
    )
    _EXACT = frozenset({("torch", "Size"), ("torch.serialization", "_get_layout")})

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name) if self._allowed(module, name) else None
        if found is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from checkpoint metadata"
            )
        return found

    def _allowed(self, module: str, name: str) -> bool:
        if (module, name) in self._EXACT:
            return True
        if module == "torch":
            return isinstance(getattr(torch, name, None), torch.dtype)
        if module in self._DCP_MODULES:
            obj = getattr(sys.modules.get(module), name, None)
            return isinstance(obj, type) and obj.__module__ == module
        return False


# Where each file of a checkpoint is read from (tiered checkpoints: the node's copy or the
# durable one): its name, as DCP names it -> (store, path in that store).
Sources = Mapping[str, tuple[Store, str]]


class Unreachable(CheckpointError):
    """A restore needed a file no tier it can read holds (a step committed only on other nodes)."""


class _RoutedFileSystem(StoreFileSystem):
    """DCP's filesystem for a checkpoint whose files come from several stores (`Sources`)."""

    def __init__(self, base: str, sources: Sources) -> None:
        FileSystem.__init__(self)
        self._base, self._sources = base, sources
        self._systems: dict[str, StoreFileSystem] = {}

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return f"{os.fspath(path)}/{suffix}"

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        name = os.fspath(path)[len(self._base) + 1 :]
        if name not in self._sources:
            raise Unreachable(f"{name} is on no tier this rank can read")
        store, rel = self._sources[name]
        fs = self._systems.setdefault(store.url, StoreFileSystem(store))
        with fs.create_stream(store.path(rel), mode) as stream:
            yield stream


HASH_SHARE = 0.5  # a load that reads this share of a file's bytes reads and hashes all of it


class Tap:
    """Verification in a load's own pass (restoring.py, tiered_restore.py): `expected` names the
    files to check (as DCP names them) with their manifest entries. A file the load reads at
    least HASH_SHARE of is read front to back, every byte hashed (the gaps between its items
    and its tail too), and `got` holds its size and checksum; one read less, or out of order,
    is not in `got`, and the caller checks it apart. On S3 a restore then downloads each file
    once instead of twice (the load, and the checksum pass beside it)."""

    def __init__(self, expected: Mapping[str, FileEntry]) -> None:
        self.expected = dict(expected)
        self.got: dict[str, FileEntry] = {}

    def wants(self, name: str, reading: int) -> bool:
        entry = self.expected.get(name)
        return entry is not None and reading >= HASH_SHARE * entry.size


class _Reader(FileSystemReader):
    """DCP's reader on the store's filesystem (what its FsspecReader is on one it builds), or on
    several (`sources`: tiered checkpoints); with a `tap`, hashing what it reads."""

    def __init__(
        self, store: Store, rel: str, sources: Sources | None = None, tap: Tap | None = None
    ) -> None:
        super().__init__(store.path(rel))
        self.tap = tap
        self.path = store.path(rel)  # a str: a URL is no Path
        fs = StoreFileSystem(store) if sources is None else _RoutedFileSystem(self.path, sources)
        self.fs: StoreFileSystem = fs  # type: ignore[assignment]

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self.fs.concat_path(self.path, METADATA_NAME)
        try:
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _SafeMetadataUnpickler(stream).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
            raise CheckpointCorrupt(f"{path}: unreadable DCP metadata ({exc})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointCorrupt(f"{path}: not DCP metadata")
        metadata.storage_meta = metadata.storage_meta or dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """DCP's reader, made sequential and copy-free: each file is read once front to back
        (items in offset order), and a plain tensor piece goes from the file straight into the
        tensor being restored (pieces.py) instead of through `torch.load` and a copy. Byte
        items and transformed pieces take DCP's own path. make bench: restore 1.7x faster."""
        per_file: dict[str, list[ReadItem]] = {}
        other: list[ReadItem] = []
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            if info.transform_descriptors:
                other.append(item)
            else:
                per_file.setdefault(info.relative_path, []).append(item)
        for rel, items in per_file.items():
            path = self.fs.concat_path(self.path, rel)
            reading = sum(self.storage_data[i.storage_index].length for i in items)
            with self.fs.create_stream(path, "rb") as raw:
                hashing = HashingReader(raw) if self.tap and self.tap.wants(rel, reading) else None
                stream = hashing or raw
                for item in sorted(items, key=lambda i: self.storage_data[i.storage_index].offset):
                    info = self.storage_data[item.storage_index]
                    if item.type == LoadItemType.BYTE_IO:  # in the same pass: one read a file
                        stream.seek(info.offset)
                        planner.load_bytes(item, io.BytesIO(stream.read(info.length)))
                        continue
                    target = planner.resolve_tensor(item).detach()
                    try:
                        part = (item.storage_offsets, item.lengths)
                        pieces.load_piece(stream, info.offset, info.length, part, target)
                    except (ValueError, EOFError, RuntimeError) as exc:
                        raise CheckpointCorrupt(f"{path}: {item.dest_index.fqn}: {exc}") from exc
                    planner.commit_tensor(item, target)
                if hashing is not None and self.tap is not None and (entry := hashing.finish()):
                    self.tap.got[rel] = entry
        if other:
            return super().read_data(LoadPlan(other, plan.storage_data), planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but byte items (non-tensor state: param groups, counters) are
    unpickled with `weights_only=True`: DCP's own uses `weights_only=False`, which would run
    whatever a tampered checkpoint file holds."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # Without a process group DCP warns "assuming the intent is to save in a single process"
    # on every call; that is exactly our intent (tools, world size 1).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_shards(
    state: Mapping[str, Any],
    store: Store,
    rel: str,
    group: Any = None,
    lazy: LazyTensors | None = None,
) -> dict[str, FileEntry]:
    """Write this rank's shards of `state` under `rel`; (size, checksum) of each file it wrote.
    With `lazy`, the live tensors among them are read through it (snapshot.LazyCopy).
    DiskFull if any rank ran out of space, else CheckpointError if any rank's write failed."""
    writer = ShardWriter(store, rel)
    try:
        with _quiet_single_process():
            dcp.save(
                dict(state),
                storage_writer=writer,
                planner=LazyPlanner(lazy) if lazy is not None else None,
                process_group=group,
                no_dist=not dist.is_initialized(),
            )
    except CheckpointException as exc:
        _raise_if_disk_full(writer.fs.no_space, store, rel, group)
        _raise_ours(exc, f"writing {store.path(rel)}")
    _raise_if_disk_full(writer.fs.no_space, store, rel, group)
    return writer.fs.records


def _raise_if_disk_full(mine: str | None, store: Store, rel: str, group: Any) -> None:
    """DiskFull on every rank if any rank's write hit ENOSPC (a file it skipped, see
    create_stream). DCP returned or raised on every rank alike (it gathers each rank's outcome),
    so this exchange is safe; the leader removes the attempt's files, so the next run has the
    space back that this one took."""
    full = next((p for p in dist.all_gather_objects(mine, group) if p), None)
    if full is None:
        return
    if dist.rank() == dist.LEADER:
        store.delete(rel, recursive=True)
    raise DiskFull(f"no space left on device writing {full}") from None


def load_shards(
    state: dict[str, Any],
    store: Store,
    rel: str,
    group: Any = None,
    sources: Sources | None = None,
    tap: Tap | None = None,
) -> None:
    """Fill `state` in place from the checkpoint at `rel`, resharding to this world's layout
    (`sources`: each file from the store it names instead; `tap`: hashing the files it reads
    mostly, see Tap). A damaged file raises
    CheckpointCorrupt naming it (what our reader raised, on any rank); any other failure (a
    state the checkpoint does not fit) a one-line CheckpointError."""
    try:
        with _quiet_single_process():
            dcp.load(
                state,
                storage_reader=_Reader(store, rel, sources, tap),
                planner=_SafeLoadPlanner(),
                process_group=group,
                no_dist=not dist.is_initialized(),
            )
    except CheckpointException as exc:
        _raise_ours(exc, f"loading {store.path(rel)}")


def _raise_ours(exc: CheckpointException, doing: str) -> NoReturn:
    """Raise what a CheckpointException stands for: the CheckpointCorrupt a reader raised on
    some rank, else a CheckpointError naming the first failure (DCP's per-rank tracebacks stay
    its cause, for --debug). An interrupt (a failure that is no Exception: KeyboardInterrupt)
    stays the BaseException it was, so no `except Exception` swallows it."""
    failures = [failure for failure, _ in exc.failures.values()]
    corrupt = next((e for e in failures if isinstance(e, CheckpointCorrupt | Unreachable)), None)
    if corrupt is not None:
        raise corrupt from None
    if not all(isinstance(e, Exception) for e in failures):
        raise exc
    ranks = ", ".join(str(rank) for rank in sorted(exc.failures))
    first = failures[0] if failures else exc
    raise CheckpointError(f"{doing} failed (rank {ranks}): {one_line(first)}") from exc


def needed_files(state: dict[str, Any], metadata: Metadata) -> set[str]:
    """The files a load of `state` reads on this rank (DCP's local plan; no collective)."""
    planner = DefaultLoadPlanner()
    planner.set_up_planner(state, metadata, is_coordinator=False)
    storage = metadata.storage_data or {}
    return {storage[item.storage_index].relative_path for item in planner.create_local_plan().items}


def read_metadata(store: Store, rel: str) -> Metadata:
    """DCP's metadata of the checkpoint data at `rel`, read with the restricted unpickler;
    CheckpointCorrupt if it is not DCP metadata."""
    return _Reader(store, rel).read_metadata()


def load_flat(store: Store, rel: str, keys: list[str]) -> dict[str, Any]:
    """Load the named flat keys (e.g. 'model.fc.weight') whole, with no model and no group;
    errors as load_shards'."""
    md = read_metadata(store, rel)
    state: dict[str, Any] = {}
    for key in keys:
        tmeta = md.state_dict_metadata[key]
        if isinstance(tmeta, TensorStorageMetadata):
            state[key] = torch.empty(tmeta.size, dtype=tmeta.properties.dtype)
        else:  # a small object saved as bytes; DCP loads it with weights_only=True
            state[key] = None
    try:
        with _quiet_single_process():
            dcp.load(
                state, storage_reader=_Reader(store, rel), planner=_SafeLoadPlanner(), no_dist=True
            )
    except CheckpointException as exc:
        _raise_ours(exc, f"loading {store.path(rel)}")
    return state
