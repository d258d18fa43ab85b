"""stockpot's in-job plane: what every rank runs inside the Slurm job (or locally)."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`orchestrator.training` (your own loop, orchestrator/api.py), imported on first use:
    the launcher imports this package without needing torch."""
    if name == "training":
        from orchestrator.api import training

        return training
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
