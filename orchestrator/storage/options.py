"""Storage settings: frozen dataclasses that are both the config's `storage:` section and what
the backends read, so the rules are checked in one place, when the config is loaded.

`StorageOptions` holds one field per backend that has settings (`s3`). Everything above this
package carries it whole and never reads a field: only the backend a URL's scheme picks
(registry.py) reads its own, as fsspec's `storage_options` are read by the backend alone.

S3: unset fields fall back to the standard AWS_* environment. Credentials are not settings:
botocore finds them itself (environment, profile, instance role) in every process that talks
to S3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.errors import require


@dataclass(frozen=True)
class S3Options:
    # S3-compatible endpoint (MinIO, moto, ...); null uses AWS_ENDPOINT_URL_S3,
    # then AWS_ENDPOINT_URL, then AWS itself.
    endpoint_url: str | None = None
    # Region; null uses AWS_REGION / AWS_DEFAULT_REGION.
    region: str | None = None
    # Named profile from ~/.aws; null uses AWS_PROFILE or the default chain.
    profile: str | None = None
    # Attempts per operation on transient errors (5xx, throttling, connection resets).
    max_attempts: int = 5
    # First wait between attempts, in seconds; doubles per attempt, with jitter.
    backoff_s: float = 0.2
    # Longest single wait between attempts, in seconds.
    max_backoff_s: float = 10.0
    # Part size of streamed uploads (checkpoint shard files), in MiB (S3's minimum is 5): a
    # file smaller than one part is a single PUT; a larger one goes up in parts while the
    # rest is still being written.
    upload_part_mb: int = 32
    # Parts of one file uploaded at once; each stream holds up to this many parts (+1) in
    # memory while they are in flight.
    upload_concurrency: int = 4

    def __post_init__(self) -> None:
        n = self.max_attempts
        require(n >= 1, f"storage.s3.max_attempts must be >= 1 (got {n}); 1 means no retries")
        for key in ("backoff_s", "max_backoff_s"):
            value = getattr(self, key)
            require(value >= 0, f"storage.s3.{key} must be >= 0 (got {value}); 0 retries at once")
        part, n = self.upload_part_mb, self.upload_concurrency
        require(part >= 5, f"storage.s3.upload_part_mb must be >= 5 (got {part}); S3's minimum")
        require(n >= 1, f"storage.s3.upload_concurrency must be >= 1 (got {n})")


@dataclass(frozen=True)
class StorageOptions:
    # Settings for s3:// URLs. Credentials come only from the standard AWS variables/files.
    s3: S3Options = field(default_factory=S3Options)
