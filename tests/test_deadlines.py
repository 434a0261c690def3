"""Every wait has a deadline: upstream bodies, and the fill's fsync in a pool of its own."""

import os
import socket
import threading

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from tests.harness import Proxy, start_upstream
from tests.test_ops_reload import eventually

MB = 1024 * 1024


def raw_get(port: int, path: str = "/v2/", timeout: float = 10.0) -> defer.Deferred:
    """(status line, headers, body) of one GET on a fresh connection, read in a thread (never on the reactor)."""

    def call() -> tuple[str, dict[str, str], bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except ConnectionResetError:  # a cut body: what came before it is the answer
                pass
        head, _, body = data.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        return status, headers, body

    return threads.deferToThread(call)


def silent_clients(port: int, path: str, n: int) -> list[socket.socket]:
    """``n`` connections that send one GET and then never read (a tiny receive buffer fills at once)."""
    clients = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))  # loopback: the kernel completes it without the reactor
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        clients.append(s)
    return clients


class UpstreamBodyTests(unittest.TestCase):
    """``timeouts.read`` is the longest an upstream body may stay silent, whoever reads it."""

    timeout = 60

    def setUp(self):
        self.fake = start_upstream(self)
        self.image = self.fake.add_image("library/hello", "1.0", layer_sizes=[100])
        self.proxy = Proxy(self, self.fake.registry_url, timeouts={"read": 1})

    @defer.inlineCallbacks
    def assert_unavailable(self, path, bound=15.0):
        began = reactor.seconds()
        response = yield self.proxy.get(path)
        self.assertEqual(response.code, 503)
        self.assertEqual((yield response.json())["errors"][0]["code"], "UNAVAILABLE")
        self.assertLess(reactor.seconds() - began, bound)

    def answered(self):
        return [r for r in self.fake.requests if r.method == "GET" and "/manifests/1.0" in r.path and r.status == 200]

    @defer.inlineCallbacks
    def test_stalled_manifest_fails_every_client_of_the_exchange(self):
        """Headers and 10 bytes, then silence: the first client and one that joined the same single-flight
        exchange later both get an answer, and the tag is served again once the upstream recovers."""
        self.fake.stall_body("/manifests/1.0", after_bytes=10)
        path = "/v2/library/hello/manifests/1.0"
        first = self.assert_unavailable(path)
        yield eventually(lambda: len(self.answered()) == 1)
        second = self.assert_unavailable(path)
        yield defer.gatherResults([first, second], consumeErrors=True)
        self.assertEqual(len(self.answered()), 1, "one shared exchange")
        self.fake.reset_faults()
        response = yield self.proxy.get(path)
        self.assertEqual((yield response.content()), self.image.body)

    @defer.inlineCallbacks
    def test_stalled_tags_list(self):
        self.fake.stall_body("/tags/list", after_bytes=10)
        yield self.assert_unavailable("/v2/library/hello/tags/list")

    @defer.inlineCallbacks
    def test_stalled_referrers(self):
        self.fake.referrers_api = True
        self.fake.stall_body("/referrers/", after_bytes=10)
        yield self.assert_unavailable(f"/v2/library/hello/referrers/{self.image.digest}")

    @defer.inlineCallbacks
    def test_stalled_token_answer(self):
        self.fake.stall_body("/token", after_bytes=10, role="auth")
        yield self.assert_unavailable("/v2/library/hello/manifests/1.0")


class PassThroughBodyTests(unittest.TestCase):
    """The no-cache pipe: a silent upstream drops the client; a slow client is not the upstream's fault."""

    timeout = 60

    def setUp(self):
        self.fake = start_upstream(self, require_auth=False, blob_redirect=False)
        self.data = os.urandom(4 * MB)
        self.digest = self.fake.add_blob(self.data)
        self.proxy = Proxy(self, self.fake.registry_url, cache={"enabled": False}, timeouts={"read": 0.5})
        self.path = f"/v2/library/hello/blobs/{self.digest}"

    @defer.inlineCallbacks
    def test_stalled_body_cuts_the_client(self):
        self.fake.stall_blob(self.digest, after_bytes=MB)
        began = reactor.seconds()
        status, _, body = yield raw_get(self.proxy.port.getHost().port, self.path, timeout=30)
        self.assertIn(" 200 ", status)
        self.assertLess(len(body), len(self.data), "the client sees a cut, never a complete body")
        self.assertLess(reactor.seconds() - began, 20)

    @defer.inlineCallbacks
    def test_a_client_that_pauses_longer_than_the_read_timeout_gets_everything(self):
        """While the client's full socket pauses the pipe, the upstream's idle clock stops."""
        [client] = silent_clients(self.proxy.port.getHost().port, self.path, 1)
        self.addCleanup(client.close)
        yield eventually(lambda: self.fake.count(method="GET", path_contains=self.digest) == 1)
        paused_since = reactor.seconds()
        yield eventually(lambda: reactor.seconds() - paused_since > 2.0)  # four read timeouts without reading

        def read_all() -> bytes:
            client.settimeout(30)
            data = b""
            while chunk := client.recv(65536):
                data += chunk
                if data.count(b"\r\n\r\n") and len(data.partition(b"\r\n\r\n")[2]) >= len(self.data):
                    break
            return data.partition(b"\r\n\r\n")[2]

        body = yield threads.deferToThread(read_all)
        self.assertEqual(body, self.data)


class DiskPoolTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_fill_fsync_runs_in_the_disk_pool(self):
        """Not in Twisted's default pool, which the name resolver needs (and never on the reactor)."""
        fake = start_upstream(self, require_auth=False)
        digest = fake.add_blob(os.urandom(1000))
        proxy = Proxy(self, fake.registry_url)
        threads_seen = []
        real = os.fsync
        self.patch(os, "fsync", lambda fd: threads_seen.append(threading.current_thread().name) or real(fd))
        response = yield proxy.get(f"/v2/library/hello/blobs/{digest}")
        yield response.content()
        yield eventually(lambda: proxy.mirror.storage.blob_size(digest) is not None)
        self.assertTrue(threads_seen)
        self.assertTrue(all("dioproxy-disk" in name for name in threads_seen), threads_seen)
