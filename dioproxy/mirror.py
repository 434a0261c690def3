"""The mirror as plain objects, free of HTTP: config, upstream clients, cache stores, fills, the blob and manifest
services; with ``storage.s3``, the shared tier (:mod:`dioproxy.storage.bucket`) behind the cache directory.

Resources translate HTTP into calls on a :class:`Mirror`; tests can build one around a fake upstream.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import time
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer

from dioproxy.auth import Gate, Htpasswd, LoginThrottle, Tokens
from dioproxy.blobs import Blobs
from dioproxy.budget import PullBudget
from dioproxy.config import Config, Upstream
from dioproxy.egress import make_public_http_client
from dioproxy.errors import name_unknown
from dioproxy.eviction import CacheBound, IndexedStorage, inflight_bytes
from dioproxy.fill import FillManager
from dioproxy.fleet.bucketuse import BucketBound, BucketUse
from dioproxy.fleet.budget import FleetBudget
from dioproxy.fleet.fills import FleetFills
from dioproxy.fleet.lease import Leases
from dioproxy.fleet.limits import FleetLoginThrottle, FleetRateLimiter
from dioproxy.fleet.presence import Presence
from dioproxy.fleet.redis import Redis
from dioproxy.fleet.tags import FleetTags
from dioproxy.health import Health
from dioproxy.manifests import Manifests, ManifestStore, TagIndex
from dioproxy.metrics import CountingTokenCache, Metrics
from dioproxy.objectstore import ObjectStore
from dioproxy.offlinefiles import OfflineFiles
from dioproxy.policy import ClientAddresses, RateLimiter, check_access
from dioproxy.pools import Pools
from dioproxy.prefetch import Prefetcher
from dioproxy.private import PrivateContent
from dioproxy.reload import apply_config
from dioproxy.routing import Target, resolve
from dioproxy.siblings import Siblings
from dioproxy.status import StatusBoard
from dioproxy.storage.bucket import STORE_TIMEOUT, Bucket
from dioproxy.tokensecret import shared_secret
from dioproxy.upstream import UpstreamClient, make_http_client, make_pool


class Mirror:
    def __init__(self, config: Config, reactor: Any, http: HTTPClient | None = None, port: int = 8004) -> None:
        self.config = config
        self.reactor = reactor
        self.metrics = Metrics()
        #: Threads for blocking work (bcrypt, disk, the cache index), apart from the reactor's own pool.
        self.pools = Pools(reactor)
        self.storage = IndexedStorage(config.cache_dir, self.pools.disk) if config.cache_enabled else None
        self.pool = make_pool(reactor)
        self.own_http = http is None  # a reload may rebuild our own client (connect timeout), not an injected one
        self.http = http or make_http_client(reactor, config, self.pool)
        self.public_http = make_public_http_client(reactor, config, self.pool)
        self.tokens = CountingTokenCache(self.metrics)
        #: Which registries are up; offline ones are answered at once (stale or 503) while one probe asks.
        self.health = Health(reactor, config.offline_timeout)
        self.health.track(config.upstreams)
        #: What each upstream account may still pull (Docker Hub's rate limit), and how we spend it.
        self.budget = PullBudget(reactor, time.time, config.pull_reserve, config.pull_wait)
        self.budget.on_action = self.metrics.budget_action
        #: ``coordination``: the fleet's Redis (fills, tags, the pull budget, the rate limits); None without.
        self.redis = Redis.from_url(config.coordination.redis, reactor) if config.coordination else None
        if self.redis is not None:
            self.budget.fleet = FleetBudget(self.redis)
        self.clients = {name: self.make_client(upstream) for name, upstream in config.upstreams.items()}
        self.fills = (
            FillManager(self.storage, reactor, self.pools.disk, self.metrics.fill_done, self.make_room)
            if self.storage
            else None
        )
        self.cache = (
            CacheBound(
                self.storage,
                reactor,
                self.metrics,
                config.cache_max_size,
                config.cache_max_age,
                inflight=lambda: inflight_bytes(self.fills),
                pools=self.pools,
            )
            if self.storage
            else None
        )
        #: ``f(old, new)`` after each applied reload, for whatever else builds state from the config.
        self.reloaders: list = []
        self.private = PrivateContent(self.storage, self.client) if self.storage else None
        if self.private:
            self.fills.verified = self.private.mark
            self.cache.on_evict.append(self.private.evicted)
        self.manifests = Manifests(
            ManifestStore(self.storage),
            TagIndex(self.storage),
            self.client,
            time.time,
            config.tag_ttl,
            caching=config.cache_enabled,
            private=self.private,
            negative_ttl=config.negative_ttl,
            on_stale=self.metrics.stale_answer,
        )
        self.blobs = Blobs(self.storage, self.fills, self.cache, self.private, self.client)
        #: The shared tier, only with ``storage.s3`` (and a cache directory to be its hot tier).
        self.bucket = self._make_bucket(config)
        self.port = port  # ours, for the address other replicas reach us at when coordination.advertise is unset
        self.bucket_bound: BucketBound | None = None
        self.fleet = self._make_fleet(config)
        #: Fires once the bucket's start check passed (fails with a StoreConfigError naming the key to fix).
        self.bucket_started: defer.Deferred = defer.succeed(None)
        self._made_secret: str | None = None
        self.reloaders.append(self._reconfigure_outages)
        self.apply_security(config)
        self.metrics.watch(self.state)
        #: Traffic history and the most pulled repositories, for the status page.
        self.status = StatusBoard()
        #: The ``prefetch:`` list, kept warm on schedule (started by :meth:`start`).
        self.prefetcher = Prefetcher(self)
        #: The other workers of ``--workers N``, whose metrics ``/metrics`` adds to ours (None: the only process).
        self.siblings: Any = None

    def join_workers(self, run_dir: str, index: int, count: int) -> None:
        """Worker ``index`` of ``count`` sharing ``run_dir``: the offline windows and ``/metrics`` cover them all."""
        self.health.shared = OfflineFiles(run_dir)
        self.siblings = Siblings(self, run_dir, index, count)
        if self.presence is not None:
            self.presence.worker = index

    def _make_fleet(self, config: Config) -> FleetFills | None:
        """``coordination``: one upstream fetch per blob for every replica on the same Redis."""
        spec, redis = config.coordination, self.redis
        #: The replicas Redis has seen, for the status page (None without a fleet).
        self.presence: Presence | None = None
        if spec is None or redis is None or self.fills is None:
            return None
        advertise = spec.advertise or f"http://{socket.getfqdn()}:{self.port}"
        self.presence = Presence(redis, advertise, lambda: len(self.fills.fills), time.time, self.reactor)
        fleet = FleetFills(redis, spec.secret, advertise, self.reactor, config.read_timeout)
        self.fills.fleet = fleet
        self.manifests.fleet_tags = FleetTags(redis)
        s3 = config.storage.s3
        if self.bucket is not None and (s3.max_size or s3.max_age):
            self.bucket.use = BucketUse(redis, time.time)
            self.bucket_bound = BucketBound(
                self.bucket.use,
                Leases(redis),
                self.bucket.remove_blob,
                s3.max_size,
                s3.max_age,
                advertise,
                self.reactor,
            )
        return fleet

    def _make_bucket(self, config: Config) -> Bucket | None:
        s3 = config.storage.s3
        if s3 is None or self.storage is None:
            return None
        store = ObjectStore(self.reactor, s3, timeout=min(STORE_TIMEOUT, config.read_timeout))
        bucket = Bucket(store, self.storage, self.reactor)
        self.fills.bucket = bucket
        self.blobs.redirect_ttl = s3.redirect_ttl if s3.redirect else None
        self.manifests.bucket = bucket
        self.cache.held = bucket.held
        self.private.on_record = bucket.record_written
        return bucket

    def apply_security(self, config: Config) -> None:
        """The login gate and the rate limiter for ``config.security`` (at start, and on a reload that changes it)."""
        reactor = self.reactor
        security = config.security
        self.gate = (
            Gate(
                Htpasswd(security.htpasswd, self.pools.auth),
                Tokens(self.token_secret(config), security.token_ttl),
                FleetLoginThrottle(self.redis, LoginThrottle()) if self.redis else None,
            )
            if security.htpasswd
            else None
        )
        self.addresses = ClientAddresses(security.trusted_proxies)
        self.metrics_readers = ClientAddresses(security.metrics_allow)  # /metrics without login when closed
        local = RateLimiter(security.rate, security.burst, reactor.seconds) if security.rate else None
        redis = self.redis
        self.limiter = FleetRateLimiter(redis, local, self.metrics.rate_check) if local and redis else local

    def token_secret(self, config: Config) -> str:
        """``auth.secret``, else one derived from ``coordination.secret`` (a login on one replica holds on all),
        else one made once for the cache directory (for this process without a cache): the same across reloads
        and restarts, and for every process sharing the directory."""
        if config.security.token_secret:
            return config.security.token_secret
        if config.coordination is not None:
            return hmac.new(config.coordination.secret.encode(), b"dioproxy login tokens", hashlib.sha256).hexdigest()
        if self._made_secret is None:
            self._made_secret = shared_secret(config.cache_dir) if config.cache_enabled else secrets.token_hex(32)
        return self._made_secret

    def route(self, name: str, ns: str | None = None, host: str | None = None) -> Target:
        """The upstream repository for a request; 404 for unknown registries, 403 for denied repositories."""
        target = resolve(self.config, name, ns, host)
        check_access(self.config.security.access, target)
        return target

    def client(self, target: Target) -> UpstreamClient:
        client = self.clients.get(target.registry)
        if client is None:  # removed by a reload while this request was under way
            raise name_unknown(target.registry)
        return client

    def make_client(self, upstream: Upstream, config: Config | None = None) -> Any:
        """An upstream client wired to our metrics (at start, and by a reload for a new or changed upstream)."""
        return UpstreamClient(
            upstream,
            self.http,
            self.reactor,
            self.tokens,
            public_http=self.public_http,
            timeout=(config or self.config).read_timeout,
            on_response=self.upstream_response,
            on_error=self.metrics.upstream_error,
            health=self.health,
            budget=self.budget,
        )

    def _reconfigure_outages(self, old: Config, new: Config) -> None:
        """A reload: the new window, negative TTL and pull budget policy; a registry whose URL or credentials changed
        starts afresh (a new account has its own budget: :meth:`make_client` picks it)."""
        self.health.window = new.offline_timeout
        self.health.track(new.upstreams)
        for name, upstream in new.upstreams.items():
            if old.upstreams.get(name) not in (None, upstream):
                self.health.forget(name)
                self.manifests.unknown.forget(name)
        self.manifests.negative_ttl = new.negative_ttl
        self.budget.reserve, self.budget.wait = new.pull_reserve, new.pull_wait

    def apply(self, config: Config) -> list[str]:
        """Put a new, validated configuration in force at once; in-flight transfers keep their clients.

        Returns the names of the settings that changed (see :mod:`dioproxy.reload`).
        """
        return apply_config(self, config)

    def make_room(self, nbytes: int) -> defer.Deferred:
        """The cache disk is full: the size bound gives up its least recently used entries."""
        return self.cache.make_room(nbytes) if self.cache else defer.succeed(None)

    def upstream_response(self, registry: str, method: str, code: int, response: Any) -> None:
        """Every upstream answer: metrics; and a blob about to be stored (its size is known now) gets room in time."""
        self.metrics.upstream_response(registry, method, code, response)
        if self.cache is not None and code in (200, 206):
            self.cache.schedule_check()

    def state(self) -> dict:
        """What ``/metrics`` reads at each scrape: fills in progress, cache size and entries."""
        fills = list(self.fills.fills.values()) if self.fills else []
        state = {"fills": len(fills), "fill_bytes": sum(f.written for f in fills), "budget": self.budget.snapshot()}
        if self.cache:
            state.update(self.cache.state())
        if self.fleet:
            state["fleet"] = {"up": 0 if self.fleet.redis.down else 1, "claims": dict(self.fleet.claims)}
        return state

    def request_done(self, request: Any, aborted: bool = False) -> None:
        """Called by the site once per request, with its access-log line: metrics, status page, manifest last use."""
        self.metrics.request_done(request, aborted)
        self.status.request_done(request)
        if self.cache:
            self.cache.request_done(request)

    def close(self) -> Any:
        """Drop the upstream connections we keep for reuse, stop the cache bound's timers (a Deferred)."""
        self.prefetcher.stop()
        self.health.stop()
        if self.fills:
            self.fills.stop()
        stopped = self.cache.stop() if self.cache else defer.succeed(None)
        written = self.storage.settled() if self.storage else defer.succeed(None)  # small files, in the disk pool
        shared = self.bucket.stop() if self.bucket else defer.succeed(None)
        if self.bucket_bound:
            self.bucket_bound.stop()
        if self.presence:
            self.presence.stop()
        if self.fleet:
            shared = defer.gatherResults([shared, defer.ensureDeferred(self.fleet.close())])
        elif self.redis:  # no cache, so no fleet of fills: the limits and the budget used it
            shared = defer.gatherResults([shared, defer.ensureDeferred(self.redis.close())])
        closed = defer.gatherResults([self.pool.closeCachedConnections(), stopped, written, shared])
        return closed.addBoth(self._stop_pools)

    def _stop_pools(self, result: Any) -> Any:
        self.pools.stop()  # after the index flush and the small writes, which run in them
        return result

    def start(self, clean: bool = True, prefetch: bool = True) -> int:
        """Prepare the cache before serving: drop what an earlier crash left half-written (``clean``); index it
        (in a thread); keep the ``prefetch:`` list warm (``prefetch``)."""
        removed = self.storage.clean_temp() if self.storage and clean else 0
        if self.cache:
            self.cache.start()
        if self.bucket:
            self.bucket_started = defer.ensureDeferred(self.bucket.start())
        if prefetch:
            self.prefetcher.start()
        if self.bucket_bound:
            self.bucket_bound.start()
        if self.presence:
            self.presence.start()
        return removed
