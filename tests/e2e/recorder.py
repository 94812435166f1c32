"""A raw-socket "container" that records every byte the proxy sends it.

The Docker double's ``Container`` parses what it receives, so it cannot show
what a hostile request turned into on the wire. This one keeps each upstream
connection's bytes as they came and answers every request it can frame
(Content-Length or chunked) with 200, or with whatever ``reply`` returns for
its head (``101`` to an upgrade, say). Health checks (``GET /up``) are
answered too and left out of ``requests()``.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable

_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _frame(buf: bytes) -> int | None:
    """Length of the first complete request in ``buf`` (head and body), or None."""
    end = buf.find(b"\r\n\r\n")
    if end == -1:
        return None
    head, pos = buf[:end + 2], end + 4
    if _CHUNKED.search(head):
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end == -1:
                return None
            size = int(buf[pos:line_end].split(b";")[0].strip() or b"0", 16)
            pos = line_end + 2
            if size == 0:
                trailer_end = buf.find(b"\r\n\r\n", pos - 2)
                return None if trailer_end == -1 else trailer_end + 4
            pos += size + 2
            if pos > len(buf):
                return None
    if (m := _LENGTH.search(head)) is not None:
        pos += int(m.group(1))
    return pos if pos <= len(buf) else None


class Recorder:
    """A raw TCP server on ``ip``; ``connections`` holds what each connection received."""

    def __init__(self, ip: str, port: int,
                 reply: Callable[[bytes], bytes] | None = None) -> None:
        self.ip, self.port = ip, port
        self.reply = reply or (lambda head: OK)
        self.connections: list[bytearray] = []
        self._lock = threading.Lock()
        self._sock = socket.create_server((ip, port))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> Recorder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def clear(self) -> None:
        """Forget what was received: connections still open go on into the old record."""
        with self._lock:
            self.connections = []

    def received(self) -> list[bytes]:
        """Every connection's bytes, health checks removed."""
        with self._lock:
            raw = [bytes(c) for c in self.connections]
        return [r for r in raw if r and not r.startswith(b"GET /up ")]

    def requests(self) -> list[bytes]:
        """Every complete request (head and body) the container could frame, health checks out."""
        out = []
        for data in self.received():
            while (n := _frame(data)) is not None:
                out.append(data[:n])
                data = data[n:]
        return [r for r in out if not r.startswith(b"GET /up ")]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            buf = bytearray()
            with self._lock:
                self.connections.append(buf)
            threading.Thread(target=self._handle, args=(conn, buf), daemon=True).start()

    def _handle(self, conn: socket.socket, buf: bytearray) -> None:
        conn.settimeout(30)
        pending = b""
        tunnel = False
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with self._lock:
                    buf += data
                if tunnel:
                    continue
                pending += data
                while (n := _frame(pending)) is not None:
                    head = pending[:n]
                    pending = pending[n:]
                    answer = self.reply(head)
                    conn.sendall(answer)
                    if answer.startswith(b"HTTP/1.1 101"):
                        tunnel = True
                        break
