"""Model soups: merge committed checkpoints (or .safetensors files) into one model.

ingredients  which checkpoints, by rule (steps, every, improved_any, top, last), and why
reader       one ingredient's model tensors, piece by piece, from DCP shards or safetensors
engine       the streaming weighted mean (memory independent of N and of model size)
recipes      greedy and learned (uniform and weighted are the engine alone)
evaluate     the run's task: scores on the validation split, test split for reports
writer       sharded safetensors + SOUP.json, committed through checkpoint/commit.py
report       the score table and soup.png
cook         one soup start to finish (what `stockpot soup` and the chained job call)
"""
