"""`make bench`: speed figures as ratios against a baseline measured in the same run.

The machines are noisy (2-4x swings), so variants are interleaved and each is the median of
several runs; read the ratios, not the absolute numbers.

1. Loop overhead: steps/s of `stockpot run` on the demo (2 ranks, DDP) against a hand-written
   bare loop with no checkpointing, with checkpoints off and with one every 50 steps.
2. Save stall: how long a 2-rank save of a CharLM with AdamW state blocks training, sync vs
   async (async blocks only while staging to host memory).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from launch.local import free_port

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
REPEATS = 3
DEMO = ["trainer.max_steps=300", "trainer.log_every=20", "trainer.eval_every=null"]


def ranks(argv: list[str], nproc: int = 2) -> list[dict]:
    """Run `argv` as nproc ranks; the JSON lines rank 0 printed."""
    port = str(free_port())
    procs = [
        subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={"RANK": str(r), "WORLD_SIZE": str(nproc), "MASTER_PORT": port,
                              "MASTER_ADDR": "127.0.0.1", "PATH": "/usr/bin:/bin",
                              "PYTHONPATH": str(REPO)})
        for r in range(nproc)
    ]  # fmt: skip
    outs = [p.communicate(timeout=600)[0] for p in procs]
    return [json.loads(line) for line in outs[0].splitlines() if line.startswith("{")]


def stockpot_rate(overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [PY, "-m", "launch", "run", "configs/demo.yaml", f"run.dir={tmp}", *DEMO, *overrides],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        lines = [json.loads(x) for x in Path(tmp, "metrics.jsonl").read_text().splitlines()]
    timed = [x for x in lines if "loss" in x]
    first, last = timed[0], timed[-1]
    return (last["step"] - first["step"]) / (last["time"] - first["time"])


def loop_overhead() -> None:
    rates: dict[str, list[float]] = {"bare loop": [], "stockpot, no checkpoints": [],
                                     "stockpot, checkpoint every 50 steps": []}  # fmt: skip
    for _ in range(REPEATS):
        rates["bare loop"] += [
            ranks([PY, "-m", "bench.bare_loop", "configs/demo.yaml", *DEMO])[0]["steps_per_s"]
        ]
        rates["stockpot, no checkpoints"] += [stockpot_rate(["checkpoint.every_steps=null"])]
        rates["stockpot, checkpoint every 50 steps"] += [
            stockpot_rate(["checkpoint.every_steps=50"])
        ]
    base = statistics.median(rates["bare loop"])
    print(f"\n== loop overhead: demo, 2 ranks, DDP (median of {REPEATS}, steps/s) ==")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"{name:38s} {med:7.1f} steps/s   step time x{base / med:.2f} of the bare loop")


def save_stall(d_model: int = 512, n_layers: int = 8) -> None:
    out: dict[str, list[dict]] = {"sync": [], "async": []}
    for _ in range(REPEATS):
        for mode in ("sync", "async"):
            with tempfile.TemporaryDirectory() as tmp:
                saves = ranks(
                    [PY, "-m", "bench.ckpt_worker", tmp, mode, "3", str(d_model), str(n_layers)]
                )
                out[mode] += saves[1:]  # steady state: the first save also allocates buffers
    size = out["sync"][0]["bytes"] / 1e6
    print(
        f"\n== save stall: CharLM d_model={d_model} n_layers={n_layers}, {size:.0f} MB with AdamW, "
        f"2 ranks (median of {len(out['sync'])}) =="
    )
    sync_block = statistics.median(r["blocked_s"] for r in out["sync"])
    for mode in ("sync", "async"):
        blocked = statistics.median(r["blocked_s"] for r in out[mode])
        total = statistics.median(r["total_s"] for r in out[mode])
        print(
            f"{mode:6s} training blocked {blocked:6.3f} s (x{blocked / sync_block:.2f} of sync), "
            f"committed after {total:6.3f} s"
        )


if __name__ == "__main__":
    loop_overhead()
    save_stall()
