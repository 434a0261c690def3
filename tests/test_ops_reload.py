"""Live reload: ``Mirror.apply``, the file watch, SIGHUP to a real ``twistd``, refusals of a broken config."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

import treq
from twisted.internet import defer, protocol, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from dioproxy.config import Config, ConfigError, Upstream, build_config, load_config
from dioproxy.reload import ConfigReloader
from dioproxy.upstream import identity
from tests.harness import Proxy, eventually, start_upstream
from tests.test_ops_metrics import Puller, value

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


class CapturedLog:
    def __init__(self, testcase: unittest.TestCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def text(self) -> str:
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) for e in self.events)


class ApplyTests(unittest.TestCase):
    """``Mirror.apply`` in process: what a reload changes, for requests that start afterwards."""

    @defer.inlineCallbacks
    def setUp(self):
        self.a = start_upstream(self, auth_mode=None)
        self.b = start_upstream(self, auth_mode=None)
        self.proxy = Proxy(self, self.a.registry_url)
        self.mirror = self.proxy.mirror
        self.puller = Puller(self, self.proxy)
        yield self.mirror.cache.when_ready()

    def config(self, data: dict):
        return build_config(data, [], self.proxy.cache_dir)

    @defer.inlineCallbacks
    def status(self, path: str, headers: dict | None = None) -> defer.Deferred:
        response = yield self.proxy.get(path, headers={"Accept": [DOCKER_MANIFEST], **(headers or {})})
        body = yield response.content()
        return response.code, body

    @defer.inlineCallbacks
    def test_upstreams_hosts_ttl_and_bounds_change_at_once(self):
        image = self.b.add_image("library/only-on-b", "1")
        code, _ = yield self.status("/v2/library/only-on-b/manifests/1")
        self.assertEqual(code, 404)
        changes = self.mirror.apply(
            self.config(
                {
                    "upstreams": {"docker.io": self.b.registry_url, "registry.example.com": self.a.registry_url},
                    "hosts": {"b.mirror.test": "registry.example.com"},
                    "cache": {"tag_ttl": "1m", "max_size": "3GB", "max_age": "7d"},
                }
            )
        )
        self.assertEqual(set(changes), {"upstreams", "hosts", "tag_ttl", "cache_max_size", "cache_max_age"}, changes)
        yield self.puller.pull(image)
        self.assertEqual(self.mirror.manifests.tag_ttl, 60)
        self.assertEqual((self.mirror.cache.max_size, self.mirror.cache.max_age), (3 * 10**9, 7 * 86400))
        other = self.a.add_image("team/app", "2")
        code, body = yield self.status("/v2/team/app/manifests/2", headers={"Host": ["b.mirror.test"]})
        self.assertEqual(code, 200)
        self.assertEqual(body, other.body)
        # ghcr.io and quay.io lost their test overrides: back to the real defaults, not connected to here.
        self.assertEqual(self.mirror.clients["ghcr.io"].upstream.url, "https://ghcr.io")

    @defer.inlineCallbacks
    def test_unchanged_upstreams_keep_their_client(self):
        before = dict(self.mirror.clients)
        overrides = {r: self.a.registry_url for r in ("docker.io", "ghcr.io", "quay.io")}
        self.mirror.apply(self.config({"upstreams": overrides, "cache": {"tag_ttl": 5}}))
        for name in ("docker.io", "ghcr.io", "quay.io", "gcr.io"):
            self.assertIs(self.mirror.clients[name], before[name], name)
        self.assertEqual(self.mirror.apply(self.config({"upstreams": overrides, "cache": {"tag_ttl": 5}})), [])
        yield defer.succeed(None)

    @defer.inlineCallbacks
    def test_removed_upstream_is_refused(self):
        self.a.add_image("someone/thing", "1")
        code, _ = yield self.status("/v2/someone/thing/manifests/1?ns=quay.io")
        self.assertEqual(code, 200)
        only_docker = Config(
            upstreams={"docker.io": Upstream("docker.io", self.a.registry_url)}, cache_dir=self.proxy.cache_dir
        )
        self.mirror.apply(only_docker)
        self.assertNotIn("quay.io", self.mirror.clients)
        code, body = yield self.status("/v2/someone/thing/manifests/1?ns=quay.io")
        self.assertEqual(code, 404)
        self.assertEqual(json.loads(body)["errors"][0]["code"], "NAME_UNKNOWN")

    @defer.inlineCallbacks
    def test_credentials_apply_to_the_next_request(self):
        fake = start_upstream(self, auth_mode="bearer", users={"alice": "s3cret"}, private=["alice/private"])
        image = fake.add_image("alice/private", "1")
        url = fake.registry_url
        self.mirror.apply(self.config({"upstreams": {"docker.io": url}}))
        code, _ = yield self.status("/v2/alice/private/manifests/1")
        self.assertEqual(code, 404)
        self.mirror.apply(
            self.config({"upstreams": {"docker.io": {"url": url, "username": "alice", "password": "s3cret"}}})
        )
        code, body = yield self.status("/v2/alice/private/manifests/1")
        self.assertEqual(code, 200)
        self.assertEqual(body, image.body)
        who = identity(("alice", "s3cret"))
        self.assertEqual({key[-1] for key in self.mirror.tokens._tokens}, {who}, "old tokens could be reused")

    @defer.inlineCallbacks
    def test_in_flight_transfer_is_not_interrupted(self):
        data = os.urandom(3 * 1024 * 1024)
        digest = self.a.add_blob(data)
        gate = self.a.gate_blob(digest)
        pending = self.proxy.get(f"/v2/library/x/blobs/{digest}")
        yield self.a.wait_for_requests(1, "cdn", "GET", digest)
        self.mirror.apply(self.config({"upstreams": {"docker.io": self.b.registry_url}}))
        gate.callback(None)
        response = yield pending
        body = yield response.content()
        self.assertEqual((response.code, body == data), (200, True))
        image = self.b.add_image("library/after", "1")
        yield self.puller.pull(image)
        self.assertEqual(self.a.count(path_contains="library/after"), 0)


class FileWatchTests(unittest.TestCase):
    """The reloader in process, watching a real file (a short interval) and refusing broken configs."""

    @defer.inlineCallbacks
    def setUp(self):
        self.a = start_upstream(self, auth_mode=None)
        self.b = start_upstream(self, auth_mode=None)
        self.path = os.path.abspath(self.mktemp())
        self.write({"upstreams": {"docker.io": self.a.registry_url}})
        self.proxy = Proxy(self, self.a.registry_url)
        self.cache_dir = self.proxy.cache_dir
        self.mirror = self.proxy.mirror
        self.mirror.apply(load_config(self.path, [], self.cache_dir))
        self.reloader = ConfigReloader(
            self.mirror,
            lambda: load_config(self.path, [], self.cache_dir),
            self.path,
            reactor,
            interval=0.05,
            refusals=(ConfigError,),
        )
        self.reloader.start()
        self.addCleanup(self.reloader.stop)
        self.log = CapturedLog(self)
        yield self.mirror.cache.when_ready()

    def write(self, data) -> None:
        text = data if isinstance(data, str) else json.dumps(data)  # JSON is YAML
        with open(self.path + ".new", "w") as f:
            f.write(text)
        os.rename(self.path + ".new", self.path)  # the way editors save

    @defer.inlineCallbacks
    def test_an_edited_file_is_applied(self):
        self.write({"upstreams": {"docker.io": self.b.registry_url}, "cache": {"tag_ttl": "42s"}})
        yield eventually(lambda: self.mirror.manifests.tag_ttl == 42)
        self.assertEqual(self.mirror.clients["docker.io"].upstream.url, self.b.registry_url)
        self.assertIn("config reloaded", self.log.text())
        text = yield Puller(self, self.proxy).metrics()
        self.assertEqual(value(text, "dioproxy_config_reloads_total", result="applied"), 1)

    @defer.inlineCallbacks
    def test_a_broken_file_is_refused_and_the_old_config_stays(self):
        before = self.mirror.config
        for broken in (
            "upstreams: [unclosed",
            {"upstreams": {"docker.io": "ftp://x"}},
            {"cache": {"max_size": "lots"}},
        ):
            count = len(self.log.events)
            self.write(broken)
            yield eventually(
                lambda c=count: "refused" in "".join(str(e.get("log_format")) for e in self.log.events[c:])
            )
            self.assertIs(self.mirror.config, before)
        self.assertIn("cache.max_size", self.log.text())
        text = yield Puller(self, self.proxy).metrics()
        self.assertEqual(value(text, "dioproxy_config_reloads_total", result="refused"), 3)
        # Fixed again: applied.
        self.write({"upstreams": {"docker.io": self.b.registry_url}})
        yield eventually(lambda: self.mirror.config is not before)

    @defer.inlineCallbacks
    def test_cache_dir_changes_need_a_restart(self):
        self.write({"upstreams": {"docker.io": self.a.registry_url}, "cache": {"dir": "/elsewhere", "tag_ttl": 7}})
        # load_config with the command line's --cache-dir wins, so this reloader ignores cache.dir like twistd does;
        # Mirror.apply itself also keeps the old directory.
        yield eventually(lambda: self.mirror.manifests.tag_ttl == 7)
        self.assertEqual(self.mirror.config.cache_dir, self.cache_dir)
        changes = self.mirror.apply(build_config({"cache": {"enabled": False}}, [], "/elsewhere"))
        self.assertNotIn("cache_dir", changes)
        self.assertEqual((self.mirror.config.cache_dir, self.mirror.config.cache_enabled), (self.cache_dir, True))
        self.assertIn("takes a restart", self.log.text())

    @defer.inlineCallbacks
    def test_sighup_in_process(self):
        self.reloader.interval = 0
        self.reloader.stop()
        self.reloader.start()
        with open(self.path) as f:
            original = f.read()
        st = os.stat(self.path)
        # Same size, same inode, same mtime: the file watch cannot see it, only the signal can.
        with open(self.path, "r+") as f:
            f.write(original.replace(self.a.registry_url, self.b.registry_url))
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.kill(os.getpid(), signal.SIGHUP)
        yield eventually(lambda: self.mirror.clients["docker.io"].upstream.url == self.b.registry_url)
        self.assertIn("SIGHUP", self.log.text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Output(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(None)


class TwistdReloadTests(unittest.TestCase):
    """A real ``twistd -n dioproxy`` subprocess: reload by editing its config file, and by SIGHUP."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.a = start_upstream(self, auth_mode=None)
        self.b = start_upstream(self, auth_mode=None)
        self.image_a = self.a.add_image("library/hello", "1")
        self.image_b = self.b.add_image("library/hello", "1")
        self.path = os.path.abspath(self.mktemp()) + ".yaml"
        self.write(self.a.registry_url)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
        argv = [*twistd, "-n", "--pidfile=", "dioproxy", "--config", self.path]
        argv += ["--port", str(self.port), "--interface", "127.0.0.1", "--cache-dir", os.path.abspath(self.mktemp())]
        self.out = _Output()
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = reactor.spawnProcess(self.out, sys.executable, argv, env=env, path=ROOT)
        self.addCleanup(self.stop)
        try:
            yield eventually(self.healthy, timeout=30, step=0.1)
        except AssertionError:
            raise AssertionError("twistd did not start:\n" + self.log()) from None

    def write(self, url: str, extra: str = "") -> None:
        # tag_ttl 0: every pull asks the upstream, so we see which upstream is in force.
        text = f"upstreams:\n  docker.io: {url}\ncache:\n  tag_ttl: 0\n{extra}"
        with open(self.path + ".new", "w") as f:
            f.write(text)
        os.rename(self.path + ".new", self.path)

    @defer.inlineCallbacks
    def healthy(self):
        try:
            response = yield self.http.get(self.url + "/healthz")
            yield response.content()
            return response.code == 200
        except Exception:
            return False

    @defer.inlineCallbacks
    def served_digest(self):
        response = yield self.http.get(
            self.url + "/v2/library/hello/manifests/1", headers={"Accept": [DOCKER_MANIFEST]}
        )
        yield response.content()
        return (response.headers.getRawHeaders("Docker-Content-Digest") or [None])[0]

    @defer.inlineCallbacks
    def stop(self):
        if self.process.pid is not None:
            self.process.signalProcess("TERM")
        yield self.out.ended

    def log(self) -> str:
        return self.out.output.decode("utf-8", "replace")

    @defer.inlineCallbacks
    def test_edit_then_sighup(self):
        digest = yield self.served_digest()
        self.assertEqual(digest, self.image_a.digest)

        # 1. The file changes on disk: applied within the 2 s poll.
        self.write(self.b.registry_url)
        yield eventually(lambda: self.served_digest().addCallback(lambda d: d == self.image_b.digest), timeout=15)
        self.assertIn("config reloaded", self.log())

        # 2. SIGHUP, with an edit the poll cannot see (same size, inode and mtime).
        st = os.stat(self.path)
        with open(self.path) as f:
            text = f.read()
        with open(self.path, "r+") as f:
            f.write(text.replace(self.b.registry_url, self.a.registry_url))
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.process.signalProcess("HUP")
        yield eventually(lambda: self.served_digest().addCallback(lambda d: d == self.image_a.digest), timeout=15)
        yield eventually(lambda: "(SIGHUP)" in self.log(), timeout=5)

        # 3. A broken config by SIGHUP: refused, logged, the old one keeps serving.
        with open(self.path, "a") as f:
            f.write("timeouts: {read: soon}\n")
        self.process.signalProcess("HUP")
        yield eventually(lambda: "refused" in self.log(), timeout=15)
        self.assertIn("timeouts.read", self.log())
        digest = yield self.served_digest()
        self.assertEqual(digest, self.image_a.digest)
        response = yield self.http.get(self.url + "/metrics")
        text = yield response.text()
        self.assertGreaterEqual(value(text, "dioproxy_config_reloads_total", result="applied"), 2)
        self.assertGreaterEqual(value(text, "dioproxy_config_reloads_total", result="refused"), 1)
