"""Memory of the streaming soup, measured in a subprocess: peak RSS above the interpreter's
RSS at the start of the soup stays under 0.1x one checkpoint's model bytes, and is flat in N
(8 ingredients vs 2). The ingredients are real committed DCP checkpoints of a 128 MB model
(192 tensors of 512 kB and one of 32 MB, a quarter of the model: it must be read in ranges to
stay under the bound), written by the real Checkpointer. At 64 MB the interpreter's own ~3 MB
(allocator arenas) was half the bound, and a 1 MB arena more or less decided the test; at 128 MB
the soup measures ~0.045 of a model, as bench's bigger models do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.soup.writer import _ModelOnly
from orchestrator.storage import Store
from tests.soup_fixtures import REPO

TENSORS, SHAPE, BIG = 192, (128, 1024), (8192, 1024)  # 192 x 512 kB and 32 MB of float32
MODEL_BYTES = (TENSORS * SHAPE[0] * SHAPE[1] + BIG[0] * BIG[1]) * 4

_CHILD = """
import json, sys
from orchestrator.config import SoupConfig
from orchestrator.soup import cook
run, out = sys.argv[1], sys.argv[2]
kitchen = cook.prepare([run], SoupConfig(), None, out)
record = cook.cook(kitchen)
print(json.dumps({"model": kitchen.sources[0].model_bytes, **record["memory"],
                  "n": len(record["ingredients"])}))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("memory")
    gen = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(SHAPE, generator=gen) for i in range(TENSORS)}
    base["embed.weight"] = torch.randn(BIG, generator=gen)
    made = {}
    for n in (2, 8):
        run = root / f"n{n}"
        ckpt, holder = Checkpointer(Store(str(run))), _ModelOnly({})
        ckpt.register("train", holder)
        for step in range(1, n + 1):  # fine-tunes of one base: small steps away from it
            state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
            state["steps"] = torch.tensor(step)
            holder.tensors = state
            ckpt.save(step)
        ckpt.close()
        made[n] = run
    return made


def _measure(run: Path, out: Path) -> dict[str, int]:
    got = subprocess.run(
        [sys.executable, "-c", _CHILD, str(run), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr[-3000:]
    return dict(json.loads(got.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_peak_memory_is_a_small_fraction_of_one_model_and_flat_in_n(
    runs: dict[int, Path], tmp_path: Path
) -> None:
    got = {n: _measure(run, tmp_path / f"out{n}") for n, run in runs.items()}
    above = {n: m["peak_rss_bytes"] - m["rss_at_start_bytes"] for n, m in got.items()}
    assert got[8]["n"] == 8 and got[2]["model"] == MODEL_BYTES + 8
    for n in (2, 8):
        assert above[n] <= 0.1 * MODEL_BYTES, f"N={n}: {above[n] / MODEL_BYTES:.3f} of a model"
    # flat in N: 8 ingredients cost what 2 do (within 5% of peak RSS, and of a model's bytes)
    assert (
        abs(got[8]["peak_rss_bytes"] - got[2]["peak_rss_bytes"]) <= 0.05 * got[2]["peak_rss_bytes"]
    )
    assert abs(above[8] - above[2]) <= 0.05 * MODEL_BYTES
