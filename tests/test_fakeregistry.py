"""The fake upstream must itself be right, or every proxy test built on it proves nothing.

These tests talk to the fake over real loopback sockets with treq (and a raw TCP client where treq would
hide a broken body), like the proxy will.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any
from urllib.parse import urlencode, urlsplit

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed

from tests.fakeregistry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    FakeRegistry,
    sha256_digest,
    start_fake_registry,
)
from tests.harness import eventually

ALL_MANIFEST_TYPES = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])


class _RawBody(Protocol):
    """Collects everything the server sends until it closes: treq would refuse to show a wrong body."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(self.data)


class FakeRegistryTestCase(TestCase):
    timeout = 10
    fake_options: dict[str, Any] = {}

    def setUp(self) -> None:
        self.fake = start_fake_registry(**self.fake_options)
        self.addCleanup(self.fake.stop)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    async def request(
        self, method: str, url: str, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> tuple[Any, bytes]:
        response = await self.http.request(method, url, headers=headers or {}, allow_redirects=False, **kwargs)
        return response, await response.content()

    def header(self, response: Any, name: str) -> str | None:
        values = response.headers.getRawHeaders(name)
        return values[0] if values else None

    async def token(self, repo: str, user: str | None = None, password: str | None = None) -> str:
        query = urlencode({"service": "fake.registry", "scope": f"repository:{repo}:pull"})
        auth = (user, password) if user else None
        response, body = await self.request("GET", f"{self.fake.auth_url}/token?{query}", auth=auth)
        self.assertEqual(response.code, 200, body)
        return json.loads(body)["token"]

    async def raw_get(self, url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """A GET over a bare socket with ``Connection: close``: returns exactly the bytes that came back."""
        parts = urlsplit(url)
        protocol = _RawBody()
        await connectProtocol(TCP4ClientEndpoint(reactor, parts.hostname, parts.port), protocol)
        lines = [f"GET {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        protocol.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = await protocol.closed
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parsed = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        return int(status_line.split()[1]), parsed, body


class AuthTests(FakeRegistryTestCase):
    fake_options = {"users": {"alice": "secret"}, "private": ["secret/app"]}

    async def test_ping_challenge_has_no_scope(self) -> None:
        response, body = await self.request("GET", f"{self.fake.registry_url}/v2/")
        self.assertEqual(response.code, 401)
        expected = f'Bearer realm="{self.fake.auth_url}/token",service="fake.registry"'
        self.assertEqual(self.header(response, "WWW-Authenticate"), expected)
        self.assertEqual(self.header(response, "Docker-Distribution-API-Version"), "registry/2.0")
        self.assertEqual(json.loads(body)["errors"][0]["code"], "UNAUTHORIZED")

    async def test_token_flow(self) -> None:
        image = self.fake.add_image("library/alpine", "3.19")
        url = f"{self.fake.registry_url}/v2/library/alpine/manifests/3.19"
        response, _ = await self.request("GET", url)
        self.assertEqual(response.code, 401)
        challenge = self.header(response, "WWW-Authenticate")
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        self.assertEqual(params["scope"], "repository:library/alpine:pull")

        query = urlencode({"service": params["service"], "scope": params["scope"]})
        response, body = await self.request("GET", f"{params['realm']}?{query}")
        answer = json.loads(body)
        self.assertEqual(answer["token"], answer["access_token"])
        self.assertEqual(answer["expires_in"], 300)
        self.assertTrue(answer["issued_at"].endswith("Z"))

        bearer = {"Authorization": f"Bearer {answer['token']}"}
        response, body = await self.request("GET", url, bearer)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, image.body)
        self.assertEqual(self.header(response, "Content-Type"), DOCKER_MANIFEST)
        self.assertEqual(self.header(response, "Docker-Content-Digest"), sha256_digest(body))
        self.assertEqual(self.header(response, "ETag"), f'"{image.digest}"')
        self.assertEqual(response.length, len(body))  # Twisted's client moves Content-Length here
        response, body = await self.request("GET", f"{self.fake.registry_url}/v2/", bearer)
        self.assertEqual((response.code, body), (200, b"{}"))

    async def test_token_is_scoped_to_its_repository(self) -> None:
        self.fake.add_image("library/alpine", "latest")
        self.fake.add_image("library/busybox", "latest")
        token = await self.token("library/alpine")
        url = f"{self.fake.registry_url}/v2/library/busybox/manifests/latest"
        response, _ = await self.request("GET", url, {"Authorization": f"Bearer {token}"})
        self.assertEqual(response.code, 401)
        self.assertIn('scope="repository:library/busybox:pull"', self.header(response, "WWW-Authenticate"))

    async def test_private_repository_needs_credentials(self) -> None:
        self.fake.add_image("secret/app", "v1")
        url = f"{self.fake.registry_url}/v2/secret/app/manifests/v1"
        anonymous = await self.token("secret/app")
        response, _ = await self.request("GET", url, {"Authorization": f"Bearer {anonymous}"})
        self.assertEqual(response.code, 401)

        query = urlencode({"service": "fake.registry", "scope": "repository:secret/app:pull"})
        response, _ = await self.request("GET", f"{self.fake.auth_url}/token?{query}", auth=("alice", "wrong"))
        self.assertEqual(response.code, 401)

        token = await self.token("secret/app", "alice", "secret")
        response, _ = await self.request("GET", url, {"Authorization": f"Bearer {token}"})
        self.assertEqual(response.code, 200)
        self.assertTrue(self.fake.find(role="auth")[-1].headers["authorization"].startswith("Basic "))

    async def test_expired_tokens_are_refused(self) -> None:
        self.fake.add_image("library/alpine", "latest")
        token = await self.token("library/alpine")
        self.fake.expire_tokens()
        url = f"{self.fake.registry_url}/v2/library/alpine/manifests/latest"
        response, _ = await self.request("HEAD", url, {"Authorization": f"Bearer {token}"})
        self.assertEqual(response.code, 401)


class BasicAndOpenModeTests(FakeRegistryTestCase):
    fake_options = {"auth_mode": "basic", "users": {"alice": "secret"}}

    async def test_basic_mode(self) -> None:
        self.fake.add_image("team/app", "latest")
        url = f"{self.fake.registry_url}/v2/team/app/manifests/latest"
        response, _ = await self.request("GET", url)
        self.assertEqual((response.code, self.header(response, "WWW-Authenticate")), (401, 'Basic realm="fake"'))
        basic = "Basic " + base64.b64encode(b"alice:secret").decode()
        response, _ = await self.request("GET", url, {"Authorization": basic})
        self.assertEqual(response.code, 200)

    async def test_open_mode(self) -> None:
        self.fake.auth_mode = None
        self.fake.add_image("team/app", "latest")
        response, _ = await self.request("GET", f"{self.fake.registry_url}/v2/team/app/manifests/latest")
        self.assertEqual(response.code, 200)


class OpenRegistryTestCase(FakeRegistryTestCase):
    fake_options = {"auth_mode": None}

    async def manifest(self, repo: str, ref: str, method: str = "GET", **headers: str) -> tuple[Any, bytes]:
        return await self.request(method, f"{self.fake.registry_url}/v2/{repo}/manifests/{ref}", headers)

    async def follow_blob(self, repo: str, digest: str, headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
        response, _ = await self.request("GET", f"{self.fake.registry_url}/v2/{repo}/blobs/{digest}")
        self.assertEqual(response.code, 307)
        return await self.request("GET", self.header(response, "Location"), headers)


class EndpointTests(OpenRegistryTestCase):
    async def test_blob_redirects_to_the_cdn(self) -> None:
        image = self.fake.add_image("library/alpine", "latest", layer_sizes=[300_000])
        digest = image.layer_digests[0]
        response, _ = await self.request("HEAD", f"{self.fake.registry_url}/v2/library/alpine/blobs/{digest}")
        self.assertEqual(response.code, 307)
        location = self.header(response, "Location")
        self.assertTrue(location.startswith(f"{self.fake.cdn_url}/cdn/"))
        self.assertTrue(location.endswith(digest))

        response, body = await self.request("GET", location)
        self.assertEqual(response.code, 200)
        self.assertEqual(sha256_digest(body), digest)
        self.assertEqual(response.length, 300_000)
        self.assertEqual(self.fake.count(role="cdn", method="GET"), 1)
        self.assertNotIn("authorization", self.fake.find(role="cdn")[0].headers)

    async def test_cdn_refuses_authorization_and_bad_signatures(self) -> None:
        digest = self.fake.add_blob(b"hello")
        url = self.fake.cdn_blob_url(digest)
        response, _ = await self.request("GET", url, {"Authorization": "Bearer leaked"})
        self.assertEqual(response.code, 400)
        response, _ = await self.request("GET", url.replace("/cdn/", "/cdn/x"))
        self.assertEqual(response.code, 403)
        self.fake.expire_tokens()
        response, _ = await self.request("GET", url)
        self.assertEqual(response.code, 403)

    async def test_blob_served_directly_without_redirect(self) -> None:
        self.fake.blob_redirect = False
        digest = self.fake.add_blob(b"direct bytes")
        response, body = await self.request("GET", f"{self.fake.registry_url}/v2/a/b/c/blobs/{digest}")
        self.assertEqual((response.code, body), (200, b"direct bytes"))
        self.assertEqual(self.header(response, "Docker-Content-Digest"), digest)

    async def test_range_requests(self) -> None:
        data = bytes(range(256)) * 4
        digest = self.fake.add_blob(data)
        url = self.fake.cdn_blob_url(digest)
        for header, expected, content_range in [
            ("bytes=10-19", data[10:20], "bytes 10-19/1024"),
            ("bytes=1000-", data[1000:], "bytes 1000-1023/1024"),
            ("bytes=-5", data[-5:], "bytes 1019-1023/1024"),
            ("bytes=1000-5000", data[1000:], "bytes 1000-1023/1024"),
        ]:
            response, body = await self.request("GET", url, {"Range": header})
            self.assertEqual((response.code, body), (206, expected), header)
            self.assertEqual(self.header(response, "Content-Range"), content_range)
        response, _ = await self.request("GET", url, {"Range": "bytes=1024-"})
        self.assertEqual((response.code, self.header(response, "Content-Range")), (416, "bytes */1024"))

        self.fake.no_range = True
        response, body = await self.request("GET", url, {"Range": "bytes=10-19"})
        self.assertEqual((response.code, body), (200, data))

    async def test_ratelimit_counts_gets_only(self) -> None:
        self.fake.add_image("library/alpine", "latest")
        response, _ = await self.manifest("library/alpine", "latest")
        self.assertEqual(self.header(response, "ratelimit-limit"), "100;w=21600")
        self.assertEqual(self.header(response, "ratelimit-remaining"), "99;w=21600")
        response, _ = await self.manifest("library/alpine", "latest", "HEAD")
        self.assertEqual(self.header(response, "ratelimit-remaining"), "99;w=21600")
        response, _ = await self.manifest("library/alpine", "latest")
        self.assertEqual(self.header(response, "ratelimit-remaining"), "98;w=21600")

        self.fake.ratelimit_remaining = 0
        response, body = await self.manifest("library/alpine", "latest")
        self.assertEqual(response.code, 429)
        self.assertEqual(json.loads(body)["errors"][0]["code"], "TOOMANYREQUESTS")
        self.assertIsNotNone(self.header(response, "Retry-After"))
        response, _ = await self.manifest("library/alpine", "latest", "HEAD")
        self.assertEqual(response.code, 200)

    async def test_unknown_things_are_404_with_registry_codes(self) -> None:
        self.fake.add_image("library/alpine", "latest")
        response, body = await self.manifest("library/alpine", "nope")
        self.assertEqual((response.code, json.loads(body)["errors"][0]["code"]), (404, "MANIFEST_UNKNOWN"))
        missing = sha256_digest(b"missing")
        response, body = await self.request("GET", f"{self.fake.registry_url}/v2/library/alpine/blobs/{missing}")
        self.assertEqual((response.code, json.loads(body)["errors"][0]["code"]), (404, "BLOB_UNKNOWN"))
        response, body = await self.request("GET", f"{self.fake.registry_url}/v2/no/such/tags/list")
        self.assertEqual((response.code, json.loads(body)["errors"][0]["code"]), (404, "NAME_UNKNOWN"))

    async def test_tags_pagination_on_a_nested_name(self) -> None:
        for tag in ["t1", "t2", "t3", "t4", "t5"]:
            self.fake.add_image("a/b/c", tag)
        path, pages = "/v2/a/b/c/tags/list?n=2", []
        while path:
            response, body = await self.request("GET", self.fake.registry_url + path)
            self.assertEqual(json.loads(body)["name"], "a/b/c")
            pages.append(json.loads(body)["tags"])
            link = self.header(response, "Link")
            path = re.match(r'<([^>]+)>; rel="next"', link).group(1) if link else None
        self.assertEqual(pages, [["t1", "t2"], ["t3", "t4"], ["t5"]])

    async def test_multi_platform_index(self) -> None:
        image = self.fake.add_image(
            "library/alpine", "latest", layer_sizes=[100], platforms=["linux/amd64", "linux/arm64/v8"]
        )
        response, body = await self.manifest("library/alpine", "latest", Accept=ALL_MANIFEST_TYPES)
        self.assertEqual(self.header(response, "Content-Type"), OCI_INDEX)
        index = json.loads(body)
        self.assertEqual(image.index_digest, sha256_digest(body))
        self.assertEqual([m["digest"] for m in index["manifests"]], [m.digest for m in image.manifests])
        self.assertEqual(index["manifests"][1]["platform"], {"architecture": "arm64", "os": "linux", "variant": "v8"})

        arm = image.platform("linux/arm64/v8")
        response, body = await self.manifest("library/alpine", arm.digest, Accept=ALL_MANIFEST_TYPES)
        self.assertEqual((self.header(response, "Content-Type"), body), (OCI_MANIFEST, arm.body))
        self.assertEqual(json.loads(body)["layers"][0]["digest"], arm.layer_digests[0])
        response, config = await self.follow_blob("library/alpine", arm.config_digest)
        self.assertEqual(json.loads(config)["architecture"], "arm64")
        self.assertEqual(len(image.layer_digests), 2)

        # Like distribution: an OCI index is not served to a client that does not accept it.
        response, _ = await self.manifest("library/alpine", "latest", Accept=DOCKER_MANIFEST)
        self.assertEqual(response.code, 404)

    async def test_if_none_match(self) -> None:
        image = self.fake.add_image("library/alpine", "latest")
        response, body = await self.manifest("library/alpine", "latest", **{"If-None-Match": f'"{image.digest}"'})
        self.assertEqual((response.code, body), (304, b""))
        self.assertEqual(self.header(response, "Docker-Content-Digest"), image.digest)

    async def test_referrers(self) -> None:
        image = self.fake.add_image("library/alpine", "latest")
        response, _ = await self.request("GET", f"{self.fake.registry_url}/v2/library/alpine/referrers/{image.digest}")
        self.assertEqual(response.code, 404)

        signature = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": "application/vnd.example.sig",
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_digest(b"{}"), "size": 2},
                "layers": [],
                "subject": {"mediaType": DOCKER_MANIFEST, "digest": image.digest, "size": len(image.body)},
            }
        ).encode()
        sig_digest = self.fake.add_manifest("library/alpine", None, signature, OCI_MANIFEST)
        self.fake.referrers_api = True
        response, body = await self.request(
            "GET", f"{self.fake.registry_url}/v2/library/alpine/referrers/{image.digest}"
        )
        self.assertEqual(self.header(response, "Content-Type"), OCI_INDEX)
        entries = json.loads(body)["manifests"]
        self.assertEqual(
            [(e["digest"], e["artifactType"]) for e in entries], [(sig_digest, "application/vnd.example.sig")]
        )

    async def test_request_log(self) -> None:
        self.fake.add_image("library/alpine", "latest")
        await self.request(
            "HEAD", f"{self.fake.registry_url}/v2/library/alpine/manifests/latest?ns=docker.io", {"X-Probe": "1"}
        )
        record = self.fake.requests[-1]
        self.assertEqual(
            (record.role, record.method, record.path), ("registry", "HEAD", "/v2/library/alpine/manifests/latest")
        )
        self.assertEqual(record.query, {"ns": "docker.io"})
        self.assertEqual(record.headers["x-probe"], "1")
        self.assertEqual((record.status, record.finished), (200, True))
        self.assertEqual(self.fake.count(role="registry", method="HEAD", path_contains="/manifests/"), 1)
        self.assertEqual(self.fake.count(role="cdn"), 0)


class FaultTests(OpenRegistryTestCase):
    async def test_fail_next(self) -> None:
        self.fake.add_image("library/alpine", "latest")
        self.fake.fail_next(2, status=503, path_contains="/manifests/")
        codes = [(await self.manifest("library/alpine", "latest"))[0].code for _ in range(3)]
        self.assertEqual(codes, [503, 503, 200])

        self.fake.fail_next(1, status=429)
        response, body = await self.manifest("library/alpine", "latest")
        self.assertEqual((response.code, self.header(response, "Retry-After")), (429, "1"))
        self.assertEqual(json.loads(body)["errors"][0]["code"], "TOOMANYREQUESTS")

        self.fake.fail_next(1, status=500, role="cdn", retry_after=7)
        digest = self.fake.add_blob(b"x")
        response, _ = await self.request("GET", self.fake.cdn_blob_url(digest))
        self.assertEqual((response.code, self.header(response, "Retry-After")), (500, "7"))

    async def test_token_fail(self) -> None:
        self.fake.token_fail = 503
        response, _ = await self.request("GET", f"{self.fake.auth_url}/token?scope=repository:x:pull")
        self.assertEqual(response.code, 503)
        self.fake.reset_faults()
        response, _ = await self.request("GET", f"{self.fake.auth_url}/token?scope=repository:x:pull")
        self.assertEqual(response.code, 200)

    async def test_corrupt_blob(self) -> None:
        data = b"0123456789" * 1000
        digest = self.fake.add_blob(data)
        self.fake.corrupt_blob(digest)
        response, body = await self.request("GET", self.fake.cdn_blob_url(digest))
        self.assertEqual((response.code, len(body)), (200, len(data)))
        self.assertNotEqual(sha256_digest(body), digest)
        self.assertEqual(body[:-1], data[:-1])

    async def test_cut_blob_then_resume(self) -> None:
        data = bytes(range(256)) * 4096  # 1 MiB
        digest = self.fake.add_blob(data)
        self.fake.cut_blob(digest, after_bytes=300_000)
        url = self.fake.cdn_blob_url(digest)
        response = await self.http.get(url)
        self.assertEqual(response.length, len(data))
        received: list[bytes] = []
        await self.assertFailure(treq.collect(response, received.append), ResponseFailed)
        got = b"".join(received)
        self.assertEqual(got, data[: len(got)])
        self.assertEqual(len(got), 300_000)

        response, rest = await self.request("GET", url, {"Range": f"bytes={len(got)}-"})
        self.assertEqual(response.code, 206)
        self.assertEqual(got + rest, data)

    async def test_short_and_extra_bytes(self) -> None:
        data = b"a" * 1000
        digest = self.fake.add_blob(data)
        self.fake.short_bytes(digest, missing=10)
        status, headers, body = await self.raw_get(self.fake.cdn_blob_url(digest))
        self.assertEqual((status, headers["content-length"], len(body)), (200, "1000", 990))

        self.fake.reset_faults()
        self.fake.extra_bytes(digest, extra=16)
        status, headers, body = await self.raw_get(self.fake.cdn_blob_url(digest))
        self.assertEqual((status, headers["content-length"], len(body)), (200, "1000", 1016))

    async def test_stall_blob_keeps_the_connection_open(self) -> None:
        data = b"s" * 200_000
        digest = self.fake.add_blob(data)
        self.fake.stall_blob(digest, after_bytes=70_000)
        response = await self.http.get(self.fake.cdn_blob_url(digest))
        received: list[bytes] = []
        collecting = treq.collect(response, received.append)
        await eventually(lambda: len(b"".join(received)) >= 70_000)
        self.assertEqual(len(b"".join(received)), 70_000)
        self.assertFalse(collecting.called)
        self.assertFalse(self.fake.find(role="cdn")[-1].finished)
        await self.fake.stop()  # aborts the stalled connection
        await self.assertFailure(collecting, ResponseFailed)

    async def test_stall_at_zero_still_sends_the_status_line(self) -> None:
        digest = self.fake.add_blob(b"z" * 1000)
        self.fake.stall_blob(digest, after_bytes=0)
        response = await self.http.get(self.fake.cdn_blob_url(digest))
        self.assertEqual(response.code, 200)
        collecting = treq.collect(response, lambda _: None)
        await self.fake.stop()
        await self.assertFailure(collecting, ResponseFailed)

    async def test_slow_paces_the_body(self) -> None:
        data = b"w" * 100_000
        digest = self.fake.add_blob(data)
        self.fake.slow(250_000)
        started = reactor.seconds()
        _, body = await self.request("GET", self.fake.cdn_blob_url(digest))
        elapsed = reactor.seconds() - started
        self.assertEqual(body, data)
        self.assertTrue(0.3 <= elapsed < 2.0, elapsed)

    async def test_latency_delays_registry_answers(self) -> None:
        self.fake.latency = 0.2
        started = reactor.seconds()
        response, _ = await self.request("GET", f"{self.fake.registry_url}/v2/")
        self.assertEqual(response.code, 200)
        self.assertGreaterEqual(reactor.seconds() - started, 0.2)

    async def test_redirect_to(self) -> None:
        digest = self.fake.add_blob(b"x")
        self.fake.redirect_to = "ftp://127.0.0.1/elsewhere"
        response, _ = await self.request("GET", f"{self.fake.registry_url}/v2/library/alpine/blobs/{digest}")
        self.assertEqual((response.code, self.header(response, "Location")), (307, "ftp://127.0.0.1/elsewhere"))

    async def test_gate_holds_concurrent_requests(self) -> None:
        data = b"g" * 500_000
        digest = self.fake.add_blob(data)
        gate = self.fake.gate_blob(digest)
        url = self.fake.cdn_blob_url(digest)
        pending = [defer.ensureDeferred(self.request("GET", url)) for _ in range(16)]
        await self.fake.wait_for_requests(16, role="cdn")
        self.assertEqual(self.fake.held(digest), 16)
        self.assertFalse(any(d.called for d in pending))
        self.assertEqual({r.status for r in self.fake.find(role="cdn")}, {None})

        gate.callback(None)
        results = await defer.gatherResults(pending)
        self.assertEqual({(r.code, hashlib.sha256(b).hexdigest()) for r, b in results}, {(200, digest[7:])})
        self.assertEqual(self.fake.held(digest), 0)

    async def test_big_blob_streams(self) -> None:
        data = bytes(range(256)) * (16 * 4096)  # 16 MiB
        digest = self.fake.add_blob(data)
        _, body = await self.request("GET", self.fake.cdn_blob_url(digest))
        self.assertEqual(sha256_digest(body), digest)

    def test_stop_twice(self) -> defer.Deferred:
        fake = FakeRegistry().start()
        return defer.gatherResults([fake.stop(), fake.stop()])
