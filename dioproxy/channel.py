"""The HTTP channel: one client connection, its deadlines, and the errors Twisted would answer bare.

Twisted answers an over-long request line, too many or too large headers, or a malformed request with a bare
``400``; clients and operators deserve the right status (414, 431, 400) and a body that says why.

Deadlines (``timeouts.client``): a connection idle between requests is closed after it (Twisted's idle timeout),
and a client that reads nothing of a response for that long is dropped, which releases its file descriptor, the
cache file it was reading and that entry's pin. The channel is the producer its transport pauses when the socket
is full, so one timer here covers every responder (the file streamers and the pass-through pipe).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.web import http

from dioproxy.errors import RegistryError

log = Logger()

_REASONS = {
    400: b"Bad Request",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}
#: What a connection over ``limits.max_connections`` is told to wait before trying again.
RETRY_AFTER = 5


class MirrorChannel(http.HTTPChannel):
    #: Longest request line (method, URL, version); longer is 414 URI Too Long.
    MAX_LENGTH = 8192
    #: Request line plus all headers; more is 431 Request Header Fields Too Large.
    totalHeadersSize = 32 * 1024
    maxHeaders = 200

    _first_bytes = True
    _host = None
    _over_limit = False
    _stuck: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._over_limit = not self.site.connection_opened(self)

    def connectionLost(self, reason: Any) -> None:
        self._unstuck()
        self.site.connection_closed(self)
        super().connectionLost(reason)

    def pauseProducing(self) -> None:
        """The socket is full: the client has until ``timeouts.client`` to read some of it."""
        if self._stuck is None and self.transport is not None:
            self._stuck = self.callLater(self.site.client_timeout, self._client_stalled)
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self._unstuck()
        super().resumeProducing()

    def _unstuck(self) -> None:
        if self._stuck is not None:
            if self._stuck.active():
                self._stuck.cancel()
            self._stuck = None

    def _client_stalled(self) -> None:
        self._stuck = None
        peer = getattr(self.transport.getPeer(), "host", "-")
        log.info("client {peer} read nothing for {s:g} s; dropping it", peer=peer, s=self.site.client_timeout)
        self.transport.abortConnection()

    def getHost(self) -> IAddress:
        """Our address, asked of the kernel once per connection rather than once per request."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def dataReceived(self, data: bytes) -> None:
        """A TLS ClientHello on this plain-HTTP port is refused at once: podman, skopeo and dockerd try HTTPS
        first on an insecure registry and fall back to HTTP only when the handshake fails, so waiting for a
        request line that never comes would cost every pull a 10 s handshake timeout."""
        if self._first_bytes and data:
            self._first_bytes = False
            if self._over_limit:  # answered once the request has arrived, so the client reads the answer
                return self._refuse(
                    503, "too many connections; try again later", "TOOMANYREQUESTS", {"Retry-After": str(RETRY_AFTER)}
                )
            if data[:1] == b"\x16":
                return self._refuse(400, "this port speaks plain HTTP, not TLS")
        super().dataReceived(data)

    def _on_request_line(self) -> bool:
        return bool(self._HTTPChannel__first_line)

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            return self._refuse(*((414, "URI too long") if self._on_request_line() else (431, "headers too large")))
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._on_request_line():
            return self._refuse(414, "URI too long")
        return self._refuse(431, "header line too long")

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount + 1 > self.maxHeaders:
            self._refuse(431, "too many headers")
            return False
        return super().headerReceived(line)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._refuse(400, "malformed HTTP request")

    def _refuse(self, status: int, message: str, code: str = "UNSUPPORTED", headers: dict | None = None) -> None:
        if self.transport is None or getattr(self, "_refused", False):
            return
        self._refused = True
        body = RegistryError(status, code, message).body()
        reason = _REASONS.get(status, b"Error")
        extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in (headers or {}).items())
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%sConnection: close\r\n\r\n%s"
            % (status, reason, len(body), extra, body)
        )
        self.dataReceived = lambda data: None
        self.loseConnection()
