"""The physical baselines: what a plain write loop and a plain read loop get from this disk.

`raw_write` writes the tensors' own memory to one file and fsyncs it: no serialization, no
checksums, one sequential stream, the limit a checkpoint writer can approach. `raw_read` reads
files sequentially into one reused buffer. Reads are cold: `evict` drops the files' pages from
the page cache with posix_fadvise(DONTNEED) (their pages are clean after fsync), which needs no
root and leaves every other process's cache alone, unlike `echo 3 > /proc/sys/vm/drop_caches`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the ranks import torch; make bench's own process only reads files
    import torch


def tensors(state: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested state dict, in a stable order."""
    import torch

    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for key in sorted(state, key=str):
            yield from tensors(state[key])
    elif isinstance(state, list | tuple):
        for item in state:
            yield from tensors(item)


def nbytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(state))


def _raw_bytes(t: torch.Tensor) -> memoryview:
    # The tensor's memory as bytes, whatever its dtype (numpy has no bfloat16).
    import torch

    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def raw_write(path: Path, state: Any) -> float:
    """Seconds to write every tensor of `state` to `path` in one stream, fsync'd."""
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for t in tensors(state):
            if t.numel():
                f.write(_raw_bytes(t))
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def evict(paths: Iterable[Path]) -> None:
    """Drop these files' (clean) pages from the page cache, so the next read comes from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # a dirty page cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths: list[Path]) -> float:
    """Seconds to read `paths` sequentially into one reused buffer (`evict` them first)."""
    buf = bytearray(max((p.stat().st_size for p in paths), default=0))
    view = memoryview(buf)
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            got = 0
            while got < size:
                n = f.readinto(view[got:size])
                if not n:
                    break
                got += n
    return time.perf_counter() - t0
