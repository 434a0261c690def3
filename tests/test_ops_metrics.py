"""``/metrics``: every value checked against what the test did (pulls, hits, upstream failures, fills, cache)."""

from __future__ import annotations

import os

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.trial import unittest

from dioproxy.metrics import Metrics, endpoint_of
from tests.harness import Proxy, eventually, start_upstream

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 if there is none)."""
    return sum(
        s.value for s in samples(text) if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


class Puller:
    """Pulls an image through a proxy the way a client does: manifest by tag, then config and layers."""

    def __init__(self, testcase: unittest.TestCase, proxy: Proxy) -> None:
        self.testcase, self.proxy = testcase, proxy

    @defer.inlineCallbacks
    def pull(self, image, ns: str = "") -> defer.Deferred:
        query = f"?ns={ns}" if ns else ""
        name = image.repo
        response = yield self.proxy.get(
            f"/v2/{name}/manifests/{image.tag}{query}", headers={"Accept": [DOCKER_MANIFEST]}
        )
        body = yield response.content()
        self.testcase.assertEqual(response.code, 200, body)
        for digest, data in image.blobs.items():
            response = yield self.proxy.get(f"/v2/{name}/blobs/{digest}{query}")
            got = yield response.content()
            self.testcase.assertEqual(got, data)
        if self.proxy.mirror.storage:  # manifests and tag entries are on disk too, as after a stop
            yield self.proxy.mirror.storage.settled()

    @defer.inlineCallbacks
    def metrics(self) -> defer.Deferred:
        response = yield self.proxy.get("/metrics")
        self.testcase.assertEqual(response.code, 200)
        self.testcase.assertTrue(response.headers.getRawHeaders("Content-Type")[0].startswith("text/plain"))
        text = yield response.text()
        return text


class MetricsTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.fake = start_upstream(self, auth_mode=None)  # no token requests: upstream bytes are exactly the image
        self.proxy = Proxy(self, self.fake.registry_url)
        self.puller = Puller(self, self.proxy)
        yield self.proxy.mirror.cache.when_ready()

    @defer.inlineCallbacks
    def test_a_cold_then_a_warm_pull(self):
        image = self.fake.add_image("library/alpine", "3.19", layer_sizes=[300_000, 2_000_000])
        blobs = image.blobs
        blob_bytes = sum(len(b) for b in blobs.values())
        yield self.puller.pull(image)
        text = yield self.puller.metrics()
        self.assertEqual(value(text, "dioproxy_requests_total", endpoint="manifests", outcome="miss", status="200"), 1)
        self.assertEqual(value(text, "dioproxy_requests_total", endpoint="manifests", registry="docker.io"), 1)
        self.assertEqual(value(text, "dioproxy_requests_total", endpoint="blobs", outcome="miss"), len(blobs))
        self.assertEqual(value(text, "dioproxy_requests_total", endpoint="blobs", outcome="hit"), 0)
        self.assertEqual(value(text, "dioproxy_sent_bytes_total", endpoint="blobs", outcome="miss"), blob_bytes)
        self.assertEqual(
            value(text, "dioproxy_upstream_bytes_total", registry="docker.io"), blob_bytes + len(image.body)
        )
        self.assertEqual(value(text, "dioproxy_fills_total"), len(blobs))
        self.assertEqual(value(text, "dioproxy_fill_bytes_total"), blob_bytes)
        self.assertEqual(value(text, "dioproxy_fill_duration_seconds_count"), len(blobs))
        self.assertEqual(value(text, "dioproxy_fills_in_progress"), 0)
        # One manifest GET (the rate limit counts it), one 307 + one CDN GET per blob.
        self.assertEqual(
            value(text, "dioproxy_upstream_requests_total", registry="docker.io", method="GET", code="307"), len(blobs)
        )
        self.assertEqual(
            value(text, "dioproxy_upstream_requests_total", registry="docker.io", method="GET", code="200"),
            len(blobs) + 1,
        )
        self.assertEqual(value(text, "dioproxy_upstream_ratelimit_remaining", registry="docker.io"), 99)
        self.assertEqual(value(text, "dioproxy_upstream_errors_total"), 0)
        manifest_file = len(DOCKER_MANIFEST) + 1 + len(image.body)
        # The bound counts what was stored at its next check (within check_interval, 1 s), not at the commit.
        yield eventually(lambda: self.proxy.mirror.cache.size == blob_bytes + manifest_file)
        text = self.proxy.mirror.metrics.exposition().decode()  # not a scrape: the count of those stays 1
        self.assertEqual(value(text, "dioproxy_cache_size_bytes"), blob_bytes + manifest_file)
        self.assertEqual(value(text, "dioproxy_cache_entries", kind="blob"), len(blobs))
        self.assertEqual(value(text, "dioproxy_cache_entries", kind="manifest"), 1)

        self.fake.clear_requests()
        yield self.puller.pull(image)
        text = yield self.puller.metrics()
        self.assertEqual(self.fake.requests, [], "the warm pull touched the upstream")
        self.assertEqual(value(text, "dioproxy_requests_total", endpoint="manifests", outcome="hit"), 1)
        self.assertEqual(value(text, "dioproxy_requests_total", endpoint="blobs", outcome="hit"), len(blobs))
        self.assertEqual(value(text, "dioproxy_sent_bytes_total", endpoint="blobs", outcome="hit"), blob_bytes)
        self.assertEqual(value(text, "dioproxy_upstream_bytes_total"), blob_bytes + len(image.body))
        self.assertEqual(value(text, "dioproxy_request_duration_seconds_count", endpoint="blobs"), 2 * len(blobs))
        # The first scrape is counted too, by the time of the second.
        self.assertEqual(value(text, "dioproxy_requests_total", endpoint="metrics", status="200"), 1)

    @defer.inlineCallbacks
    def test_errors_and_status_codes(self):
        response = yield self.proxy.get("/v2/library/nothing/manifests/latest")
        yield response.content()
        self.assertEqual(response.code, 404)
        self.fake.fail_next(3, status=503, path_contains="/manifests/")
        response = yield self.proxy.get("/v2/library/broken/manifests/latest")
        yield response.content()
        self.assertEqual(response.code, 502)
        text = yield self.puller.metrics()
        self.assertEqual(value(text, "dioproxy_requests_total", endpoint="manifests", status="404"), 1)
        self.assertEqual(value(text, "dioproxy_requests_total", endpoint="manifests", status="502"), 1)
        self.assertEqual(value(text, "dioproxy_upstream_errors_total", registry="docker.io", kind="5xx"), 3)
        self.assertEqual(value(text, "dioproxy_upstream_requests_total", registry="docker.io", code="503"), 3)


class UnreachableTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_network_errors_are_counted_per_registry(self):
        fake = start_upstream(self)
        proxy = Proxy(self, fake.registry_url, upstreams={"ghcr.io": "http://127.0.0.1:1"})
        for client in proxy.mirror.clients.values():
            client.backoff = 0.01
        response = yield proxy.get("/v2/owner/img/manifests/latest?ns=ghcr.io")
        yield response.content()
        self.assertEqual(response.code, 503)
        text = yield Puller(self, proxy).metrics()
        retries = proxy.mirror.clients["ghcr.io"].retries
        self.assertEqual(value(text, "dioproxy_upstream_errors_total", registry="ghcr.io", kind="network"), retries + 1)
        self.assertEqual(value(text, "dioproxy_requests_total", endpoint="manifests", registry="ghcr.io"), 1)


class TokenTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_token_fetches(self):
        fake = start_upstream(self)
        proxy = Proxy(self, fake.registry_url)
        image = fake.add_image("library/busybox", "1", layer_sizes=[1000])
        yield Puller(self, proxy).pull(image)
        text = yield Puller(self, proxy).metrics()
        self.assertEqual(value(text, "dioproxy_token_fetches_total", service="fake.registry"), fake.count("auth"))
        self.assertGreaterEqual(fake.count("auth"), 1)


class UnitTests(unittest.TestCase):
    def test_endpoints(self):
        cases = {
            "/v2/": "base",
            "/v2": "base",
            "/v2/library/a/manifests/latest": "manifests",
            "/v2/ghcr.io/o/i/blobs/sha256:" + "a" * 64: "blobs",
            "/v2/a/b/tags/list?n=1": "tags",
            "/v2/a/referrers/sha256:" + "a" * 64: "referrers",
            "/v2/a/nonsense": "other",
            "/token?scope=x": "token",
            "/metrics": "metrics",
            "/healthz": "healthz",
            "/etc/passwd": "other",
        }
        for path, endpoint in cases.items():
            self.assertEqual(endpoint_of(path.encode()), endpoint, path)

    def test_each_mirror_has_its_own_registry(self):
        a, b = Metrics(), Metrics()
        a.evicted("blob", "size", 10)
        self.assertEqual(value(a.exposition().decode(), "dioproxy_evictions_total"), 1)
        self.assertEqual(value(b.exposition().decode(), "dioproxy_evictions_total"), 0)

    def test_every_name_has_the_prefix(self):
        names = {s.name for s in samples(Metrics().exposition().decode())}
        self.assertTrue(names)
        self.assertEqual({n for n in names if not n.startswith("dioproxy_")}, set())

    def test_dashboard_uses_only_real_metrics(self):
        """docs/grafana-dashboard.json queries only metrics that exist (a renamed metric breaks this test)."""
        import json
        import re

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "docs", "grafana-dashboard.json"), encoding="utf-8") as f:
            dashboard = json.load(f)
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        self.assertGreater(len(exprs), 8)
        families = {f.name for f in text_string_to_metric_families(_full_metrics().exposition().decode())}
        for expr in exprs:
            for name in re.findall(r"\b(dioproxy_[a-z_]+)", expr):
                base = re.sub(r"_(total|bucket|count|sum)$", "", name)
                self.assertIn(base, families, f"{name} in {expr!r}")


def _full_metrics() -> Metrics:
    """Metrics with a sample in every labelled family and the cache gauges present."""
    m = Metrics()
    m.watch(
        lambda: {
            "fills": 0,
            "fill_bytes": 0,
            "cache_size": 0,
            "cache_entries": {"blob": 0},
            "max_size": 0,
            "pinned": 0,
            "ready": 1,
            "fleet": {"up": 1, "claims": {"owner": 0}},
        }
    )
    return m
