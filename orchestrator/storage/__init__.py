"""One small store over local paths and `s3://bucket/prefix` URLs; the only fsspec/s3fs importer.

    store.py     Store, the facade every caller uses; asks the registry for its backend once
    registry.py  URL scheme -> backend factory (imported on first use); unknown schemes refused
    base.py      Backend, the Protocol a backend implements; AtomicWriter
    local.py     local disk: temp + fsync + rename (link for create-only), fsynced directories
    s3.py        S3 via s3fs: create-only PUT (If-None-Match), multipart abort, retry wiring
    retry.py     which errors are transient, backoff with jitter, redaction, the retry loop
    options.py   StorageOptions (the config's `storage:` section), one field per backend: S3Options
    check.py     the start-up check that a run dir can be written, read and deleted

Above this package, code carries a `StorageOptions` whole and asks a Store what it can do
(`renames_dirs`, `fsyncs`, `local_paths`); it never reads a backend's setting or tests a URL's
scheme. A new backend: one module, its field of StorageOptions, its entry in registry.py, and
the contract suite run on it (tests/test_storage_contract.py).

Retries: whole small-object operations are retried by this package on transient errors, with
botocore/s3fs retries off for them; streams and the filesystem handed to torch DCP for the shard
files (`Store.fsspec_filesystem`) use botocore's own per-request retries (see s3.py).
Credentials are never held here: botocore reads them in each process, so a pickled Store
carries none and `repr`/logs cannot show them.

fsspec, s3fs and botocore are imported lazily, on first use: importing this package is cheap.
"""

from orchestrator.storage.local import start_writeback
from orchestrator.storage.options import S3Options, StorageOptions
from orchestrator.storage.retry import backoff_delay, is_transient, redact
from orchestrator.storage.store import Store

__all__ = [
    "S3Options",
    "StorageOptions",
    "Store",
    "backoff_delay",
    "is_transient",
    "redact",
    "start_writeback",
]
