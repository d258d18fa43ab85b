"""Model weights out of a committed checkpoint into one safetensors file, with no model code.

`export_checkpoint(ckpt, dest, name, prefix)`: a committed DCP checkpoint's model tensors under
their plain names (`fc.weight`), read one batch at a time (`format.load_flat`), written by the
format's safetensors writer (`format.write_safetensors`), so memory stays about one batch
whatever the model's size. `stockpot export` and the chained job use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.checkpoint.format import (
    DTYPE_CODES,
    SAFETENSORS_SUFFIX,
    TensorEntry,
    dtype_name,
    write_safetensors,
)
from orchestrator.checkpoint.weights import choose_prefix
from orchestrator.errors import CheckpointCorrupt, CheckpointError, StockpotError, UsageError

if TYPE_CHECKING:
    from orchestrator.checkpoint.format import StoredTensor
    from orchestrator.storage import Store


@dataclass(frozen=True)
class Exported:
    """What `export_checkpoint` wrote."""

    path: str
    step: int
    tensors: int
    nbytes: int
    skipped: list[str] = field(default_factory=list)  # non-tensor items under the prefix


def check_out_name(out: str) -> str:
    """`out` when it names a .safetensors file; else a UsageError suggesting one."""
    name = out.rsplit("/", 1)[-1]
    if name.endswith(SAFETENSORS_SUFFIX) and name != SAFETENSORS_SUFFIX:
        return out
    fixed = out[: len(out) - len(name)] + (name.split(".", 1)[0] or "model") + SAFETENSORS_SUFFIX
    raise UsageError(f"--out must name a {SAFETENSORS_SUFFIX} file, e.g. --out {fixed}")


def model_entries(
    items: Mapping[str, StoredTensor | None], prefix: str
) -> tuple[list[TensorEntry], list[str]]:
    """The tensors under `prefix` (`format.stored_items`), renamed to plain names; and the keys
    of the non-tensor items there, which safetensors cannot hold."""
    entries, skipped = [], []
    for key, stored in items.items():
        if not key.startswith(prefix):
            continue
        if stored is None:  # an object saved as bytes, not a tensor
            skipped.append(key)
            continue
        dtype = dtype_name(stored.dtype)
        if dtype not in DTYPE_CODES:
            raise StockpotError(f"{key} has dtype {dtype}, which safetensors cannot hold")
        itemsize = stored.dtype.itemsize
        entries.append(TensorEntry(key[len(prefix) :], key, dtype, stored.shape, itemsize))
    if not entries:
        raise UsageError(f"no tensors under {prefix!r}")
    return entries, sorted(skipped)


def export_checkpoint(
    ckpt: Store,
    dest: Store,
    name: str,
    *,
    prefix: str = "auto",
    progress: Callable[[int], object] | None = None,
) -> Exported:
    """Write the model tensors of the committed checkpoint `ckpt` to `dest/name`.

    The sizes in the manifest are checked first (a damaged checkpoint is refused, not
    exported); the file lands only when complete (Store.open_write), nothing is left on error.
    `prefix`: the flat key prefix of the model (`train.model.`), or `auto` for the only one.
    """
    from orchestrator.checkpoint import catalog
    from orchestrator.checkpoint.format import CHECKPOINTS_DIR, MANIFEST_NAME, stored_items
    from orchestrator.checkpoint.weights import recorded_aliases

    if not ckpt.exists(MANIFEST_NAME):
        hint = (
            f" (a run directory: pass one of its {CHECKPOINTS_DIR}/step-* dirs)"
            if ckpt.exists(CHECKPOINTS_DIR)
            else ""
        )
        raise UsageError(f"{ckpt.path()} is not a committed checkpoint (no {MANIFEST_NAME}){hint}")
    info = catalog.load_info(ckpt)
    problems = catalog.verify(ckpt, info.manifest, checksums=False)
    if problems:
        raise CheckpointCorrupt(f"refusing to export {ckpt.path()}: {'; '.join(problems)}")
    data = info.manifest.data_dir  # where DCP's files are, relative to the checkpoint
    items = stored_items(ckpt, data)
    model_prefix = choose_prefix(items, prefix)
    entries, skipped = model_entries(items, model_prefix)
    # A tie is written once, under its owner's name, as save_pretrained does (orchestrator/ties.py).
    tied = recorded_aliases(ckpt, data, items, model_prefix)
    entries = [e for e in entries if e.name not in tied]
    metadata = {"format": "pt", "step": str(info.step), "source": ckpt.path()}
    with dest.open_write(name) as f:
        total = write_safetensors(
            f, entries, lambda batch: _load_batch(ckpt, data, batch), metadata, progress=progress
        )
    return Exported(dest.path(name), info.step, len(entries), total, skipped)


def _load_batch(ckpt: Store, data: str, batch: list[TensorEntry]) -> dict[str, Any]:
    from orchestrator.checkpoint.format import load_flat

    try:
        return load_flat(ckpt, data, [e.key for e in batch])
    except (CheckpointCorrupt, CheckpointError) as exc:
        # Sizes matched but the bytes do not load: the checksums would have caught it.
        # (torch's own message for this suggests weights_only=False: the wrong advice here.)
        raise CheckpointCorrupt(
            f"{ckpt.path()}: tensor data does not load ({type(exc).__name__} reading "
            f"{batch[0].key}...); run `stockpot verify {ckpt.path()}` (--debug for details)"
        ) from exc
