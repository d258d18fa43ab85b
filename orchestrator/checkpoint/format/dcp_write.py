"""The write side of DCP (dcp_io.py): each rank's shard files, hashed as they go out.

Every stream is wrapped so its size and xxh3-128 are computed as the bytes go out; the records
feed the manifest, so saving never re-reads what it wrote.

Each tensor piece is the same bytes DCP writes (`torch.save` of the tensor, a small zip), but
written in three writes: torch.save's records around the data, made with
`torch.serialization.skip_data()`, then the tensor's memory as it is, then the records after
it. torch.save itself would also compute a CRC32 of the data (~0.4 s/GB here, on the writer's
CPU); torch.load does not check it, and our xxh3 of every file covers the same bytes. DCP's own
reader, `torch.load` and the copy-free readers (pieces.py) read the files unchanged.
"""

from __future__ import annotations

import errno
import io
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any, Protocol, cast

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from orchestrator.checkpoint.format.layout import METADATA_NAME, OPTIM_KEY, is_optimizer_item
from orchestrator.checkpoint.format.manifest import FileEntry, Hasher
from orchestrator.storage import Store, start_writeback

WRITEBACK_BYTES = 16 << 20  # a local file's writer starts the disk on its bytes this often


class HashingStream:
    """Passes writes through to `raw`, feeding a Hasher on the way."""

    def __init__(self, raw: Any, hasher: Hasher, on_full: Callable[[], None]) -> None:
        self._raw, self._hasher, self._on_full = raw, hasher, on_full
        self.closed = False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._hasher.update(b)
        try:
            written = self._raw.write(b)
        except OSError as exc:  # torch.save's zip writer turns it into "unexpected pos": note it
            if exc.errno == errno.ENOSPC:
                self._on_full()
            raise
        return memoryview(b).nbytes if written is None else written

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        self.closed = True


class StoreFileSystem(FileSystem):
    """DCP's fsspec FileSystem over the filesystem the store's backend owns, so the shard bytes
    go through the same backend, settings and retries as every other byte. DCP's own
    FsspecWriter/Reader would build one from the URL and keyword arguments (`url_to_fs`)."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.fs = store.fsspec_filesystem()

    def init_path(self, path: str | os.PathLike, **kwargs: Any) -> str | os.PathLike:
        return path  # DCP's reset(checkpoint_id) must not build another filesystem


class HashingFileSystem(StoreFileSystem):
    """The store's filesystem for DCP, recording (size, checksum) of each file by its name under
    the attempt directory `rel`.

    `rel` is always a fresh attempt directory no one else writes (commit.py), so the checks
    DCP makes there are skipped: whether `.metadata` exists (never, yet), and the write of
    `.metadata.tmp` renamed to `.metadata` goes to `.metadata` directly (the commit is the
    manifest, written later). On S3 those were a dozen requests of a save's ~30 (a rename is a
    copy and a delete there), and `mkdir` (a bucket HEAD per rank) is skipped as well."""

    def __init__(self, store: Store, rel: str) -> None:
        super().__init__(store)
        self.root = store.path(rel)
        self._directories = store.renames_dirs  # False on S3: nothing to create
        self.records: dict[str, FileEntry] = {}
        self.no_space: str | None = None  # the first file a write failed on with ENOSPC
        self.on_closed: Callable[[], None] = lambda: None  # in the writer thread, per file

    def exists(self, path: str | os.PathLike) -> bool:
        return False

    def mkdir(self, path: str | os.PathLike) -> None:
        if self._directories:
            super().mkdir(path)

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        if "w" in mode and os.fspath(path).endswith(f"{METADATA_NAME}.tmp"):
            path = os.fspath(path)[: -len(".tmp")]  # see the class doc; rename() is then a no-op

        def full() -> None:
            self.no_space = self.no_space or os.fspath(path)

        hasher: Hasher | None = None
        try:
            with super().create_stream(path, mode) as stream:
                if "w" not in mode:
                    yield stream
                    return
                hasher = Hasher()
                yield HashingStream(stream, hasher, full)
        except Exception as exc:  # a buffered write can fail at close too
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                full()
            if self.no_space is None or hasher is None:  # (None: failed before the yield)
                raise
            # Out of space: the save fails as DiskFull (dcp_io.save_shards), so this file is
            # left unrecorded and unraised, as every other file of the attempt.
            return
        finally:
            if hasher is not None:
                self.on_closed()
        self.records[self._name(path)] = hasher.entry()

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        if os.fspath(path) != f"{os.fspath(new_path)}.tmp":  # DCP's .metadata: written in place
            raise NotImplementedError(f"a checkpoint writer renames {path}")

    def _name(self, path: str | os.PathLike) -> str:
        return os.path.relpath(os.fspath(path), self.root).replace(os.sep, "/")


class ShardWriter(FileSystemWriter):
    """DCP's writer on the store's filesystem (what its FsspecWriter is on one it builds), with
    its per-file writing loop replaced (`_write_file`)."""

    def __init__(self, store: Store, rel: str) -> None:
        # Without fsync (S3), DCP's sync_files would fall back to os.sync() of the whole machine.
        super().__init__(store.path(rel), sync_files=store.fsyncs)
        self.fs: HashingFileSystem = HashingFileSystem(store, rel)  # type: ignore[assignment]
        # A str, as FsspecWriter keeps it (not the Path FileSystemWriter made): it is pickled
        # into `.metadata` as the checkpoint id, and a URL is no Path.
        self.path = store.path(rel)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """This rank's optimizer state in one file (`__<rank>_optim.distcp`), the rest in
        another (`__<rank>_0.distcp`): retention can then drop a kept checkpoint's optimizer
        part by deleting files, never rewriting the model's (see layout.py). The two files are
        written by two threads at once (make bench: ~1.25x on 2 ranks); the first error of
        either fails the rank's write, where DCP's extra threads drop theirs."""
        if isinstance(planner, LazyPlanner):
            planner.expect(plan.items)
            self.fs.on_closed = planner.lazy.release
        prefix = plan.storage_data.prefix
        optim = [item for item in plan.items if is_optimizer_item(item.index.fqn)]
        rest = [item for item in plan.items if not is_optimizer_item(item.index.fqn)]
        files = [(f"{prefix}0{DEFAULT_SUFFIX}", rest)]
        if optim:
            files.append((f"{prefix}{OPTIM_KEY}{DEFAULT_SUFFIX}", optim))
        outcomes: list[list[WriteResult] | BaseException] = [[] for _ in files]

        def write(i: int) -> None:
            try:
                outcomes[i] = self._write_file(planner, *files[i])
            except BaseException as exc:
                outcomes[i] = exc

        threads = [threading.Thread(target=write, args=(i,)) for i in range(1, len(files))]
        for thread in threads:
            thread.start()
        write(0)
        for thread in threads:
            thread.join()
        results: list[WriteResult] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            results += outcome
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def _write_file(self, planner: SavePlanner, name: str, items: list[WriteItem]) -> list[Any]:
        """DCP's layout: byte items first, then each tensor piece, at the offsets recorded."""
        results = []
        byte_items = [item for item in items if item.type == WriteItemType.BYTE_IO]
        tensor_items = [item for item in items if item.type != WriteItemType.BYTE_IO]
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
            kicked = 0  # where writeback was last started (storage.start_writeback)
            for item in byte_items + tensor_items:
                offset = stream.tell()
                data = planner.resolve_data(item)
                if isinstance(data, io.BytesIO):
                    stream.write(data.getbuffer())
                else:
                    write_tensor(stream, _cpu_piece(data))
                length = stream.tell() - offset
                results.append(WriteResult(item.index, length, _StorageInfo(name, offset, length)))
                if self.sync_files and offset + length - kicked >= WRITEBACK_BYTES:
                    start_writeback(stream.fileno())
                    kicked = offset + length
            if self.sync_files:
                stream.flush()
                os.fsync(stream.fileno())
        return results


def _cpu_piece(tensor: torch.Tensor) -> torch.Tensor:
    """What DCP's loader hands torch.save: on the CPU, and owning exactly its bytes (torch.save
    writes a view's whole storage)."""
    tensor = tensor.detach().cpu()
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor


def write_tensor(stream: Any, tensor: torch.Tensor) -> None:
    """`torch.save(tensor, stream)`'s bytes, with the data written straight from the tensor's
    memory and no CRC32 computed over it (see the module doc)."""
    if not _plain(tensor):
        torch.save(tensor, stream)
        return
    around = _Around()
    with torch.serialization.skip_data():
        torch.save(tensor, cast(IO[bytes], around))
    nbytes = tensor.untyped_storage().nbytes()
    if around.holes != ([nbytes] if nbytes else []):  # not torch.save's layout as we know it
        torch.save(tensor, stream)
        return
    stream.write(around.parts[0])
    if nbytes:
        whole = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
        stream.write(whole.numpy().data)
        stream.write(around.parts[1])


def _plain(tensor: torch.Tensor) -> bool:
    return (
        type(tensor) is torch.Tensor
        and tensor.layout == torch.strided
        and tensor.device.type == "cpu"
        and not tensor.is_quantized
        and sys.byteorder == "little"
    )


class _Around:
    """Where torch.save writes under skip_data: it skips the data with a relative seek; the
    bytes before and after each skip are kept."""

    def __init__(self) -> None:
        self.parts: list[bytearray] = [bytearray()]
        self.holes: list[int] = []
        self._pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = memoryview(b).nbytes
        self.parts[-1] += b
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_CUR or offset < 0:
            raise io.UnsupportedOperation("only skipping forward")
        self.holes.append(offset)
        self.parts.append(bytearray())
        self._pos += offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass


class LazyTensors(Protocol):
    """Live tensors a background save reads until they are about to change (what
    `checkpoint/snapshot.LazyCopy` is): the writer says which of them this rank writes, takes
    each one as it writes it (the copy, if one was made meanwhile) and releases it after."""

    def expect(self, tensors: Iterable[torch.Tensor]) -> None: ...

    def take(self, t: torch.Tensor) -> torch.Tensor: ...

    def release(self) -> None: ...


class LazyPlanner(DefaultSavePlanner):
    """DCP's planner, handing the writer each tensor through a LazyTensors."""

    def __init__(self, lazy: LazyTensors) -> None:
        super().__init__()
        self.lazy = lazy

    def expect(self, items: list[WriteItem]) -> None:
        tensors = (super(LazyPlanner, self).lookup_object(item.index) for item in items
                   if item.type != WriteItemType.BYTE_IO)  # fmt: skip
        self.lazy.expect(t for t in tensors if isinstance(t, torch.Tensor))

    def lookup_object(self, index: MetadataIndex) -> Any:
        found = super().lookup_object(index)
        return self.lazy.take(found) if isinstance(found, torch.Tensor) else found
