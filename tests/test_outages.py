"""Outages are fast: the offline window (dioproxy.health), stale answers at once, one probe, the negative cache."""

from __future__ import annotations

import time

from twisted.internet import defer, reactor, task
from twisted.protocols import portforward
from twisted.trial import unittest

from dioproxy import health as health_module
from dioproxy.config import build_config
from dioproxy.health import Health, Offline
from dioproxy.manifests import UnknownTags
from tests.harness import Proxy, eventually, start_upstream
from tests.test_ops_metrics import value

STALE = ['110 - "Response is Stale"']


class _Front(portforward.ProxyServer):
    def connectionMade(self) -> None:
        switch = self.factory
        switch.accepted[switch.mode] += 1
        switch.open[self] = defer.Deferred()
        if switch.mode == "forward":
            super().connectionMade()
        elif switch.mode == "cut":
            self.transport.abortConnection()
        # "hole": accepted, read, never answered

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            super().dataReceived(data)

    def connectionLost(self, reason: object = None) -> None:
        super().connectionLost(reason)
        self.factory.open.pop(self).callback(None)


class Switch(portforward.ProxyFactory):
    """A TCP front for the fake registry that turns into a black hole (accepts, never answers: ``hole``), cuts
    every connection (``cut``) or forwards (``forward``); a change of mode drops open connections (a restart)."""

    protocol = _Front

    def __init__(self, testcase: unittest.TestCase, url: str) -> None:
        host, port = url.rsplit("//", 1)[1].split(":")
        super().__init__(host, int(port))
        self.mode = "forward"
        self.accepted = {"forward": 0, "hole": 0, "cut": 0}
        self.open: dict[_Front, defer.Deferred] = {}
        self.listening = reactor.listenTCP(0, self, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.listening.getHost().port}"
        testcase.addCleanup(self.stop)

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        for front in list(self.open):
            front.transport.abortConnection()

    def stop(self) -> defer.Deferred:
        waits = [defer.maybeDeferred(self.listening.stopListening), *self.open.values()]
        self.set_mode("cut")
        return defer.gatherResults(waits)


class BlackHoleTests(unittest.TestCase):
    """With the default timeouts: minutes per request today once the upstream is a black hole."""

    timeout = 60  # a request that waits for the black hole would wait three minutes

    @defer.inlineCallbacks
    def setUp(self):
        self.patch(health_module, "PROBE_INTERVAL", 0.1)  # the recovery below needs a second probe soon
        self.fake = start_upstream(self)
        self.image = self.fake.add_image("library/hello", "1.0", layer_sizes=[1000])
        self.switch = Switch(self, self.fake.registry_url)
        self.proxy = Proxy(self, self.switch.url, cache={"tag_ttl": 0})  # every request revalidates upstream
        self.assertEqual(self.proxy.config.read_timeout, 60)
        self.assertEqual(self.proxy.config.offline_timeout, 30)
        response = yield self.proxy.get("/v2/library/hello/manifests/1.0")
        self.assertEqual(((yield response.content()), response.code), (self.image.body, 200))

    @defer.inlineCallbacks
    def timed(self, path: str):
        started = time.monotonic()
        response = yield self.proxy.get(path)
        body = yield response.content()
        return response, body, time.monotonic() - started

    @defer.inlineCallbacks
    def test_stale_answers_at_once_one_probe_and_recovery(self):
        health = self.proxy.mirror.health
        self.switch.set_mode("cut")  # the first failure: no answer, after the retries
        response, body, first = yield self.timed("/v2/library/hello/manifests/1.0")
        self.assertEqual((response.code, body), (200, self.image.body))
        self.assertEqual(response.headers.getRawHeaders("Warning"), STALE)
        state = health.snapshot()["docker.io"]
        self.assertIsNotNone(state["offline_until"])
        self.assertIn("ResponseNeverReceived", state["last_error"])

        self.switch.set_mode("hole")
        self.fake.clear_requests()
        times = []
        for _ in range(9):
            response, body, seconds = yield self.timed("/v2/library/hello/manifests/1.0")
            self.assertEqual((response.code, body), (200, self.image.body))
            self.assertEqual(response.headers.getRawHeaders("Warning"), STALE)
            times.append(seconds)
        print(
            f"\nstale answers, black-hole upstream, default timeouts: first {first * 1000:.0f} ms (cut upstream, "
            f"3 attempts); next nine {', '.join(f'{t * 1000:.1f}' for t in times)} ms (max {max(times) * 1000:.1f})"
        )
        self.assertLess(max(times), 0.5)

        # What the cache cannot answer fails at once too, naming the registry, with Retry-After.
        for path in ("/v2/library/other/manifests/1.0", f"/v2/library/hello/blobs/{self.image.layer_digests[0]}"):
            response, body, seconds = yield self.timed(path)
            self.assertEqual(response.code, 503, path)
            self.assertIn(b"UNAVAILABLE", body)
            self.assertIn(b"docker.io", body)
            self.assertTrue(1 <= int(response.headers.getRawHeaders("Retry-After")[0]) <= 30)
            self.assertLess(seconds, 0.5)

        self.assertEqual(self.switch.accepted["hole"], 1, "only the one probe may reach the upstream")
        self.assertEqual(self.fake.requests, [])
        text = self.proxy.mirror.metrics.exposition().decode()
        self.assertEqual(value(text, "dioproxy_stale_answers_total", registry="docker.io", reason="offline"), 9)
        self.assertEqual(value(text, "dioproxy_stale_answers_total", registry="docker.io", reason="error"), 1)

        # The upstream comes back (a restart: the probe's connection is dropped); the next probe ends the window.
        self.switch.set_mode("forward")
        moved = self.fake.add_image("library/hello", "1.0", layer_sizes=[10])

        @defer.inlineCallbacks
        def fresh():
            response, body, _ = yield self.timed("/v2/library/hello/manifests/1.0")
            return response.code == 200 and body == moved.body and not response.headers.hasHeader("Warning")

        yield eventually(fresh)
        state = health.snapshot()["docker.io"]
        self.assertIsNone(state["offline_until"])
        self.assertGreater(state["last_success"], state["last_error_at"])
        self.assertEqual(self.switch.accepted["hole"], 1)

    @defer.inlineCallbacks
    def test_a_black_hole_costs_the_first_request_one_timeout(self):
        self.proxy.mirror.clients["docker.io"].timeout = 1.0  # timeouts.read, short for the test
        self.switch.set_mode("hole")
        response, body, first = yield self.timed("/v2/library/hello/manifests/1.0")
        self.assertEqual((response.code, body), (200, self.image.body))
        self.assertEqual(response.headers.getRawHeaders("Warning"), STALE)
        self.assertEqual(self.switch.accepted["hole"], 1, "a registry silent for a whole timeout was asked again")
        print(f"\nblack hole from the start, timeouts.read 1 s: first answer (stale) after {first * 1000:.0f} ms")
        self.assertLess(first, 2.0)
        self.assertIsNotNone(self.proxy.mirror.health.snapshot()["docker.io"]["offline_until"])


class TokenServiceOutageTests(unittest.TestCase):
    """The registry answers, its token service (auth.docker.io) is a black hole: nobody can be served."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.patch(health_module, "PROBE_INTERVAL", 0.1)
        self.fake = start_upstream(self)
        self.image = self.fake.add_image("library/hello", "1.0", layer_sizes=[1000])
        self.switch = Switch(self, self.fake.auth_url)
        self.fake.auth_url = self.switch.url  # the challenge names the switch as the realm
        self.proxy = Proxy(self, self.fake.registry_url, cache={"tag_ttl": 0})
        self.proxy.mirror.clients["docker.io"].timeout = 1.0
        response = yield self.proxy.get("/v2/library/hello/manifests/1.0")
        self.assertEqual(((yield response.content()), response.code), (self.image.body, 200))

    timed = BlackHoleTests.timed

    @defer.inlineCallbacks
    def test_offline_at_once_after_the_first_and_back_when_tokens_are(self):
        self.proxy.mirror.tokens._tokens.clear()  # the next request needs a token
        self.switch.set_mode("hole")
        response, body, first = yield self.timed("/v2/library/hello/manifests/1.0")
        self.assertEqual((response.code, body), (200, self.image.body))
        self.assertEqual(response.headers.getRawHeaders("Warning"), STALE)
        self.assertLess(first, 2.0, "one token timeout (1 s), not more")
        self.assertIn("token service", self.proxy.mirror.health.snapshot()["docker.io"]["last_error"])
        times = []
        for _ in range(5):
            response, body, seconds = yield self.timed("/v2/library/hello/manifests/1.0")
            self.assertEqual((response.code, body), (200, self.image.body))
            times.append(seconds)
        print(
            f"\ntoken service black hole, timeouts.read 1 s: first {first * 1000:.0f} ms; next five "
            f"{', '.join(f'{t * 1000:.1f}' for t in times)} ms"
        )
        self.assertLess(max(times), 0.5, "each request waited for the token service again")

        self.switch.set_mode("forward")
        moved = self.fake.add_image("library/hello", "1.0", layer_sizes=[10])

        @defer.inlineCallbacks
        def fresh():
            response, body, _ = yield self.timed("/v2/library/hello/manifests/1.0")
            return response.code == 200 and body == moved.body

        yield eventually(fresh)
        self.assertIsNone(self.proxy.mirror.health.snapshot()["docker.io"]["offline_until"])


class FailureKindTests(unittest.TestCase):
    """What takes a registry offline, and what never does."""

    def setUp(self):
        self.fake = start_upstream(self)
        self.fake.add_image("library/hello", "1.0", layer_sizes=[1000])
        self.switch = Switch(self, self.fake.registry_url)
        self.proxy = Proxy(self, self.switch.url)
        self.health = self.proxy.mirror.health

    def assertUp(self):
        state = self.health.snapshot()["docker.io"]
        self.assertIsNone(state["offline_until"], state)
        self.assertIsNone(state["last_error"], state)
        self.assertFalse(self.health.offline("docker.io"))

    @defer.inlineCallbacks
    def test_a_404_or_a_429_is_an_answer(self):
        response = yield self.proxy.get("/v2/library/nope/manifests/1.0")
        self.assertEqual(response.code, 404, (yield response.content()))
        yield response.content()
        self.assertIsNotNone(self.health.snapshot()["docker.io"]["last_success"])
        self.fake.fail_next(5, status=429)
        response = yield self.proxy.get("/v2/library/hello/manifests/1.0")
        self.assertEqual(response.code, 429)
        yield response.content()
        self.assertUp()

    @defer.inlineCallbacks
    def test_a_cancelled_request_is_not_a_failure(self):
        """Whoever awaits an upstream request may give up on it: neither retried nor counted against the registry."""
        self.switch.set_mode("hole")
        client = self.proxy.mirror.clients["docker.io"]
        d = defer.ensureDeferred(client.request("GET", "/v2/library/hello/manifests/1.0", "library/hello"))
        yield eventually(lambda: self.switch.accepted["hole"] == 1)
        d.cancel()
        yield eventually(lambda: d.called, timeout=5)
        yield self.assertFailure(d, defer.CancelledError)
        self.assertEqual(self.switch.accepted["hole"], 1, "a cancelled request was retried")
        self.assertUp()

    @defer.inlineCallbacks
    def test_5xx_after_the_retries_is_a_failure(self):
        self.fake.fail_next(3, status=503)
        response = yield self.proxy.get("/v2/library/hello/manifests/1.0")
        self.assertEqual(response.code, 502)
        yield response.content()
        self.assertEqual(self.health.snapshot()["docker.io"]["last_error"], "HTTP 503")
        self.assertTrue(self.health.offline("docker.io"))
        # The next request starts the probe, which finds the registry answering: the window ends.
        response = yield self.proxy.get("/v2/library/hello/manifests/1.0")
        self.assertEqual(response.code, 503)
        self.assertTrue(response.headers.hasHeader("Retry-After"))
        yield response.content()
        yield eventually(lambda: not self.health.offline("docker.io"))
        response = yield self.proxy.get("/v2/library/hello/manifests/1.0")
        self.assertEqual(response.code, 200)
        yield response.content()


class _Probe:
    """A probe under the test's control: each call returns a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[defer.Deferred] = []

    def __call__(self) -> defer.Deferred:
        d = defer.Deferred()
        self.calls.append(d)
        return d


class HealthTests(unittest.TestCase):
    """The window on a fake clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.health = Health(self.clock, 30, self.clock.seconds)
        self.health.track(["docker.io", "ghcr.io"])
        self.probe = _Probe()

    def check(self):
        return self.health.check("docker.io", self.probe)

    def test_snapshot_contract(self):
        self.health.succeeded("docker.io")
        self.health.failed("ghcr.io", "ConnectError: refused")
        self.assertEqual(
            self.health.snapshot(),
            {
                "docker.io": {"last_success": 1000, "last_error": None, "last_error_at": None, "offline_until": None},
                "ghcr.io": {
                    "last_success": None,
                    "last_error": "ConnectError: refused",
                    "last_error_at": 1000,
                    "offline_until": 1030,
                },
            },
        )

    def test_window_without_traffic_ends_by_itself(self):
        self.health.failed("docker.io", "TimeoutError")
        self.clock.advance(29.9)
        self.assertTrue(self.health.offline("docker.io"))
        self.clock.advance(0.2)
        self.check()  # may be asked again
        self.assertEqual(self.probe.calls, [], "no traffic, no probe")

    def test_one_probe_at_a_time_and_its_answer_decides(self):
        self.health.failed("docker.io", "TimeoutError")
        for _ in range(20):
            error = self.assertRaises(Offline, self.check)
            self.clock.advance(1)
        self.assertEqual(len(self.probe.calls), 1, "one probe while it runs")
        self.assertEqual(error.to_registry_error().status, 503)
        self.assertEqual(error.to_registry_error().headers["Retry-After"], "11")
        self.probe.calls[0].callback(401)  # an answer (a challenge): up
        self.assertFalse(self.health.offline("docker.io"))
        self.assertIsNone(self.health.snapshot()["docker.io"]["offline_until"])
        self.check()

    def test_a_probe_that_hangs_fails_at_its_deadline(self):
        self.health.failed("docker.io", "TimeoutError")
        self.clock.advance(10)
        self.assertRaises(Offline, self.check)  # probe 1, its deadline 30 s from now
        self.clock.advance(25)  # the window is over, the probe has not answered: still offline, no second probe
        self.assertRaises(Offline, self.check)
        self.assertGreaterEqual(self.health.snapshot()["docker.io"]["offline_until"], self.clock.seconds())
        self.assertEqual(len(self.probe.calls), 1)
        self.clock.advance(5)  # the probe's deadline: a failure, a new window
        self.assertIn("probe: TimeoutError", self.health.snapshot()["docker.io"]["last_error"])
        self.assertRaises(Offline, self.check)
        self.assertEqual(len(self.probe.calls), 2)
        self.probe.calls[1].callback(500)  # answered, but with a server error: still offline
        self.assertRaises(Offline, self.check)
        self.assertEqual(len(self.probe.calls), 2, "probes are spaced PROBE_INTERVAL apart")
        self.clock.advance(health_module.PROBE_INTERVAL)
        self.assertRaises(Offline, self.check)
        self.probe.calls[2].callback(200)
        self.check()

    def test_stop_cancels_the_probe(self):
        """At shutdown: a probe still under way would hand its connection back to a closed pool."""
        self.health.failed("docker.io", "TimeoutError")
        self.assertRaises(Offline, self.check)
        self.health.stop()
        self.assertTrue(self.probe.calls[0].called)
        self.assertEqual(self.clock.getDelayedCalls(), [], "the probe's deadline is gone too")

    def test_zero_window_never_goes_offline(self):
        self.health.window = 0
        self.health.failed("docker.io", "ConnectError")
        self.check()
        self.assertEqual(self.health.snapshot()["docker.io"]["last_error"], "ConnectError")

    def test_track_and_forget(self):
        self.health.failed("docker.io", "ConnectError")
        self.health.track(["docker.io", "quay.io"])
        self.assertEqual(sorted(self.health.snapshot()), ["docker.io", "quay.io"])
        self.assertTrue(self.health.offline("docker.io"))
        self.health.forget("docker.io")
        self.assertFalse(self.health.offline("docker.io"))


class NegativeCacheTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        self.proxy = Proxy(self, self.fake.registry_url, cache={"negative_ttl": 1})

    def manifest_requests(self):
        """Upstream answers for the tag, the 401s of the token dance not counted."""
        return len([r for r in self.fake.find("registry", None, "/manifests/typo") if r.status != 401])

    @defer.inlineCallbacks
    def test_a_typo_storm_costs_one_upstream_request(self):
        for _ in range(20):
            response = yield self.proxy.get("/v2/library/hello/manifests/typo")
            self.assertEqual(response.code, 404, (yield response.content()))
            self.assertIn(b"MANIFEST_UNKNOWN", (yield response.content()))
        self.assertEqual(self.manifest_requests(), 1)
        # Pushed meanwhile: answered once the 404 is forgotten, at the first request past the TTL.
        image = self.fake.add_image("library/hello", "typo", layer_sizes=[10])

        @defer.inlineCallbacks
        def found():
            response = yield self.proxy.get("/v2/library/hello/manifests/typo")
            return response.code == 200 and (yield response.content()) == image.body

        yield eventually(found, timeout=15)
        self.assertEqual(self.manifest_requests(), 2)

    @defer.inlineCallbacks
    def test_off_with_zero(self):
        overrides = [f"{r}={self.fake.registry_url}" for r in ("docker.io", "ghcr.io", "quay.io")]
        self.proxy.mirror.apply(build_config({"cache": {"negative_ttl": 0}}, overrides, self.proxy.cache_dir))
        for _ in range(3):
            response = yield self.proxy.get("/v2/library/hello/manifests/typo")
            self.assertEqual(response.code, 404, (yield response.content()))
            yield response.content()
        self.assertEqual(self.manifest_requests(), 3)

    def test_bounded(self):
        unknown = UnknownTags()
        unknown.MEMORY = 3
        for i in range(5):
            unknown.add(("docker.io", "x", str(i)), 100)
        self.assertEqual(len(unknown), 3)
        self.assertFalse(unknown.known(("docker.io", "x", "0"), 50))
        self.assertTrue(unknown.known(("docker.io", "x", "4"), 50))
        self.assertFalse(unknown.known(("docker.io", "x", "4"), 100))
        self.assertEqual(len(unknown), 2)


class ConfigTests(unittest.TestCase):
    def test_keys_defaults_and_reload(self):
        config = build_config({})
        self.assertEqual((config.offline_timeout, config.negative_ttl), (30, 30))
        config = build_config({"timeouts": {"offline": "1m"}, "cache": {"negative_ttl": "5s"}})
        self.assertEqual((config.offline_timeout, config.negative_ttl), (60, 5))
        for bad, key in (({"timeouts": {"offline": -1}}, "timeouts.offline"), ({"cache": {"negative_ttl": "x"}}, "")):
            with self.assertRaisesRegex(ValueError, key or "cache.negative_ttl"):
                build_config(bad)
        fake = start_upstream(self)
        proxy = Proxy(self, fake.registry_url, timeouts={"offline": 7})
        proxy.mirror.health.failed("ghcr.io", "ConnectError")
        state = proxy.mirror.health.snapshot()["ghcr.io"]
        self.assertEqual(state["offline_until"] - state["last_error_at"], 7)
        proxy.mirror.health.failed("docker.io", "ConnectError")
        proxy.mirror.health.failed("quay.io", "ConnectError")
        changes = proxy.mirror.apply(
            build_config(
                {
                    "timeouts": {"offline": 5},
                    "cache": {"negative_ttl": 7},
                    "upstreams": {"quay.io": "http://q.example"},
                },
                [f"docker.io={fake.registry_url}", f"ghcr.io={fake.registry_url}"],
                proxy.cache_dir,
            )
        )
        self.assertIn("offline_timeout", changes)
        self.assertEqual((proxy.mirror.health.window, proxy.mirror.manifests.negative_ttl), (5, 7))
        self.assertTrue(proxy.mirror.health.offline("docker.io"), "an unchanged upstream keeps its state")
        self.assertFalse(proxy.mirror.health.offline("quay.io"), "a changed upstream starts afresh")
