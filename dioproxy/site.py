"""The HTTP site: our request type (start time, cache outcome, registry) and one access-log line per request."""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import Logger
from twisted.web import server

from dioproxy.channel import MirrorChannel
from dioproxy.policy import ClientAddresses

log = Logger(namespace="dioproxy.access")


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


class MirrorSite(server.Site):
    requestFactory = MirrorRequest
    protocol = MirrorChannel
    noisy = False  # no "Starting factory" lines: the service says what it serves

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
