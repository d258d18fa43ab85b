"""The deprecation rule (pyproject.toml's filterwarnings, tests/strict_warnings/sitecustomize.py):
torch's FutureWarning and DeprecationWarning fail a test, in the test process and in the
processes it starts; a third-party library's do not."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from tests.ranks import REPO

WARN = "import warnings; warnings.warn_explicit('old API', FutureWarning, 'x.py', 1, module={!r})"


@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
@pytest.mark.parametrize("module", ["torch.distributed.checkpoint", "orchestrator.state"])
def test_torch_deprecation_is_an_error_here(category: type[Warning], module: str) -> None:
    with pytest.raises(category, match="old API"):
        warnings.warn_explicit("old API", category, "x.py", 1, module=module)


def test_third_party_deprecation_is_not() -> None:
    with pytest.warns(DeprecationWarning):
        warnings.warn_explicit("old API", DeprecationWarning, "x.py", 1, module="botocore.auth")


@pytest.mark.parametrize(
    ("module", "fails"),
    [("torch.distributed.fsdp", True), ("torchvision", False), ("boto3", False)],
)
def test_same_rule_in_started_processes(module: str, fails: bool) -> None:
    code = WARN.format(module)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert (out.returncode != 0) == fails, out.stderr
    assert "FutureWarning: old API" in out.stderr  # raised, or shown as a plain warning
