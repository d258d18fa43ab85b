"""The FSDP sharding policy (orchestrator/sharding.py) and tie bookkeeping (orchestrator/ties.py)
as pure functions over real module trees: bundled tasks, toy models, and transformers' GPT-2.
The 2-rank runs that shard them for real are in test_library_models.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orchestrator.config import load
from orchestrator.errors import ConfigError
from orchestrator.sharding import largest_block_list, plan
from orchestrator.tasks.charlm import CharLM
from orchestrator.tasks.synthetic import SyntheticClassification
from orchestrator.ties import aliases, tied_parameters, truly_missing


class Block(nn.Module):
    def __init__(self, shared: nn.Linear | None = None) -> None:
        super().__init__()
        self.fc = shared if shared is not None else nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class TiedLM(nn.Module):
    """Embedding and head share one weight; the blocks are a ModuleList."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.other = nn.ModuleList([Block(), nn.Linear(4, 4)])  # mixed classes: not blocks
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


class TiedPair(nn.Module):
    """No block list: the old rule (every direct child) split the tie across two groups."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


class SharedAcrossBlocks(nn.Module):
    """ALBERT-like: blocks 0 and 1 share one Linear; block 2 has its own."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(4, 4)
        self.layers = nn.ModuleList([Block(shared), Block(shared), Block()])


def names(model: nn.Module, shard_modules: tuple[str, ...] = ()) -> list[str]:
    return [name for name, _ in plan(model, shard_modules).units]


def test_the_largest_same_class_list_is_sharded_and_the_tie_stays_in_the_root() -> None:
    model = TiedLM()
    assert largest_block_list(model) is model.blocks
    assert names(model) == ["blocks.0", "blocks.1", "blocks.2"]
    assert tied_parameters(model) == [["emb.weight", "head.weight"]]


def test_a_tie_across_direct_children_keeps_both_in_the_root_group() -> None:
    chosen = plan(TiedPair())
    assert [n for n, _ in chosen.units] == ["mid"]
    assert chosen.dropped == [
        ("emb", "emb.weight = head.weight"),
        ("head", "head.weight = emb.weight"),
    ]
    assert "kept in an enclosing group for shared parameters: emb (shares emb.weight" in (
        chosen.describe()
    )


def test_blocks_sharing_a_parameter_are_not_sharded_on_their_own() -> None:
    model = SharedAcrossBlocks()
    assert names(model) == ["layers.2"]
    # sharded as a whole, the list holds every owner of the shared Linear: allowed
    assert names(model, ("ModuleList",)) == ["layers"]


def test_a_tie_inside_one_unit_keeps_the_unit() -> None:
    model = TiedLM()
    model.blocks[1].norm.weight = model.blocks[1].fc.bias
    assert names(model) == ["blocks.0", "blocks.1", "blocks.2"]


def test_user_named_classes_nested_units_deepest_first() -> None:
    model = TiedLM()
    assert names(model, ("Block", "LayerNorm")) == [
        "blocks.0.norm", "blocks.1.norm", "blocks.2.norm", "other.0.norm",
        "blocks.0", "blocks.1", "blocks.2", "other.0",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match=r"no module of class Blok in this model; its classes: "):
        plan(model, ("Blok",))


def every_linear(model: nn.Module) -> list[nn.Module]:
    """A user policy, named by import path in test_a_policy_function_by_import_path."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def not_a_submodule(model: nn.Module) -> list[nn.Module]:
    return [nn.Linear(1, 1)]


def test_a_policy_function_by_import_path() -> None:
    model = TiedLM()
    assert names(model, ("tests.test_sharding:every_linear",)) == [
        "blocks.0.fc",
        "blocks.1.fc",
        "blocks.2.fc",
        "other.0.fc",
        "other.1",
    ]  # fmt: skip (the tied head is kept back)
    assert names(model, ("tests.test_sharding.every_linear",)) == names(
        model, ("tests.test_sharding:every_linear",)
    )
    with pytest.raises(ConfigError, match="must return sub-modules of the model"):
        plan(model, ("tests.test_sharding:not_a_submodule",))
    with pytest.raises(ConfigError, match=r"cannot import 'tests.test_sharding:nope'"):
        plan(model, ("tests.test_sharding:nope",))


def test_bundled_tasks_shard_as_before() -> None:
    torch.manual_seed(0)
    charlm = CharLM(n_layers=3).build_model()
    assert names(charlm) == ["blocks.0", "blocks.1", "blocks.2"]
    mlp = SyntheticClassification().build_model()  # Sequential(Linear, ReLU, ...): no blocks
    assert names(mlp) == [n for n, m in mlp.named_children() if isinstance(m, nn.Linear)]
    assert "direct children" in plan(mlp).source


def test_transformers_gpt2_uses_no_split_modules_and_keeps_its_tie_whole() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=64, n_positions=8)
    model = transformers.GPT2LMHeadModel(config)
    chosen = plan(model)
    assert [n for n, _ in chosen.units] == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert chosen.source == "_no_split_modules ['GPT2Block']"
    assert tied_parameters(model) == [["transformer.wte.weight", "lm_head.weight"]]


def test_tie_aliases_and_what_init_from_reports_missing() -> None:
    groups = [["emb.weight", "head.weight"], ["a", "b", "c"]]
    assert aliases(groups) == {"head.weight": "emb.weight", "b": "a", "c": "a"}
    # head.weight got its value through emb.weight; both of a tie absent stay missing
    assert truly_missing(["head.weight", "x"], groups) == ["x"]
    assert truly_missing(["emb.weight", "head.weight"], groups) == ["emb.weight", "head.weight"]


def test_fsdp_config_is_validated() -> None:
    cfg = load("configs/demo.yaml", ["trainer.fsdp.shard_modules=[GPT2Block,GPT2MLP]"])
    assert cfg.trainer.fsdp.shard_modules == ("GPT2Block", "GPT2MLP")
    with pytest.raises(ConfigError, match="an import path to a policy function must be its only"):
        load("configs/demo.yaml", ["trainer.fsdp.shard_modules=[pkg.policy,GPT2Block]"])
