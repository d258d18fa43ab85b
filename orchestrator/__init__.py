"""stockpot's in-job plane: what every rank runs inside the Slurm job (or locally)."""

__version__ = "0.1.0"
