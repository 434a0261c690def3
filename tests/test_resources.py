"""The resource tree: errors in the registry's JSON format, routing, tags, referrers, /token, auth, access log."""

import json

from treq.testing import StubTreq
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from dioproxy.config import build_config
from dioproxy.mirror import Mirror
from dioproxy.resources import Root
from tests.harness import Proxy, start_upstream

DIGEST = "sha256:" + "ab" * 32


class InMemoryTests(unittest.TestCase):
    """Requests refused before any upstream is asked, driven through the tree in memory with treq.testing."""

    def setUp(self):
        config = build_config(None, ["docker.io=http://127.0.0.1:9"], self.mktemp())
        self.mirror = Mirror(config, reactor)
        self.addCleanup(self.mirror.close)
        self.client = StubTreq(Root(self.mirror))

    @defer.inlineCallbacks
    def request(self, method, path, **kwargs):
        response = yield self.client.request(method, "http://mirror" + path, **kwargs)
        body = yield self.client.content(response)
        defer.returnValue((response, body))

    @defer.inlineCallbacks
    def assert_error(self, method, path, status, code):
        response, body = yield self.request(method, path)
        self.assertEqual(response.code, status, f"{method} {path}: {body!r}")
        self.assertEqual(json.loads(body)["errors"][0]["code"], code, f"{method} {path}")
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/json"])

    @defer.inlineCallbacks
    def test_base(self):
        response, body = yield self.request("GET", "/v2/")
        self.assertEqual((response.code, body), (200, b"{}"))
        self.assertEqual(response.headers.getRawHeaders("Docker-Distribution-API-Version"), ["registry/2.0"])
        response, body = yield self.request("GET", "/healthz")
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_write_methods_are_unsupported(self):
        for method in ("PUT", "POST", "PATCH", "DELETE"):
            yield self.assert_error(method, "/v2/library/a/manifests/latest", 405, "UNSUPPORTED")
            yield self.assert_error(method, f"/v2/library/a/blobs/{DIGEST}", 405, "UNSUPPORTED")
        yield self.assert_error("POST", "/v2/library/a/blobs/uploads/", 405, "UNSUPPORTED")

    @defer.inlineCallbacks
    def test_invalid_input_is_400(self):
        cases = [
            ("/v2/UPPER/manifests/latest", "NAME_INVALID"),
            ("/v2/a/%2e%2e/b/manifests/latest", "NAME_INVALID"),
            ("/v2/a/..%2fb/manifests/latest", "NAME_INVALID"),
            ("/v2/a%5cb/manifests/latest", "NAME_INVALID"),
            ("/v2/%ff/manifests/latest", "NAME_INVALID"),
            ("/v2/library/a/manifests/bad%0d%0atag", "MANIFEST_INVALID"),
            ("/v2/library/a/manifests/..%2fx", "MANIFEST_INVALID"),  # .x alone is a 404: see test_protocol
            ("/v2/library/a/blobs/sha256:xyz", "DIGEST_INVALID"),
            ("/v2/library/a/blobs/md5:" + "a" * 32, "DIGEST_INVALID"),
            ("/v2/library/a/blobs/sha256:..%2f..%2fetc", "DIGEST_INVALID"),
            ("/v2/library/a/referrers/nope", "DIGEST_INVALID"),
        ]
        for path, code in cases:
            yield self.assert_error("GET", path, 400, code)

    @defer.inlineCallbacks
    def test_unconfigured_registries_are_refused_without_connecting(self):
        yield self.assert_error("GET", "/v2/evil.example/x/manifests/latest", 404, "NAME_UNKNOWN")
        yield self.assert_error("GET", "/v2/x/y/manifests/latest?ns=evil.example", 404, "NAME_UNKNOWN")
        yield self.assert_error("GET", f"/v2/localhost:22/x/blobs/{DIGEST}", 404, "NAME_UNKNOWN")

    @defer.inlineCallbacks
    def test_unknown_paths(self):
        yield self.assert_error("GET", "/v2/library/a/nothing/here", 404, "NOT_FOUND")
        yield self.assert_error("GET", "/nothing", 404, "NOT_FOUND")


class RoutingTests(unittest.TestCase):
    """ns=, path prefix and Host mapping reach the right upstream; OCI-Namespace says which."""

    def setUp(self):
        self.hub = start_upstream(self)
        self.ghcr = start_upstream(self)
        self.hub_image = self.hub.add_image("library/hello", "1.0", layer_sizes=[10])
        self.ghcr_image = self.ghcr.add_image("acme/tool", "2.0", layer_sizes=[10])
        self.proxy = Proxy(
            self,
            self.hub.registry_url,
            upstreams={"ghcr.io": self.ghcr.registry_url},
            hosts={"ghcr.mirror.test": "ghcr.io"},
        )

    @defer.inlineCallbacks
    def check(self, path, expected, registry, headers=None):
        response = yield self.proxy.get(path, headers=headers)
        self.assertEqual((yield response.content()), expected, path)
        self.assertEqual(response.headers.getRawHeaders("OCI-Namespace"), [registry], path)

    @defer.inlineCallbacks
    def test_routes(self):
        yield self.check("/v2/library/hello/manifests/1.0", self.hub_image.body, "docker.io")
        yield self.check("/v2/hello/manifests/1.0?ns=docker.io", self.hub_image.body, "docker.io")
        yield self.check("/v2/acme/tool/manifests/2.0?ns=ghcr.io", self.ghcr_image.body, "ghcr.io")
        yield self.check("/v2/ghcr.io/acme/tool/manifests/2.0", self.ghcr_image.body, "ghcr.io")
        yield self.check(
            "/v2/acme/tool/manifests/2.0", self.ghcr_image.body, "ghcr.io", {"Host": ["ghcr.mirror.test:8004"]}
        )
        self.assertEqual(self.hub.count("registry", path_contains="acme"), 0)
        self.assertEqual(self.ghcr.count("registry", path_contains="hello"), 0)


class EndpointTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        self.proxy = Proxy(self, self.fake.registry_url)
        self.image = self.fake.add_image("library/hello", "1.0", layer_sizes=[1000, 2000])
        for i in range(5):
            self.fake.add_image("library/hello", f"t{i}", layer_sizes=[10])

    @defer.inlineCallbacks
    def test_tags_list_with_link_rewritten_for_nginx(self):
        nginx = Proxy(self, self.fake.registry_url, rate_limit={"trusted_proxies": ["127.0.0.1"]})
        headers = {"X-Forwarded-Proto": ["https"], "X-Forwarded-Host": ["mirror.example.com"]}
        response = yield nginx.get("/v2/hello/tags/list?n=2", headers=headers)
        body = yield response.json()
        self.assertEqual(body["name"], "library/hello")
        self.assertEqual(len(body["tags"]), 2)
        [link] = response.headers.getRawHeaders("Link")
        self.assertTrue(link.startswith("<https://mirror.example.com/v2/hello/tags/list?"), link)
        self.assertIn("n=2", link)
        self.assertIn('rel="next"', link)

    @defer.inlineCallbacks
    def test_referrers_empty_index_when_upstream_lacks_it(self):
        response = yield self.proxy.get(f"/v2/hello/referrers/{self.image.digest}")
        self.assertEqual(response.code, 200)
        body = yield response.json()
        self.assertEqual((body["mediaType"], body["manifests"]), ("application/vnd.oci.image.index.v1+json", []))

    @defer.inlineCallbacks
    def test_referrers_pass_through(self):
        self.fake.referrers_api = True
        response = yield self.proxy.get(f"/v2/hello/referrers/{self.image.digest}")
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json())["manifests"], [])
        self.assertEqual(self.fake.count("registry", "GET", "/referrers/"), 2)  # a 401, then the answer

    @defer.inlineCallbacks
    def test_token_endpoint_forwards_to_the_realm_with_library(self):
        response = yield self.proxy.get("/token?service=registry.docker.io&scope=repository:hello:pull")
        self.assertEqual(response.code, 200)
        token = (yield response.json())["token"]
        self.assertTrue(token)
        [request] = self.fake.find("auth")[-1:]
        self.assertEqual(request.query["scope"], "repository:library/hello:pull")
        self.assertEqual(request.query["service"], "fake.registry")

    @defer.inlineCallbacks
    def test_one_token_for_a_whole_pull(self):
        yield (yield self.proxy.get("/v2/hello/manifests/1.0")).content()
        for digest in self.image.blobs:
            yield (yield self.proxy.get(f"/v2/hello/blobs/{digest}")).content()
        self.assertEqual(self.fake.count("auth"), 1)
        self.assertEqual(self.fake.count("registry", path_contains="blobs", method="GET"), 3)
        self.assertTrue(all(r.status == 307 for r in self.fake.find("registry", "GET", "/blobs/")))

    @defer.inlineCallbacks
    def test_expired_token_is_renewed(self):
        yield (yield self.proxy.get("/v2/hello/manifests/1.0")).content()
        self.fake.expire_tokens()
        response = yield self.proxy.get(f"/v2/hello/manifests/{self.image.digest}")
        self.assertEqual((yield response.content()), self.image.body)
        response = yield self.proxy.get(f"/v2/hello/blobs/{self.image.layer_digests[0]}")
        self.assertEqual(response.code, 200)
        yield response.content()

    @defer.inlineCallbacks
    def test_transient_5xx_is_retried(self):
        self.fake.fail_next(2, status=503, path_contains="/blobs/")
        digest = self.image.layer_digests[0]
        response = yield self.proxy.get(f"/v2/hello/blobs/{digest}")
        self.assertEqual(response.code, 200)
        yield response.content()

    @defer.inlineCallbacks
    def test_rate_limited_with_nothing_cached_is_429(self):
        self.fake.fail_next(10, status=429, retry_after=30)
        response = yield self.proxy.get("/v2/hello/manifests/1.0")
        self.assertEqual(response.code, 429)
        self.assertEqual((yield response.json())["errors"][0]["code"], "TOOMANYREQUESTS")
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["30"])

    @defer.inlineCallbacks
    def test_token_service_down_is_a_clear_error(self):
        self.fake.token_fail = 503
        response = yield self.proxy.get("/v2/hello/manifests/1.0")
        self.assertIn(response.code, (502, 503))
        error = (yield response.json())["errors"][0]
        self.assertIn("docker.io", error["message"])

    @defer.inlineCallbacks
    def test_redirect_to_other_schemes_is_refused(self):
        self.fake.redirect_to = "file:///etc/passwd"
        response = yield self.proxy.get(f"/v2/hello/blobs/{self.image.layer_digests[0]}")
        self.assertEqual(response.code, 502)
        self.assertIn("redirect", (yield response.json())["errors"][0]["message"])

    @defer.inlineCallbacks
    def test_unreachable_upstream_names_the_registry(self):
        yield self.fake.stop()
        response = yield self.proxy.get("/v2/hello/manifests/1.0")
        self.assertEqual(response.code, 503)
        self.assertIn("docker.io", (yield response.json())["errors"][0]["message"])

    @defer.inlineCallbacks
    def test_access_log(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        digest = self.image.layer_digests[0]
        for _ in range(2):
            yield (yield self.proxy.get(f"/v2/hello/blobs/{digest}")).content()
        lines = [e for e in events if e.get("log_namespace") == "dioproxy.access"]
        self.assertEqual([e["outcome"] for e in lines], ["miss", "hit"])
        first = lines[0]
        self.assertEqual((first["method"], first["status"], first["registry"]), ("GET", 200, "docker.io"))
        self.assertEqual(first["bytes"], 1000)
        self.assertEqual(first["uri"], f"/v2/hello/blobs/{digest}")
        self.assertGreater(first["ms"], 0)


class UpstreamAuthTests(unittest.TestCase):
    @defer.inlineCallbacks
    def pull(self, fake, **upstream):
        image = fake.add_image("acme/private", "1.0", layer_sizes=[100])
        proxy = Proxy(self, fake.registry_url, upstreams={"ghcr.io": {"url": fake.registry_url, **upstream}})
        response = yield proxy.get("/v2/ghcr.io/acme/private/manifests/1.0")
        body = yield response.content()
        defer.returnValue((response.code, body == image.body))

    @defer.inlineCallbacks
    def test_basic_auth_upstream(self):
        fake = start_upstream(self, auth_mode="basic", users={"bob": "pw"})
        self.assertEqual((yield self.pull(fake, username="bob", password="pw")), (200, True))
        self.assertNotIn("authorization", fake.find("registry")[0].headers, "no credentials before a challenge")
        self.assertEqual((yield self.pull(fake)), (404, False))

    @defer.inlineCallbacks
    def test_credentials_for_private_repositories_go_to_the_token_realm_only(self):
        fake = start_upstream(self, users={"bob": "pw"}, private=["acme/private"])
        self.assertEqual((yield self.pull(fake, username="bob", password="pw")), (200, True))
        [token_request] = fake.find("auth")
        self.assertTrue(token_request.headers["authorization"].startswith("Basic "))
        for request in fake.find("registry") + fake.find("cdn"):
            self.assertFalse(request.headers.get("authorization", "").startswith("Basic "))
