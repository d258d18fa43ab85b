"""S3 settings: one frozen dataclass that is both the config schema `storage.s3.*` and what the
S3 backend reads, so the rules are checked in one place, when the config is loaded.

Unset fields fall back to the standard AWS_* environment. Credentials are not settings: botocore
finds them itself (environment, profile, instance role) in every process that talks to S3.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def __post_init__(self) -> None:
        n = self.max_attempts
        require(n >= 1, f"storage.s3.max_attempts must be >= 1 (got {n}); 1 means no retries")
        for key in ("backoff_s", "max_backoff_s"):
            value = getattr(self, key)
            require(value >= 0, f"storage.s3.{key} must be >= 0 (got {value}); 0 retries at once")
