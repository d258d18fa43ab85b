"""Slurm's hostlist and tasks-per-node syntaxes (orchestrator/slurm_syntax.py): tables and a
round-trip property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.slurm_syntax import MAX_HOSTS, parse_nodelist, parse_tasks_per_node


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("n1", ["n1"]),
        ("vm", ["vm"]),
        ("n[1-2]", ["n1", "n2"]),
        ("n[1-2],n5", ["n1", "n2", "n5"]),
        ("gpu[01-04,07],cpu3", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("n[007]", ["n007"]),
        ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
        ("node[1-2]-ib", ["node1-ib", "node2-ib"]),
        ("rack1-n[3,1]", ["rack1-n3", "rack1-n1"]),
        ("[1-2]", ["1", "2"]),
        ("h.example.com,n[1-1]", ["h.example.com", "n1"]),
    ],
)
def test_parse_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist",
    ["", " ", "n[", "n]", "n[1-2", "n[1-2]]", "n[[1]]", "n[]", "n[a-b]", "n[2-1]", "n[1-2-3]",
     "n[1,,2]", "n1,,n2", ",n1", "n1,", "n 1", "n[1:2]", "n[1-99999999]", "a[0-999]b[0-999]"],
)  # fmt: skip
def test_parse_nodelist_rejects(nodelist: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_nodelist(nodelist)
    assert "\n" not in str(info.value)


def test_parse_nodelist_limit() -> None:
    assert len(parse_nodelist(f"n[1-{MAX_HOSTS}]")) == MAX_HOSTS
    with pytest.raises(ValueError, match="more than"):
        parse_nodelist(f"n[1-{MAX_HOSTS}],x")


@pytest.mark.parametrize(
    ("value", "counts"),
    [("2", [2]), ("2(x3)", [2, 2, 2]), ("2,1", [2, 1]), ("4(x2),1,3(x1)", [4, 4, 1, 3])],
)
def test_parse_tasks_per_node(value: str, counts: list[int]) -> None:
    assert parse_tasks_per_node(value) == counts


@pytest.mark.parametrize("value", ["", "x", "2(x)", "0", "2(3)", "2,,1"])
def test_parse_tasks_per_node_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE="):
        parse_tasks_per_node(value)


prefixes = st.text("abcxyz-.", min_size=1, max_size=6).filter(lambda p: not p[-1].isdigit())
groups = st.tuples(
    prefixes,
    st.lists(st.integers(0, 300), min_size=1, max_size=12, unique=True).map(sorted),
    st.integers(1, 4),
)


def compress(prefix: str, numbers: list[int], width: int) -> str:
    """Slurm's compressed form: runs of consecutive numbers become ranges."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    items = [f"{r[0]:0{width}d}" + (f"-{r[-1]:0{width}d}" if len(r) > 1 else "") for r in runs]
    return f"{prefix}[{','.join(items)}]"


@given(st.lists(groups, min_size=1, max_size=4))
def test_parse_nodelist_round_trip(spec: list[tuple[str, list[int], int]]) -> None:
    nodelist = ",".join(compress(p, numbers, w) for p, numbers, w in spec)
    expected = [f"{p}{n:0{w}d}" for p, numbers, w in spec for n in numbers]
    assert parse_nodelist(nodelist) == expected
    # The expanded names are themselves a valid nodelist.
    assert parse_nodelist(",".join(expected)) == expected
