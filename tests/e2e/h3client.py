"""A small HTTP/3 client for the end-to-end tests: aioquic, as mitmproxy itself uses.

``h3(port, authority, [Request, ...])`` opens one QUIC connection to 127.0.0.1:port,
sends every request on it concurrently (one stream each) and returns what came
back, with the negotiated ALPN and the certificate the proxy presented; with
``linger``, it then keeps the connection open that long and says how the proxy
closed it, if it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent
from cryptography import x509


@dataclass
class Request:
    path: str = "/"
    method: str = "GET"
    body: bytes | None = None  # sent without content-length: the stream's end ends it
    authority: str | None = None  # default: the connection's


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated field keeps its last value
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


@dataclass
class Session:
    alpn: str | None
    peer_cert: x509.Certificate
    replies: list[Reply | BaseException] = field(default_factory=list)
    closed: tuple[int, str] | None = None  # the proxy's CONNECTION_CLOSE: (code, reason)


class _Client(QuicConnectionProtocol):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.h3 = H3Connection(self._quic)
        self.streams: dict[int, tuple[list[tuple[bytes, bytes]], bytearray,
                                      asyncio.Future[None]]] = {}
        self.terminated = asyncio.get_running_loop().create_future()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated) and not self.terminated.done():
            self.terminated.set_result((event.error_code, event.reason_phrase))
        for ev in self.h3.handle_event(event):
            self._h3_event(ev)

    def _h3_event(self, ev: H3Event) -> None:
        if not isinstance(ev, HeadersReceived | DataReceived) or ev.stream_id not in self.streams:
            return
        headers, body, done = self.streams[ev.stream_id]
        if isinstance(ev, HeadersReceived):
            headers.extend(ev.headers)
        else:
            body.extend(ev.data)
        if ev.stream_ended and not done.done():
            done.set_result(None)

    async def send(self, authority: str, request: Request, timeout: float) -> Reply:
        sid = self._quic.get_next_available_stream_id()
        self.h3.send_headers(sid, [
            (b":method", request.method.encode()), (b":scheme", b"https"),
            (b":authority", (request.authority or authority).encode()),
            (b":path", request.path.encode()), (b"user-agent", b"h3client/aioquic")],
            end_stream=request.body is None)
        if request.body is not None:
            self.h3.send_data(sid, request.body, end_stream=True)
        headers: list[tuple[bytes, bytes]] = []
        body = bytearray()
        done = asyncio.get_running_loop().create_future()
        self.streams[sid] = (headers, body, done)
        self.transmit()
        await asyncio.wait_for(done, timeout)
        fields = {k.decode().lower(): v.decode() for k, v in headers}
        return Reply(int(fields.pop(":status")), fields, bytes(body))


async def _session(port: int, authority: str, requests: list[Request], cafile: str | None,
                   sni: str | None, timeout: float, linger: float) -> Session:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN,
                               server_name=sni or authority.split(":")[0])
    if cafile:
        config.load_verify_locations(cafile)  # the deployed certificate is its own root
    else:
        config.verify_mode = ssl.CERT_NONE
    async with asyncio.timeout(timeout + linger + 5), connect(
            "127.0.0.1", port, configuration=config, create_protocol=_Client,
            wait_connected=True) as client:
        assert isinstance(client, _Client)
        tls = client._quic.tls
        session = Session(tls.alpn_negotiated, tls._peer_certificate)
        session.replies = list(await asyncio.gather(
            *(client.send(authority, r, timeout) for r in requests), return_exceptions=True))
        if linger:
            with contextlib.suppress(TimeoutError):
                session.closed = await asyncio.wait_for(asyncio.shield(client.terminated),
                                                        linger)
        return session


def h3(port: int, authority: str, requests: list[Request] | None = None, *,
       cafile: str | None = None, sni: str | None = None, timeout: float = 10,
       linger: float = 0) -> Session:
    """The requests (default one GET /) on one HTTP/3 connection, all at once.

    ``cafile``: verify the proxy's certificate against it (and the name); without
    it nothing is verified. A failed handshake raises (``ConnectionError``, or a
    timeout); a failed request is its ``replies`` entry. ``linger``: seconds to wait
    for the proxy to close the connection afterwards (``Session.closed``).
    """
    return asyncio.run(_session(port, authority, requests or [Request()], cafile, sni,
                                timeout, linger))
