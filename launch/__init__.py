"""stockpot's login-node plane: config -> submitit/sbatch, and the `stockpot` CLI.

Never imports torch.distributed at module level: the CLI must start fast.
"""
