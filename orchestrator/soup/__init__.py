"""Model soups: merge committed checkpoints (or .safetensors files) into one model.

ingredients  which checkpoints, by rule (steps, every, improved_any, top, last), and why
reader       one ingredient's model tensors, piece by piece, from DCP shards or safetensors
segments     the byte ranges that make each output segment (big pieces in chunks)
window       the reads, in parallel ahead of the mixer, into reused buffers
checks       the ingredients' checksums, from the bytes the mixer reads
engine       the streaming weighted mean (memory independent of N, model size, largest tensor)
recipes      greedy and learned (uniform and weighted are the engine alone)
schedules    window weights from the checkpoints' steps (uniform, linear, an LR cooldown's, ema)
evaluate     the run's task: scores on the validation split, test split for reports
user_eval    the user's own evaluation (--eval CMD, --eval-hook) instead of the task
scoring      which of the two scores a soup; ingredient scores (cached); the soup as written
writer       sharded safetensors + SOUP.json, committed through checkpoint/commit.py
provenance   the ingredients' integrity before the commit, SOUP.json's body, memory figures
report       the score table and soup.png
cook         one soup start to finish (what `stockpot soup` and the chained job call)
"""
