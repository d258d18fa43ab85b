"""Per-rank state (RNG streams, data position, ...) as JSON: nothing on load can run code.

Values may be None, bool, int, float, str, bytes, tuples, lists, str-keyed dicts, torch tensors
and numpy arrays; bytes and array data travel as base64. Tuples stay tuples (python's RNG state
needs them).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import torch


def encode_rank_state(value: Any) -> bytes:
    return json.dumps(_to_json(value), separators=(",", ":")).encode()


def decode_rank_state(raw: bytes) -> Any:
    return _from_json(json.loads(raw))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _to_json(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, bytes):
        return {"__bytes__": _b64(v)}
    if isinstance(v, tuple):
        return {"__tuple__": [_to_json(x) for x in v]}
    if isinstance(v, list):
        return [_to_json(x) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise TypeError(f"per-rank state dict keys must be str (got {list(v)[:3]})")
        if any(k.startswith("__") and k.endswith("__") for k in v):
            raise TypeError("per-rank state keys may not look like __tag__")
        return {k: _to_json(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        return {
            "__tensor__": _b64(t.view(torch.uint8).numpy().tobytes() if t.numel() else b""),
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
        }
    if isinstance(v, np.ndarray):
        a = np.ascontiguousarray(v)
        return {"__ndarray__": _b64(a.tobytes()), "dtype": a.dtype.str, "shape": list(a.shape)}
    if isinstance(v, np.integer | np.floating):
        return _to_json(v.item())
    raise TypeError(
        f"cannot save {type(v).__name__} in per-rank state; use plain data, tensors or arrays"
    )


def _from_json(v: Any) -> Any:
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    if not isinstance(v, dict):
        return v
    if "__bytes__" in v:
        return base64.b64decode(v["__bytes__"])
    if "__tuple__" in v:
        return tuple(_from_json(x) for x in v["__tuple__"])
    if "__tensor__" in v:
        dtype = getattr(torch, v["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown tensor dtype {v['dtype']!r}")
        raw = bytearray(base64.b64decode(v["__tensor__"]))
        flat = (
            torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        )
        return flat.view(dtype).reshape(v["shape"]).clone()
    if "__ndarray__" in v:
        buf = base64.b64decode(v["__ndarray__"])
        return np.frombuffer(buf, dtype=np.dtype(v["dtype"])).reshape(v["shape"]).copy()
    return {k: _from_json(x) for k, x in v.items()}
