"""An entry point module that fails at import (tests/test_api.py)."""

raise RuntimeError("this script is broken at import")
