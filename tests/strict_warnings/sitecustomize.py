"""Run at start-up by every Python process the tests start (tests/conftest.py puts this folder
on their PYTHONPATH), as pyproject.toml's `filterwarnings` does in the test process itself.

A FutureWarning or DeprecationWarning raised in torch, or in our code calling a deprecated API,
is an error: DCP and FSDP2 mostly run inside rank processes, where a deprecation would otherwise
be a line in a rank log no one reads, until the torch release that removes the API breaks users.
Only torch and our own modules: a third-party library's deprecation is not ours to fix.
"""

import warnings

TORCH_AND_OURS = r"(torch|orchestrator|launch|tests|bench|devtools)(\.|$)"  # as pyproject.toml's

for _category in (FutureWarning, DeprecationWarning):
    warnings.filterwarnings("error", category=_category, module=TORCH_AND_OURS)
