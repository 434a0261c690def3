"""What replicas on one Redis share besides fills (dioproxy/fleet/limits.py, dioproxy/fleet/budget.py): a client's
request rate and failed logins are limited for the fleet, not per replica, and the pull budget one replica heard
about steers all of them. Redis stopped or stalled: every replica limits and budgets on its own, and no request
fails or waits past the quick deadline for it.

Replicas are mirrors in this process with their own cache directories, on a real ``redis-server``.
"""

from __future__ import annotations

import json
import random
import sys
import time

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from dioproxy.auth import LoginThrottle
from dioproxy.budget import PullBudget
from dioproxy.fleet.budget import FleetBudget
from dioproxy.fleet.redis import QUICK, Redis
from dioproxy.fleet.values import SharedValues
from tests import redisserver
from tests.harness import Proxy, eventually, start_upstream
from tests.seaweed import free_ports
from tests.test_budget import announced
from tests.test_logins import basic, write_htpasswd

SECRET = "a shared random string for the tests"
SLACK = 0.5  # how late a deadline may fire on a loaded 2-core machine (as in test_fleet_redis)


def client_address() -> str:
    """An address no other test used (keys in the shared Redis outlive a test)."""
    return f"2001:db8::{random.getrandbits(16):x}:{random.getrandbits(16):x}:{time.monotonic_ns() % 65536:x}"


def replica(testcase, redis, upstream, **config) -> Proxy:
    port = free_ports(1)[0]
    coordination = {"redis": redis.url, "secret": SECRET, "advertise": f"http://127.0.0.1:{port}"}
    return Proxy(testcase, upstream.registry_url, port=port, coordination=coordination, **config)


def checks(proxy: Proxy, where: str) -> float:
    value = proxy.mirror.metrics.registry.get_sample_value("dioproxy_fleet_rate_checks_total", {"where": where})
    return value or 0


@defer.inlineCallbacks
def ask(proxy: Proxy, path: str, client: str, **headers):
    """(status, seconds) of one GET from ``client`` (behind the trusted proxy 127.0.0.1)."""
    began = time.monotonic()
    response = yield proxy.get(path, headers={"X-Forwarded-For": [client], **headers})
    yield response.content()
    return response.code, time.monotonic() - began


RATE = {"rate": 0.1, "burst": 4, "trusted_proxies": ["127.0.0.1"]}  # one request more every 10 s: none in a test


class FleetRateTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = yield redisserver.shared("fleet")
        self.fake = start_upstream(self)
        self.replicas = [replica(self, self.redis, self.fake, rate_limit=RATE) for _ in range(2)]

    @defer.inlineCallbacks
    def test_a_client_alternating_between_replicas_gets_the_rate_once(self):
        client, codes = client_address(), []
        for i in range(10):
            code, _ = yield ask(self.replicas[i % 2], "/v2/", client)
            codes.append(code)
        self.assertEqual(codes, [200] * 4 + [429] * 6, "each replica gave the client its own burst")
        response = yield self.replicas[0].get("/v2/", headers={"X-Forwarded-For": [client]})
        yield response.content()
        self.assertTrue(9 <= int(response.headers.getRawHeaders("Retry-After")[0]) <= 10)
        code, _ = yield ask(self.replicas[1], "/v2/", client_address())
        self.assertEqual(code, 200, "another client has a bucket of its own")
        self.assertEqual([checks(p, "fleet") for p in self.replicas], [6, 6])
        self.assertEqual([checks(p, "local") for p in self.replicas], [0, 0])

    @defer.inlineCallbacks
    def test_failed_logins_count_for_the_fleet(self):
        htpasswd = write_htpasswd(self, 4)
        config = {"auth": {"htpasswd": htpasswd}, "rate_limit": {"trusted_proxies": ["127.0.0.1"]}}
        replicas = [replica(self, self.redis, self.fake, **config) for _ in range(2)]
        client, wrong = client_address(), basic("alice", "guess")
        limit = LoginThrottle().limit
        codes = []
        for i in range(limit + 2):
            code, _ = yield ask(replicas[i % 2], "/v2/", client, **wrong)
            codes.append(code)
        self.assertEqual(codes, [401] * limit + [429] * 2, "each replica counted only its own failed logins")
        code, _ = yield ask(replicas[1], "/v2/", client_address(), **basic("alice", "wonderland"))
        self.assertEqual(code, 200)


class FleetRateOutageTests(unittest.TestCase):
    """Redis stopped or stalled under the rate limit: each replica limits on its own, and nobody waits for Redis."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = yield redisserver.shared("limits")
        self.fake = start_upstream(self)
        self.replicas = [replica(self, self.redis, self.fake, rate_limit=RATE) for _ in range(2)]

    @defer.inlineCallbacks
    def test_redis_stopped_each_replica_limits_on_its_own(self):
        yield threads.deferToThread(self.redis.stop)
        try:
            client, answers = client_address(), []
            for i in range(10):
                answers.append((yield ask(self.replicas[i % 2], "/v2/", client)))
        finally:
            yield threads.deferToThread(self.redis.start)
        codes = [code for code, _ in answers]
        self.assertEqual(codes, [200] * 8 + [429] * 2, "not limited by each replica's own bucket")
        self.assertLess(max(s for _, s in answers), QUICK + SLACK, "a request waited for Redis")
        self.assertEqual([checks(p, "local") for p in self.replicas], [5, 5])

    @defer.inlineCallbacks
    def test_redis_stalled_a_request_waits_at_most_the_quick_deadline(self):
        yield threads.deferToThread(self.redis.pause)
        try:
            client, answers = client_address(), []
            for i in range(6):
                answers.append((yield ask(self.replicas[i % 2], "/v2/", client)))
        finally:
            yield threads.deferToThread(self.redis.resume)
        print(f"\n    stalled Redis: answers took {', '.join(f'{s:.3f}' for _, s in answers)} s", file=sys.stderr)
        self.assertEqual([code for code, _ in answers], [200] * 6)
        self.assertLess(max(s for _, s in answers), QUICK + SLACK, "a request waited past the quick deadline")
        self.assertGreaterEqual(answers[0][1], QUICK * 0.9, "the first request did not ask Redis")
        self.assertLess(max(s for _, s in answers[2:]), 0.1, "once Redis missed a deadline, each request waited")


class FleetBudgetTests(unittest.TestCase):
    """The single-replica budget's behaviour (tests/test_budget.py), with the word heard by another replica."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = yield redisserver.shared("fleet")
        self.fake = start_upstream(self, ratelimit=10)
        self.name = f"library/b{time.monotonic_ns()}"
        self.image = self.fake.add_image(self.name, "1.0", layer_sizes=[100])
        budget = {"reserve": "20%", "wait": "5s"}
        self.replicas = [replica(self, self.redis, self.fake, pull_budget=budget) for _ in range(2)]

    def manifest_gets(self):
        return len([r for r in self.fake.find("registry", "GET", "/manifests/") if r.status != 401])

    @defer.inlineCallbacks
    def fetch(self, proxy, path):
        response = yield proxy.get(path)
        return response, (yield response.content())

    @defer.inlineCallbacks
    def test_a_budget_one_replica_saw_used_up_holds_the_other(self):
        first, second = self.replicas
        for proxy in self.replicas:
            response, body = yield self.fetch(proxy, f"/v2/{self.name}/manifests/1.0")
            self.assertEqual(body, self.image.body)
            proxy.mirror.manifests.tag_ttl = 0
        self.fake.add_image(self.name, "1.0", layer_sizes=[10])  # moved: would cost a GET
        cold = [f"{self.name}-cold{i}" for i in range(2)]
        for name in cold:
            self.fake.add_image(name, "1", layer_sizes=[10])
        self.fake.ratelimit_remaining = 0
        self.fake.ratelimit_retry_after = 120
        self.fake.clear_requests()

        response, _ = yield self.fetch(first, f"/v2/{cold[0]}/manifests/1")  # the GET that learns it
        self.assertEqual((response.code, self.manifest_gets()), (429, 1))
        shared = SharedValues(first.mirror.redis, "budget")

        @defer.inlineCallbacks
        def said_gone():
            said = yield defer.ensureDeferred(shared.get("docker.io/anonymous"))
            return said is not None and said["remaining"] == 0

        yield eventually(said_gone, why="the used-up budget shared")

        response, body = yield self.fetch(second, f"/v2/{cold[1]}/manifests/1")
        self.assertEqual(response.code, 429)
        self.assertEqual(self.manifest_gets(), 1, "the other replica sent a GET into a budget the fleet knew was gone")
        self.assertEqual(self.fake.count("registry", "HEAD", f"{cold[1]}/manifests/"), 1, "one free HEAD probe")
        self.assertEqual(json.loads(body)["errors"][0]["code"], "TOOMANYREQUESTS")
        self.assertTrue(100 <= int(response.headers.getRawHeaders("Retry-After")[0]) <= 120)

        response, body = yield self.fetch(second, f"/v2/{self.name}/manifests/1.0")
        self.assertEqual((response.code, body), (200, self.image.body), "a cached tag is still served")
        self.assertEqual(response.headers.getRawHeaders("Warning"), ['110 - "Response is Stale"'])
        self.assertEqual(self.manifest_gets(), 1)


class FleetInflightTests(unittest.TestCase):
    """GETs under way on one replica count on the others (PullBudget objects on one Redis, no HTTP)."""

    @defer.inlineCallbacks
    def setUp(self):
        self.server = yield redisserver.shared("fleet")
        prefix = f"t:{time.time_ns()}:"
        self.budgets = [self.budget(Redis.from_url(self.server.url, reactor), prefix) for _ in range(2)]

    def budget(self, redis: Redis, prefix: str = "t:") -> PullBudget:
        self.addCleanup(lambda: defer.ensureDeferred(redis.close()))
        budget = PullBudget(reactor, time.time, reserve=20.0)
        budget.fleet = FleetBudget(redis, prefix)
        return budget

    async def nothing(self) -> None:
        pass

    @defer.inlineCallbacks
    def test_a_get_in_flight_on_one_replica_makes_the_budget_low_on_the_other(self):
        first, second = self.budgets
        mine, theirs = first.of("docker.io", "anonymous"), second.of("docker.io", "anonymous")
        first.observe(mine, 200, announced(3, limit=10))  # low at 2 or fewer left
        answered = defer.Deferred()

        async def get() -> None:
            async with first.spending(mine, self.nothing):
                await answered

        under_way = defer.ensureDeferred(get())
        # Its count reaches Redis just after the GET is counted here: wait for it (the assertion is the timeout).
        yield eventually(lambda: defer.ensureDeferred(second.holding(theirs)), timeout=5, why="the GET counted")
        self.assertEqual(theirs.left(time.time()), 2, "the other replica's GET was not counted")
        answered.callback(None)
        yield under_way
        yield eventually(lambda: defer.ensureDeferred(second.holding(theirs)).addCallback(lambda held: not held))
        self.assertEqual(theirs.left(time.time()), 3)

    @defer.inlineCallbacks
    def test_the_newest_announcement_wins_whatever_order_the_writes_arrive_in(self):
        values = SharedValues(self.budgets[0].fleet.redis, "budget", f"t:{time.time_ns()}:")
        wrote = yield defer.ensureDeferred(values.set_newer("k", {"seen": 20.5, "remaining": 3}, 60, "seen"))
        late = yield defer.ensureDeferred(values.set_newer("k", {"seen": 20.0, "remaining": 9}, 60, "seen"))
        self.assertEqual((wrote, late), (True, False))
        self.assertEqual((yield defer.ensureDeferred(values.get("k")))["remaining"], 3)
        yield defer.ensureDeferred(values.set_newer("k", {"seen": 21.0, "remaining": 2}, 60, "seen"))
        self.assertEqual((yield defer.ensureDeferred(values.get("k")))["remaining"], 2)

    @defer.inlineCallbacks
    def test_redis_unreachable_each_budget_goes_by_its_own_word(self):
        lone = self.budget(Redis.from_url(f"redis://127.0.0.1:{free_ports(1)[0]}/0", reactor))
        allowance = lone.of("docker.io", "anonymous")
        lone.observe(allowance, 200, announced(5, limit=10))
        allowance.elsewhere = 4  # what an earlier look said
        began = time.monotonic()
        self.assertFalse((yield defer.ensureDeferred(lone.holding(allowance))))

        async def spend() -> None:
            async with lone.spending(allowance, self.nothing):
                self.assertEqual(allowance.left(time.time()), 4)

        yield defer.ensureDeferred(spend())
        self.assertLess(time.monotonic() - began, QUICK + SLACK)
        self.assertEqual((allowance.elsewhere, allowance.inflight), (0, 0))
