"""Shared test set-up. Real services live in their own fixture modules."""

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.slurm"]
