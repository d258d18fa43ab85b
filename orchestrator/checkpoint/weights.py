"""Model weights out of a checkpoint with no model code: find them, read them by plain name.

`ModelAndOptimizer` registered under a name (e.g. `train`) stores the model's tensors under the
flat DCP keys `<name>.model.<param>`, and its ties beside them (`<name>.tied`, ties.py). Used
by `stockpot export`, the soup and `model.init_from`. trainer.ema's averages are stored the
same way under `ema_<digits>` (ema.py), and are read when asked for by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from orchestrator.checkpoint.format import MODEL_KEY
from orchestrator.config.ema import EMA_PREFIX
from orchestrator.errors import CheckpointCorrupt, UsageError
from orchestrator.ties import TIED_KEY, aliases

if TYPE_CHECKING:
    import torch

    from orchestrator.storage import StorageOptions, Store


def model_prefixes(keys: Iterable[str]) -> list[str]:
    """Every `<name>.model.` that starts a flat key (registered names have no dots)."""
    found = set()
    for key in keys:
        name, _, rest = key.partition(".")
        if rest.startswith(MODEL_KEY[1:]):
            found.add(name + MODEL_KEY)
    return sorted(found)


def choose_prefix(tensors: Mapping[str, Any], requested: str) -> str:
    """`requested` (a registered name alone, `ema_999`, means its model: `ema_999.model.`), or
    when it is `auto` the one model prefix there is, not counting trainer.ema's averages
    (`ema_*`: the trained model is what `auto` means); UsageError otherwise."""
    present = model_prefixes(tensors)
    if requested != "auto":
        prefix = requested if requested.endswith(".") else requested + "."
        if prefix[:-1] + MODEL_KEY in present:
            return prefix[:-1] + MODEL_KEY
        if not any(k.startswith(prefix) for k in tensors):
            raise UsageError(
                f"no tensors under --prefix {prefix!r}; model prefixes here: {_listed(present)}"
            )
        return prefix
    trained = [p for p in present if not p.startswith(EMA_PREFIX)]
    if len(trained) == 1:
        return trained[0]
    if len(present) == 1:
        return present[0]
    others = sorted({k.partition(".")[0] + "." for k in tensors})
    if not present:
        raise UsageError(
            f"no '<name>{MODEL_KEY}' tensors in this checkpoint; top-level prefixes: "
            f"{_listed(others)}; choose one with --prefix"
        )
    raise UsageError(
        f"several model prefixes: {_listed(present)}; choose one with --prefix, "
        f"e.g. --prefix {present[0]}"
    )


def _listed(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


def read_weights(
    url: str, storage: StorageOptions | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Plain-named model weights from a `.safetensors` file, a committed checkpoint, or a run dir
    (its newest checkpoint that verifies), local or s3://; and a description of the source."""
    from orchestrator.checkpoint import catalog
    from orchestrator.checkpoint.format import (
        CHECKPOINTS_DIR,
        MANIFEST_NAME,
        load_flat,
        stored_items,
    )
    from orchestrator.storage import Store

    if url.endswith(".safetensors"):
        return _read_safetensors(url, storage), url
    store = Store(url, storage)
    if store.exists(MANIFEST_NAME):
        info = catalog.load_info(store)
        ckpt = store
    elif store.exists(CHECKPOINTS_DIR):
        found = catalog.newest_good(store, catalog.scan(store).committed, checksums=True)
        if found is None:
            raise UsageError(f"{store.path()} has no committed checkpoint that verifies")
        info, ckpt = found, store.child(found.rel)
    else:
        raise UsageError(
            f"{url} is not a .safetensors file, a committed checkpoint, or a run directory"
        )
    problems = catalog.verify(ckpt, info.manifest, checksums=True)
    if problems:
        raise CheckpointCorrupt(f"{ckpt.path()}: {problems[0]}")
    data = info.manifest.data_dir
    items = stored_items(ckpt, data)
    prefix = choose_prefix(items, "auto")
    keys = [k for k, stored in items.items() if k.startswith(prefix) and stored is not None]
    loaded = load_flat(ckpt, data, keys)
    return {k[len(prefix) :]: loaded[k] for k in keys}, f"{ckpt.path()} (step {info.step})"


def _read_safetensors(url: str, storage: StorageOptions | None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    from orchestrator.storage import Store

    parent, _, name = url.rpartition("/")
    return load(Store(parent or ".", storage).read_bytes(name))


def recorded_aliases(
    ckpt: Store, data: str, items: Mapping[str, Any], model_prefix: str
) -> dict[str, str]:
    """alias -> owner, from the ties recorded beside the model under `model_prefix`
    (`train.model.` -> `train.tied`) among the checkpoint's `items` (`format.stored_items`);
    empty for a model without ties."""
    from orchestrator.checkpoint.format import load_flat

    key = model_prefix.removesuffix("model.") + TIED_KEY
    if key not in items:
        return {}
    return aliases(load_flat(ckpt, data, [key])[key])
