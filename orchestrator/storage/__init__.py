"""One small store over local paths and `s3://bucket/prefix` URLs; the only fsspec/s3fs importer.

    store.py    Store, the facade every caller uses; picks a backend once from the URL
    base.py     Backend, the Protocol a backend implements; AtomicWriter
    local.py    local disk: temp + fsync + rename (link for create-only), fsynced directories
    s3.py       S3 via s3fs: create-only PUT (If-None-Match), multipart abort, retry wiring
    retry.py    which errors are transient, backoff with jitter, redaction, the retry loop
    options.py  S3Options, which is also the config schema of `storage.s3.*`

Retries: whole small-object operations are retried by this package on transient errors, with
botocore/s3fs retries off for them; streams and the filesystem handed to torch DCP use botocore's
own per-request retries (see s3.py). Credentials are never held here: botocore reads them in each
process, so a pickled Store carries none and `repr`/logs cannot show them.

fsspec, s3fs and botocore are imported lazily, on first use: importing this package is cheap.
"""

from orchestrator.storage.local import start_writeback
from orchestrator.storage.options import S3Options
from orchestrator.storage.retry import backoff_delay, is_transient, redact
from orchestrator.storage.store import Store, is_s3_url

__all__ = [
    "S3Options",
    "Store",
    "backoff_delay",
    "is_s3_url",
    "is_transient",
    "redact",
    "start_writeback",
]
