"""Closed to strangers when asked: htpasswd logins and tokens, access rules, rate limits, private content, TLS."""

import base64
import contextlib
import json
import os
import socket

import bcrypt
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from dioproxy import auth
from dioproxy.config import ConfigError, build_config
from dioproxy.policy import ClientAddresses, RateLimiter
from dioproxy.service import Options, makeService
from tests.harness import Proxy, start_upstream

#: The upstream password in the private-content tests: distinctive, so finding it in a log is never a coincidence.
PASSWORD = "pat-Qx7v2kZ9"


def basic(user, password):
    return {"Authorization": ["Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()]}


class LoginTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        self.image = self.fake.add_image("library/hello", "1.0", layer_sizes=[100])
        self.fake.add_image("library/other", "1.0", layer_sizes=[100])
        htpasswd = self.mktemp()
        with open(htpasswd, "wb") as f:
            f.write(b"alice:" + bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)) + b"\n")
        self.proxy = Proxy(
            self, self.fake.registry_url, auth={"htpasswd": htpasswd}, rate_limit={"trusted_proxies": ["127.0.0.1"]}
        )

    @defer.inlineCallbacks
    def test_anonymous_gets_a_challenge_pointing_at_our_token_endpoint(self):
        for path in ("/v2/", "/v2/library/hello/manifests/1.0", f"/v2/library/hello/blobs/{self.image.digest}"):
            response = yield self.proxy.get(path, headers={"X-Forwarded-Proto": ["https"], "Host": ["mirror.test"]})
            self.assertEqual(response.code, 401, path)
            self.assertEqual((yield response.json())["errors"][0]["code"], "UNAUTHORIZED")
            [challenge] = response.headers.getRawHeaders("WWW-Authenticate")
            self.assertTrue(challenge.startswith('Bearer realm="https://mirror.test/token",service="dioproxy"'))
        self.assertEqual(self.fake.requests, [], "nothing reached the upstream for a stranger")

    @defer.inlineCallbacks
    def test_docker_login_flow(self):
        response = yield self.proxy.get(
            "/token?service=dioproxy&scope=repository:library/hello:pull", headers=basic("alice", "wonderland")
        )
        self.assertEqual(response.code, 200)
        token = (yield response.json())["token"]
        bearer = {"Authorization": [f"Bearer {token}"]}
        response = yield self.proxy.get("/v2/library/hello/manifests/1.0", headers=bearer)
        self.assertEqual((yield response.content()), self.image.body)
        response = yield self.proxy.get("/v2/library/other/manifests/1.0", headers=bearer)
        self.assertEqual(response.code, 401, "a token is only good for the repositories it names")
        self.assertIn('error="insufficient_scope"', response.headers.getRawHeaders("WWW-Authenticate")[0])
        yield response.content()
        response = yield self.proxy.get("/v2/", headers={"Authorization": ["Bearer forged.token"]})
        self.assertEqual(response.code, 401)
        yield response.content()

    @defer.inlineCallbacks
    def test_basic_credentials_directly(self):
        response = yield self.proxy.get("/v2/library/hello/manifests/1.0", headers=basic("alice", "wonderland"))
        self.assertEqual((yield response.content()), self.image.body)
        for user, password in [("alice", "wrong"), ("mallory", "wonderland"), ("", "")]:
            response = yield self.proxy.get("/v2/", headers=basic(user, password))
            self.assertEqual(response.code, 401, user)
            yield response.content()
            response = yield self.proxy.get("/token?scope=repository:library/hello:pull", headers=basic(user, password))
            self.assertEqual(response.code, 401, user)
            yield response.content()

    @defer.inlineCallbacks
    def test_unknown_users_cost_a_bcrypt_check_too(self):
        """No timing leak of which users exist: an unknown user is checked against a stand-in hash."""
        calls = []
        real = auth.bcrypt.checkpw
        self.patch(auth.bcrypt, "checkpw", lambda p, h: calls.append(h) or real(p, h))
        for user in ("alice", "mallory"):
            response = yield self.proxy.get("/v2/", headers=basic(user, "nope"))
            yield response.content()
        self.assertEqual(len(calls), 2)
        self.assertEqual(calls[0][:7], calls[1][:7], "same algorithm and cost for both")


class AccessRuleTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_allow_and_deny(self):
        fake = start_upstream(self)
        image = fake.add_image("library/hello", "1.0", layer_sizes=[10])
        fake.add_image("myorg/tool", "1.0", layer_sizes=[10])
        fake.add_image("myorg/secret", "1.0", layer_sizes=[10])
        fake.add_image("evil/x", "1.0", layer_sizes=[10])
        proxy = Proxy(
            self, fake.registry_url, access={"docker.io": {"allow": ["library/*", "myorg/*"], "deny": ["myorg/secret"]}}
        )
        response = yield proxy.get("/v2/hello/manifests/1.0")
        self.assertEqual((yield response.content()), image.body)
        response = yield proxy.get("/v2/myorg/tool/manifests/1.0")
        self.assertEqual(response.code, 200)
        yield response.content()
        fake.clear_requests()
        for path in ("/v2/evil/x/manifests/1.0", "/v2/myorg/secret/manifests/1.0", f"/v2/evil/x/blobs/{image.digest}"):
            response = yield proxy.get(path)
            self.assertEqual(response.code, 403, path)
            self.assertEqual((yield response.json())["errors"][0]["code"], "DENIED")
        self.assertEqual(fake.requests, [])


class RateLimitTests(unittest.TestCase):
    def test_forwarded_for_only_from_trusted_proxies(self):
        addresses = ClientAddresses(("127.0.0.1", "10.0.0.0/8"))
        self.assertEqual(addresses.of("127.0.0.1", "203.0.113.9"), "203.0.113.9")
        self.assertEqual(addresses.of("127.0.0.1", "198.51.100.1, 10.1.2.3"), "198.51.100.1")
        self.assertEqual(addresses.of("198.51.100.7", "203.0.113.9"), "198.51.100.7", "untrusted peer")
        self.assertEqual(addresses.of("127.0.0.1", None), "127.0.0.1")

    @defer.inlineCallbacks
    def test_access_log_names_the_client_behind_a_trusted_proxy(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        fake = start_upstream(self)
        trusting = Proxy(self, fake.registry_url, rate_limit={"trusted_proxies": ["127.0.0.0/8"]})
        wary = Proxy(self, fake.registry_url)
        for proxy in (trusting, wary):
            yield (yield proxy.get("/v2/", headers={"X-Forwarded-For": ["192.0.2.7"]})).content()
        clients = [e["client"] for e in events if e.get("log_namespace") == "dioproxy.access"]
        self.assertEqual(clients, ["192.0.2.7", "127.0.0.1"])

    def test_bucket(self):
        now = [0.0]
        limiter = RateLimiter(2, 3, lambda: now[0])

        def retry_after(client):
            return self.successResultOf(defer.ensureDeferred(limiter.retry_after(client)))

        self.assertEqual([retry_after("a") for _ in range(3)], [0, 0, 0])
        self.assertAlmostEqual(retry_after("a"), 0.5)
        self.assertEqual(retry_after("b"), 0, "buckets are per client")
        now[0] += 0.5
        self.assertEqual(retry_after("a"), 0)

    @defer.inlineCallbacks
    def test_429_with_retry_after(self):
        fake = start_upstream(self)
        proxy = Proxy(self, fake.registry_url, rate_limit={"rate": 0.5, "burst": 2, "trusted_proxies": ["127.0.0.1"]})
        codes = []
        for _ in range(3):
            response = yield proxy.get("/v2/", headers={"X-Forwarded-For": ["192.0.2.1"]})
            codes.append(response.code)
            yield response.content()
        self.assertEqual(codes, [200, 200, 429])
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["2"])
        response = yield proxy.get("/v2/", headers={"X-Forwarded-For": ["192.0.2.2"]})
        self.assertEqual(response.code, 200, "another client behind the same proxy is not limited")
        yield response.content()


class PrivateContentTests(unittest.TestCase):
    def setUp(self):
        self.ghcr = start_upstream(self, users={"bot": PASSWORD}, private=["acme/private"])
        self.hub = start_upstream(self)
        self.ghcr.strict_repos = self.hub.strict_repos = True
        self.secret = self.ghcr.add_image("acme/private", "1.0", layer_sizes=[5000])
        self.ghcr.add_image("acme/public", "1.0", layer_sizes=[10])
        self.proxy = Proxy(
            self,
            self.hub.registry_url,
            upstreams={"ghcr.io": {"url": self.ghcr.registry_url, "username": "bot", "password": PASSWORD}},
        )
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @defer.inlineCallbacks
    def test_digest_knowledge_is_not_enough(self):
        layer = self.secret.layer_digests[0]
        response = yield self.proxy.get(f"/v2/ghcr.io/acme/private/blobs/{layer}")
        self.assertEqual(response.code, 200)
        yield response.content()
        for path in (
            f"/v2/ghcr.io/acme/public/blobs/{layer}",
            f"/v2/library/anything/blobs/{layer}",
            f"/v2/ghcr.io/acme/public/manifests/{self.secret.digest}",
        ):
            response = yield self.proxy.get(path)
            self.assertEqual(response.code, 404, path)
            yield response.content()
        response = yield self.proxy.get(f"/v2/ghcr.io/acme/private/manifests/{self.secret.digest}")
        self.assertEqual((yield response.content()), self.secret.body)

    @defer.inlineCallbacks
    def test_records_survive_a_restart(self):
        layer = self.secret.layer_digests[0]
        yield (yield self.proxy.get(f"/v2/ghcr.io/acme/private/blobs/{layer}")).content()
        again = Proxy(
            self,
            self.hub.registry_url,
            cache_dir=self.proxy.cache_dir,
            upstreams={"ghcr.io": {"url": self.ghcr.registry_url, "username": "bot", "password": PASSWORD}},
        )
        response = yield again.get(f"/v2/ghcr.io/acme/public/blobs/{layer}")
        self.assertEqual(response.code, 404)
        yield response.content()
        response = yield again.get(f"/v2/ghcr.io/acme/private/blobs/{layer}")
        self.assertEqual(response.code, 200)
        yield response.content()

    @defer.inlineCallbacks
    def test_credentials_never_leave(self):
        response = yield self.proxy.get("/v2/ghcr.io/acme/private/manifests/1.0")
        yield response.content()
        response = yield self.proxy.get("/token?scope=repository:ghcr.io/acme/private:pull")
        answer = yield response.json()
        forwarded = self.ghcr.find("auth")[-1]
        self.assertNotIn("authorization", forwarded.headers, "a token for a client is asked for anonymously")
        self.assertNotIn(PASSWORD, json.dumps(answer))
        for request in self.ghcr.find("registry") + self.ghcr.find("cdn") + self.hub.requests:
            self.assertNotIn("Basic", request.headers.get("authorization", ""))
        text = "\n".join(formatEvent(e) or "" for e in self.events) + repr(self.proxy.config)
        self.assertNotIn(PASSWORD, text)
        self.assertNotIn(base64.b64encode(f"bot:{PASSWORD}".encode()).decode(), text)


class NeverAnOpenProxyTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_unconfigured_hosts_are_never_contacted(self):
        configured = start_upstream(self)
        bystander = start_upstream(self, require_auth=False)
        bystander.add_image("x/y", "1", layer_sizes=[1])
        proxy = Proxy(self, configured.registry_url)
        host = bystander.registry_url.split("//")[1]
        for path, headers in [
            (f"/v2/{host}/x/y/manifests/1", None),
            (f"/v2/x/y/manifests/1?ns={host}", None),
            ("/v2/x/y/manifests/1?ns=localhost", None),
            ("/v2/x/y/manifests/1", {"Host": [host]}),
            (f"/token?scope=repository:{host}/x/y:pull", None),
        ]:
            response = yield proxy.get(path, headers=headers)
            yield response.content()
            self.assertIn(response.code, (401, 404), path)
        self.assertEqual(bystander.requests, [])


class OversizedTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        self.proxy = Proxy(self, self.fake.registry_url)

    def raw(self, data):
        def call():
            with socket.create_connection(("127.0.0.1", self.proxy.port.getHost().port), timeout=5) as s:
                s.sendall(data)
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
                return out

        return threads.deferToThread(call)

    @defer.inlineCallbacks
    def test_long_urls_and_headers(self):
        cases = [
            (b"GET /v2/" + b"a/" * 5000 + b"manifests/x HTTP/1.1\r\nHost: x\r\n\r\n", b"414"),
            (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 40000 + b"\r\n\r\n", b"431"),
            (
                b"GET /v2/ HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 200) for i in range(190)) + b"\r\n",
                b"431",
            ),
            (b"NOT HTTP\r\n\r\n", b"400"),
        ]
        for request, status in cases:
            answer = yield self.raw(request)
            head, _, body = answer.partition(b"\r\n\r\n")
            self.assertEqual(head.split(b" ")[1], status)
            self.assertIn("errors", json.loads(body))
        response = yield self.proxy.get("/v2/")
        self.assertEqual(response.code, 200, "still serving")
        yield response.content()

    @defer.inlineCallbacks
    def test_oversized_manifest_from_upstream_is_refused(self):
        self.fake.add_manifest(
            "library/huge", "1", b'{"pad":"' + b"x" * (5 << 20) + b'"}', "application/vnd.oci.image.manifest.v1+json"
        )
        response = yield self.proxy.get("/v2/library/huge/manifests/1")
        self.assertEqual(response.code, 502)
        self.assertEqual((yield response.json())["errors"][0]["code"], "MANIFEST_INVALID")


class ConfigPropertyTests(unittest.TestCase):
    @settings(max_examples=300)
    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "upstreams",
                            "hosts",
                            "cache",
                            "auth",
                            "access",
                            "rate_limit",
                            "tls",
                            "url",
                            "dir",
                            "tag_ttl",
                            "enabled",
                            "docker.io",
                            "ghcr.io",
                            "allow",
                            "deny",
                            "rate",
                            "burst",
                            "x",
                        ]
                    ),
                    children,
                    max_size=4,
                )
            ),
            max_leaves=12,
        )
    )
    def test_any_document_is_accepted_or_refused_cleanly(self, document):
        with contextlib.suppress(ConfigError):
            build_config(document)


class TLSTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_https_with_modern_protocols_only(self):
        key, cert = self.mktemp(), self.mktemp()
        yield threads.deferToThread(_self_signed, key, cert)
        fake = start_upstream(self)
        data = os.urandom(3 << 20)
        digest = fake.add_blob(data)
        options = Options()
        listen = ["--port", "0", "--interface", "127.0.0.1", "--cache-dir", self.mktemp()]
        options.parseOptions(
            [*listen, "--tls-cert", cert, "--tls-key", key, "--upstream", f"docker.io={fake.registry_url}"]
        )
        service = makeService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.services[0]._port.getHost().port
        status, _ = yield threads.deferToThread(_https_get, port, "/v2/")
        self.assertEqual(status, 200)
        for _ in ("cold", "cached"):  # the growing-file producer, then the complete-file one (no sendfile in TLS)
            status, body = yield threads.deferToThread(_https_get, port, f"/v2/library/x/blobs/{digest}")
            self.assertEqual((status, body == data), (200, True))
        old = yield threads.deferToThread(_handshake, port, "TLSv1.1")
        self.assertFalse(old, "TLS 1.1 must be refused")
        modern = yield threads.deferToThread(_handshake, port, "TLSv1.2")
        self.assertTrue(modern)


def _https_get(port, path):
    import http.client
    import ssl as stdlib_ssl

    connection = http.client.HTTPSConnection("127.0.0.1", port, context=stdlib_ssl._create_unverified_context())
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _self_signed(key_path, cert_path):
    import subprocess

    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key_path,
            "-out",
            cert_path,
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )


def _handshake(port, version):
    import ssl as stdlib_ssl

    context = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = stdlib_ssl.CERT_NONE
    context.minimum_version = context.maximum_version = getattr(stdlib_ssl.TLSVersion, version.replace(".", "_"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw):
            return True
    except (stdlib_ssl.SSLError, OSError):
        return False


class UpstreamTLSTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_an_upstream_with_an_untrusted_certificate_is_refused(self):
        """TLS to upstreams is verified: a self-signed registry is not talked to (no token, no request line)."""
        from twisted.internet import ssl
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        key, cert = self.mktemp(), self.mktemp()
        yield threads.deferToThread(_self_signed, key, cert)
        with open(cert, "rb") as c, open(key, "rb") as k:
            certificate = ssl.PrivateCertificate.loadPEM(c.read() + k.read())
        seen = []

        class Spy(Resource):
            isLeaf = True

            def render(self, request):
                seen.append(request.uri)
                return b"{}"

        port = reactor.listenSSL(0, Site(Spy()), certificate.options(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        fake = start_upstream(self)
        proxy = Proxy(self, fake.registry_url, upstreams={"quay.io": f"https://127.0.0.1:{port.getHost().port}"})
        response = yield proxy.get("/v2/quay.io/a/b/manifests/1")
        self.assertEqual(response.code, 503)
        self.assertIn("quay.io", (yield response.json())["errors"][0]["message"])
        self.assertEqual(seen, [], "a request went to a host whose certificate could not be verified")
        from service_identity.exceptions import CertificateError

        self.flushLoggedErrors(CertificateError)  # Twisted logs each refused handshake
