"""The commit record and the per-rank state (checkpoint/format/manifest.py, rank_state.py): their
bytes are pinned (a reader of older checkpoints depends on them), they round-trip, and what is
not one of them is refused as corrupt, never half-read."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from orchestrator.checkpoint.format import (
    FileEntry,
    Hasher,
    HashingReader,
    Manifest,
    check_confined,
    decode_rank_state,
    encode_rank_state,
    hash_bytes,
    hash_stream,
)
from orchestrator.errors import CheckpointCorrupt

MANIFEST = Manifest(
    step=7,
    files={
        "__0_0.distcp": FileEntry(10, "ab" * 16),
        "ranks/rank-00000.json": FileEntry(3, "cd" * 16),
    },
    world_size=2,
    parallel="ddp",
    config_hash="h",
    metrics={"loss": 0.5},
    timings={"write_s": 1.25},
    created_at=1700000000.5,
    versions={"torch": "2.13.0"},
    data_dir="n1",
    weights_only=True,
)
# What MANIFEST.json holds, byte for byte (the writer before the format package had its home).
PINNED = (
    b'{\n "checksum_algorithm": "xxh3_128",\n "config_hash": "h",\n "created_at": 1700000000.5,\n'
    b' "data_dir": "n1",\n "files": {\n  "__0_0.distcp": {\n'
    b'   "checksum": "abababababababababababababababab",\n   "size": 10\n  },\n'
    b'  "ranks/rank-00000.json": {\n   "checksum": "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",\n'
    b'   "size": 3\n  }\n },\n "format": "stockpot.checkpoint",\n "metrics": {\n  "loss": 0.5\n'
    b' },\n "parallel": "ddp",\n "step": 7,\n "timings": {\n  "write_s": 1.25\n },\n'
    b' "version": 2,\n "versions": {\n  "torch": "2.13.0"\n },\n "weights_only": true,\n'
    b' "world_size": 2\n}\n'
)


def test_the_manifest_bytes_are_pinned_and_round_trip() -> None:
    assert MANIFEST.to_json() == PINNED
    assert Manifest.from_json(PINNED) == MANIFEST
    assert MANIFEST.data_path("__0_0.distcp") == "n1/__0_0.distcp"
    assert MANIFEST.total_bytes == 13


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"not json", "unreadable manifest"),
        (b'{"format": "other"}', "not a stockpot manifest"),
        (PINNED.replace(b'"version": 2', b'"version": 9'), "unsupported version 9"),
        (PINNED.replace(b'"__0_0.distcp"', b'"../x"'), "'../x' escapes the checkpoint"),
        (PINNED.replace(b'"data_dir": "n1"', b'"data_dir": "/etc"'), "escapes the checkpoint"),
        (PINNED.replace(b'"xxh3_128"', b'"md5"'), "unknown checksum algorithm"),
        (PINNED.replace(b'"size": 10', b'"size": "ten"'), "unreadable manifest"),
    ],
)
def test_what_is_not_a_manifest_is_corrupt(raw: bytes, why: str) -> None:
    with pytest.raises(CheckpointCorrupt, match=rf"^step-1/MANIFEST\.json: .*{why}"):
        Manifest.from_json(raw, "step-1/MANIFEST.json")


@pytest.mark.parametrize("name", ["", ".", "/etc/x", "a/../../x", "a\\b", "c:x", "a//b", "./a"])
def test_names_outside_the_checkpoint_are_refused(name: str) -> None:
    with pytest.raises(CheckpointCorrupt, match="escapes the checkpoint"):
        check_confined(name)
    assert check_confined("data/__0_0.distcp") == "data/__0_0.distcp"


def test_a_hash_fed_in_pieces_equals_the_hash_of_the_whole() -> None:
    data = bytes(range(256)) * 1000
    hasher = Hasher()
    for at in range(0, len(data), 4097):
        hasher.update(memoryview(data)[at : at + 4097])
    assert hasher.entry() == hash_bytes(data) == hash_stream(io.BytesIO(data), chunk=1000)
    assert hash_bytes(b"") == FileEntry(0, "99aa06d3014798d86001c324468d497f")  # xxh3-128("")


def test_rank_state_bytes_are_pinned_and_round_trip() -> None:
    state = {
        "a": (1, 2.5, None, True),
        "b": b"xy",
        "t": torch.tensor([1, 2], dtype=torch.int16),
        "n": np.arange(3, dtype=np.uint8),
        "l": ["s", {"k": 1}],
    }
    raw = encode_rank_state(state)
    assert raw == (
        b'{"a":{"__tuple__":[1,2.5,null,true]},"b":{"__bytes__":"eHk="},'
        b'"t":{"__tensor__":"AQACAA==","dtype":"int16","shape":[2]},'
        b'"n":{"__ndarray__":"AAEC","dtype":"|u1","shape":[3]},"l":["s",{"k":1}]}'
    )
    back = decode_rank_state(raw)
    assert back["a"] == (1, 2.5, None, True) and back["b"] == b"xy" and back["l"] == state["l"]
    assert back["t"].dtype == torch.int16 and torch.equal(back["t"], state["t"])
    assert back["n"].dtype == np.uint8 and np.array_equal(back["n"], state["n"])
    empty = decode_rank_state(encode_rank_state({"e": torch.zeros(0, 3, dtype=torch.bfloat16)}))
    assert empty["e"].shape == (0, 3) and empty["e"].dtype == torch.bfloat16


def test_rank_state_refuses_what_json_cannot_carry_back() -> None:
    with pytest.raises(TypeError, match="use plain data, tensors or arrays"):
        encode_rank_state({"f": print})
    with pytest.raises(TypeError, match="keys must be str"):
        encode_rank_state({1: "x"})
    with pytest.raises(TypeError, match="may not look like __tag__"):
        encode_rank_state({"__bytes__": "x"})
    with pytest.raises(ValueError, match="unknown tensor dtype 'Tensor'"):
        decode_rank_state(b'{"x":{"__tensor__":"","dtype":"Tensor","shape":[0]}}')


def test_a_hashing_reader_hashes_every_byte_of_a_file_read_in_order() -> None:
    """What a load reads through a HashingReader: pieces with gaps between them (seeks forward
    read and hash the gap), some into a buffer; `finish` reads the tail. The checksum is the
    whole file's; a backward seek gives it up (None), and reads still return the right bytes."""
    data = bytes(range(256)) * 100
    reader = HashingReader(io.BytesIO(data), chunk=1000)
    reader.seek(10)
    assert reader.read(5) == data[10:15]
    reader.seek(7000)
    buf = bytearray(300)
    assert reader.readinto(memoryview(buf)) == 300 and bytes(buf) == data[7000:7300]
    assert reader.tell() == 7300
    assert reader.finish() == hash_bytes(data)
    back = HashingReader(io.BytesIO(data))
    back.seek(500)
    back.seek(100)
    assert back.read(4) == data[100:104]
    assert back.finish() is None
    past = HashingReader(io.BytesIO(data))
    past.seek(len(data) + 10)
    assert past.read(1) == b""
    assert past.finish() == hash_bytes(data)
