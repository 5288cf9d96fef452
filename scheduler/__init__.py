"""scheduler: decides where each chunk lives and where each update runs (issue: Scheduler).

Imports ``storage`` only, never ``offload`` (tests/test_layers.py enforces it).
"""
