"""The commands' shared run: trained and saved once for the whole package, then copied for
each test that may damage it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from orchestrator.storage import Store
from tests.inspect_cli.saved_run import Run, train_and_save


@pytest.fixture(scope="package")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Run:
    t0 = time.time()
    path = tmp_path_factory.mktemp("pristine") / "run"
    return Run(path, train_and_save(Store(str(path))), t0)


@pytest.fixture
def run(pristine: Run, tmp_path: Path) -> Run:
    """A private copy of the pristine run, free to damage."""
    shutil.copytree(pristine.path, tmp_path / "run")
    return Run(tmp_path / "run", pristine.weights, pristine.t0)
