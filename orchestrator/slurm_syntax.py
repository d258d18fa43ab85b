"""Slurm's compressed syntaxes, parsed: hostlists ("gpu[01-03],cpu3") and per-node task counts
("2(x3),1"). Pure string functions, used by env.py to find the master host and local sizes."""

from __future__ import annotations

import re

# A nodelist expanding to more hosts than this is a typo, not a cluster.
MAX_HOSTS = 65536

_TASKS_ENTRY = re.compile(r"(\d+)(?:\(x(\d+)\))?")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_LITERAL = re.compile(r"[^\s\[\],]*")


def parse_tasks_per_node(value: str, name: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Slurm's compressed per-node counts: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for entry in value.split(","):
        m = _TASKS_ENTRY.fullmatch(entry.strip())
        if m is None or int(m.group(1)) < 1:
            raise ValueError(f"{name}={value!r} is not a tasks-per-node list like '2(x3),1'")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist: "gpu[01-03,07],cpu3" -> gpu01 gpu02 gpu03 gpu07 cpu3.

    Zero padding follows the range's first number, as in Slurm ("n[08-10]" -> n08 n09 n10,
    "n[8-10]" -> n8 n9 n10). Several brackets in one name expand as a product, the first
    varying slowest ("a[1-2]b[3-4]" -> a1b3 a1b4 a2b3 a2b4). Order and duplicates are kept.
    """
    if not nodelist.strip():
        raise ValueError("empty nodelist")
    hosts: list[str] = []
    for expression in _split_top_level(nodelist):
        hosts.extend(_expand_host(expression, budget=MAX_HOSTS - len(hosts)))
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split on the commas outside brackets; brackets must pair up and not nest."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise ValueError(f"nodelist {nodelist!r}: unbalanced or nested brackets at {i}")
    if depth:
        raise ValueError(f"nodelist {nodelist!r}: unclosed '['")
    parts.append(nodelist[start:])
    if not all(parts):
        raise ValueError(f"nodelist {nodelist!r}: empty host name")
    return parts


def _expand_host(expression: str, budget: int) -> list[str]:
    # re.split with a group keeps the brackets: literal, [..], literal, [..], ..., literal
    tokens = re.split(r"(\[[^\]]*\])", expression)
    names = [""]
    for token in tokens:
        if token.startswith("["):
            choices = _expand_brackets(token, expression)
        elif _LITERAL.fullmatch(token):
            choices = [token]
        else:
            raise ValueError(f"nodelist host {expression!r}: bad character in {token!r}")
        if len(names) * len(choices) > budget:
            raise ValueError(f"nodelist host {expression!r}: more than {MAX_HOSTS} hosts")
        names = [name + choice for name in names for choice in choices]
    return names


def _expand_brackets(token: str, expression: str) -> list[str]:
    out: list[str] = []
    for item in token[1:-1].split(","):
        m = _RANGE.fullmatch(item)
        if m is None:
            raise ValueError(f"nodelist host {expression!r}: bad range {item!r} in {token}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        first, last = int(lo), int(hi)
        if first > last:
            raise ValueError(f"nodelist host {expression!r}: range {item!r} runs backwards")
        if last - first >= MAX_HOSTS:
            raise ValueError(f"nodelist host {expression!r}: more than {MAX_HOSTS} hosts")
        out.extend(f"{i:0{len(lo)}d}" for i in range(first, last + 1))
    return out
