"""The HTTP site: our request type (start time, cache outcome, registry), one access-log line per request, and
the client connection count that ``limits.max_connections`` bounds."""

from __future__ import annotations

import resource
import time
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import server

from dioproxy.channel import MirrorChannel
from dioproxy.policy import ClientAddresses

log = Logger(namespace="dioproxy.access")
_events = Logger()


def client_address(request: server.Request, addresses: ClientAddresses) -> str:
    """Who sent a request: ``X-Forwarded-For`` counts only from ``rate_limit.trusted_proxies``."""
    forwarded = request.getHeader("X-Forwarded-For")
    peer = getattr(request.getClientAddress(), "host", "-")
    return addresses.of(peer, forwarded.decode("latin-1") if isinstance(forwarded, bytes) else forwarded)


class MirrorRequest(server.Request):
    """A request that remembers what the access log needs to say about it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dioproxy_started = time.monotonic()
        self.dioproxy_outcome = "-"
        self.dioproxy_registry = "-"
        self.dioproxy_logged = False

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        site = getattr(self, "site", None)  # None: refused by the channel before it became a request
        if not self.finished and site is not None:
            site.log(self, aborted=True)


#: Descriptors kept out of the connection budget: upstream connections, the cache index, logs, thread pools.
FD_RESERVE = 100
#: Used when the descriptor limit is unlimited.
UNLIMITED_CONNECTIONS = 100_000


def default_max_connections(nofile: int | None = None) -> int:
    """Half of what the soft ``RLIMIT_NOFILE`` leaves after :data:`FD_RESERVE`: a client may hold its socket and a
    cache file at once. At least 8, so a tiny limit still serves."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY:
        return UNLIMITED_CONNECTIONS
    return max(8, (nofile - FD_RESERVE) // 2)


class MirrorSite(server.Site):
    requestFactory = MirrorRequest
    protocol = MirrorChannel
    noisy = False  # no "Starting factory" lines: the service says what it serves

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections = 0  # client connections open now
        self._channels: set[Any] = set()
        self._drained: list[defer.Deferred] = []
        self._fd_default = default_max_connections()

    @property
    def client_timeout(self) -> float:
        """``timeouts.client``, read at each use so a reload applies to the next wait."""
        return self.resource.mirror.config.client_timeout

    @property
    def max_connections(self) -> int:
        return self.resource.mirror.config.max_connections or self._fd_default

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.timeOut = self.client_timeout  # idle between requests (Twisted pauses it while one is served)
        return channel

    def connection_opened(self, channel: Any) -> bool:
        """Count a new connection; False when it is over ``limits.max_connections`` (it gets a 503)."""
        self.connections += 1
        self._channels.add(channel)
        return self.connections <= self.max_connections

    def connection_closed(self, channel: Any) -> None:
        self.connections -= 1
        self._channels.discard(channel)
        if not self._channels:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)

    def drain(self, timeout: float, reactor: Any) -> defer.Deferred:
        """Shutting down, with the port closed: idle connections close now, busy ones after their response;
        fires once all are gone, or after ``timeout`` (then the rest are cut)."""
        for channel in list(self._channels):
            if channel._handlingRequest:
                channel.persistent = False
            else:
                channel.transport.loseConnection()
        if not self._channels:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._drained.append(d)

        def cut(_: Any) -> None:
            _events.warn("{n} connections still busy after {s:.0f} s: closed", n=len(self._channels), s=timeout)
            for channel in list(self._channels):
                channel.transport.abortConnection()

        return d.addTimeout(timeout, reactor).addErrback(lambda f: f.trap(defer.TimeoutError) and cut(f))

    def log(self, request: MirrorRequest, aborted: bool = False) -> None:
        if request.dioproxy_logged:
            return
        request.dioproxy_logged = True
        mirror = getattr(self.resource, "mirror", None)
        fields = {
            "client": client_address(request, mirror.addresses)
            if mirror
            else getattr(request.getClientAddress(), "host", "-"),
            "method": request.method.decode("ascii", "replace"),
            "uri": request.uri.decode("ascii", "replace")[:500],
            # A response cut mid-body (client gone, digest mismatch) is no 200, whatever its status line said.
            "status": "aborted" if aborted else request.code,
            "bytes": request.sentLength,
            "ms": (time.monotonic() - request.dioproxy_started) * 1000,
            "outcome": request.dioproxy_outcome,
            "registry": request.dioproxy_registry,
        }
        # Formatted here with an f-string: the logger's own formatting was a fifth of a cached request's CPU time.
        line = (
            f"{fields['client']} {fields['method']} {fields['uri']} {fields['status']} {fields['bytes']} "
            f"{fields['ms']:.2f}ms {fields['outcome']} {fields['registry']}"
        )
        log.info("{line}", line=line, aborted=aborted, **fields)
        if mirror is not None:
            mirror.request_done(request, aborted)
