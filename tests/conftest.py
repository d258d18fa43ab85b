"""Shared test set-up. Real services live in their own fixture modules (tests/fixtures/);
helpers shared by several test modules live in tests/*.py modules that are not tests, so no
test module imports another."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.slurm",
    "tests.fixtures.sbatch",
    "tests.fixtures.reference",
]

# Every Python process a test starts (ranks, the CLI; all that inherit the environment) turns
# torch's deprecations into errors, as this one does (pyproject.toml's filterwarnings): see
# the sitecustomize.py there.
_PATH = [str(Path(__file__).parent / "strict_warnings"), os.environ.get("PYTHONPATH")]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, _PATH))

# Tests whose service may be missing outside CI; under CI=true their fixtures fail instead.
SERVICES = {"slurm": "Slurm", "s3": "S3"}


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture scope
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the `two_nodes` tests last: they switch the dev cluster to two nodes (and back at
    their teardown), which would cancel or confuse the single-node Slurm tests' jobs."""
    items.sort(key=lambda item: item.get_closest_marker("two_nodes") is not None)


# Seconds spent per test file (set-up, call and tear-down), for the closing summary.
_FILE_SECONDS: Counter[str] = Counter()
SLOWEST_FILES = 5


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _FILE_SECONDS[report.nodeid.split("::", 1)[0]] += report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    _slowest_files(terminalreporter)
    _skipped_services(terminalreporter)


def _slowest_files(terminalreporter: pytest.TerminalReporter) -> None:
    """Where the suite's time goes, by file: `make test` must stay under 15 minutes on 2 cores
    as tests are added, and a file, not a test, is what one splits or trims."""
    if not _FILE_SECONDS:
        return
    total = sum(_FILE_SECONDS.values())
    terminalreporter.write_sep("-", f"slowest test files ({total:.0f} s in all)")
    for name, seconds in _FILE_SECONDS.most_common(SLOWEST_FILES):
        terminalreporter.write_line(f"{seconds:8.1f} s  {name}")


def _skipped_services(terminalreporter: pytest.TerminalReporter) -> None:
    """A loud closing line when Slurm or S3 tests were skipped because their service could not
    start: a green `make test` must not hide that those tests never ran."""
    skipped: Counter[tuple[str, str]] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        service = next((SERVICES[m] for m in SERVICES if m in report.keywords), None)
        if service is not None:
            skipped[service, _reason(report)] += 1
    if not skipped:
        return
    total = sum(skipped.values())
    terminalreporter.write_sep(
        "!", f"{total} SERVICE TESTS DID NOT RUN (set CI=true to fail instead)", red=True, bold=True
    )
    for (service, reason), count in sorted(skipped.items()):
        terminalreporter.write_line(f"SKIPPED {count} {service} tests: {reason}", red=True)


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")
