"""The training skeleton shared by the SSL stages (core/ssl/loop.py) and the student loop (students/run.py).

optim: the official AdamW parameter groups and the per-iteration lr/wd; ema: the EMA update and weight
copies; clip: per-submodule gradient clipping; update: one optimizer step in the order both loops use;
metrics: the metrics.jsonl file. Checkpoints are core/checkpoint.py.
"""
