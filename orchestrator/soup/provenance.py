"""What a soup records about itself: the integrity of its ingredients (checked while the soup
is made, before anything is committed), SOUP.json's body, and the memory figures.
"""

from __future__ import annotations

import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from orchestrator.errors import CheckpointCorrupt
from orchestrator.soup import writer
from orchestrator.soup.reader import verify

if TYPE_CHECKING:
    from orchestrator.soup.kitchen import Kitchen, Mixture
    from orchestrator.soup.reader import Source


class Integrity:
    """Every file a soup reads, checked against its ingredient's manifest before the commit.

    The mixer hashes the files it reads in storage order as it reads them (`streamed`, see
    checks.py); `check()` then compares sizes, and reads and hashes only the rest (`.metadata`,
    files read out of order, ingredients of recipes that load states whole), in parallel."""

    def __init__(self, kitchen: Kitchen) -> None:
        self.kitchen = kitchen
        self.checksums = kitchen.cfg.verify == "checksums"
        self.streamed: dict[tuple[int, str], str | None] = {}  # (id(source), file) -> problem

    def _problems(self, source: Source) -> list[str]:
        done = {f: p for (sid, f), p in self.streamed.items() if sid == id(source)}
        rest = [f for f in source.model_files() if f not in done]
        found = verify(source, False, sorted(done)) if done else []
        found += [p for p in done.values() if p is not None]
        return found + (verify(source, self.checksums, rest) if rest else [])

    def check(self) -> None:
        """CheckpointCorrupt naming the first bad ingredient and its file."""
        t0 = time.perf_counter()
        sources = self.kitchen.sources
        workers = min(max(1, self.kitchen.cfg.read_workers), len(sources))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="soup-verify") as pool:
            found = list(pool.map(self._problems, sources))
        for ing, problems in zip(self.kitchen.ingredients, found, strict=True):
            if problems:
                raise CheckpointCorrupt(
                    f"ingredient {ing.label} ({ing.url}) is corrupt: {problems[0]}; "
                    "refusing to soup"
                )
        self.kitchen.timings.setdefault("verify_s", time.perf_counter() - t0)


def record(kitchen: Kitchen, mixture: Mixture, written: writer.Written, info: dict[str, Any],
            related: dict[str, Any], data_dir: str) -> dict[str, Any]:  # fmt: skip
    from orchestrator.checkpoint.format import library_versions

    cfg = kitchen.cfg
    chosen = {id(s) for s in mixture.sources}
    weights = _weights(mixture)
    ingredients = []
    for k, (ing, src) in enumerate(zip(kitchen.ingredients, kitchen.sources, strict=True)):
        entry: dict[str, Any] = {
            "path": ing.url, "kind": ing.kind, "step": ing.step, "run": ing.run,
            "manifest_checksum": ing.manifest_checksum, "why": ing.why,
            "metrics": dict(ing.metrics), "in_soup": id(src) in chosen,
        }  # fmt: skip
        if id(src) in weights:
            entry["weight"] = weights[id(src)]
        if mixture.ingredient_scores:
            entry["scores"] = mixture.ingredient_scores[k]
        ingredients.append(entry)
    files = {(f"{data_dir}/{n}" if data_dir else n): asdict(e) for n, e in written.files.items()}
    params = {k: v for k, v in asdict(cfg).items() if k not in ("enabled",)}
    return {
        "recipe": cfg.recipe,
        "params": params,
        "details": mixture.details,
        "ingredients": ingredients,
        "related_check": related,
        "tied": {k: v for k, v in info.get("ties", {}).items()},
        "reading": {k: v for k, v in info.items() if k not in ("cosine", "ties")},
        "shards": written.shards,
        "index": writer.INDEX if len(written.shards) > 1 else None,
        "data_dir": data_dir,
        "files": files,
        "nbytes": written.nbytes,
        "versions": library_versions(),
        "created_at": time.time(),
        "command": sys.argv,
    }


def _weights(mixture: Mixture) -> dict[int, float]:
    """id(source) -> its weight in the mean (none for a state mixed per layer)."""
    if mixture.weights is not None:
        return {id(s): w for s, w in zip(mixture.sources, mixture.weights, strict=True)}
    if mixture.state is not None:
        return {}
    return {id(s): 1.0 / len(mixture.sources) for s in mixture.sources}


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def reset_peak_rss() -> None:
    """Start the RSS high-water mark afresh from the RSS now (Linux: writing 5 to
    /proc/self/clear_refs resets VmHWM), so a peak read later is the peak since this call,
    not a transient of what ran before (opening and checking the ingredients); no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark (since `reset_peak_rss`). VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    fork and exec, so a soup started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
