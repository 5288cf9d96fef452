"""Transfer statistics per tier and direction: bytes, time busy, requests in flight.

``busy_s`` is the time during which at least one request of that stream was in flight (the union of their
intervals), so ``bytes / busy_s`` is the bandwidth the stream delivered while it worked: the figure the
scheduler calibrates its cost model from.
"""

from __future__ import annotations

import dataclasses
import threading
import time


@dataclasses.dataclass
class StreamStats:
    """One direction of one tier (e.g. ``nvme.read``)."""

    bytes: int = 0
    requests: int = 0
    busy_s: float = 0.0
    request_s: float = 0.0
    """Sum of request durations; ``request_s / busy_s`` is the mean queue depth."""
    max_in_flight: int = 0
    in_flight: int = 0
    issued_bytes: int = 0
    """Bytes of the requests asked for so far (``bytes`` counts those done): a count that does not depend on
    when they land, for per-iteration figures while writes outlive the step that issued them."""
    _busy_since: float = 0.0

    @property
    def gbps(self) -> float:
        return self.bytes / self.busy_s / 1e9 if self.busy_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"bytes": self.bytes, "requests": self.requests, "busy_s": round(self.busy_s, 6),
                "request_s": round(self.request_s, 6), "gbps": round(self.gbps, 3),
                "mean_queue_depth": round(self.request_s / self.busy_s, 2) if self.busy_s > 0 else 0.0,
                "max_in_flight": self.max_in_flight, "in_flight": self.in_flight, "issued_bytes": self.issued_bytes}


class TransferStats:
    """Thread-safe counters for several named streams. ``begin`` before a request, ``end`` after it."""

    def __init__(self, names: tuple[str, ...] = ()):
        self._lock = threading.Lock()
        self._streams: dict[str, StreamStats] = {n: StreamStats() for n in names}

    def issue(self, name: str, nbytes: int) -> None:
        """A request of ``nbytes`` was asked for (its blocks are counted by ``begin``/``end`` as they run)."""
        with self._lock:
            self._streams.setdefault(name, StreamStats()).issued_bytes += nbytes

    def begin(self, name: str) -> float:
        now = time.perf_counter()
        with self._lock:
            s = self._streams.setdefault(name, StreamStats())
            if s.in_flight == 0:
                s._busy_since = now
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
        return now

    def end(self, name: str, started: float, nbytes: int) -> None:
        now = time.perf_counter()
        with self._lock:
            s = self._streams[name]
            s.in_flight -= 1
            s.requests += 1
            s.bytes += nbytes
            s.request_s += now - started
            if s.in_flight == 0:
                s.busy_s += now - s._busy_since

    def snapshot(self) -> dict[str, dict]:
        """Counters as plain dicts (JSON-ready). A stream busy right now counts its busy time up to now."""
        now = time.perf_counter()
        with self._lock:
            out = {}
            for name, s in self._streams.items():
                d = dataclasses.replace(s)
                if d.in_flight:
                    d.busy_s += now - d._busy_since
                out[name] = d.as_dict()
            return out

    def reset(self) -> None:
        with self._lock:
            for name, s in self._streams.items():
                fresh = StreamStats(in_flight=s.in_flight, max_in_flight=s.in_flight)
                fresh._busy_since = time.perf_counter() if s.in_flight else 0.0
                self._streams[name] = fresh
