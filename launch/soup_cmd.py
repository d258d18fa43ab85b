"""`stockpot soup SOURCE... --recipe R --out DIR [options] [key=value ...]`.

Every option is a `soup.*` config field (orchestrator/config/schema.py, SoupConfig); the
command line is turned into `soup.<field>=<value>` overrides on top of `--config FILE` (or the
defaults) and `key=value` overrides, so the CLI and the chained job's `soup:` section mean the
same thing and are validated by one schema. Heavy modules load only when the command runs.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from orchestrator.soup.schedules import RULES  # pure (no torch): the rules --help lists

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # key=value; a path has a / or : before its =

# flag -> (soup field, how the value is written into the override)
_FLAGS: dict[str, tuple[str, str]] = {
    "recipe": ("recipe", "raw"), "name": ("name", "str"), "out": ("out", "str"),
    "weights": ("weights", "list"), "steps": ("steps", "str"), "every": ("every", "raw"),
    "last": ("last", "raw"), "top": ("top", "raw"), "metric": ("metric", "str"),
    "mode": ("mode", "raw"), "improved_any": ("improved_any", "strlist"),
    "per_layer": ("per_layer", "flag"), "epochs": ("learned_epochs", "raw"),
    "lr": ("learned_lr", "raw"), "max_memory": ("max_memory_gb", "raw"),
    "recompute_bn": ("recompute_bn", "flag"), "allow_unrelated": ("allow_unrelated", "flag"),
    "report": ("report", "flag"), "out_checkpoint": ("out_checkpoint", "str"),
    "verify": ("verify", "raw"), "shard_mb": ("shard_mb", "raw"), "workers": ("read_workers", "raw"),
    "schedule": ("schedule", "str"),
    "prefix": ("prefix", "str"),
}  # fmt: skip
_FLAGS.update({"eval": ("eval_cmd", "str"), "eval_hook": ("eval_hook", "str")})


class _Intermixed(argparse.ArgumentParser):
    """Sources and key=value items may come before, between or after the options
    (`stockpot soup RUN --recipe greedy soup.metric=eval/accuracy`): plain argparse stops
    collecting positionals at the first option and rejects the rest."""

    _inner = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._inner:  # parse_known_intermixed_args calls back into this method
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "soup",
        help="merge checkpoints into a model soup (uniform, weighted, greedy, learned, window)",
        description="Merge committed checkpoints (a run's, a sweep's, or named ones) or "
        ".safetensors files into one model, streamed tensor by tensor; writes "
        "<out>/model.safetensors and <out>/SOUP.json (provenance), committed. Pretraining: "
        "--recipe window --weights decay:cosine --steps A:B weighs one run's checkpoints by the "
        "steps each covers, as the LR cooldown they emulate (docs/soups.md).",
    )
    p.add_argument("items", nargs="*", metavar="SOURCE|key=value",
                   help="run dirs, a sweep dir, checkpoints or .safetensors files (local or "
                   "s3://); key=value items are config overrides, e.g. soup.metric=eval/accuracy")  # fmt: skip
    p.add_argument("--config", help="a run config: its soup: section, run.dir and storage")
    p.add_argument("--recipe", choices=["uniform", "weighted", "greedy", "learned", "window"],
                   help="window: one run's checkpoints weighted by step (pretraining)")  # fmt: skip
    p.add_argument("--name", help="soup name (default out dir <run.dir>/soups/<name>)")
    p.add_argument("--out", help="output directory, local or s3://")
    p.add_argument("--weights", metavar="W1,W2|RULE",
                   help="weighted: comma-separated, one per ingredient; window: a rule "
                   f"({', '.join(RULES)})")  # fmt: skip
    p.add_argument("--schedule", metavar="RULE", help="window: the rule (as --weights RULE)")
    p.add_argument("--steps", metavar="A:B", help="keep checkpoints with A <= step <= B")
    p.add_argument("--every", type=int, metavar="N", help="keep steps that are multiples of N")
    p.add_argument("--last", type=int, metavar="K", help="keep the newest K checkpoints")
    p.add_argument("--top", type=int, metavar="K", help="keep the K best by --metric")
    p.add_argument("--metric", help="eval/<name>: ranks checkpoints and scores soups")
    p.add_argument("--mode", choices=["max", "min"], help="direction of --metric")
    p.add_argument("--improved-any", metavar="M1,M2", help="keep checkpoints that beat every "
                   "earlier one on at least one of these metrics")  # fmt: skip
    p.add_argument("--per-layer", action="store_true", help="learned: per-tensor coefficients")
    p.add_argument("--epochs", type=int, help="learned: passes over the held-out set")
    p.add_argument("--lr", type=float, help="learned: AdamW learning rate")
    p.add_argument("--max-memory", type=float, metavar="GB", help="learned: memory bound")
    p.add_argument("--recompute-bn", action="store_true", help="recompute BatchNorm statistics")
    p.add_argument("--allow-unrelated", action="store_true",
                   help="skip the shared-starting-point check")  # fmt: skip
    p.add_argument("--report", action="store_true", help="score table and <out>/soup.png")
    p.add_argument("--eval", metavar="CMD",
                   help="score soups with this shell command instead of the run's task: "
                   "{model} (or $STOCKPOT_SOUP_MODEL) is the candidate's .safetensors file; "
                   'its last stdout line is JSON metrics, e.g. {"eval/accuracy": 0.91}')  # fmt: skip
    p.add_argument("--eval-hook", metavar="MOD:FN",
                   help="score soups with this Python function of the state dict, returning "
                   "a dict of metrics")  # fmt: skip
    p.add_argument("--out-checkpoint", metavar="RUN_DIR",
                   help="also write the soup as a committed checkpoint of RUN_DIR")  # fmt: skip
    p.add_argument(
        "--verify",
        choices=["checksums", "sizes"],
        help="check what is read against the manifests: checksums (default) or sizes",
    )
    p.add_argument("--shard-mb", type=float, help="largest output file (MB) before sharding")
    p.add_argument("--workers", type=int, help="parallel reads")
    p.add_argument("--prefix", help="which model: auto (the trained one), or e.g. ema_999")
    p.add_argument("--dry-run", action="store_true",
                   help="list the ingredients and why, and the bytes to read; write nothing")  # fmt: skip
    p.set_defaults(handler=cmd_soup)
    p.__class__ = _Intermixed  # add_parser builds the subparsers' own class; same fields
    return p


def split_items(items: list[str]) -> tuple[list[str], list[str]]:
    """(sources, overrides): `key=value` where key is a dotted name, everything else a path."""
    overrides = [i for i in items if _OVERRIDE.match(i)]
    return [i for i in items if not _OVERRIDE.match(i)], overrides


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"  # YAML single-quoted: no ':' or '#' surprises


def flag_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for flag, (field, how) in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is None or (how == "flag" and not value):
            continue
        if flag == "weights" and not _numbers(str(value)):
            field, how = "schedule", "str"  # `--recipe window --weights decay:cosine`
        if how == "str":
            text = _quote(str(value))
        elif how == "list":
            text = "[" + ",".join(v.strip() for v in str(value).split(",")) + "]"
        elif how == "strlist":
            text = "[" + ",".join(_quote(v.strip()) for v in str(value).split(",")) + "]"
        elif how == "flag":
            text = "true"
        else:
            text = str(value)
        out.append(f"soup.{field}={text}")
    return out


def _numbers(text: str) -> bool:
    try:
        [float(v) for v in text.split(",")]
    except ValueError:
        return False
    return True


def cmd_soup(args: argparse.Namespace) -> int:
    from orchestrator import config
    from orchestrator.errors import UsageError

    sources, overrides = split_items(args.items)
    cfg = config.load(args.config, [*overrides, *flag_overrides(args)])
    soup = cfg.soup
    sources = sources or list(soup.sources) or ([cfg.run.dir] if args.config else [])
    if not sources:
        raise UsageError("name what to soup: run dirs, checkpoints or .safetensors files")
    from orchestrator.soup import cook

    # The whole storage section, as the chained soup job (soup_job.py) opens every store.
    kitchen = cook.prepare(sources, soup, cfg.storage, out="")
    kitchen.out = _out_dir(soup, kitchen, cfg.run.dir if args.config else None)
    if args.dry_run:
        print("\n".join(cook.dry_run(kitchen)))
        return 0
    record = _cook_with_bar(cook, kitchen)
    _summary(kitchen, record)
    if soup.out_checkpoint:
        _write_checkpoint(kitchen, record, soup.out_checkpoint)
    return 0


def _out_dir(soup: Any, kitchen: Any, config_run_dir: str | None) -> str:
    from orchestrator.config.soup import soup_out_dir
    from orchestrator.errors import UsageError

    runs = {i.run for i in kitchen.ingredients}
    run = config_run_dir or (runs.pop() if len(runs) == 1 and None not in runs else None)
    if run is None and not soup.out:
        raise UsageError("ingredients come from several places: say where to write with --out")
    return soup_out_dir(run or "", soup)  # no run: soup.out is set, the run dir is not used


def _cook_with_bar(cook: Any, kitchen: Any) -> dict[str, Any]:
    from tqdm import tqdm

    total = kitchen.sources[0].model_bytes
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"soup {kitchen.cfg.recipe}",
               disable=not sys.stderr.isatty())  # fmt: skip
    with bar:
        return dict(cook.cook(kitchen, progress=bar.update))


def _summary(kitchen: Any, record: dict[str, Any]) -> None:
    chosen = sum(1 for i in record["ingredients"] if i["in_soup"])
    t = record["timings"]
    peak = record["memory"]["peak_rss_bytes"] / 1e6
    print(f"wrote {kitchen.out}: {record['recipe']} soup of {chosen} of "
          f"{len(record['ingredients'])} ingredients, {record['nbytes'] / 1e6:.1f} MB in "
          f"{len(record['shards'])} file(s), {t['total_s']:.1f} s, peak RSS {peak:.0f} MB")  # fmt: skip
    if record.get("soup_scores"):
        scores = " ".join(f"{k}={v:.4g}" for k, v in sorted(record["soup_scores"].items()))
        print(f"soup scores: {scores}")
    if kitchen.cfg.report and kitchen.judge is not None:
        from orchestrator.soup import report

        print(report.table(record, kitchen.judge.metric, kitchen.judge.mode))
        print(
            f"plot: {kitchen.out.rstrip('/')}/{record['data_dir'] + '/' if record['data_dir'] else ''}{report.PNG}"
        )


def _write_checkpoint(kitchen: Any, record: dict[str, Any], run_dir: str) -> None:
    from orchestrator.soup import writer
    from orchestrator.storage import Store

    steps = [i["step"] for i in record["ingredients"] if i["in_soup"] and i["step"] is not None]
    metrics = {k: v for k, v in (record.get("soup_scores") or {}).items() if k.startswith("eval/")}
    storage = kitchen.storage
    path = writer.write_checkpoint(
        Store(kitchen.out, storage), run_dir, max(steps, default=0), storage, metrics
    )
    print(f"wrote checkpoint {path} (model only; model.init_from={run_dir} starts from it)")
