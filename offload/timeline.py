"""The measured timeline: what each resource did during an iteration, as events with start and end times.

Resource names are the scheduler's (:data:`scheduler.cost.RESOURCES`), and event names follow its simulation
(``forward <unit>``, ``backward <unit>``, ``fetch <unit>``, ``grad <unit>``, ``update <unit>``), so a predicted
and a measured timeline line up. Exports to the Chrome trace format (open in Perfetto or chrome://tracing).
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

from scheduler.cost import RESOURCES, Event


class Timeline:
    """Thread-safe event recorder. Times are seconds since the timeline's start (or its last ``reset``)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self.events: list[Event] = []

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def reset(self) -> None:
        with self._lock:
            self._t0 = time.perf_counter()
            self.events = []

    def add(self, resource: str, name: str, start_s: float, end_s: float, nbytes: int = 0) -> None:
        assert resource in RESOURCES, resource
        if self.enabled:
            with self._lock:
                self.events.append(Event(resource, name, start_s, end_s, nbytes))

    @contextmanager
    def span(self, resource: str, name: str, nbytes: int = 0):
        start = self.now()
        try:
            yield
        finally:
            self.add(resource, name, start, self.now(), nbytes)

    # -- summaries ----------------------------------------------------------------------------------------------
    def busy_s(self) -> dict[str, float]:
        """Per resource, the time during which it had at least one event (overlapping events count once)."""
        out = {}
        for r in RESOURCES:
            spans = sorted((e.start_s, e.end_s) for e in self.events if e.resource == r)
            total, cur_s, cur_e = 0.0, None, None
            for s, e in spans:
                if cur_e is None or s > cur_e:
                    if cur_e is not None:
                        total += cur_e - cur_s
                    cur_s, cur_e = s, e
                else:
                    cur_e = max(cur_e, e)
            if cur_e is not None:
                total += cur_e - cur_s
            out[r] = total
        return out

    def bytes_by_resource(self) -> dict[str, int]:
        out = {r: 0 for r in RESOURCES}
        for e in self.events:
            out[e.resource] += e.nbytes
        return out

    def span_s(self) -> float:
        if not self.events:
            return 0.0
        return max(e.end_s for e in self.events) - min(e.start_s for e in self.events)

    def summary(self) -> dict:
        """Iteration span, busy time and bytes per resource, and overlap efficiency (span / busiest)."""
        busy = self.busy_s()
        span = self.span_s()
        top = max(busy.values()) if busy else 0.0
        return {"span_s": span, "busy_s": busy, "bytes": self.bytes_by_resource(),
                "bottleneck": max(busy, key=busy.get) if busy else None,
                "overlap_efficiency": span / top if top > 0 else None}

    def chrome_trace(self) -> dict:
        tid = {r: i for i, r in enumerate(RESOURCES)}
        events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid[r], "args": {"name": r}} for r in RESOURCES]
        for e in self.events:
            events.append({"name": e.name, "ph": "X", "pid": 0, "tid": tid[e.resource], "ts": e.start_s * 1e6,
                           "dur": max(e.end_s - e.start_s, 0) * 1e6, "args": {"bytes": e.nbytes}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def save_chrome_trace(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.chrome_trace(), f)
