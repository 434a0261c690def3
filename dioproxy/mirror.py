"""The mirror as plain objects, free of HTTP: config, upstream clients, cache stores, fills.

Resources translate HTTP into calls on a :class:`Mirror`; tests can build one around a fake upstream.
"""

from __future__ import annotations

import time
from typing import Any

from treq.client import HTTPClient

from dioproxy.auth import Gate, Htpasswd, Tokens
from dioproxy.config import Config
from dioproxy.fill import FillManager
from dioproxy.manifests import Manifests, ManifestStore, TagIndex
from dioproxy.policy import RateLimiter, check_access
from dioproxy.private import PrivateContent
from dioproxy.routing import Target, resolve
from dioproxy.storage import DiskStorage
from dioproxy.upstream import TokenCache, UpstreamClient, make_http_client, make_pool


class Mirror:
    def __init__(self, config: Config, reactor: Any, http: HTTPClient | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.storage = DiskStorage(config.cache_dir) if config.cache_enabled else None
        self.pool = make_pool(reactor)
        self.http = http or make_http_client(reactor, config, self.pool)
        self.tokens = TokenCache()
        self.clients = {
            name: UpstreamClient(upstream, self.http, reactor, self.tokens, timeout=config.read_timeout)
            for name, upstream in config.upstreams.items()
        }
        self.fills = FillManager(self.storage, reactor, config.read_timeout) if self.storage else None
        self.private = PrivateContent(self.storage, self.client) if self.storage else None
        self.manifests = Manifests(
            ManifestStore(self.storage),
            TagIndex(self.storage),
            self.client,
            time.time,
            config.tag_ttl,
            caching=config.cache_enabled,
            private=self.private,
        )
        security = config.security
        self.gate = (
            Gate(Htpasswd(security.htpasswd), Tokens(security.token_secret, security.token_ttl))
            if (security.htpasswd)
            else None
        )
        self.limiter = (
            RateLimiter(security.rate, security.burst, security.trusted_proxies, reactor.seconds)
            if security.rate
            else None
        )

    def route(self, name: str, ns: str | None = None, host: str | None = None) -> Target:
        """The upstream repository for a request; 404 for unknown registries, 403 for denied repositories."""
        target = resolve(self.config, name, ns, host)
        check_access(self.config.security.access, target)
        return target

    def client(self, target: Target) -> UpstreamClient:
        return self.clients[target.registry]

    def close(self) -> Any:
        """Drop the upstream connections we keep for reuse (a Deferred)."""
        return self.pool.closeCachedConnections()

    def start(self) -> int:
        """Prepare the cache before serving: drop what an earlier crash left half-written."""
        return self.storage.clean_temp() if self.storage else 0
