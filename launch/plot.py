"""`stockpot plot RUN... [--out curves.png]`: loss and eval metrics against step, one line per
run (several runs, or every run of a sweep dir, on one figure), with a vertical mark at each
restart (where a life resumed) and each commit.

Read from metrics.jsonl only, the last line per step (what a resumed run re-trained replaces
what its earlier life logged), so a plot of a resumed run shows each step once. matplotlib runs
headless (Agg): no display needed on a login node. `load_series` and `draw` are the API other
commands (the soup report) reuse.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.errors import UsageError

if TYPE_CHECKING:
    from orchestrator.storage import Store

DEFAULT_OUT = "curves.png"
RESTART_STYLE = {"color": "tab:red", "linestyle": "--", "linewidth": 1.5}
COMMIT_STYLE = {"color": "0.6", "linestyle": ":", "linewidth": 0.8}


@dataclass
class Series:
    """One run's curves: {metric: {step: value}} and its event steps."""

    name: str
    curves: dict[str, dict[int, float]] = field(default_factory=dict)
    restarts: list[int] = field(default_factory=list)
    commits: list[int] = field(default_factory=list)


def series_from_records(name: str, records: list[dict[str, Any]]) -> Series:
    """The last value per step of `loss` and every `eval/*` key, and the restart/commit steps."""
    out = Series(name)
    for rec in records:
        event = rec.get("event")
        if event == "resumed":
            out.restarts.append(int(rec["step"]))
        elif event == "commit":
            out.commits.append(int(rec["step"]))
        for key, value in rec.items():
            if (key == "loss" or key.startswith("eval/")) and isinstance(value, int | float):
                out.curves.setdefault(key, {})[int(rec["step"])] = float(value)
    out.commits = sorted(set(out.commits))
    return out


def load_series(store: Store, name: str | None = None) -> list[Series]:
    """The runs under `store`: itself when it has metrics.jsonl, else each child run dir that
    has one (a sweep dir); UsageError when there is none."""
    from orchestrator.metrics import METRICS_NAME, read_metrics

    if store.exists(METRICS_NAME):
        return [series_from_records(name or _name(store), read_metrics(store))]
    children = [store.child(c.rstrip("/").rsplit("/", 1)[-1]) for c in store.list("")]
    found = [c for c in children if c.exists(METRICS_NAME)]
    if not found:
        raise UsageError(
            f"{store.path()} has no {METRICS_NAME} (nor has any run dir in it): nothing to plot"
        )
    return [
        series_from_records(f"{name or _name(store)}/{_name(c)}", read_metrics(c)) for c in found
    ]


def _name(store: Store) -> str:
    return store.path().rstrip("/").rsplit("/", 1)[-1]


def draw(series: list[Series], out_path: str, title: str = "") -> list[str]:
    """One panel per metric (loss first), every run on each; returns the metrics drawn."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a login node or in CI
    import matplotlib.pyplot as plt

    metrics = sorted({k for s in series for k in s.curves}, key=lambda k: (k != "loss", k))
    fig, axes = plt.subplots(
        len(metrics), 1, figsize=(8, 2.6 * len(metrics) + 0.6), sharex=True, squeeze=False
    )
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        for s in series:
            _draw_one(ax, s, metric, label=len(series) > 1 or metric == metrics[0])
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return metrics


def _draw_one(ax: Any, s: Series, metric: str, *, label: bool) -> None:
    points = sorted(s.curves.get(metric, {}).items())
    if points:
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="." if len(points) < 30 else None, label=s.name)
    for i, step in enumerate(s.commits):
        ax.axvline(step, **COMMIT_STYLE, label="commit" if label and i == 0 else None)
    for i, step in enumerate(s.restarts):
        ax.axvline(step, **RESTART_STYLE, label="restart" if label and i == 0 else None)


def add_parser(sub: Any) -> None:
    plot = sub.add_parser("plot", help="loss and eval curves of runs, restarts and commits marked")
    plot.add_argument(
        "runs", nargs="+", metavar="RUN", help="run dirs or sweep dirs (local or s3://)"
    )
    plot.add_argument("--out", default=DEFAULT_OUT, help=f"output PNG (default {DEFAULT_OUT})")
    plot.add_argument("--title", default="", help="figure title")
    plot.set_defaults(handler=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from orchestrator.storage import Store

    if not args.out.endswith(".png"):
        raise UsageError(f"--out must name a .png file (got {args.out!r})")
    series = [s for url in args.runs for s in load_series(Store(url))]
    metrics = draw(series, args.out, args.title)
    restarts = sum(len(s.restarts) for s in series)
    print(
        f"wrote {args.out}: {len(series)} run(s), {', '.join(metrics)}; "
        f"{restarts} restart(s) marked"
    )
    return 0
