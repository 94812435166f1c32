"""Closed-loop load on the proxy's published port: keep-alive and new-connection clients.

A request fails on a non-2xx status, a connection error or reset, or 10 s without
an answer. Every request is recorded (start, end, outcome) so a test can tell
which failures came while a given container was being killed.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

HANG = 10.0


@dataclass
class Outcome:
    start: float
    end: float
    ok: bool
    what: str  # the status, or the error's type


@dataclass
class Load:
    port: int
    host: str
    keepalive: int = 20
    fresh: int = 5
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        for i in range(self.keepalive + self.fresh):
            t = threading.Thread(target=self._client, args=(i < self.keepalive,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(HANG + 5)

    def _client(self, keepalive: bool) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HANG)
            start = time.monotonic()
            try:
                conn.request("GET", "/", headers={"Host": self.host})
                response = conn.getresponse()
                response.read()
                ok, what = 200 <= response.status < 300, str(response.status)
                if response.will_close or not keepalive:
                    conn.close()
                    conn = None
            except Exception as e:  # a reset, a refused connect, a hang
                ok, what = False, type(e).__name__
                conn.close()
                conn = None
            with self._lock:
                self.outcomes.append(Outcome(start, time.monotonic(), ok, what))
            if not ok:
                time.sleep(0.05)  # a client backs off a little, as a browser would

    # ------------------------------------------------------------------ figures
    @property
    def requests(self) -> int:
        return len(self.outcomes)

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if not o.ok)

    def failures(self) -> Counter[str]:
        return Counter(o.what for o in self.outcomes if not o.ok)

    def in_flight_at(self, moment: float) -> int:
        """Requests started before ``moment`` that had not ended by then."""
        return sum(1 for o in self.outcomes if o.start <= moment < o.end)

    def summary(self) -> str:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(self.failures().items()))
        return f"{self.requests} requests, {self.failed} failed" + (f" ({detail})" if detail
                                                                     else "")
