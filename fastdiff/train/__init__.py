"""Training: the loop (loop.py), parallelisation (parallel.py), checkpoints (checkpoint.py),
metrics (metrics.py), optimizer paths (optimizer.py); the CLI entry point is cli.py, run as
``torchrun -m fastdiff.train``."""
