"""A student group: model + EMA + optimizer (model.py), distillation losses (loss.py), the loop (run.py).

Imports only `core`; gets its teacher targets through a core.targets.TargetSource.
"""
