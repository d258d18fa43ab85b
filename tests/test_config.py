"""The config schema: loading, overrides, interpolation, refusal of bad input, hashing."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from pathlib import Path

import pytest

from orchestrator import config
from orchestrator.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = config.load(str(path))
    assert config.from_dict(cfg.to_dict()) == cfg


def test_demo_is_two_local_ranks_on_local_disk() -> None:
    cfg = config.load(str(REPO / "configs/demo.yaml"))
    assert (cfg.trainer.nproc, cfg.launcher.kind, cfg.run.dir) == (2, "local", "runs/demo")


def test_defaults_list_composes_in_order() -> None:
    cfg = config.load(str(REPO / "configs/demo-slurm.yaml"))
    assert cfg.launcher.kind == "slurm" and cfg.trainer.nproc == 2
    s3 = config.load(str(REPO / "configs/demo-s3.yaml"))
    assert s3.run.dir == "s3://stockpot-runs/demo" and s3.launcher.kind == "local"


def test_overrides_are_typed_and_interpolated() -> None:
    cfg = config.load(None, ["run.name=abc", "trainer.max_steps=7", "optim.lr=1e-2"])
    assert cfg.run.dir == "runs/abc"
    assert cfg.trainer.max_steps == 7 and cfg.optim.lr == pytest.approx(0.01)
    assert isinstance(cfg.optim.lr, float)


def test_int_is_accepted_for_float_but_not_the_reverse() -> None:
    assert config.load(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"trainer.max_steps must be an integer \(got 1.5\)"):
        config.load(None, ["trainer.max_steps=1.5"])


def test_task_block_keeps_its_own_keys_as_params() -> None:
    cfg = config.load(None, ["task._target_=my.pkg.Task", "task.width=8"])
    assert cfg.task.target == "my.pkg.Task" and cfg.task.params == {"width": 8}
    assert cfg.to_dict()["task"] == {"_target_": "my.pkg.Task", "width": 8}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "no_such_key=1",
            r"unknown config key 'no_such_key'; valid keys at top level: checkpoint,",
        ),
        (
            "trainer.nope=1",
            r"unknown config key 'trainer.nope'; valid keys at trainer: activation_checkpointing, batch_size",
        ),
        (
            "checkpoint.keep_best.x=1",
            r"'checkpoint.keep_best.x'; valid keys at checkpoint.keep_best: k, metric, mode",
        ),
        ("trainer.parallel=tp", r"trainer.parallel must be one of ddp, fsdp \(got 'tp'\)"),
        ("launcher.kind=k8s", r"launcher.kind must be one of local, slurm"),
        (
            "checkpoint.keep_last=0",
            r"checkpoint.keep_last must be an integer >= 1 \(got 0\); use null to keep every",
        ),
        ("checkpoint.every_steps=-5", r"checkpoint.every_steps must be an integer >= 1 \(got -5\)"),
        ("trainer.nproc=0", r"trainer.nproc must be >= 1 \(got 0\)"),
        ("optim.lr=-1", r"optim.lr must be > 0"),
        ("checkpoint.async_save=maybe", r"checkpoint.async_save must be true or false"),
        ("optim.betas=[0.9]", r"optim.betas must be a list of 2 items"),
        ("task._target_=nodots", r"task._target_ must be an import path"),
        ("run.dir=${nope}", r"config: Interpolation key 'nope' not found"),
        ("trainer", r"override 'trainer' is not key=value"),
        (
            "trainer.ema=[1.0]",
            r"trainer.ema: each decay must be in \(0, 1\), e.g. 0.999 \(got 1.0\)",
        ),
        ("trainer.ema=[0]", r"trainer.ema: each decay must be in \(0, 1\)"),
        ("trainer.ema=[0.9999995]", r"trainer.ema: a decay has at most 6 decimals"),
        ("trainer.ema=[0.9,0.90]", r"trainer.ema lists a decay twice \(ema_9\); list each once"),
        ("soup.prefix=''", r"soup.prefix must not be empty"),
    ],
)
def test_bad_input_is_refused_with_one_line_saying_how_to_fix(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        config.load(None, [override])
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_unknown_key_in_a_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer\.max_stepz'"):
        config.load(str(path))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(str(tmp_path / "absent.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        config.load(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match=r"scalar.yaml: Invalid loaded object type"):
        config.load(str(scalar))


def test_defaults_cycle_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("defaults: [b]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a]\n")
    with pytest.raises(ConfigError, match="cycle"):
        config.load(str(tmp_path / "a.yaml"))


def test_config_is_frozen_plain_and_picklable() -> None:
    cfg = config.load(None, ["launcher.additional_parameters.reservation=r1"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.name = "x"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert "omegaconf" not in pickle.dumps(cfg).decode("latin-1")


def test_hash_is_stable_and_sensitive() -> None:
    a = config.load(None, ["optim.lr=0.1"])
    assert config.config_hash(a) == config.config_hash(config.load(None, ["optim.lr=0.1"]))
    assert config.config_hash(a) != config.config_hash(config.load(None, ["optim.lr=0.2"]))
    assert len(config.config_hash(a)) == 16


def test_drift_ignores_a_key_added_later_at_its_default() -> None:
    """A run saved before the schema gained a key resumes while that key is at its default."""
    view = config.computation_view(config.load(None, []))
    before = {k: v for k, v in view.items() if k != "optim.momentum"}  # "saved before it existed"
    assert config.diff_views(before, view) == []
    changed = config.computation_view(config.load(None, ["optim.momentum=0.5"]))
    assert config.diff_views(before, changed) == ["optim.momentum: '<unset>' -> 0.5"]
    with_param = config.computation_view(config.load(None, ["task.noise=0.1"]))
    assert config.diff_views(view, with_param) == ["task.noise: '<unset>' -> 0.1"]
    assert config.diff_views(with_param, view) == ["task.noise: 0.1 -> '<unset>'"]


def test_drift_ignores_num_workers_also_in_a_view_saved_while_it_counted() -> None:
    view = config.computation_view(config.load(None, ["trainer.num_workers=2"]))
    assert "trainer.num_workers" not in view
    assert config.diff_views({**view, "trainer.num_workers": 0}, view) == []


def test_resolved_yaml_round_trips(tmp_path: Path) -> None:
    cfg = config.load(str(REPO / "configs/demo.yaml"), ["trainer.max_steps=11"])
    text = config.to_yaml(cfg)
    assert text.startswith(f"# stockpot resolved config; hash {config.config_hash(cfg)}")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert config.load(str(path)) == cfg


def test_every_schema_field_has_a_comment() -> None:
    missing = []
    for cls in _schema_classes(config.Config)[1:]:
        for f in dataclasses.fields(cls):
            # An inherited field is commented where it is declared (CheckpointConfig's bases).
            owner = next(c for c in cls.__mro__ if f.name in vars(c).get("__annotations__", {}))
            source = inspect.getsource(owner).splitlines()
            line = next(i for i, text in enumerate(source) if text.strip().startswith(f"{f.name}:"))
            if not source[line - 1].strip().startswith("#"):
                missing.append(f"{cls.__name__}.{f.name}")
    assert missing == []


def _schema_classes(cls: type) -> list[type]:
    found = [cls]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            found += _schema_classes(type(default))
    return found
