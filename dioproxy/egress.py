"""Where an upstream may send us: connections that reach only globally routable addresses.

A redirect (or a token realm) names a URL the upstream chose. Followed blindly, a compromised or hostile upstream
could make the mirror fetch ``http://10.0.0.5/admin`` or the cloud metadata service and hand the body to a client.
So such hops go through :func:`make_public_http_client`, whose connections check the addresses a host name
resolves to at connect time, the addresses it then connects to (no second lookup a DNS rebinding could answer
differently), and refuse loopback, private, link-local and every other address that is not global.

The configured upstream's own host, and the hosts the operator lists in ``upstreams.<registry>.redirect_hosts``,
are trusted and reached the ordinary way (:mod:`dioproxy.upstream` decides which client a hop uses).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHostnameResolver,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.web import client as webclient
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from dioproxy.config import Config


class InternalAddress(Exception):
    """A host name led to an address the mirror does not connect to on an upstream's say-so."""

    def __init__(self, host: str, addresses: list[str]) -> None:
        super().__init__(f"{host} resolves to a non-public address ({', '.join(sorted(set(addresses)))})")
        self.host = host


def is_public(address: str) -> bool:
    """Globally routable and unicast: not loopback, private, link-local, CGNAT, unspecified, reserved, multicast."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return ip.is_global and not ip.is_multicast


@implementer(IResolutionReceiver)
class _Checked:
    """Passes a resolution on only if every address is public (one bad address refuses the host)."""

    def __init__(self, receiver: Any, refused: list[str]) -> None:
        self.receiver = receiver
        self.refused = refused
        self.addresses: list[Any] = []

    def resolutionBegan(self, resolution: Any) -> None:
        self.receiver.resolutionBegan(resolution)

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        bad = [a.host for a in self.addresses if not is_public(a.host)]
        if bad:
            self.refused.extend(bad)
        else:
            for address in self.addresses:
                self.receiver.addressResolved(address)
        self.receiver.resolutionComplete()


@implementer(IHostnameResolver)
class _PublicResolver:
    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver
        self.refused: list[str] = []

    def resolveHostName(self, receiver: Any, hostName: str, *args: Any, **kwargs: Any) -> Any:
        return self.resolver.resolveHostName(_Checked(receiver, self.refused), hostName, *args, **kwargs)


@implementer(IReactorPluggableNameResolver)
class _ResolvingThrough:
    """The reactor, with one connection's checking resolver (as Synapse wraps its reactor for the same purpose)."""

    def __init__(self, reactor: Any, resolver: _PublicResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: Any) -> Any:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(IStreamClientEndpoint)
class _PublicEndpoint:
    """One connection attempt: the hostname endpoint's happy eyeballs, over checked addresses only."""

    def __init__(self, reactor: Any, resolver: Any, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.checker = _PublicResolver(resolver)
        self.endpoint = HostnameEndpoint(_ResolvingThrough(reactor, self.checker), host, port, timeout=timeout)

    def connect(self, factory: Any) -> defer.Deferred:
        return self.endpoint.connect(factory).addErrback(self._refused)

    def _refused(self, failure: Any) -> Any:
        if failure.check(error.DNSLookupError) and self.checker.refused:
            raise InternalAddress(self.host, self.checker.refused)
        return failure


@implementer(IAgentEndpointFactory)
class PublicEndpoints:
    def __init__(self, reactor: Any, connect_timeout: float, resolver: Any = None) -> None:
        self.reactor = reactor
        self.timeout = connect_timeout
        self.resolver = resolver  # None: the reactor's, looked up per connection
        self.tls = webclient.BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> Any:
        resolver = self.resolver or self.reactor.nameResolver
        endpoint = _PublicEndpoint(self.reactor, resolver, uri.host.decode("ascii"), uri.port, self.timeout)
        if uri.scheme == b"https":
            return wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


class _OwnKeys:
    """The shared connection pool under keys of our own: a connection made without the check (to a trusted host)
    is never reused for a hop that needs it, nor the other way round."""

    def __init__(self, pool: webclient.HTTPConnectionPool) -> None:
        self.pool = pool

    def getConnection(self, key: tuple, endpoint: Any) -> defer.Deferred:
        return self.pool.getConnection(("public", *key), endpoint)


def make_public_http_client(
    reactor: Any, config: Config, pool: webclient.HTTPConnectionPool, resolver: Any = None
) -> HTTPClient:
    """treq whose connections reach public addresses only (TLS verified as for the upstreams)."""
    endpoints = PublicEndpoints(reactor, config.connect_timeout, resolver)
    return HTTPClient(webclient.Agent.usingEndpointFactory(reactor, endpoints, pool=_OwnKeys(pool)))
