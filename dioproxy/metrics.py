"""Prometheus metrics, served at ``/metrics``: one :class:`Metrics` (its own ``CollectorRegistry``) per mirror.

Every name starts with ``dioproxy_``. The numbers come from hooks the core already has: the site's access log
(endpoint, status, cache outcome, bytes sent), the upstream client's ``on_response`` / ``on_error``, the fill
manager's ``on_done``, the token cache, the size-bounded cache and the config reloader. Gauges that describe
state (fills in progress, cache size) are read when scraped, so they can never drift from the truth.

Under ``--workers N`` each worker keeps its own registry and a scrape answered by any worker covers all of them
(:mod:`dioproxy.siblings` fetches the others'; :func:`merge` adds them up as :data:`GAUGE_MERGE` says).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.web import resource, server

from dioproxy import __version__
from dioproxy.upstream import TokenCache

NAMESPACE = "dioproxy"
#: Request durations: a cached manifest takes a millisecond, a cold multi-GB layer minutes.
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
FILL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

#: How each gauge is combined over the workers of ``--workers N`` (counters and histograms are always summed):
#: ``sum`` for what each process counts of its own (a fill runs in one worker only, a pin is one worker's reader);
#: ``once`` for what every worker reads from the same shared state: the SQLite index's totals (the answering
#: worker writes its batch and reads them at the scrape, its siblings have written theirs just before) and the
#: configuration; ``min`` where the most cautious worker is the one to alert on: the pull budget each learned from
#: its own upstream answers, the index scan each ran, the last configuration each applied; ``max`` for the
#: upstream's limit and the build (1 for each version any worker runs). A gauge missing here is summed.
GAUGE_MERGE = {
    f"{NAMESPACE}_fills_in_progress": "sum",
    f"{NAMESPACE}_fill_inflight_bytes": "sum",
    f"{NAMESPACE}_cache_pinned_entries": "sum",
    f"{NAMESPACE}_cache_size_bytes": "once",
    f"{NAMESPACE}_cache_entries": "once",
    f"{NAMESPACE}_cache_max_size_bytes": "once",
    f"{NAMESPACE}_cache_index_ready": "min",
    f"{NAMESPACE}_upstream_ratelimit_remaining": "min",
    f"{NAMESPACE}_upstream_ratelimit_limit": "max",
    f"{NAMESPACE}_config_last_reload_success_timestamp_seconds": "min",
    f"{NAMESPACE}_build_info": "max",
    f"{NAMESPACE}_fleet_redis_up": "min",
    f"{NAMESPACE}_scrape_workers": "once",
    f"{NAMESPACE}_scrape_workers_missing": "once",
}
_COMBINE: dict[str, Callable[[float, float], float]] = {"sum": float.__add__, "min": min, "max": max}

# No ``*_created`` series next to every counter: they double the exposition and no dashboard uses them.
disable_created_metrics()


def endpoint_of(path: bytes | str) -> str:
    """The API endpoint of a request path, a label of bounded cardinality (never the repository name)."""
    if isinstance(path, bytes):
        path = path.decode("ascii", "replace")
    path = path.split("?", 1)[0]
    if path in ("/v2", "/v2/"):
        return "base"
    if path.startswith("/v2/"):
        parts = path.rstrip("/").split("/")
        if len(parts) >= 4 and parts[-2] in ("manifests", "blobs", "referrers"):
            return parts[-2]
        if len(parts) >= 4 and parts[-2:] == ["tags", "list"]:
            return "tags"
        return "other"
    first = path.strip("/").split("/", 1)[0]
    return first if first in ("token", "healthz", "metrics") else "other"


class Metrics:
    """The mirror's metrics and the hooks that feed them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, ns = self.registry, NAMESPACE
        self.requests = Counter(
            "requests",
            "Client requests, by API endpoint, HTTP status (or aborted: cut before the end), cache outcome (hit, "
            "miss, stale, pass, -) and registry",
            ["endpoint", "status", "outcome", "registry"],
            namespace=ns,
            registry=r,
        )
        self.aborted = Counter(
            "requests_aborted",
            "Client requests whose connection was cut before the response was complete",
            ["endpoint"],
            namespace=ns,
            registry=r,
        )
        self.request_seconds = Histogram(
            "request_duration_seconds",
            "Time from request to last byte, by endpoint and cache outcome",
            ["endpoint", "outcome"],
            buckets=REQUEST_BUCKETS,
            namespace=ns,
            registry=r,
        )
        self.sent_bytes = Counter(
            "sent_bytes",
            "Body bytes sent to clients, by endpoint and outcome: hit = served from the cache, miss = streamed "
            "while being fetched, pass = piped from upstream without caching",
            ["endpoint", "outcome"],
            namespace=ns,
            registry=r,
        )
        self.upstream_requests = Counter(
            "upstream_requests",
            "Responses received from upstream registries (token services and CDN redirects included)",
            ["registry", "method", "code"],
            namespace=ns,
            registry=r,
        )
        self.upstream_errors = Counter(
            "upstream_errors",
            "Upstream failures: network (no answer), 5xx, 429 (rate limited)",
            ["registry", "kind"],
            namespace=ns,
            registry=r,
        )
        self.upstream_bytes = Counter(
            "upstream_bytes",
            "Body bytes of successful upstream GET responses (200/206, by their Content-Length): what the "
            "mirror fetched from upstream",
            ["registry"],
            namespace=ns,
            registry=r,
        )
        self.budget_actions = Counter(
            "pull_budget_actions",
            "What the pull budget decided (dioproxy.budget): held (a cached tag served as it is to save a manifest "
            "GET), waited (for the upstream's reset), refused (429: the budget is used up)",
            ["registry", "account", "action"],
            namespace=ns,
            registry=r,
        )
        self.rate_checks = Counter(
            "fleet_rate_checks",
            "coordination and rate_limit: per-client rate limit checks, where=fleet (the client's bucket in Redis) "
            "or local (Redis did not answer in time: this replica's own bucket)",
            ["where"],
            namespace=ns,
            registry=r,
        )
        self.stale_answers = Counter(
            "stale_answers",
            "Tags answered from the cache past their tag_ttl because the upstream could not say: reason=offline "
            "(its registry is in its offline window: answered at once), error (it failed on this request) or budget "
            "(the pull budget is low: a moved tag keeps its cached digest)",
            ["registry", "reason"],
            namespace=ns,
            registry=r,
        )
        self.token_fetches = Counter(
            "token_fetches",
            "Bearer tokens fetched from upstream token services, by service",
            ["service"],
            namespace=ns,
            registry=r,
        )
        self.fills = Counter("fills", "Completed blob fills (verified and stored)", namespace=ns, registry=r)
        self.fill_bytes = Counter("fill_bytes", "Bytes of blobs stored by completed fills", namespace=ns, registry=r)
        self.fill_seconds = Histogram(
            "fill_duration_seconds",
            "Duration of completed blob fills, upstream request to verified commit",
            buckets=FILL_BUCKETS,
            namespace=ns,
            registry=r,
        )
        self.evictions = Counter(
            "evictions",
            "Cache entries removed by the size bound (reason=size) or max_age (reason=age)",
            ["kind", "reason"],
            namespace=ns,
            registry=r,
        )
        self.evicted_bytes = Counter(
            "evicted_bytes", "Bytes removed from the cache by eviction", ["reason"], namespace=ns, registry=r
        )
        self.reloads = Counter(
            "config_reloads",
            "Configuration reloads (SIGHUP or file change): applied, unchanged or refused",
            ["result"],
            namespace=ns,
            registry=r,
        )
        self.last_reload = Gauge(
            "config_last_reload_success_timestamp_seconds",
            "When a configuration was last applied (start or reload), Unix time",
            namespace=ns,
            registry=r,
        )
        self.last_reload.set(time.time())
        Gauge("build_info", "dioproxy version", ["version"], namespace=ns, registry=r).labels(__version__).set(1)
        self._state: Callable[[], dict[str, Any]] = dict
        r.register(_StateCollector(self))

    # -- hooks -------------------------------------------------------------------------------------------------

    def watch(self, state: Callable[[], dict[str, Any]]) -> None:
        """``state()`` is read at each scrape: fills in progress, cache size and entries, the bound."""
        self._state = state

    def request_done(self, request: Any, aborted: bool = False) -> None:
        """One finished (or aborted) client request, as the site's access log sees it."""
        endpoint = endpoint_of(request.path)
        outcome = str(getattr(request, "dioproxy_outcome", "-"))
        registry = str(getattr(request, "dioproxy_registry", "-"))
        self.requests.labels(endpoint, "aborted" if aborted else str(request.code), outcome, registry).inc()
        if aborted:
            self.aborted.labels(endpoint).inc()
        started = getattr(request, "dioproxy_started", None)
        if started is not None:
            self.request_seconds.labels(endpoint, outcome).observe(max(0.0, time.monotonic() - started))
        if request.sentLength:
            self.sent_bytes.labels(endpoint, outcome).inc(request.sentLength)

    def upstream_response(self, registry: str, method: str, code: int, response: Any = None) -> None:
        """``UpstreamClient.on_response``: every upstream answer, redirects and token requests included."""
        self.upstream_requests.labels(registry, method, str(code)).inc()
        if code == 429:
            self.upstream_errors.labels(registry, "429").inc()
        elif code >= 500:
            self.upstream_errors.labels(registry, "5xx").inc()
        if response is None:
            return
        if method == "GET" and code in (200, 206) and isinstance(response.length, int):
            self.upstream_bytes.labels(registry).inc(response.length)

    def upstream_error(self, registry: str, reason: str) -> None:
        """``UpstreamClient.on_error``: the upstream could not be reached (no HTTP answer)."""
        self.upstream_errors.labels(registry, "network").inc()

    def budget_action(self, registry: str, account: str, action: str) -> None:
        """``PullBudget.on_action``."""
        self.budget_actions.labels(registry, account, action).inc()

    def rate_check(self, where: str) -> None:
        """``FleetRateLimiter.on_check``."""
        self.rate_checks.labels(where).inc()

    def stale_answer(self, registry: str, reason: str) -> None:
        """``Manifests.on_stale``: a tag was served stale."""
        self.stale_answers.labels(registry, reason).inc()

    def fill_done(self, fill: Any, seconds: float) -> None:
        """``FillManager.on_done``: a blob was verified and stored."""
        self.fills.inc()
        self.fill_bytes.inc(fill.size or 0)
        self.fill_seconds.observe(seconds)

    def evicted(self, kind: str, reason: str, size: int) -> None:
        self.evictions.labels(kind, reason).inc()
        self.evicted_bytes.labels(reason).inc(size)

    def reloaded(self, result: str) -> None:
        self.reloads.labels(result).inc()
        if result == "applied":
            self.last_reload.set(time.time())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def merge(workers: Iterable[Iterable[Metric]]) -> list[Metric]:
    """The metric families of several workers as one exposition; the answering worker's come first (a ``once``
    gauge is taken from the first worker that has it)."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple, tuple[str, dict, float]]] = {}
    owner: dict[str, int] = {}
    for i, families in enumerate(workers):
        for family in families:
            how = GAUGE_MERGE.get(family.name, "sum") if family.type == "gauge" else "sum"
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name], owner[family.name] = {}, i
            elif how == "once" and owner[family.name] != i:
                continue
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen = samples.get(key)
                value = float(sample.value)
                if seen is not None and how != "once":
                    value = _COMBINE[how](seen[2], value)
                samples[key] = (sample.name, sample.labels, value)
    for name, family in merged.items():
        for sample_name, labels, value in values[name].values():
            family.add_sample(sample_name, labels, value)
    return list(merged.values())


class Families:
    """Metric families as a registry to :func:`generate_latest`."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self.families)


class _StateCollector:
    """Gauges computed at scrape time from the mirror's live objects."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self) -> Any:
        state = self.metrics._state()
        ns = NAMESPACE
        yield GaugeMetricFamily(f"{ns}_fills_in_progress", "Blob fills downloading now", state.get("fills", 0))
        yield GaugeMetricFamily(
            f"{ns}_fill_inflight_bytes", "Bytes written so far by fills in progress", state.get("fill_bytes", 0)
        )
        yield from _budget_gauges(state.get("budget", []))
        yield from _fleet_families(state.get("fleet"))
        if "cache_size" not in state:
            return
        yield GaugeMetricFamily(
            f"{ns}_cache_size_bytes", "Bytes of blobs and manifests stored in the cache", state["cache_size"]
        )
        entries = GaugeMetricFamily(f"{ns}_cache_entries", "Entries in the cache, by kind", labels=["kind"])
        for kind, count in sorted(state["cache_entries"].items()):
            entries.add_metric([kind], count)
        yield entries
        yield GaugeMetricFamily(
            f"{ns}_cache_max_size_bytes", "The configured bound (cache.max_size); 0 = unbounded", state["max_size"]
        )
        yield GaugeMetricFamily(f"{ns}_cache_pinned_entries", "Entries being read now (never evicted)", state["pinned"])
        yield GaugeMetricFamily(
            f"{ns}_cache_index_ready", "1 once the start-up scan of the cache directory is done", state["ready"]
        )


def _fleet_families(fleet: dict[str, Any] | None) -> Any:
    """``coordination``: whether Redis answers, and what the digests' leases said (dioproxy.fleet.fills)."""
    if fleet is None:
        return
    yield GaugeMetricFamily(f"{NAMESPACE}_fleet_redis_up", "1 while Redis answers the fleet's calls", fleet["up"])
    claims = CounterMetricFamily(
        f"{NAMESPACE}_fleet_claims",
        "Lease requests before an upstream fetch, by outcome: owner (we fetch), follower (we stream from the "
        "replica that does), alone (Redis did not answer: we fetch without the fleet)",
        labels=["outcome"],
    )
    for outcome, n in sorted(fleet["claims"].items()):
        claims.add_metric([outcome], n)
    yield claims


def _budget_gauges(allowances: list[dict[str, Any]]) -> Any:
    """The pull budget each upstream last announced for each of our accounts (dioproxy.budget)."""
    labels = ["registry", "account"]
    remaining = GaugeMetricFamily(
        f"{NAMESPACE}_upstream_ratelimit_remaining",
        "Manifest GETs the upstream allows this account in its window, as it last said (Docker Hub's "
        "ratelimit-remaining, less the GETs under way); absent once the announcement is older than its window",
        labels=labels,
    )
    limit = GaugeMetricFamily(
        f"{NAMESPACE}_upstream_ratelimit_limit", "The upstream's ratelimit-limit for this account", labels=labels
    )
    for a in allowances:
        if a["remaining"] is not None:
            remaining.add_metric([a["registry"], a["account"]], a["remaining"])
        if a["limit"] is not None:
            limit.add_metric([a["registry"], a["account"]], a["limit"])
    yield remaining
    yield limit


class CountingTokenCache(TokenCache):
    """The shared token cache, counting the tokens fetched (``put`` is called once per successful fetch)."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self.metrics = metrics

    def put(self, key: tuple, token: str, expires_in: float) -> None:
        self.metrics.token_fetches.labels(str(key[1] or "-")).inc()
        super().put(key, token, expires_in)


class MetricsPage(resource.Resource):
    """``/metrics`` in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: server.Request) -> bytes:
        request.dioproxy_outcome = "-"
        request.setHeader("Content-Type", CONTENT_TYPE_LATEST)
        return self.metrics.exposition()

    render_HEAD = render_GET
