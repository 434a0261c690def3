"""Blobs through the proxy: one verified fill per digest, followers, resume, hold-back-and-abort, Range."""

import hashlib
import os
import socket

import treq
from twisted.internet import defer, threads
from twisted.trial import unittest
from twisted.web.client import ResponseFailed

from dioproxy.storage.cachedir import BLOB
from dioproxy.storage.partial import part_path
from tests.harness import Proxy, eventually, start_upstream

MB = 1024 * 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BlobTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        self.proxy = Proxy(self, self.fake.registry_url)
        self.data = os.urandom(3 * MB + 17)
        self.digest = self.fake.add_blob(self.data)
        self.path = f"/v2/library/hello/blobs/{self.digest}"

    def cdn_gets(self):
        return self.fake.count("cdn", "GET", self.digest)

    @defer.inlineCallbacks
    def fetch(self, headers=None):
        response = yield self.proxy.get(self.path, headers=headers)
        body = yield response.content()
        defer.returnValue((response, body))

    @defer.inlineCallbacks
    def assert_aborted(self):
        """The client must not get a complete body: the connection is cut before the end."""
        try:
            response, body = yield self.fetch()
        except ResponseFailed:
            return
        self.assertNotEqual(body, self.data, "a damaged blob was delivered whole")
        self.assertEqual(response.code // 100, 4 if response.code != 502 else 5)

    @defer.inlineCallbacks
    def test_cold_then_cached(self):
        response, body = yield self.fetch()
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.data)
        self.assertEqual(response.headers.getRawHeaders("Docker-Content-Digest"), [self.digest])
        self.assertEqual(response.length, len(self.data))
        with open(self.proxy.blob_file(self.digest), "rb") as f:
            self.assertEqual(sha(f.read()), self.digest)
        self.assertEqual(self.proxy.temp_files(), [])
        self.fake.clear_requests()
        response, body = yield self.fetch()
        self.assertEqual(body, self.data)
        self.assertEqual(self.fake.requests, [], "a cached blob touched the upstream")

    @defer.inlineCallbacks
    def test_authorization_never_reaches_the_cdn(self):
        yield self.fetch()
        cdn = self.fake.find("cdn")
        self.assertEqual(len(cdn), 1)
        self.assertNotIn("authorization", cdn[0].headers)
        registry = [r for r in self.fake.find("registry", "GET", self.digest) if r.status == 307]
        self.assertTrue(registry[0].headers["authorization"].startswith("Bearer "))

    @defer.inlineCallbacks
    def test_concurrent_cold_requests_make_one_upstream_get(self):
        data = os.urandom(16 * MB)
        digest = self.fake.add_blob(data)
        gate = self.fake.gate_blob(digest)
        requests = [self.proxy.get(f"/v2/library/hello/blobs/{digest}") for _ in range(16)]
        yield self.fake.wait_for_requests(1, "cdn", "GET", digest)
        pins = self.proxy.mirror.cache.pins
        yield eventually(lambda: len(pins.get((BLOB, digest), ())) == 16)  # all 16 in, the upstream held
        gate.callback(None)
        responses = yield defer.gatherResults(requests)
        bodies = yield defer.gatherResults([r.content() for r in responses])
        self.assertEqual([sha(b) for b in bodies], [digest] * 16)
        self.assertEqual(self.fake.count("cdn", "GET", digest), 1)
        self.assertEqual(len([r for r in self.fake.find("registry", "GET", digest) if r.status == 307]), 1)

    @defer.inlineCallbacks
    def test_damaged_blob_is_never_delivered_whole_nor_cached(self):
        self.fake.corrupt_blob(self.digest)
        yield self.assert_aborted()
        self.assertFalse(os.path.exists(self.proxy.blob_file(self.digest)))
        self.assertEqual(self.proxy.temp_files(), [])
        self.fake.reset_faults()
        _response, body = yield self.fetch()
        self.assertEqual(body, self.data, "the next request after the upstream heals succeeds")

    @defer.inlineCallbacks
    def test_damaged_blob_aborts_every_follower(self):
        self.fake.corrupt_blob(self.digest)
        gate = self.fake.gate_blob(self.digest)
        attempts = [self.assert_aborted() for _ in range(4)]
        yield self.fake.wait_for_requests(1, "cdn", "GET", self.digest)
        gate.callback(None)
        yield defer.gatherResults(attempts)
        self.assertEqual(self.cdn_gets(), 1)

    @defer.inlineCallbacks
    def test_bytes_past_content_length_are_not_part_of_the_blob(self):
        """HTTP framing ends the body at Content-Length; what follows is dropped, the digest still verified."""
        self.fake.extra_bytes(self.digest)
        _response, body = yield self.fetch()
        self.assertEqual(body, self.data)
        with open(self.proxy.blob_file(self.digest), "rb") as f:
            self.assertEqual(sha(f.read()), self.digest)

    @defer.inlineCallbacks
    def test_cut_body_is_resumed_with_range(self):
        self.fake.cut_blob(self.digest, after_bytes=MB + 5)
        _response, body = yield self.fetch()
        self.assertEqual(body, self.data)
        gets = self.fake.find("cdn", "GET", self.digest)
        self.assertEqual(len(gets), 2)
        self.assertTrue(gets[1].headers["range"].startswith("bytes="), gets[1].headers)
        self.assertTrue(os.path.exists(self.proxy.blob_file(self.digest)))

    @defer.inlineCallbacks
    def test_short_body_is_resumed(self):
        self.fake.short_bytes(self.digest, missing=1000, times=1)
        _response, body = yield self.fetch()
        self.assertEqual(body, self.data)

    @defer.inlineCallbacks
    def test_cut_body_without_range_support_restarts(self):
        self.fake.no_range = True
        self.fake.cut_blob(self.digest, after_bytes=MB)
        _response, body = yield self.fetch()
        self.assertEqual(body, self.data)
        self.assertEqual(self.cdn_gets(), 2)

    @defer.inlineCallbacks
    def test_cut_every_time_fails_cleanly(self):
        self.fake.cut_blob(self.digest, after_bytes=100_000, times=None)
        yield self.assert_aborted()
        self.assertFalse(os.path.exists(self.proxy.blob_file(self.digest)))
        self.assertEqual(self.proxy.temp_files(), [])

    @defer.inlineCallbacks
    def test_stalled_upstream_is_dropped_and_resumed(self):
        self.proxy.mirror.clients["docker.io"].timeout = 0.3
        self.fake.stall_blob(self.digest, after_bytes=MB, times=1)
        _response, body = yield self.fetch()
        self.assertEqual(body, self.data)
        self.assertEqual(self.cdn_gets(), 2)

    @defer.inlineCallbacks
    def test_unknown_blob_is_404(self):
        response = yield self.proxy.get("/v2/library/hello/blobs/sha256:" + "0" * 64)
        self.assertEqual(response.code, 404)
        self.assertEqual((yield response.json())["errors"][0]["code"], "BLOB_UNKNOWN")
        self.assertEqual(self.proxy.temp_files(), [])

    @defer.inlineCallbacks
    def test_range_cached_and_cold(self):
        response, body = yield self.fetch({"Range": ["bytes=100-199"]})
        self.assertEqual((response.code, body), (206, self.data[100:200]))
        self.assertEqual(response.headers.getRawHeaders("Content-Range"), [f"bytes 100-199/{len(self.data)}"])
        yield eventually(lambda: os.path.exists(self.proxy.blob_file(self.digest)))  # the fill went on
        response, body = yield self.fetch({"Range": ["bytes=-10"]})
        self.assertEqual((response.code, body), (206, self.data[-10:]))
        response, body = yield self.fetch({"Range": [f"bytes={len(self.data)}-"]})
        self.assertEqual(response.code, 416)

    @defer.inlineCallbacks
    def test_head(self):
        status, headers = yield self.proxy.head(self.path)
        self.assertEqual((status, headers["content-length"]), (200, str(len(self.data))))
        self.assertEqual(headers["docker-content-digest"], self.digest)
        self.assertFalse(os.path.exists(self.proxy.blob_file(self.digest)), "HEAD does not download")
        yield self.fetch()
        self.fake.clear_requests()
        status, headers = yield self.proxy.head(self.path)
        self.assertEqual((status, headers["content-length"]), (200, str(len(self.data))))
        self.assertEqual(self.fake.requests, [])

    @defer.inlineCallbacks
    def test_slow_client_does_not_slow_the_fill(self):
        data = os.urandom(24 * MB)
        digest = self.fake.add_blob(data)
        host, port = "127.0.0.1", self.proxy.port.getHost().port
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.addCleanup(sock.close)
        sock.sendall(f"GET /v2/library/hello/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        # the reader reads nothing while the fill runs
        yield eventually(lambda: os.path.exists(self.proxy.blob_file(digest)), why="the fill waited for the client")
        self.assertTrue(os.path.exists(self.proxy.blob_file(digest)), "the fill waited for the slow client")
        received = yield threads.deferToThread(_read_all, sock, len(data))
        self.assertEqual(sha(received.split(b"\r\n\r\n", 1)[1]), digest)

    @defer.inlineCallbacks
    def test_cached_blob_goes_by_sendfile_at_a_slow_readers_pace(self):
        data = os.urandom(24 * MB)
        digest = self.fake.add_blob(data)
        yield (yield self.proxy.get(f"/v2/library/hello/blobs/{digest}")).content()
        calls = []
        real = os.sendfile
        self.patch(os, "sendfile", lambda *a: calls.append(a[3]) or real(*a))
        sock = socket.create_connection(("127.0.0.1", self.proxy.port.getHost().port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.addCleanup(sock.close)
        sock.sendall(f"GET /v2/library/hello/blobs/{digest} HTTP/1.1\r\nHost: x\r\nRange: bytes=1-\r\n\r\n".encode())
        received = yield threads.deferToThread(_read_slowly, sock, len(data) - 1)
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertIn(b"206", head.split(b"\r\n")[0])
        self.assertEqual(body, data[1:])
        self.assertGreater(len(calls), 3, "sendfile was used, and paused for the slow reader")

    @defer.inlineCallbacks
    def test_client_gone_fill_goes_on(self):
        gate = self.fake.gate_blob(self.digest)
        d = self.proxy.get(self.path)
        d.addErrback(lambda _: None)
        yield self.fake.wait_for_requests(1, "cdn", "GET", self.digest)
        d.cancel()
        gate.callback(None)
        yield eventually(lambda: os.path.exists(self.proxy.blob_file(self.digest)), why="the fill stopped")
        self.assertTrue(os.path.exists(self.proxy.blob_file(self.digest)))


def _read_slowly(sock: socket.socket, size: int) -> bytes:
    """Reads in small bites with pauses, so the server's socket buffer fills and it must wait for us."""
    import time

    sock.settimeout(20)
    chunks, total = [], 0
    while total < size + 100:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if len(chunks) % 50 == 0:
            time.sleep(0.01)  # in a thread, not on the reactor
        if total >= size and b"\r\n\r\n" in b"".join(chunks[:2]):
            head_len = b"".join(chunks[:2]).index(b"\r\n\r\n") + 4
            if total - head_len >= size:
                break
    return b"".join(chunks)


def _read_all(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(20)
    chunks, total = [], 0
    while total < size:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


class RestartTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_crash_leftovers_are_cleaned_and_never_served(self):
        fake = start_upstream(self)
        data = os.urandom(MB)
        digest = fake.add_blob(data)
        cache = os.path.abspath(self.mktemp())
        first = Proxy(self, fake.registry_url, cache_dir=cache)
        with open(os.path.join(first.mirror.storage.tmp, "leftover"), "wb") as f:  # a crashed small write
            f.write(data[:1000])
        with open(part_path(first.mirror.storage.tmp, digest), "wb") as f:  # a fill that was killed half-way
            f.write(data[:1000])
        yield first.stop()
        second = Proxy(self, fake.registry_url, cache_dir=cache)
        self.assertEqual(second.temp_files(), [])
        response = yield second.get(f"/v2/library/x/blobs/{digest}")
        self.assertEqual(sha((yield response.content())), digest)


class PassThroughTests(unittest.TestCase):
    """``cache: {enabled: false}``: the upstream body producer piped into the request, nothing on disk."""

    def setUp(self):
        self.fake = start_upstream(self)
        self.proxy = Proxy(self, self.fake.registry_url, cache={"enabled": False})
        self.data = os.urandom(2 * MB)
        self.digest = self.fake.add_blob(self.data)
        self.image = self.fake.add_image("library/hello", "1.0", layer_sizes=[10])

    @defer.inlineCallbacks
    def test_blob_and_manifest_pass_through(self):
        for _ in range(2):
            response = yield self.proxy.get(f"/v2/library/hello/blobs/{self.digest}")
            self.assertEqual((yield response.content()), self.data)
            response = yield self.proxy.get("/v2/library/hello/manifests/1.0")
            self.assertEqual((yield response.content()), self.image.body)
        self.assertEqual(self.fake.count("cdn", "GET", self.digest), 2)
        self.assertFalse(os.path.exists(self.proxy.cache_dir))

    @defer.inlineCallbacks
    def test_range_passes_through(self):
        response = yield self.proxy.get(f"/v2/library/hello/blobs/{self.digest}", headers={"Range": ["bytes=10-19"]})
        self.assertEqual((response.code, (yield response.content())), (206, self.data[10:20]))

    @defer.inlineCallbacks
    def test_damaged_blob_is_cut(self):
        """Not just different bytes: the client sees an aborted body without its last chunk (held back)."""
        self.fake.corrupt_blob(self.digest)
        response = yield self.proxy.get(f"/v2/library/hello/blobs/{self.digest}")
        self.assertEqual((response.code, response.length), (200, len(self.data)))
        received = []
        yield self.assertFailure(treq.collect(response, received.append), ResponseFailed)
        self.assertLess(len(b"".join(received)), len(self.data))


class AccelRedirectTests(unittest.TestCase):
    """``cache.accel_redirect``: cached blobs are handed to nginx, but only when nginx asks for it."""

    @defer.inlineCallbacks
    def test_only_for_requests_nginx_marked(self):
        fake = start_upstream(self)
        data = os.urandom(MB)
        digest = fake.add_blob(data)
        proxy = Proxy(self, fake.registry_url, cache={"accel_redirect": "/_dioproxy/blobs/"})
        path = f"/v2/library/x/blobs/{digest}"
        marked = {"X-Dioproxy-Accel": ["on"]}
        response = yield proxy.get(path, headers=marked)
        self.assertEqual((yield response.content()), data, "a miss streams from the proxy as usual")
        response = yield proxy.get(path, headers=marked)
        self.assertEqual((yield response.content()), b"")
        self.assertEqual(
            response.headers.getRawHeaders("X-Accel-Redirect"), [f"/_dioproxy/blobs/{digest[7:9]}/{digest[7:]}"]
        )
        self.assertEqual(response.headers.getRawHeaders("Docker-Content-Digest"), [digest])
        response = yield proxy.get(path)
        self.assertEqual((yield response.content()), data, "a client that reached us directly gets the bytes")
        self.assertIsNone(response.headers.getRawHeaders("X-Accel-Redirect"))
