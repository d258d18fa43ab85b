"""The bundled tasks and how a config names them: data, models, learning, errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from orchestrator.data import ResumableSampler
from orchestrator.errors import ConfigError
from orchestrator.tasks import build_task, import_target
from orchestrator.tasks.base import Task, Tensors, eval_batches
from orchestrator.tasks.charlm import CharLM, CharTransformer
from orchestrator.tasks.synthetic import SyntheticClassification

SYNTHETIC = "orchestrator.tasks.synthetic.SyntheticClassification"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models: a second thread only adds contention on a loaded CI machine (10x slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train(task: Task, model: torch.nn.Module, steps: int, batch: int, lr: float) -> list[float]:
    data = task.train_set()
    sampler = ResumableSampler(len(data), batch, rank=0, world_size=1, seed=0)
    optim = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = task.loss(model, data.batch(sampler.next_indices()))
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses


def evaluate(task: Task, model: torch.nn.Module, world: int = 2) -> dict[str, float]:
    data = task.eval_set()
    sums: dict[str, float] = {}
    for rank in range(world):
        for idx in eval_batches(len(data), 256, rank, world):
            for key, value in task.eval_sums(model, data.batch(idx)).items():
                sums[key] = sums.get(key, 0.0) + value
    return sums


# --- synthetic classification ---------------------------------------------------------------


def test_synthetic_data_is_deterministic_and_independent_of_the_global_rng() -> None:
    torch.manual_seed(1)
    a = SyntheticClassification(split="finetune", n_train=500, n_eval=100)
    xa, ya = a.train_set().tensors
    torch.manual_seed(2)
    torch.rand(10)
    b = SyntheticClassification(split="finetune", n_train=500, n_eval=100)
    assert torch.equal(xa, b.train_set().tensors[0]) and torch.equal(ya, b.train_set().tensors[1])
    assert torch.equal(a.eval_set().tensors[0], b.eval_set().tensors[0])
    assert a.train_set() is a.train_set()  # cached on the instance
    assert not torch.equal(xa[:100], a.eval_set().tensors[0])  # train and eval streams differ
    other = SyntheticClassification(split="finetune", n_train=500, data_seed=1)
    assert not torch.equal(xa, other.train_set().tensors[0])


def test_pretrain_and_finetune_share_the_teacher_but_not_the_inputs() -> None:
    pre = SyntheticClassification(split="pretrain", n_train=4000)
    fin = SyntheticClassification(split="finetune", n_train=4000)
    x_pre, y_pre = pre.train_set().tensors
    x_fin, _ = fin.train_set().tensors
    assert x_pre.mean(0).norm() < 0.2 < 0.8 < x_fin.mean(0).norm() < 1.2  # shift = 1.0
    assert not torch.allclose(x_pre.std(0), x_fin.std(0), atol=0.2)
    assert torch.equal(fin._teacher.label(x_pre), y_pre)
    counts = torch.bincount(y_pre, minlength=10)
    assert counts.min() > 0 and counts.max() < 0.3 * len(y_pre)  # no class dominates


def test_synthetic_model_is_plain_and_seeded_by_the_caller() -> None:
    task = SyntheticClassification(in_dim=8, hidden=16, depth=3, classes=4)
    torch.manual_seed(0)
    a = task.build_model()
    torch.manual_seed(0)
    b = task.build_model()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    names = [name for name, _ in a.named_parameters()]
    assert names == [f"{i}.{w}" for i in (0, 2, 4, 6) for w in ("weight", "bias")]
    assert a(torch.zeros(5, 8)).shape == (5, 4)
    assert isinstance(task, Task) and task.name == "synthetic-pretrain"


def test_synthetic_learns_well_above_chance() -> None:
    task = SyntheticClassification()
    torch.manual_seed(0)
    model = task.build_model()
    before = evaluate(task, model)
    train(task, model, steps=300, batch=128, lr=3e-3)
    after = evaluate(task, model)
    assert before["count"] == after["count"] == 2000
    assert before["accuracy"] / 2000 < 0.3
    assert after["accuracy"] / 2000 > 0.6  # chance 0.1, the largest class ~0.2
    assert after["loss"] < 0.6 * before["loss"]


def test_eval_sums_accept_an_empty_batch() -> None:
    task = SyntheticClassification(n_eval=10)
    sums = task.eval_sums(task.build_model(), task.eval_set().batch(torch.arange(0)))
    assert sums == {"loss": 0.0, "accuracy": 0.0, "count": 0.0}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"split": "train"}, "task.split must be one of pretrain, finetune"),
        ({"classes": 1}, "task.classes must be an integer >= 2"),
        ({"depth": 1.5}, "task.depth must be an integer >= 1"),
        ({"noise": 2.0}, r"task.noise must be in \[0, 1\]"),
    ],
)
def test_synthetic_rejects_bad_params_in_one_line(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        SyntheticClassification(**params)
    assert "\n" not in str(info.value)


def test_tensors_index_together() -> None:
    data = Tensors(torch.arange(5), torch.arange(5) * 10)
    x, y = data.batch(torch.tensor([4, 1]))
    assert len(data) == 5 and x.tolist() == [4, 1] and y.tolist() == [40, 10]
    with pytest.raises(ValueError, match="differ in length"):
        Tensors(torch.zeros(2), torch.zeros(3))


# --- char-level language model --------------------------------------------------------------

TINY = {"seq_len": 32, "d_model": 32, "n_layers": 2, "n_heads": 4}


def test_bundled_corpus_is_there_and_says_where_it_is_from() -> None:
    path = CharLM().text_path
    assert path.is_file() and path.stat().st_size > 50_000
    assert "PSF License" in path.read_text(encoding="utf-8").splitlines()[0]


def test_windows_pair_each_byte_with_the_next_and_tile_the_text(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(200)))
    task = CharLM(text_path=str(text), seq_len=8, eval_fraction=0.2)
    train, held_out = task.train_set(), task.eval_set()
    assert (len(train), len(held_out)) == (19, 4)  # 160 train bytes, 40 eval bytes
    x, y = train.batch(torch.tensor([0, 2]))
    assert x.tolist() == [list(range(8)), list(range(16, 24))]
    assert y.tolist() == [list(range(1, 9)), list(range(17, 25))]
    assert x.dtype == torch.int64
    assert held_out.batch(torch.tensor([0]))[0][0, 0].item() == 160


def test_charlm_shapes_and_causality() -> None:
    task = CharLM(**TINY)
    torch.manual_seed(0)
    model = task.build_model().eval()
    assert isinstance(model, CharTransformer) and isinstance(model.blocks, torch.nn.ModuleList)
    x = torch.randint(256, (3, 32))
    logits = model(x)
    assert logits.shape == (3, 32, 256)
    changed = x.clone()
    changed[:, 20:] = torch.randint(256, (3, 12))
    after = model(changed)
    assert torch.allclose(logits[:, :20], after[:, :20], atol=1e-6)
    assert not torch.allclose(logits[:, 20:], after[:, 20:])


def test_charlm_loss_decreases() -> None:
    task = CharLM(**TINY)
    torch.manual_seed(0)
    model = task.build_model()
    losses = train(task, model, steps=30, batch=16, lr=3e-3)
    assert losses[0] > 5.0  # ~ln(256) at init
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    sums = task.eval_sums(model, task.eval_set().batch(torch.arange(4)))
    assert sums["count"] == 4 * 32 and 0 < sums["loss"] / sums["count"] < losses[0]


@pytest.mark.parametrize(
    "kwargs",
    [TINY, {"seq_len": 17, "d_model": 48, "n_layers": 3, "n_heads": 3, "d_ff": 50}],
)
def test_parameter_estimate_matches_the_built_model(kwargs: dict) -> None:
    task = CharLM(**kwargs)
    built = sum(p.numel() for p in task.build_model().parameters())
    assert task.num_parameters() == built


def test_a_one_gigabyte_config_is_reachable_without_building_it() -> None:
    n = CharLM.estimate_parameters(seq_len=128, d_model=1024, n_layers=20)
    assert 0.95e9 < 4 * n < 1.05e9  # float32 bytes


def test_charlm_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"task\.n_heads must divide task\.d_model=32"):
        CharLM(d_model=32, n_heads=5)
    with pytest.raises(ConfigError, match=r"task\.text_path: cannot read"):
        CharLM(text_path=str(tmp_path / "missing.txt")).train_set()
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ConfigError, match="too short for seq_len=128"):
        CharLM(text_path=str(short)).train_set()


# --- naming a task in the config ------------------------------------------------------------


def test_build_task_passes_params_as_keywords() -> None:
    task = build_task(SYNTHETIC, {"split": "finetune", "n_train": 100})
    assert isinstance(task, SyntheticClassification) and task.split == "finetune"
    assert import_target("orchestrator.tasks.charlm.CharLM") is CharLM


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("orchestrator.nope.Task", "task._target_ 'orchestrator.nope.Task': no module 'orchestrator.nope'"),
        ("orchestrator.tasks.synthetic.Nope", "'orchestrator.tasks.synthetic' has no attribute 'Nope'"),
        ("Nope", "must be an import path like 'package.module.Factory'"),
    ],
)  # fmt: skip
def test_import_target_errors_are_one_line(target: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        import_target(target)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_build_task_names_the_bad_key_and_lists_the_accepted_ones() -> None:
    with pytest.raises(ConfigError) as info:
        build_task(SYNTHETIC, {"hiden": 8})
    message = str(info.value)
    assert "task.hiden" in message and "accepted: split, in_dim, classes, hidden," in message

    with pytest.raises(
        ConfigError, match=r"^task\.typename is required by collections\.namedtuple; "
    ):
        build_task("collections.namedtuple", {})
