"""`--report`: a table of every ingredient's validation/test score next to the soup's, and
`<out>/soup.png` (matplotlib, headless Agg): ingredient scores as points, the soup as a line.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

PNG = "soup.png"


def _score(scores: Mapping[str, float] | None, key: str) -> str:
    if not scores or key not in scores:
        return "-"
    return f"{scores[key]:.4f}"


def best_single(record: Mapping[str, Any], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [i for i in record["ingredients"] if metric in (i.get("scores") or {})]
    if not scored:
        return None
    sign = 1 if mode == "min" else -1
    return min(scored, key=lambda i: sign * i["scores"][metric])


def table(record: Mapping[str, Any], metric: str, mode: str) -> str:
    """Ingredient by ingredient, then the best single one and the soup."""
    test = "test/" + metric.split("/", 1)[-1]
    rows = [f"{'INGREDIENT':<40} {'IN':>3} {metric:>14} {test:>14}"]
    for ing in record["ingredients"]:
        label = f"step {ing['step']}" if ing.get("step") is not None else ing["path"]
        label = f"{label} ({ing['run'].rsplit('/', 1)[-1]})" if ing.get("run") else label
        s = ing.get("scores")
        rows.append(f"{label[-40:]:<40} {'*' if ing['in_soup'] else '':>3} "
                    f"{_score(s, metric):>14} {_score(s, test):>14}")  # fmt: skip
    best = best_single(record, metric, mode)
    if best is not None:
        rows.append(f"{'best single ingredient':<40} {'':>3} "
                    f"{_score(best['scores'], metric):>14} {_score(best['scores'], test):>14}")  # fmt: skip
    soup = record.get("soup_scores")
    rows.append(f"{'soup (' + record['recipe'] + ')':<40} {'':>3} "
                f"{_score(soup, metric):>14} {_score(soup, test):>14}")  # fmt: skip
    return "\n".join(rows)


def plot(record: Mapping[str, Any], metric: str) -> bytes:
    """The PNG bytes: one point per ingredient (by step, or by position), the soup as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ings = record["ingredients"]
    xs = [i["step"] if i.get("step") is not None else k for k, i in enumerate(ings)]
    for split, marker in (("eval", "o"), ("test", "s")):
        key = metric if split == "eval" else f"test/{metric.split('/', 1)[-1]}"
        pts = [(x, i["scores"][key]) for x, i in zip(xs, ings, strict=True)
               if key in (i.get("scores") or {})]  # fmt: skip
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, label=f"ingredients ({key})")
        soup = (record.get("soup_scores") or {}).get(key)
        if soup is not None:
            ax.axhline(soup, linestyle="--" if split == "test" else "-",
                       label=f"soup ({key})", color="C2" if split == "eval" else "C3")  # fmt: skip
    ax.set_xlabel("step" if any(i.get("step") is not None for i in ings) else "ingredient")
    ax.set_ylabel(metric.split("/", 1)[-1])
    ax.set_title(f"{record['recipe']} soup of {len(ings)} ingredients")
    return png_bytes(fig)


def png_bytes(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (legend small, layout tight), closing it."""
    import matplotlib.pyplot as plt

    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
