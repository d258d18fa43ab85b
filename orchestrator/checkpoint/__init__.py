"""Sharded, atomically committed, verifiable checkpoints (see checkpointer.Checkpointer)."""
