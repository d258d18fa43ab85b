"""Which backend serves a URL: a table keyed by URL scheme, as fsspec's registry is.

Each entry is a factory `(StorageOptions) -> Backend` that imports its backend's module on
first use (importing this package stays cheap) and hands it its own field of the options; no
other code reads a field. A new backend is one module satisfying `base.Backend`, its settings
as a field of `StorageOptions`, one factory and one entry here, and the contract suite run on
it (tests/test_storage_contract.py, which fails until it has a root for every entry).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.storage.base import Backend
    from orchestrator.storage.options import StorageOptions


def _local(options: StorageOptions) -> Backend:
    from orchestrator.storage.local import LocalBackend

    return LocalBackend()


def _s3(options: StorageOptions) -> Backend:
    from orchestrator.storage.s3 import S3Backend

    return S3Backend(options.s3)


# URL scheme -> factory; "" is a plain path (no scheme).
_FACTORIES: dict[str, Callable[[StorageOptions], Backend]] = {"": _local, "s3": _s3}
# Schemes that are another's other spelling: file:///abs/path is a local path.
_ALIASES = {"file": ""}


def scheme(url: str) -> str:
    """`url`'s scheme as the table knows it ("" for a plain path); no check."""
    name, sep, _ = url.partition("://")
    name = name if sep else ""
    return _ALIASES.get(name, name)


def schemes() -> list[str]:
    """The scheme of each backend there is ("" for local paths), one per backend."""
    return sorted(_FACTORIES)


def check_url(url: str, key: str = "") -> None:
    """ConfigError unless a backend serves `url`: one line naming the schemes that are served
    (`key`, e.g. "run.dir", says where the URL came from)."""
    if scheme(url) not in _FACTORIES:
        where = f"{key} {url}" if key else url
        given = url.partition("://")[0]
        served = ", ".join(["local paths", *(f"{s}://" for s in (*_ALIASES, *schemes()) if s)])
        raise ConfigError(f"{where}: no storage backend for '{given}://'; supported: {served}")


def open_backend(url: str, options: StorageOptions) -> Backend:
    """A fresh backend for `url`'s scheme, with its own field of `options`."""
    check_url(url)
    return _FACTORIES[scheme(url)](options)
