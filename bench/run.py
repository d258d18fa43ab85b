"""`make bench`: every speed figure as a ratio against a baseline measured in the same run.

    python -m bench.run                      # quick: ~300 MB of state, 3 repeats
    python -m bench.run --full               # ~1 GB of state, 5 repeats
    python -m bench.run --d-model 768 --n-layers 6 --repeats 4 --only save,load
    python -m bench.run --readme             # also rewrite README.md's Performance block

Sections (bench/<name>.py): save (sync vs raw write, torch.save, dcp.save; async stall, step
time and background throughput), load (restore vs raw read; resume start-up), s3 (moto_server:
throughput vs put_file; requests per save and restore), tiers (a local tier vs S3 through a
capped link: save stall, restore), loop (overhead vs a bare loop), soup.
Writes bench/results.json, bench/results.md and bench/results.png. A section that fails
becomes a "not measured" row saying why; the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import load, loop, report, restart, s3, save, soup, tiers
from bench.common import REPO, Row, Sizes

SECTIONS = ("save", "load", "s3", "tiers", "loop", "soup")
# What each section measures, for its "not measured" row.
FIGURES = {
    "save": "sync/async save against the raw write",
    "load": "restore and resume against the raw read",
    "s3": "S3 throughput and request counts",
    "tiers": "tiered checkpoints: save and restore, local tier vs S3",
    "loop": "loop overhead against a bare loop",
    "soup": "soup engine peak RSS and throughput",
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="~1 GB of training state, 5 repeats")
    p.add_argument("--d-model", type=int, help="CharLM width of the saved state")
    p.add_argument("--n-layers", type=int, help="CharLM depth of the saved state")
    p.add_argument("--repeats", type=int, help="interleaved repeats per figure (median)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    p.add_argument("--dir", help="scratch dir on the disk to measure (default: the temp dir)")
    p.add_argument("--out", default=str(REPO / "bench"), help="where results.* are written")
    p.add_argument("--readme", action="store_true", help="rewrite README.md's bench block")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    base = Sizes.full() if args.full else Sizes.quick()
    given = {"d_model": args.d_model, "n_layers": args.n_layers, "repeats": args.repeats,
             "launch_repeats": args.repeats}  # fmt: skip
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def sections(
    sizes: Sizes, work: Path, details: dict[str, Any], full: bool
) -> dict[str, Callable[[], list[Row]]]:
    return {
        "save": lambda: save.measure(sizes, work, details),
        "load": lambda: load.measure(sizes, work) + restart.restart_rows(sizes, work),
        "s3": lambda: s3.measure(sizes, work),
        "tiers": lambda: tiers.measure(sizes, work),
        "loop": lambda: loop.measure(sizes),
        "soup": lambda: soup.measure(sizes, work, (2, 4, 8) if full else (2, 4)),
    }  # fmt: skip


def main(argv: list[str]) -> int:
    args = parse(argv)
    sizes = sizes_from(args)
    work = Path(tempfile.mkdtemp(prefix="stockpot-bench-", dir=args.dir))
    details: dict[str, Any] = {}
    started = time.time()
    meta: dict[str, Any] = {"mode": "full" if args.full else "quick", "sizes": dataclasses.asdict(sizes),
            "commit": report.commit(), "unix_time": started,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": report.machine(work)}  # fmt: skip
    rows: list[Row] = []
    try:
        for name, measure in sections(sizes, work, details, args.full).items():
            if name not in args.only.split(","):
                continue
            t0 = time.perf_counter()
            print(f"== {name} ...", file=sys.stderr, flush=True)
            try:
                got = measure()
            except Exception as exc:  # one broken section must not hide the others' figures
                traceback.print_exc()
                got = [Row(FIGURES[name], None, "-", False, note=f"failed: {str(exc)[:200]}")]
            rows += got
            print(report.table(got).split("\n", 2)[2], file=sys.stderr)
            print(f"   {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta["seconds"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.json", rows, meta)
    (out / "results.md").write_text(report.table(rows) + "\n")
    png = report.chart(out / "results.png", details)
    print(report.table(rows))
    if args.readme:
        report.update_readme(REPO / "README.md", rows, meta, "bench/results.png" if png else None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
