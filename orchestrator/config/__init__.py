"""The run config: a YAML file plus `key=value` overrides, resolved into frozen dataclasses.

    schema      the dataclasses (one per section) and their validation
    checkpoint  the `checkpoint:` section's types, which the checkpoint code reads as they are
    sweeps      what a sweep may vary, and its elements' labels and run dirs
    loading     YAML + overrides -> Config (the only OmegaConf importer), sweep elements, to_yaml
    hashing     config_hash and the resume drift check (computation_view, diff_views)

Import from here (`from orchestrator.config import Config, load`); the modules are the layout.
"""

from orchestrator.config.checkpoint import CheckpointConfig
from orchestrator.config.hashing import computation_view, config_hash, diff_views
from orchestrator.config.loading import expand_sweep, from_dict, load, to_yaml
from orchestrator.config.schema import (
    Config,
    LauncherConfig,
    ModelConfig,
    OptimConfig,
    ResumeConfig,
    RunConfig,
    S3Config,
    SchedulerConfig,
    SoupConfig,
    StorageConfig,
    TaskConfig,
    TrainerConfig,
)
from orchestrator.config.sweeps import sweep_label, sweep_run_dir

__all__ = [
    "CheckpointConfig",
    "Config",
    "LauncherConfig",
    "ModelConfig",
    "OptimConfig",
    "ResumeConfig",
    "RunConfig",
    "S3Config",
    "SchedulerConfig",
    "SoupConfig",
    "StorageConfig",
    "TaskConfig",
    "TrainerConfig",
    "computation_view",
    "config_hash",
    "diff_views",
    "expand_sweep",
    "from_dict",
    "load",
    "sweep_label",
    "sweep_run_dir",
    "to_yaml",
]
