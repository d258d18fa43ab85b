"""The examples (examples/), run as a user would: `stockpot run examples/X/config.yaml` on 2
ranks under DDP and FSDP, SIGKILLed twice mid-run and resumed, end bit-identical (weights,
optimizer state, per-step loss) to an uninterrupted run; a soup of the run works; TensorBoard
shows each step once. The README's diff of the nanoGPT script is the files' own."""

from __future__ import annotations

import difflib
import random
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import runs
from tests.ckpt_helpers import assert_same, final_state, state_at
from tests.test_tensorboard import scalars

MAX_STEPS, EVERY = 24, 3
COMMON = [
    f"trainer.max_steps={MAX_STEPS}", f"checkpoint.every_steps={EVERY}", "trainer.log_every=1",
    "checkpoint.keep_last=null",
]  # fmt: skip
EXAMPLES = {
    "nanogpt": "examples/nanogpt/config.yaml",
    "hf_gpt2": "examples/hf_gpt2/config.yaml",
}


def _argv(example: str, parallel: str, run_dir: Path, *more: str) -> list[str]:
    return [EXAMPLES[example], f"run.dir={run_dir}", f"trainer.parallel={parallel}", *COMMON, *more]


def _assert_same(got: dict[str, object], want: dict[str, object]) -> None:
    assert any(k.startswith("train.optim.state.") for k in want), "optimizer state is saved"
    assert_same(got, want)


@pytest.mark.parametrize(
    ("example", "parallel"),
    [("nanogpt", "ddp"), ("nanogpt", "fsdp"), ("hf_gpt2", "ddp"), ("hf_gpt2", "fsdp")],
)
def test_example_killed_twice_ends_bit_identical(
    example: str, parallel: str, tmp_path: Path
) -> None:
    tensorboard = (example, parallel) == ("nanogpt", "ddp")  # once is enough: it costs ~2 s
    more = () if tensorboard else ("logging.tensorboard=false",)
    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    log = tmp_path / "run.log"
    assert runs.stockpot_run(_argv(example, parallel, ref, *more), log=tmp_path / "ref.log") == 0
    argv = _argv(example, parallel, run_dir, *more)
    at = runs.kill_at_random_steps(argv, run_dir, 2, random.Random(example + parallel),
                                   every=EVERY, log=log)  # fmt: skip
    assert len(at) == 2 and at[-1] < MAX_STEPS
    runs.assert_resumed_from(run_dir, log.read_text(), at)
    _assert_same(final_state(run_dir, MAX_STEPS), final_state(ref, MAX_STEPS))
    want = runs.losses(ref)
    assert sorted(want) == list(range(1, MAX_STEPS + 1))
    assert runs.losses(run_dir) == want
    if tensorboard:
        shown = [s for s, _ in scalars(run_dir / "tb", "loss")]
        assert shown == list(range(1, MAX_STEPS + 1)), "each step once, across three lives"
    if example == "nanogpt":
        _check_soup(run_dir, tmp_path / "soup")


def _check_soup(run_dir: Path, out: Path) -> None:
    """`stockpot soup` of the run: a uniform soup of its last 3 checkpoints, tensor by tensor."""
    done = subprocess.run(
        [runs.STOCKPOT, "soup", str(run_dir), "--last", "3", "--out", str(out)],
        cwd=runs.REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    soup = load_file(out / "model.safetensors")
    steps = range(MAX_STEPS - 2 * EVERY, MAX_STEPS + 1, EVERY)
    name = "h.0.mlp.0.weight"
    mean = sum(state_at(run_dir, s)[f"train.model.{name}"] for s in steps) / 3
    torch.testing.assert_close(soup[name], mean)


def test_readme_shows_the_nanogpt_diff_as_it_is() -> None:
    """README's "Your own training loop" states how many lines converting plain.py changed and
    shows the diff: both must be the files' own."""
    folder = runs.REPO / "examples" / "nanogpt"
    plain = (folder / "plain.py").read_text().splitlines()
    converted = (folder / "train.py").read_text().splitlines()
    diff = list(difflib.unified_diff(plain, converted, "plain.py", "train.py", lineterm="", n=0))
    removed = sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))
    added = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
    readme = (runs.REPO / "README.md").read_text()
    claim = re.search(r"(\d+) lines removed and (\d+) added, of (\d+)", readme)
    assert claim, "README states the diff's size"
    assert claim.groups() == (str(removed), str(added), str(len(plain))), (removed, added)
    body = "\n".join(line for line in diff if not line.startswith("@@"))
    assert body in readme.replace("```diff\n", "").replace("\n```", "")
