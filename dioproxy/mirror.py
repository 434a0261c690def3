"""The mirror as plain objects, free of HTTP: config, upstream clients, cache stores, fills.

Resources translate HTTP into calls on a :class:`Mirror`; tests can build one around a fake upstream.
"""

from __future__ import annotations

import time
from typing import Any

from treq.client import HTTPClient

from dioproxy.config import Config
from dioproxy.fill import FillManager
from dioproxy.manifests import Manifests, ManifestStore, TagIndex
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
        self.manifests = Manifests(
            ManifestStore(self.storage),
            TagIndex(self.storage),
            self.client,
            time.time,
            config.tag_ttl,
            caching=config.cache_enabled,
        )

    def route(self, name: str, ns: str | None = None, host: str | None = None) -> Target:
        return resolve(self.config, name, ns, host)

    def client(self, target: Target) -> UpstreamClient:
        return self.clients[target.registry]

    def close(self) -> Any:
        """Drop the upstream connections we keep for reuse (a Deferred)."""
        return self.pool.closeCachedConnections()

    def start(self) -> int:
        """Prepare the cache before serving: drop what an earlier crash left half-written."""
        return self.storage.clean_temp() if self.storage else 0
