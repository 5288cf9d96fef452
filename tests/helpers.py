"""Helpers the tests share, in a plain module: test files import it by name (``from helpers import gpt``).

Not in conftest.py: the ranks that tests/test_distributed.py spawns import functions of that test module in a fresh
interpreter, where pytest has loaded no conftest. This module imports neither pytest nor a test module, so a
spawned rank can import it (multiprocessing's spawn gives the child the parent's ``sys.path``, which pytest put
``tests/`` on).
"""

from __future__ import annotations

import time
from typing import Callable


def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll ``cond`` until it holds; fail naming ``what`` after ``timeout_s``. For states that no event announces
    (a thread parked inside a lock's wait)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s} s"
        time.sleep(0.001)
