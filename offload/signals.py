"""Stop a training loop cleanly on Ctrl-C or SIGTERM: finish the step, save, exit.

    with StopOnSignal() as stop:
        for step in range(start, steps):
            train_one_step()
            if stop.requested:
                save_checkpoint(path, model, opt, step=step + 1)
                break

A signal in the middle of a step (in backward, with grads in flight and updates running on other threads) must
not unwind the step half done: the handler only records the request, and the loop acts on it between steps,
where the runtime's state is whole. A second signal raises ``KeyboardInterrupt`` at once, for a loop that hangs.
"""

from __future__ import annotations

import signal
import sys
import threading


class StopOnSignal:
    """Context manager: while inside, SIGINT/SIGTERM set :attr:`requested` instead of interrupting."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM), message: str | None = None, stream=None):
        self.signals = signals
        self.message = message or "stopping after this step (again to stop at once)"
        self.stream = stream if stream is not None else sys.stderr
        self.requested: int | None = None
        """The signal number received, or ``None``."""
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: {self.message}", file=self.stream, flush=True)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set from there
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
