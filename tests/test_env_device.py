"""Per-rank device, backend and CPU threads: device_for, backend_for and cpu_threads."""

from __future__ import annotations

import pytest

from orchestrator.env import backend_for, cpu_threads, device_for


@pytest.mark.parametrize(
    ("local_rank", "requested", "cuda", "device", "backend"),
    [
        (1, "auto", True, "cuda:1", "nccl"),
        (1, "auto", False, "cpu", "gloo"),
        (0, "cpu", True, "cpu", "gloo"),
        (3, "cuda", True, "cuda:3", "nccl"),
    ],
)
def test_device_and_backend(
    local_rank: int, requested: str, cuda: bool, device: str, backend: str
) -> None:
    got = device_for(local_rank, requested, cuda)  # type: ignore[arg-type]
    assert got == device
    assert backend_for(got) == backend


def test_device_errors() -> None:
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
        device_for(0, "cuda", False)
    with pytest.raises(ValueError, match="device='tpu' is not one of"):
        device_for(0, "tpu", True)  # type: ignore[arg-type]
    assert backend_for("cuda") == "nccl"


@pytest.mark.parametrize(
    ("env", "cpus", "local_ranks", "threads"),
    [
        ({}, 2, 2, 1),  # 2 ranks on 2 cores: one each, not 2 each fighting
        ({}, 16, 4, 4),
        ({}, 3, 4, 1),  # never 0
        ({"SLURM_CPUS_PER_TASK": "6"}, 64, 8, 6),  # Slurm's per-task share wins
        ({"OMP_NUM_THREADS": "3"}, 16, 2, None),  # the user decided: torch reads it itself
        ({"OMP_NUM_THREADS": ""}, 8, 2, 4),  # empty counts as unset
    ],
)
def test_cpu_threads(env: dict[str, str], cpus: int, local_ranks: int, threads: int | None) -> None:
    assert cpu_threads(env, cpus, local_ranks) == threads


def test_cpu_threads_refuses_a_bad_slurm_value() -> None:
    with pytest.raises(ValueError, match="SLURM_CPUS_PER_TASK"):
        cpu_threads({"SLURM_CPUS_PER_TASK": "zero"}, 8, 1)
