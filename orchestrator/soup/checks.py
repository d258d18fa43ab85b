"""Checksums of the ingredients' files from the bytes the soup reads anyway: no second pass.

The manifest records one xxh3-128 per file, so a file can be checked in one pass only if its
bytes are hashed in order. The read plan visits each ingredient's files in storage order when
the ingredients were saved alike (the output follows the first ingredient's storage order):
then the mixer feeds every read here as it consumes it, the few bytes no read covers (DCP's
non-tensor entries, a file's tail) are read on the spot, and the file is checked at `finish`.
A file the plan visits out of order is left to `provenance.Integrity`'s separate pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from orchestrator.checkpoint.format import Hasher
from orchestrator.soup.reader import Source
from orchestrator.soup.segments import Read

GAP_READ = 8 << 20  # bytes per read while hashing what the plan skips


@dataclass
class _File:
    size: int
    checksum: str
    at: int = 0  # bytes hashed so far
    hasher: Hasher = field(default_factory=Hasher)


class StreamCheck:
    """Hashes, in order, every file of `sources` that `reads` visit in storage order."""

    def __init__(self, sources: Sequence[Source], reads: Sequence[Read], enabled: bool) -> None:
        self.sources = list(sources)
        self.files: dict[tuple[int, str], _File] = {}
        if not enabled:
            return
        visits: dict[tuple[int, str], list[Read]] = {}
        for r in reads:
            visits.setdefault((r.source, r.file), []).append(r)
        for (i, name), rs in visits.items():
            manifest = self.sources[i].manifest
            entry = manifest.files.get(name) if manifest is not None else None
            ordered = all(a.end <= b.start for a, b in itertools.pairwise(rs))
            xxh3 = manifest is not None and manifest.checksum_algorithm == "xxh3_128"
            if entry is not None and xxh3 and ordered and rs[-1].end <= entry.size:
                self.files[(i, name)] = _File(entry.size, entry.checksum)

    def feed(self, read: Read, data: memoryview) -> None:
        f = self.files.get((read.source, read.file))
        if f is None:
            return
        self._hash_up_to(read.source, read.file, f, read.start)
        f.hasher.update(data)
        f.at = read.end

    def _hash_up_to(self, i: int, name: str, f: _File, end: int) -> None:
        while f.at < end:
            stop = min(end, f.at + GAP_READ)
            f.hasher.update(self.sources[i].read_range(name, f.at, stop))
            f.at = stop

    def finish(self) -> dict[tuple[int, str], str | None]:
        """(source id, file) -> None if the file's checksum matched, else the problem."""
        found: dict[tuple[int, str], str | None] = {}
        for (i, name), f in self.files.items():
            source = self.sources[i]
            self._hash_up_to(i, name, f, f.size)
            ok = f.hasher.entry().checksum == f.checksum
            problem = None if ok else f"{source.store.path(name)}: checksum mismatch (xxh3_128)"
            found[(id(source), name)] = problem
        return found
