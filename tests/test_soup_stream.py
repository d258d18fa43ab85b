"""The streaming read path: big pieces read in byte ranges (never whole), checksums computed
from the bytes the soup reads (no second pass), and the whole-piece fallback for pieces that
are not plain. Real checkpoints from the real Checkpointer; the mixer is driven directly with
a small chunk so a 1.5 MB tensor is read in 6 ranges."""

from __future__ import annotations

import io
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.format import Piece
from orchestrator.errors import CheckpointCorrupt
from orchestrator.soup import engine
from orchestrator.soup.ingredients import Ingredient
from orchestrator.soup.reader import TensorSpec, open_source
from orchestrator.soup.writer import _HashingFile, _ModelOnly
from orchestrator.storage import Store

CHUNK = 256 << 10
BIG = (384, 1024)  # 1.5 MB of float32: 6 chunks


def _states(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    base = {"big": torch.randn(BIG, generator=gen), "small": torch.randn(64, generator=gen)}
    states = []
    for step in range(n):
        state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        state["count"] = torch.tensor(step + 7)
        states.append(state)
    return states


@pytest.fixture
def ckpts(tmp_path: Path) -> list[Path]:
    run, holder = tmp_path / "run", _ModelOnly({})
    ckpt = Checkpointer(Store(str(run)))
    ckpt.register("train", holder)
    for step, state in enumerate(_states(3), start=1):
        holder.tensors = state
        ckpt.save(step)
    ckpt.close()
    return sorted((run / "checkpoints").iterdir())


def _mix(paths: list[Path], checksums: bool = True) -> tuple[dict[str, torch.Tensor], engine.Mixer]:
    sources = [open_source(Ingredient(str(p), "dcp", "test")) for p in paths]
    names = list(sources[0].specs)
    mixer = engine.Mixer(sources, None, names, chunk=CHUNK, checksums=checksums)
    try:
        return {name: mixer.next(name) for name in names}, mixer
    finally:
        mixer.close()


def test_a_big_tensor_is_read_in_ranges_and_equals_the_float64_mean(ckpts: list[Path]) -> None:
    got, mixer = _mix(ckpts)
    big = [s for s in mixer.segments if s.name == "big"]
    assert len(big) == math.ceil(BIG[0] * BIG[1] * 4 / CHUNK) == 6
    assert all(r.mode == "range" and r.length <= CHUNK + 4096 for s in big for r in s.reads)
    states = _states(3)
    for name in ("big", "small"):
        want = sum(s[name].double() for s in states) / 3
        assert torch.equal(got[name], want.float()), name
    assert got["count"].item() == 7  # integers come from the first ingredient
    # every model file and nothing else was checked from the stream, and matched
    found = mixer.checks.finish()
    assert found and all(problem is None for problem in found.values())
    assert {f for _, f in found} == {p.file for ps in mixer.sources[0].pieces.values() for p in ps}


def test_a_flipped_byte_inside_a_ranged_read_fails_its_stream_checksum(
    ckpts: list[Path], tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(ckpts[1], copy)
    source = open_source(Ingredient(str(copy), "dcp", "test"))
    (piece,) = source.pieces["big"]
    shard = copy / piece.file
    raw = bytearray(shard.read_bytes())
    raw[piece.offset + piece.length // 2] ^= 0x10  # in the tensor's bytes: loads fine
    shard.write_bytes(bytes(raw))
    _, mixer = _mix([ckpts[0], copy])
    problems = [p for p in mixer.checks.finish().values() if p]
    assert problems == [f"{shard}: checksum mismatch (xxh3_128)"]


def test_damaged_dcp_metadata_is_refused_before_it_is_unpickled(
    ckpts: list[Path], tmp_path: Path
) -> None:
    """The soup indexes an ingredient's pieces from DCP's `.metadata` (a pickle): it checks the
    file against the manifest first, so random bytes are a checksum mismatch, never unpickled."""
    copy = tmp_path / "copy"
    shutil.copytree(ckpts[1], copy)
    metadata = copy / ".metadata"
    metadata.write_bytes(os.urandom(metadata.stat().st_size))
    with pytest.raises(CheckpointCorrupt, match=r"\.metadata: checksum mismatch"):
        open_source(Ingredient(str(copy), "dcp", "test"))


def _stored(tensor: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return buf.getvalue()


def test_a_piece_that_is_not_plain_is_read_whole_and_loaded(ckpts: list[Path]) -> None:
    source = open_source(Ingredient(str(ckpts[0]), "dcp", "test"))
    transposed = torch.arange(12, dtype=torch.float32).reshape(4, 3).t()
    raw = _stored(transposed)
    spec = TensorSpec("t", torch.float32, (3, 4))
    got = source.decode(Piece("f", 0, len(raw), (0, 0), (3, 4)), spec, memoryview(raw))
    assert torch.equal(got, transposed)
    with pytest.raises(CheckpointCorrupt, match="does not load"):
        source.decode(Piece("f", 0, 10, (0, 0), (3, 4)), spec, memoryview(b"PK\x03\x04junk"))


def test_half_precision_ingredients_mix_in_float32_and_look_related(tmp_path: Path) -> None:
    """fp16 and bf16 tensors (segments of 256 kB) are summed in float32 and cast once; their
    squared norms, which overflow float16 (here ~50^2 x 262144), are summed in float32 too,
    so fine-tunes of one model still look related."""
    gen = torch.Generator().manual_seed(1)
    base = 50 + torch.randn(512, 512, generator=gen)
    run, holder = tmp_path / "half", _ModelOnly({})
    ckpt = Checkpointer(Store(str(run)))
    ckpt.register("train", holder)
    states = []
    for step in (1, 2, 3):
        w = base + 0.1 * torch.randn(base.shape, generator=gen)
        holder.tensors = {"h": w.half(), "b": w.bfloat16()}
        states.append(holder.tensors)
        ckpt.save(step)
    ckpt.close()
    got, mixer = _mix(sorted((run / "checkpoints").iterdir()))
    for name, dtype in (("h", torch.float16), ("b", torch.bfloat16)):
        want = (sum(s[name].float() for s in states) / 3).to(dtype)
        assert got[name].dtype == dtype and torch.equal(got[name], want), name
    cosine = mixer.similarity.cosine()
    assert cosine is not None and cosine > 0.99, cosine


def test_a_read_failing_on_a_read_thread_reaches_the_mixer(
    ckpts: list[Path], tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(ckpts[1], copy)
    sources = [open_source(Ingredient(str(p), "dcp", "test")) for p in (ckpts[0], copy)]
    mixer = engine.Mixer(sources, None, list(sources[0].specs), chunk=CHUNK, checksums=True)
    (piece,) = sources[1].pieces["big"]
    os.truncate(copy / piece.file, piece.offset + piece.length // 2)  # after the plan was made
    try:
        with pytest.raises(CheckpointCorrupt, match="truncated"):
            for name in mixer.names:
                mixer.next(name)
    finally:
        mixer.close()


def test_the_writer_threads_error_reaches_the_caller(tmp_path: Path) -> None:
    raw = open(tmp_path / "out", "wb")  # noqa: SIM115 -- closed below, before the write runs
    raw.close()
    with pytest.raises(ValueError, match="closed file"), _HashingFile(raw) as f:
        f.write(b"x" * 10)  # runs on the writer thread; its error comes out at the exit
