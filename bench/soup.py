"""The soup engine (issue 10): `stockpot soup RUN --recipe uniform` over N checkpoints of a
CharLM run. Peak RSS above the interpreter at start (SOUP.json's `memory`) as a fraction of one
model's bytes, flat in N; throughput against a cold raw read of the same N x model bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.common import Row, Sizes, median, run_cli
from bench.disk import evict, files_under, raw_read

CONFIG = "bench/charlm.yaml"


def _make_run(run_dir: Path, d_model: int, n_layers: int, n: int) -> None:
    run_cli(["run", CONFIG, f"run.dir={run_dir}", f"task.d_model={d_model}",
             f"task.n_layers={n_layers}", f"trainer.max_steps={n}", "trainer.batch_size=2",
             "checkpoint.every_steps=1", "checkpoint.keep_last=null",
             "checkpoint.keep_weights_every_steps=null"])  # fmt: skip


def _soup(run_dir: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    evict(files_under(run_dir / "checkpoints"))
    run_cli(["soup", str(run_dir), "--recipe", "uniform", "--out", str(out)])
    return json.loads(next(out.rglob("SOUP.json")).read_text())


def _raw_model_read(work: Path, model_bytes: int, n: int) -> float:
    """Cold read of n files of one model's bytes each: the bytes a soup must read."""
    paths = []
    for i in range(n):
        path = work / f"soup-raw-{i}.bin"
        if not path.exists() or path.stat().st_size != model_bytes:
            with open(path, "wb") as f:
                f.write(bytes(model_bytes))
        paths.append(path)
    evict(paths)
    return raw_read(paths)


def measure(sizes: Sizes, work: Path, counts: tuple[int, ...]) -> list[Row]:
    d_model, n_layers = sizes.d_model, max(1, sizes.n_layers // 2)
    peaks, ratios = {}, []
    for n in counts:
        run_dir = work / f"soup-run-{n}"
        _make_run(run_dir, d_model, n_layers, n)
        recs, raws = [], []
        for _ in range(max(1, sizes.repeats - 1)):
            recs.append(_soup(run_dir, work / f"soup-out-{n}"))
            raws.append(_raw_model_read(work, recs[-1]["nbytes"], n))
        model = recs[0]["nbytes"]
        peaks[n] = median([(r["memory"]["peak_rss_bytes"] - r["memory"]["rss_at_start_bytes"])
                           / model for r in recs])  # fmt: skip
        ratios.append(
            (n, median([raw / r["timings"]["total_s"] for raw, r in zip(raws, recs, strict=True)]))
        )
    flat = abs(peaks[counts[-1]] - peaks[counts[0]]) / max(peaks[counts[0]], 1e-9)
    mb = f"model {model / 1e6:.0f} MB"
    return [
        Row("soup peak RSS above start / one model's bytes",
            ", ".join(f"N={n}: {p:.2f}" for n, p in peaks.items()), "<= 0.1, flat in N (< 5%)",
            max(peaks.values()) <= 0.1 and flat < 0.05, note=f"{mb}; N spread {flat:.0%}"),
        Row("soup throughput / raw read of N x model bytes",
            ", ".join(f"N={n}: {v:.2f}" for n, v in ratios), ">= 0.8",
            min(v for _, v in ratios) >= 0.8, note=f"{mb}; soup time includes checksum verification"),
    ]  # fmt: skip
