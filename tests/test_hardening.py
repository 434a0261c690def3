"""Issue 9 sections 5 and 7: where upstream redirects may lead, and the smaller holes a review found."""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import replace
from typing import Any

import bcrypt
from twisted.internet import defer, reactor
from twisted.internet._resolver import HostResolution
from twisted.internet.address import IPv4Address
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import client as webclient
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from dioproxy.config import Upstream, build_config
from dioproxy.egress import InternalAddress, is_public, make_public_http_client
from dioproxy.upstream import UpstreamClient, make_pool
from tests.harness import Proxy, start_upstream

SUBJECT = "sha256:" + "ab" * 32
SECRET = b'{"schemaVersion": 2, "manifests": [], "internal": "secret"}'


class _Secret(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader("Content-Type", "application/json")
        return SECRET


class Bystander:
    """An internal HTTP service on another loopback address (127.0.0.2): it counts every connection it accepts."""

    def __init__(self, testcase: unittest.TestCase) -> None:
        self.connections: list[Any] = []
        site = Site(_Secret())
        build = site.buildProtocol
        site.buildProtocol = lambda addr: self.connections.append(addr) or build(addr)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.2")
        self.url = f"http://127.0.0.2:{self.port.getHost().port}/internal"
        testcase.addCleanup(self.port.stopListening)


class NamesResolver:
    """The reactor's resolver, except for the names given (as a DNS that points them at internal addresses)."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.real = reactor.nameResolver

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, *args: Any, **kwargs: Any) -> Any:
        if hostName not in self.names:
            return self.real.resolveHostName(receiver, hostName, portNumber, *args, **kwargs)
        resolution = HostResolution(hostName)
        receiver.resolutionBegan(resolution)
        receiver.addressResolved(IPv4Address("TCP", self.names[hostName], portNumber))
        receiver.resolutionComplete()
        return resolution


class InternalRedirectTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        self.fake.add_image("library/hello", "1.0", layer_sizes=[10])
        self.bystander = Bystander(self)

    @defer.inlineCallbacks
    def assert_refused(self, proxy: Proxy, path: str):
        response = yield proxy.get(path)
        body = yield response.content()
        self.assertEqual(response.code, 502, body)
        self.assertNotIn(b"secret", body)
        error = json.loads(body)["errors"][0]
        self.assertIn("docker.io", error["message"], "the refusal names the registry")
        self.assertEqual(self.bystander.connections, [], "no connection reached the internal service")

    @defer.inlineCallbacks
    def test_referrers_and_tags_redirected_to_another_internal_host_are_refused(self):
        proxy = Proxy(self, self.fake.registry_url)
        self.fake.redirect_path("/referrers/", self.bystander.url)
        self.fake.redirect_path("/tags/list", self.bystander.url)
        yield self.assert_refused(proxy, f"/v2/library/hello/referrers/{SUBJECT}")
        yield self.assert_refused(proxy, "/v2/library/hello/tags/list")

    @defer.inlineCallbacks
    def test_a_blob_redirected_to_an_internal_host_is_refused(self):
        proxy = Proxy(self, self.fake.registry_url)
        digest = self.fake.add_blob(b"x" * 1000)
        self.fake.redirect_to = self.bystander.url
        yield self.assert_refused(proxy, f"/v2/library/hello/blobs/{digest}")

    @defer.inlineCallbacks
    def test_a_host_name_that_resolves_to_an_internal_address_is_refused(self):
        previous = reactor.installNameResolver(NamesResolver({"innocent.example": "127.0.0.2"}))
        self.addCleanup(reactor.installNameResolver, previous)
        proxy = Proxy(self, self.fake.registry_url)
        self.fake.redirect_path("/tags/list", self.bystander.url.replace("127.0.0.2", "innocent.example"))
        yield self.assert_refused(proxy, "/v2/library/hello/tags/list")

    @defer.inlineCallbacks
    def test_a_token_realm_on_an_internal_host_is_refused(self):
        """The realm is a URL the upstream chose too: same rule as for its redirects."""
        proxy = Proxy(self, self.fake.registry_url)
        self.fake.auth_url = self.bystander.url.rsplit("/", 1)[0]
        yield self.assert_refused(proxy, "/v2/library/hello/manifests/1.0")

    @defer.inlineCallbacks
    def test_listed_hosts_and_the_upstreams_own_host_are_followed(self):
        upstream = {"url": self.fake.registry_url, "redirect_hosts": ["127.0.0.2"]}
        proxy = Proxy(self, self.fake.registry_url, upstreams={"docker.io": upstream})
        response = yield proxy.get("/v2/library/hello/manifests/1.0")
        self.assertEqual(response.code, 200, "the realm and the CDN on the upstream's own host are fine")
        yield response.content()
        self.fake.redirect_path("/tags/list", self.bystander.url)
        response = yield proxy.get("/v2/library/hello/tags/list")
        self.assertEqual((yield response.content()), SECRET)
        self.assertEqual(len(self.bystander.connections), 1)

    def test_redirect_hosts_config(self):
        config = build_config({"upstreams": {"ghcr.io": {"url": "https://ghcr.io", "redirect_hosts": ["CDN.Lan"]}}})
        self.assertEqual(config.upstreams["ghcr.io"].redirect_hosts, ("cdn.lan",))
        self.assertRaises(ValueError, build_config, {"upstreams": {"ghcr.io": {"url": "x", "redirect_hosts": 3}}})


class PublicAddressTests(unittest.TestCase):
    def test_which_addresses_are_public(self):
        for address in ("8.8.8.8", "2606:4700::1111", "151.101.1.1"):
            self.assertTrue(is_public(address), address)
        internal = ("127.0.0.2", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0")
        internal += ("::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "224.0.0.1", "nonsense")
        for address in internal:
            self.assertFalse(is_public(address), address)

    @defer.inlineCallbacks
    def test_the_check_is_on_the_address_connected_to(self):
        bystander = Bystander(self)
        pool = make_pool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        resolver = NamesResolver({"innocent.example": "127.0.0.2"})
        http = make_public_http_client(reactor, build_config(), pool, resolver)
        for url in (bystander.url, bystander.url.replace("127.0.0.2", "innocent.example")):
            yield self.assertFailure(http.get(url, timeout=10), InternalAddress)
        self.assertEqual(bystander.connections, [])


class _Response:
    """Just enough of an IResponse for _follow: a status, headers and an empty body."""

    def __init__(self, code: int, location: str | None = None) -> None:
        self.code = code
        self.length = 0
        self.headers = Headers({"Location": [location]} if location else {})

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(None)
        protocol.connectionLost(Failure(webclient.ResponseDone()))


class _Recording:
    def __init__(self, answers: list[_Response]) -> None:
        self.answers = answers
        self.sent: list[tuple[str, dict]] = []

    def request(self, method: str, url: str, headers: dict, **kwargs: Any) -> defer.Deferred:
        self.sent.append((url, dict(headers)))
        return defer.succeed(self.answers.pop(0))


class AuthorizationOnRedirectTests(unittest.TestCase):
    def follow(self, origin: str, location: str) -> list[tuple[str, dict]]:
        http = _Recording([_Response(307, location), _Response(200)])
        client = UpstreamClient(Upstream("ghcr.io", origin), http, reactor, public_http=http)
        self.successResultOf(defer.ensureDeferred(client._follow("GET", origin + "/v2/x", {"Authorization": "t"})))
        return http.sent

    def test_never_over_a_scheme_downgrade(self):
        sent = self.follow("https://registry.example", "http://registry.example/v2/y")
        self.assertEqual(sent[0][1], {"Authorization": "t"})
        self.assertEqual(sent[1], ("http://registry.example/v2/y", {}), "https to http on the same host")

    def test_kept_on_the_same_origin_dropped_for_another_host(self):
        self.assertEqual(self.follow("https://registry.example", "/v2/y")[1][1], {"Authorization": "t"})
        self.assertEqual(self.follow("https://registry.example", "https://cdn.example/y")[1][1], {})


def basic(user: str, password: str) -> dict:
    return {"Authorization": ["Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()]}


class ClosedMirrorTests(unittest.TestCase):
    """A mirror closed with htpasswd: /metrics, X-Forwarded-*, tokens bound to a registry, the token secret."""

    def setUp(self):
        self.fake = start_upstream(self)
        self.image = self.fake.add_image("library/hello", "1.0", layer_sizes=[10])
        self.htpasswd = self.mktemp()
        with open(self.htpasswd, "wb") as f:
            f.write(b"alice:" + bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)) + b"\n")

    def closed(self, cache_dir: str | None = None, **config: Any) -> Proxy:
        auth = {"htpasswd": self.htpasswd, **config.pop("auth", {})}
        return Proxy(self, self.fake.registry_url, cache_dir, auth=auth, **config)

    @defer.inlineCallbacks
    def token(self, proxy: Proxy, query: str = "scope=repository:library/hello:pull") -> Any:
        response = yield proxy.get(f"/token?{query}", headers=basic("alice", "wonderland"))
        self.assertEqual(response.code, 200)
        return {"Authorization": [f"Bearer {(yield response.json())['token']}"]}

    @defer.inlineCallbacks
    def code(self, proxy: Proxy, path: str, headers: dict | None = None) -> Any:
        response = yield proxy.get(path, headers=headers)
        body = yield response.content()
        return response.code, body, response.headers

    # -- /metrics --------------------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_metrics_are_behind_the_login(self):
        proxy = self.closed()
        code, body, headers = yield self.code(proxy, "/metrics")
        self.assertEqual(code, 401)
        self.assertNotIn(b"dioproxy_", body)
        self.assertTrue(headers.getRawHeaders("WWW-Authenticate")[0].startswith("Bearer realm="))
        code, body, headers = yield self.code(proxy, "/metrics", basic("alice", "wonderland"))
        self.assertEqual(code, 200)
        self.assertIn(b"dioproxy_requests_total", body)
        self.assertTrue(headers.getRawHeaders("Content-Type")[0].startswith("text/plain"))
        code, body, _ = yield self.code(proxy, "/metrics", (yield self.token(proxy)))
        self.assertEqual(code, 200)
        code, _, _ = yield self.code(proxy, "/metrics", basic("alice", "wrong"))
        self.assertEqual(code, 401)

    @defer.inlineCallbacks
    def test_metrics_without_login_only_from_the_allowlist(self):
        allowed = self.closed(auth={"metrics_allow": ["127.0.0.0/8"]})
        code, body, _ = yield self.code(allowed, "/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b"dioproxy_requests_total", body)
        elsewhere = self.closed(auth={"metrics_allow": ["10.0.0.0/8"]})
        code, _, _ = yield self.code(elsewhere, "/metrics")
        self.assertEqual(code, 401, "127.0.0.1 is not in 10.0.0.0/8")
        code, _, _ = yield self.code(elsewhere, "/metrics", {"X-Forwarded-For": ["10.1.1.1"]})
        self.assertEqual(code, 401, "X-Forwarded-For from a peer that is not a trusted proxy changes nothing")
        self.assertRaises(ValueError, build_config, {"auth": {"metrics_allow": ["not a network"]}})

    # -- X-Forwarded-* ---------------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_forwarded_url_headers_only_from_trusted_proxies(self):
        forwarded = {"X-Forwarded-Proto": ["https"], "X-Forwarded-Host": ["evil.example"]}
        stranger = self.closed()
        _, _, headers = yield self.code(stranger, "/v2/", forwarded)
        [challenge] = headers.getRawHeaders("WWW-Authenticate")
        self.assertTrue(challenge.startswith(f'Bearer realm="{stranger.url}/token"'), challenge)
        nginx = self.closed(rate_limit={"trusted_proxies": ["127.0.0.1"]})
        _, _, headers = yield self.code(nginx, "/v2/", forwarded)
        self.assertTrue(headers.getRawHeaders("WWW-Authenticate")[0].startswith('Bearer realm="https://evil.example/'))

    @defer.inlineCallbacks
    def test_tags_link_ignores_a_strangers_forwarded_host(self):
        self.fake.add_image("library/hello", "2.0", layer_sizes=[10])
        proxy = Proxy(self, self.fake.registry_url)
        headers = {"X-Forwarded-Proto": ["https"], "X-Forwarded-Host": ["evil.example"]}
        response = yield proxy.get("/v2/hello/tags/list?n=1", headers=headers)
        yield response.content()
        [link] = response.headers.getRawHeaders("Link")
        self.assertTrue(link.startswith(f"<{proxy.url}/v2/hello/tags/list?"), link)

    # -- tokens name their registry ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_token_for_one_registry_is_refused_for_another(self):
        proxy = self.closed()
        hub = yield self.token(proxy)
        code, body, _ = yield self.code(proxy, "/v2/library/hello/manifests/1.0", hub)
        self.assertEqual((code, body), (200, self.image.body))
        code, _, headers = yield self.code(proxy, "/v2/library/hello/manifests/1.0?ns=ghcr.io", hub)
        self.assertEqual(code, 401, "same repository name, other registry")
        [challenge] = headers.getRawHeaders("WWW-Authenticate")
        self.assertIn(f'realm="{proxy.url}/token?ns=ghcr.io"', challenge)
        self.assertIn('error="insufficient_scope"', challenge)
        ghcr = yield self.token(proxy, "ns=ghcr.io&scope=repository:library/hello:pull")
        code, body, _ = yield self.code(proxy, "/v2/library/hello/manifests/1.0?ns=ghcr.io", ghcr)
        self.assertEqual((code, body), (200, self.image.body), "the realm in the challenge gives the right token")
        code, _, _ = yield self.code(proxy, "/v2/ghcr.io/library/hello/manifests/1.0", ghcr)
        self.assertEqual(code, 401, "a token names the client's repository spelling and the registry")
        code, _, _ = yield self.code(proxy, "/v2/library/hello/manifests/1.0", ghcr)
        self.assertEqual(code, 401)

    # -- the token secret ------------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_the_token_secret_survives_a_reload(self):
        proxy = self.closed()
        bearer = yield self.token(proxy)
        security = replace(proxy.config.security, token_ttl=600.0)
        self.assertEqual(proxy.mirror.apply(replace(proxy.config, security=security)), ["security"])
        code, _, _ = yield self.code(proxy, "/v2/library/hello/manifests/1.0", bearer)
        self.assertEqual(code, 200, "a reload logged everyone out")

    @defer.inlineCallbacks
    def test_processes_on_one_cache_directory_share_the_secret(self):
        first = self.closed()
        second = self.closed(first.cache_dir)
        bearer = yield self.token(first)
        code, _, _ = yield self.code(second, "/v2/library/hello/manifests/1.0", bearer)
        self.assertEqual(code, 200)
        path = os.path.join(first.cache_dir, "token-secret")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual([n for n in os.listdir(first.cache_dir) if n.startswith("token-secret")], ["token-secret"])

    @defer.inlineCallbacks
    def test_a_configured_secret_is_used_and_nothing_written(self):
        first = self.closed(auth={"secret": "s" * 40})
        bearer = yield self.token(first)
        self.assertFalse(os.path.exists(os.path.join(first.cache_dir, "token-secret")))
        other = self.closed(auth={"secret": "t" * 40})
        code, _, _ = yield self.code(other, "/v2/library/hello/manifests/1.0", bearer)
        self.assertEqual(code, 401)

    # -- reloads apply the security settings -----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_reload_closes_and_opens_the_mirror(self):
        proxy = Proxy(self, self.fake.registry_url)
        open_config = proxy.config
        closed = replace(open_config, security=replace(open_config.security, htpasswd=self.htpasswd))
        self.assertIn("security", proxy.mirror.apply(closed))
        code, _, _ = yield self.code(proxy, "/v2/library/hello/manifests/1.0")
        self.assertEqual(code, 401)
        proxy.mirror.apply(open_config)
        code, _, _ = yield self.code(proxy, "/v2/library/hello/manifests/1.0")
        self.assertEqual(code, 200)
