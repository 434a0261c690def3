"""The HTTP channel: requests Twisted refuses before any resource sees them still get a registry JSON error.

Twisted answers an over-long request line, too many or too large headers, or a malformed request with a bare
``400``; clients and operators deserve the right status (414, 431, 400) and a body that says why.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress
from twisted.web import http

from dioproxy.errors import RegistryError

_REASONS = {400: b"Bad Request", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


class MirrorChannel(http.HTTPChannel):
    #: Longest request line (method, URL, version); longer is 414 URI Too Long.
    MAX_LENGTH = 8192
    #: Request line plus all headers; more is 431 Request Header Fields Too Large.
    totalHeadersSize = 32 * 1024
    maxHeaders = 200

    _first_bytes = True
    _host = None

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

    def _refuse(self, status: int, message: str) -> None:
        if self.transport is None or getattr(self, "_refused", False):
            return
        self._refused = True
        body = RegistryError(status, "UNSUPPORTED", message).body()
        reason = _REASONS.get(status, b"Error")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, reason, len(body), body)
        )
        self.dataReceived = lambda data: None
        self.loseConnection()
