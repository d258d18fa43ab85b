"""`stockpot soup --config FILE` opens every run dir and its output with the config's whole
`storage:` section, as the chained soup job does: on the real S3 server (moto_server) behind
the fault proxy, the retries of the soup's reads wait as `storage.s3` says."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from devtools.s3server import FaultProxy, S3Server
from launch.cli import main
from orchestrator.config import load, to_yaml
from orchestrator.storage import Store
from tests.fixtures.s3 import s3_storage
from tests.soup_fixtures import train_run

BACKOFF_S, MAX_BACKOFF_S = 0.02, 0.05
FAILURES = 4  # one read fails 4 times (of storage.s3.max_attempts: 5) and then succeeds
# storage/retry.py's warning for a transient failure, with the wait it then makes
_RETRY = re.compile(r"\(attempt (\d)/\d, retry in ([\d.]+)s\)")


def _upload(local: Path, store: Store) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.write_bytes(path.relative_to(local).as_posix(), path.read_bytes())


@pytest.mark.s3
def test_soup_with_a_config_waits_between_retries_as_storage_s3_says(
    s3_server: S3Server,
    s3_bucket: str,
    s3_faults: FaultProxy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    local = tmp_path / "run"
    train_run(local, saves=(10, 20))
    url = f"{s3_bucket}/run"
    _upload(local, Store(url, s3_storage(s3_server.endpoint_url)))
    settings = [f"run.dir={url}", f"storage.s3.endpoint_url={s3_faults.endpoint_url}"]
    settings += [f"storage.s3.backoff_s={BACKOFF_S}", f"storage.s3.max_backoff_s={MAX_BACKOFF_S}"]
    config = tmp_path / "soup.yaml"
    config.write_text(to_yaml(load(None, settings)))
    manifest = url.removeprefix("s3:/") + "/checkpoints/step-000000010/MANIFEST.json"
    s3_faults.fail(manifest, status=503, times=FAILURES)

    with caplog.at_level(logging.WARNING, logger="orchestrator.storage"):
        assert main(["soup", "--config", str(config), "--out", str(tmp_path / "soup")]) == 0
    waits = [(int(a), float(s)) for a, s in _RETRY.findall(caplog.text)]
    assert [a for a, _ in waits] == list(range(1, FAILURES + 1)), caplog.text
    # Capped exponential with jitter: the first wait is at most backoff_s (the default, 0.2 s,
    # waits at least 0.1 s), and no wait is longer than max_backoff_s (uncapped, the fourth
    # would be 0.08 s at least).
    assert waits[0][1] <= BACKOFF_S, waits
    assert max(s for _, s in waits) <= MAX_BACKOFF_S, waits
