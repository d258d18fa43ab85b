"""The soup engine (issue 10): `stockpot soup RUN --last N --recipe uniform` over the committed
checkpoints of one CharLM run (d_model 1024: ~100 MB of weights in quick mode, ~250 MB with
FULL=1). Peak RSS above the interpreter at the soup's start (SOUP.json's `memory`) as a
fraction of one model's bytes, flat in N; throughput against a cold raw read of the same
N x model bytes, interleaved, median of the repeats. The soup's time includes checking every
byte it reads against the manifests and writing its output (fsynced).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from bench.common import PY, REPO, Row, Sizes, median, run_cli
from bench.disk import evict, files_under, raw_read

CONFIG = "bench/charlm.yaml"
D_MODEL = 1024


def _make_run(run_dir: Path, n_layers: int, n: int) -> None:
    if (run_dir / "checkpoints").is_dir() and len(list((run_dir / "checkpoints").iterdir())) >= n:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    run_cli(["run", CONFIG, f"run.dir={run_dir}", f"task.d_model={D_MODEL}",
             f"task.n_layers={n_layers}", f"trainer.max_steps={n}", "trainer.batch_size=2",
             "checkpoint.every_steps=1", "checkpoint.keep_last=null",
             "checkpoint.keep_weights_every_steps=null"])  # fmt: skip


def _soup(run_dir: Path, n: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    evict(files_under(run_dir / "checkpoints"))
    run_cli(["soup", str(run_dir), "--last", str(n), "--recipe", "uniform", "--out", str(out)])
    return json.loads(next(out.rglob("SOUP.json")).read_text())


# What users write by hand: DCP loads each checkpoint whole (optimizer included), all N are
# held, the model tensors are stacked and averaged in float32 (mergekit's way), then saved.
_NAIVE = """
import json, os, resource, sys, time
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
out, paths = sys.argv[1], sys.argv[2:]
start, t0 = rss(), time.perf_counter()
states = [_load_state_dict_from_keys(checkpoint_id=p) for p in paths]
keys = [k for k, v in states[0].items() if k.startswith("train.model.") and torch.is_tensor(v)]
soup = {k[len("train.model."):]: torch.stack([s[k] for s in states]).float().mean(0)
        for k in keys}
save_file(soup, out)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_above": peak - start}))
"""


def _naive(run_dir: Path, n: int, out: Path) -> dict:
    ckpts = sorted((run_dir / "checkpoints").iterdir())[-n:]
    evict(files_under(run_dir / "checkpoints"))
    done = subprocess.run([PY, "-c", _NAIVE, str(out), *map(str, ckpts)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=True)  # fmt: skip
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


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


def _limits(recs: list[dict]) -> str:
    """Medians of where one N's mixing time went (SOUP.json's `reading`)."""

    def share(key: str) -> float:
        return median([r["reading"][key] / r["reading"]["mix_s"] for r in recs])

    outside = median([r["timings"]["total_s"] - r["reading"]["mix_s"] for r in recs])
    return (f"waits for reads {share('read_wait_s'):.0%}, for the writer "
            f"{share('write_wait_s'):.0%}, {share('cpu_s'):.1f} cores busy, "
            f"{outside:.2f} s outside the mix")  # fmt: skip


def measure(sizes: Sizes, work: Path, counts: tuple[int, ...]) -> list[Row]:
    run_dir = work / f"soup-run-{sizes.soup_layers}"
    _make_run(run_dir, sizes.soup_layers, max(counts))
    recs: dict[int, list[dict]] = {n: [] for n in counts}
    raws: dict[int, list[float]] = {n: [] for n in counts}
    naives: dict[int, dict] = {}
    loads = []
    for r in range(sizes.repeats + 2):  # soups are cheap; the disk swings between minutes
        for n in counts:  # the counts interleaved, and the soup and its raw read alternate
            loads.append(os.getloadavg()[0])
            if r % 2 == 0:
                recs[n].append(_soup(run_dir, n, work / f"soup-out-{n}"))
            raws[n].append(_raw_model_read(work, recs[n][0]["nbytes"], n))
            if r % 2 == 1:
                recs[n].append(_soup(run_dir, n, work / f"soup-out-{n}"))
            if r == 0:  # a report-only comparison: once is enough
                naives[n] = _naive(run_dir, n, work / "soup-naive.safetensors")
    model = recs[counts[0]][0]["nbytes"]
    peaks, rss, naive, ratios, spread = {}, {}, {}, {}, {}
    for n in counts:
        above = [r["memory"]["peak_rss_bytes"] - r["memory"]["rss_at_start_bytes"] for r in recs[n]]
        peaks[n] = median(above) / model
        rss[n] = median([r["memory"]["peak_rss_bytes"] for r in recs[n]])
        each = [raw / r["timings"]["total_s"] for raw, r in zip(raws[n], recs[n], strict=True)]
        ratios[n], spread[n] = median(each), f"{min(each):.2f}-{max(each):.2f}"
        soup_s = median([r["timings"]["total_s"] for r in recs[n]])
        naive[n] = (naives[n]["seconds"] / soup_s, naives[n]["peak_above"] / max(1, median(above)))
    lo, hi = counts[0], counts[-1]
    flat = abs(rss[hi] - rss[lo]) / rss[lo]
    mb = f"model {model / 1e6:.0f} MB"
    runs = len(recs[lo])
    return [
        Row("soup peak RSS above start / one model's bytes",
            ", ".join(f"N={n}: {p:.3f}" for n, p in peaks.items()),
            "<= 0.1, flat in N (peak RSS within 5%)", max(peaks.values()) <= 0.1 and flat < 0.05,
            note=f"{mb}; peak RSS N={hi} vs N={lo}: {flat:+.1%}"),
        Row("soup throughput / raw read of N x model bytes",
            ", ".join(f"N={n}: {v:.2f}" for n, v in ratios.items()), ">= 0.8",
            min(ratios.values()) >= 0.8,
            note=f"{mb}; median of {runs} interleaved pairs (range "
                 f"{', '.join(f'N={n}: {s}' for n, s in spread.items())}); soup time includes "
                 "checksums of what it reads and the fsynced output"),
        Row("soup: where the mix's time goes (medians)",
            "; ".join(f"N={n}: {_limits(recs[n])}" for n in counts), "report", None,
            note="cores busy = CPU s of all threads / mix s; little waiting with well under 2 "
                 "cores busy: runnable threads not running (other load); load average (1 min) "
                 f"during the soups {median(loads):.1f}"),
        Row("naive load-all-and-average (DCP, stacked) / soup: time, peak RSS above start",
            ", ".join(f"N={n}: {t:.1f}x, {m:.0f}x" for n, (t, m) in naive.items()),
            "report", None, note="the naive script holds N whole checkpoints"),
    ]  # fmt: skip
