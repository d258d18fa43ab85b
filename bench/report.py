"""The bench's outputs: a markdown table, bench/results.json (rows plus machine, date and
commit), a PNG chart (save throughput vs raw write; stall sync vs async vs raw write time), and,
on request, the README's Performance block regenerated from them (never typed by hand).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, Row

README_BEGIN = "<!-- bench:begin (written by `make bench README=1`; do not edit) -->"
README_END = "<!-- bench:end -->"


def machine(work: Path) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())  # fmt: skip
    mem = next(
        (line.split()[1] for line in _lines("/proc/meminfo") if line.startswith("MemTotal")), "?"
    )
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gb": round(int(mem) / 1e6, 1) if mem != "?" else None,
            "python": platform.python_version(), "torch": importlib.metadata.version("torch"),
            "disk": _filesystem(work), "load_average": os.getloadavg()}  # fmt: skip


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _filesystem(path: Path) -> str:
    out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout.split("\n")
    fields = out[1].split() if len(out) > 1 else []
    return f"{fields[0]} ({fields[1]})" if len(fields) > 1 else "?"


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _cell(value: Any) -> str:
    if value is None:
        return "not measured"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _met(row: Row) -> str:
    return {True: "yes", False: "**MISSED**", None: "-"}[row.met]


def table(rows: list[Row]) -> str:
    lines = ["| figure | value | goal | met | note |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.figure} | {_cell(r.value)} | {r.goal} | {_met(r)} | {r.note} |")
    return "\n".join(lines)


def write_json(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    body = {**meta, "rows": [r.to_json() for r in rows]}
    path.write_text(json.dumps(body, indent=2) + "\n")


def chart(path: Path, details: dict[str, Any]) -> bool:
    """Save throughput and stall beside the raw write; False if no save figures were taken."""
    save = details.get("save")
    if not save:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = ["raw write", "stockpot sync", "torch.save", "dcp.save", "stockpot async\n(background)"]
    speeds = [save["raw_gbps"], save["stockpot_gbps"], save["torch_gbps"], save["dcp_gbps"],
              save.get("background_gbps", 0.0)]  # fmt: skip
    left.bar(names, speeds, color=["#777", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"])
    left.set_ylabel("GB/s (fsync'd, same disk, same run)")
    left.set_title(f"save throughput, {save['mb']:.0f} MB, 2 ranks")
    left.tick_params(axis="x", labelsize=7)
    stalls = ["raw write time", "sync save blocks", "async save stalls"]
    secs = [save["raw_s"], save["stockpot_s"], save.get("stall_s", 0.0)]
    right.bar(stalls, secs, color=["#777", "#1f77b4", "#9467bd"])
    right.set_ylabel("seconds training waits")
    right.set_title("training stall per checkpoint")
    right.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def update_readme(readme: Path, rows: list[Row], meta: dict[str, Any], png: str | None) -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: no bench block ({README_BEGIN} ... {README_END})")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    m = meta["machine"]
    when = time.strftime("%Y-%m-%d", time.gmtime(meta["unix_time"]))
    block = [README_BEGIN, "",
             f"`make bench{' FULL=1' if meta['mode'] == 'full' else ''}` on {when}, commit "
             f"{meta['commit']}: {m['cpus']} CPUs ({m['cpu']}), no GPU, {m['disk']}, torch "
             f"{m['torch']}; load average at start {m['load_average'][0]:.1f}.", "", table(rows), ""]  # fmt: skip
    if png:
        block += [f"![save throughput and stall]({png})", ""]
    readme.write_text(head + "\n".join([*block, README_END]) + tail)
