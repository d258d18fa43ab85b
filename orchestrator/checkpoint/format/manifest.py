"""MANIFEST.json: the commit record of a checkpoint, its schema, checksums and confinement.

A checkpoint is committed if and only if its MANIFEST.json exists and parses. The manifest lists
every file of the checkpoint with its size and xxh3-128 checksum, computed while the file was
written (never by re-reading it on the save path). Paths are relative, posix, and must stay
inside the checkpoint: a manifest naming `../x` or `/etc/x` is corrupt and nothing it names is
read or deleted.
"""

from __future__ import annotations

import json
import platform
import posixpath
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

from orchestrator.checkpoint.format.layout import MANIFEST_NAME
from orchestrator.errors import CheckpointCorrupt, require

FORMAT = "stockpot.checkpoint"
VERSION = 1
# A weights-only manifest (optimizer state dropped by retention) is version 2, so a reader that
# predates it skips it as unsupported instead of trying to resume from it.
WEIGHTS_ONLY_VERSION = 2
CHECKSUM_ALGORITHM = "xxh3_128"


@dataclass(frozen=True)
class FileEntry:
    size: int
    checksum: str


@dataclass(frozen=True)
class Manifest:
    step: int
    files: Mapping[str, FileEntry]
    world_size: int
    parallel: str = ""
    config_hash: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    versions: Mapping[str, str] = field(default_factory=lambda: library_versions())
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    # Sub-directory holding the data ("" = the checkpoint dir itself). On S3 each save attempt
    # writes under its own nonce, so a racing or crashed writer can never mix files with it.
    data_dir: str = ""
    # True once retention dropped the optimizer part: model weights only; resume never uses it.
    weights_only: bool = False

    def data_path(self, name: str) -> str:
        """Path of a data file (as DCP names it) relative to the checkpoint directory."""
        return f"{self.data_dir}/{name}" if self.data_dir else name

    def data_files(self) -> dict[str, FileEntry]:
        """The data files by the names DCP uses (relative to the data dir): `data_path`'s
        inverse over `files`."""
        prefix = f"{self.data_dir}/" if self.data_dir else ""
        return {n[len(prefix) :]: e for n, e in self.files.items() if n.startswith(prefix)}

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def to_json(self) -> bytes:
        version = WEIGHTS_ONLY_VERSION if self.weights_only else VERSION
        body = {"format": FORMAT, "version": version, **asdict(self)}
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str = MANIFEST_NAME) -> Manifest:
        """Parse and check a manifest; CheckpointCorrupt (naming `where`) if it is not one."""
        try:
            body = json.loads(raw)
            require(body.get("format") == FORMAT, "not a stockpot manifest", CheckpointCorrupt)
            require(
                body.get("version") in (VERSION, WEIGHTS_ONLY_VERSION),
                f"unsupported version {body.get('version')!r}",
                CheckpointCorrupt,
            )
            files = {
                name: FileEntry(int(e["size"]), str(e["checksum"]))
                for name, e in body["files"].items()
            }
            for name in files:
                check_confined(name)
            manifest = cls(
                step=int(body["step"]),
                files=files,
                world_size=int(body["world_size"]),
                parallel=str(body.get("parallel", "")),
                config_hash=str(body.get("config_hash", "")),
                metrics={str(k): float(v) for k, v in body.get("metrics", {}).items()},
                timings={str(k): float(v) for k, v in body.get("timings", {}).items()},
                created_at=float(body.get("created_at", 0.0)),
                versions=dict(body.get("versions", {})),
                checksum_algorithm=str(body.get("checksum_algorithm", "")),
                data_dir=str(body.get("data_dir", "")),
                weights_only=body.get("weights_only", False) is True,
            )
            if manifest.data_dir:
                check_confined(manifest.data_dir)
            require(
                manifest.checksum_algorithm == CHECKSUM_ALGORITHM,
                "unknown checksum algorithm",
                CheckpointCorrupt,
            )
        except CheckpointCorrupt as exc:
            raise CheckpointCorrupt(f"{where}: {exc}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointCorrupt(
                f"{where}: unreadable manifest ({type(exc).__name__}: {exc})"
            ) from None
        return manifest


def check_confined(name: str) -> str:
    """`name` if it is a plain relative path inside the checkpoint, else CheckpointCorrupt."""
    normal = posixpath.normpath(name)
    require(
        bool(name)
        and not name.startswith("/")
        and "\\" not in name
        and ":" not in name
        and normal == name
        and normal != "."
        and not normal.startswith(".."),
        f"file name {name!r} escapes the checkpoint",
        CheckpointCorrupt,
    )
    return name


def library_versions() -> dict[str, str]:
    import torch

    from orchestrator import __version__

    return {
        "stockpot": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


class Hasher:
    """Size and xxh3-128 of a byte stream, fed as it is written."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()
        self.size = 0

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        self._h.update(view)
        self.size += view.nbytes

    def entry(self) -> FileEntry:
        return FileEntry(self.size, self._h.hexdigest())


def hash_bytes(data: bytes) -> FileEntry:
    h = Hasher()
    h.update(data)
    return h.entry()


def hash_stream(stream: Any, chunk: int = 8 << 20) -> FileEntry:
    """Size and checksum of a readable binary stream (verification reads; saving never does)."""
    h = Hasher()
    while block := stream.read(chunk):
        h.update(block)
    return h.entry()


class HashingReader:
    """A binary stream read in order, every byte hashed: a forward seek reads (and hashes) the
    bytes it skips and `finish` reads the rest, so a load that reads a file verifies it in the
    same pass (dcp_io's Tap). A backward seek gives the hash up (`finish` is then None)."""

    def __init__(self, stream: Any, chunk: int = 8 << 20) -> None:
        self._stream, self._chunk = stream, chunk
        self._hasher, self._pos, self._whole = Hasher(), 0, True

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._stream.read(n)
        self._took(data)
        return data

    def readinto(self, buf: Any) -> int:
        got = self._stream.readinto(buf) or 0
        self._took(memoryview(buf).cast("B")[:got])
        return got

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or offset < self._pos:
            self._whole = False
            self._pos = self._stream.seek(offset, whence)
            return self._pos
        while self._pos < offset and self.read(min(offset - self._pos, self._chunk)):
            pass
        return self._pos

    def tell(self) -> int:
        return self._pos

    def finish(self) -> FileEntry | None:
        """Size and checksum of the whole stream (read to its end), or None if not read in order."""
        if not self._whole:
            return None
        while self.read(self._chunk):
            pass
        return self._hasher.entry()

    def _took(self, data: Any) -> None:
        if self._whole:
            self._hasher.update(data)
        self._pos += len(data)
