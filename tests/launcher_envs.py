"""The rank variables each launcher sets (srun, an sbatch batch script, torchrun, a two-node
step, submitit's LocalExecutor), shared by the DistEnv tests (test_env_from_environ.py,
test_env_master_port.py)."""

# What task 1 of `srun -n2 -N1` saw on the dev cluster (Slurm 22.05), trimmed to what matters.
SRUN_TASK1 = {
    "SLURM_JOB_ID": "8",
    "SLURM_JOBID": "8",
    "SLURM_JOB_NODELIST": "vm",
    "SLURM_NODELIST": "vm",
    "SLURM_STEP_NODELIST": "vm",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_NNODES": "1",
    "SLURM_STEP_NUM_NODES": "1",
    "SLURM_NODEID": "0",
    "SLURM_NTASKS": "2",
    "SLURM_NPROCS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_TASKS_PER_NODE": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_STEPID": "0",
    "SLURM_GTIDS": "0,1",
}
# The sbatch -n2 batch script itself: rank-like variables, but no step.
BATCH_SCRIPT = {
    k: v
    for k, v in SRUN_TASK1.items()
    if not k.startswith(("SLURM_STEP", "SLURM_GTIDS", "SLURM_PROCID", "SLURM_LOCALID"))
} | {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_GTIDS": "0"}
TORCHRUN = {
    "RANK": "3",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "4",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "node-a",
    "MASTER_PORT": "29500",
}
# Rank 3 of a 2-node step (2 tasks per node) on the virtual cluster's n1, n2.
TWO_NODES = SRUN_TASK1 | {
    "SLURM_JOB_ID": "41",
    "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_NODELIST": "n[1-2]",
    "SLURM_STEP_NODELIST": "n[1-2]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NNODES": "2",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
}
# What submitit's LocalExecutor gives task 1 of 2 (its controller's pid is the job id).
SUBMITIT_LOCAL = {
    "SUBMITIT_EXECUTOR": "local",
    "SUBMITIT_LOCAL_NTASKS": "2",
    "SUBMITIT_LOCAL_GLOBALID": "1",
    "SUBMITIT_LOCAL_LOCALID": "1",
    "SUBMITIT_LOCAL_JOB_ID": "4242",
}
