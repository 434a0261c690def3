"""Every wait has a deadline: upstream bodies, clients that stop reading, connection and descriptor limits."""

import errno
import json
import os
import socket
import sys
import threading

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from dioproxy.config import ConfigError, build_config
from dioproxy.site import default_max_connections
from dioproxy.storage.cachedir import BLOB
from tests.harness import Proxy, ProxyProcess, eventually, start_upstream

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


def proxy_fds(exclude: list[socket.socket] = ()) -> int:
    """Descriptors this process holds, without the test's own client sockets (the proxy runs in-process)."""
    return len(set(os.listdir("/proc/self/fd")) - {str(s.fileno()) for s in exclude})


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


class NonReadingClientTests(unittest.TestCase):
    """``timeouts.client``: 20 clients that never read are dropped; descriptors and pins come back."""

    timeout = 120
    CLIENTS = 20

    def setUp(self):
        self.fake = start_upstream(self, require_auth=False, blob_redirect=False)
        self.data = os.urandom(16 * MB)
        self.digest = self.fake.add_blob(self.data)
        self.path = f"/v2/library/hello/blobs/{self.digest}"

    def start(self, **config):
        self.proxy = Proxy(self, self.fake.registry_url, timeouts={"client": 3}, **config)

    @defer.inlineCallbacks
    def settled_fds(self, exclude=()):
        """The count once idle upstream connections (not the clients' doing) are closed and it holds still."""
        yield self.proxy.mirror.pool.closeCachedConnections()
        last = None
        while (now := proxy_fds(exclude)) != last:
            last = now
            yield task.deferLater(reactor, 0.2, lambda: None)
        return now

    @defer.inlineCallbacks
    def check_release(self, kind, per_client):
        port = self.proxy.port.getHost().port
        pinned = (lambda: self.proxy.mirror.cache.pinned((BLOB, self.digest))) if self.proxy.mirror.cache else None
        before = yield self.settled_fds()
        began = reactor.seconds()
        clients = silent_clients(port, self.path, self.CLIENTS)
        self.addCleanup(lambda: [c.close() for c in clients])
        yield eventually(lambda: proxy_fds(clients) >= before + per_client * self.CLIENTS, timeout=30)
        during = proxy_fds(clients)
        if pinned:
            self.assertTrue(pinned())

        @defer.inlineCallbacks
        def released():
            return (yield self.settled_fds(clients)) <= before and not (pinned and pinned())

        yield eventually(released, timeout=60, step=0.2)
        after = proxy_fds(clients)
        elapsed = reactor.seconds() - began
        print(
            f"\n{kind}: proxy fds before {before}, with {self.CLIENTS} silent clients {during}, after {after}; "
            f"released {elapsed:.1f} s after they connected (timeouts.client 3 s)",
            file=sys.stderr,
        )
        self.assertEqual(after, before)

    @defer.inlineCallbacks
    def test_cached_blob_by_sendfile(self):
        self.start()
        response = yield self.proxy.get(self.path)
        self.assertEqual((yield response.content()), self.data)
        yield eventually(lambda: self.proxy.mirror.storage.blob_size(self.digest) is not None)
        yield self.check_release("sendfile (cached)", per_client=2)  # socket + cache file

    @defer.inlineCallbacks
    def test_growing_blob_by_file_streamer(self):
        self.start()
        yield self.check_release("file streamer (fill)", per_client=2)

    @defer.inlineCallbacks
    def test_pass_through_pipe(self):
        self.start(cache={"enabled": False})
        yield self.check_release("pass-through pipe", per_client=3)  # socket + both ends of its upstream connection

    @defer.inlineCallbacks
    def test_idle_connection_is_closed(self):
        self.start()
        with socket.create_connection(("127.0.0.1", self.proxy.port.getHost().port)) as s:
            s.setblocking(False)

            def closed():
                try:
                    return s.recv(1) == b""
                except BlockingIOError:
                    return False

            yield eventually(closed, timeout=30)


class ConnectionLimitTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_past_the_limit_503_then_served_again(self):
        fake = start_upstream(self)
        proxy = Proxy(self, fake.registry_url, limits={"max_connections": 3})
        port = proxy.port.getHost().port
        site = proxy.port.factory
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        self.addCleanup(lambda: [s.close() for s in held])
        yield eventually(lambda: site.connections == 3)
        status, headers, body = yield raw_get(port)
        self.assertIn(" 503 ", status)
        self.assertEqual(json.loads(body)["errors"][0]["code"], "TOOMANYREQUESTS")
        self.assertTrue(headers["retry-after"].isdigit())
        held.pop().close()
        yield eventually(lambda: site.connections == 2)
        status, _, body = yield raw_get(port)
        self.assertIn(" 200 ", status)

    def test_default_follows_the_descriptor_limit(self):
        self.assertEqual(default_max_connections(1024), 462)
        self.assertEqual(default_max_connections(65536), 32718)
        self.assertEqual(default_max_connections(64), 8)


class DescriptorExhaustionTests(unittest.TestCase):
    """A real ``twistd`` with ``ulimit -n 64``: running out of descriptors never crashes or wedges it."""

    timeout = 120

    @defer.inlineCallbacks
    def flood(self, process, n):
        """Open ``n`` connections that each ask for /v2/; the answers' status codes (None: cut or refused)."""

        def run():
            sockets, codes = [], []
            for _ in range(n):
                try:
                    s = socket.create_connection(("127.0.0.1", process.port), timeout=5)
                    s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
                    sockets.append(s)
                except OSError:
                    codes.append(None)
            for s in sockets:
                try:
                    line = s.recv(65536).split(b"\r\n", 1)[0]
                    codes.append(int(line.split()[1]) if line else None)
                except OSError:
                    codes.append(None)
            return sockets, codes

        sockets, codes = yield threads.deferToThread(run)
        return sockets, codes

    def start(self, config_text):
        fake = start_upstream(self)
        config = os.path.abspath(self.mktemp())
        with open(config, "w") as f:
            f.write(config_text)
        process = ProxyProcess(self, os.path.abspath(self.mktemp()), fake.registry_url, "--config", config, nofile=64)
        return process

    @defer.inlineCallbacks
    def assert_serves_again(self, process, sockets):
        self.assertIsNone(process.process.poll(), "the proxy is still running")
        for s in sockets:
            s.close()

        @defer.inlineCallbacks
        def serves():
            status, _, _ = yield raw_get(process.port)
            return " 200 " in status

        yield eventually(serves, timeout=30, step=0.2)
        with open(process.log_path, errors="replace") as f:
            log = f.read()
        self.assertNotIn("Traceback", log)

    @defer.inlineCallbacks
    def test_default_limit_answers_503_before_descriptors_run_out(self):
        process = self.start("timeouts:\n  client: 30\n")
        yield process.listening()
        sockets, codes = yield self.flood(process, 40)
        print(
            f"\nulimit -n 64, default limit: {codes.count(200)} served, {codes.count(503)} got 503, "
            f"{codes.count(None)} cut",
            file=sys.stderr,
        )
        self.assertEqual(codes.count(None), 0, "every connection got an answer")
        # 8 (the limit); 7 if the readiness probe's connection was not yet seen closed when the flood began
        self.assertIn(codes.count(200), (7, 8))
        self.assertEqual(codes.count(503), 40 - codes.count(200))
        yield self.assert_serves_again(process, sockets)

    @defer.inlineCallbacks
    def test_emfile_on_accept(self):
        """With the limit set above what the descriptors allow, accept() meets EMFILE: the extra connections
        are closed, and once the others go the proxy serves again."""
        process = self.start("limits:\n  max_connections: 1000\ntimeouts:\n  client: 30\n")
        yield process.listening()
        sockets, codes = yield self.flood(process, 100)
        print(f"\nulimit -n 64, limit 1000: {codes.count(200)} served, {codes.count(None)} cut", file=sys.stderr)
        self.assertGreater(codes.count(None), 0, "descriptors did run out")
        self.assertGreater(codes.count(200), 0)
        yield self.assert_serves_again(process, sockets)


class DescriptorShortageTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_out_of_descriptors_opening_a_cached_blob_is_503_with_retry_after(self):
        fake = start_upstream(self, require_auth=False)
        data = os.urandom(1000)
        digest = fake.add_blob(data)
        proxy = Proxy(self, fake.registry_url)
        response = yield proxy.get(f"/v2/library/hello/blobs/{digest}")
        self.assertEqual((yield response.content()), data)
        yield eventually(lambda: proxy.mirror.storage.blob_size(digest) is not None)
        real = os.open

        def short(path, *args, **kwargs):
            if digest.split(":")[1] in str(path):
                raise OSError(errno.EMFILE, "Too many open files")
            return real(path, *args, **kwargs)

        self.patch(os, "open", short)
        response = yield proxy.get(f"/v2/library/hello/blobs/{digest}")
        body = yield response.json()
        self.assertEqual(response.code, 503)
        self.assertEqual(body["errors"][0]["code"], "UNAVAILABLE")
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["5"])
        self.assertEqual(self.flushLoggedErrors(), [], "a passing shortage is no traceback")


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


class ConfigTests(unittest.TestCase):
    def test_defaults_and_values(self):
        config = build_config()
        self.assertEqual((config.client_timeout, config.max_connections), (60, None))
        config = build_config({"timeouts": {"client": "2m"}, "limits": {"max_connections": 500}})
        self.assertEqual((config.client_timeout, config.max_connections), (120, 500))

    def test_bad_values_name_the_key(self):
        for data, key in [
            ({"timeouts": {"client": 0}}, "timeouts.client"),
            ({"timeouts": {"client": "never"}}, "timeouts.client"),
            ({"limits": {"max_connections": 0}}, "limits.max_connections"),
            ({"limits": {"max_connections": "many"}}, "limits.max_connections"),
            ({"limits": {"max_connections": True}}, "limits.max_connections"),
            ({"limits": {"connections": 5}}, "limits.connections"),
            ({"limits": [5]}, "limits"),
        ]:
            with self.assertRaises(ConfigError, msg=repr(data)) as caught:
                build_config(data)
            self.assertIn(key, str(caught.exception))
