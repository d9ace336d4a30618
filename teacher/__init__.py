"""The frozen teacher group: load (model.py), compute targets for rows (targets.py), serve them (run.py).

Imports only `core`; meets the students at the target format and exchange plan in core/targets.py.
"""
