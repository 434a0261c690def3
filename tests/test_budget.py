"""The pull budget against the fake Docker Hub with a small limit: low keeps cached tags, gone fetches nothing blind.

Docker Hub counts manifest GETs (10 an hour anonymously, 100 with a free account); the fake counts them the same
way, per account, and says what is left on every manifest answer.
"""

import json
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from dioproxy.budget import Allowance, parse_announcement
from dioproxy.config import build_config
from tests.harness import Proxy, start_upstream
from tests.test_ops_metrics import value

JSON = {"Accept": ["application/json"]}


def announced(remaining: int, limit: int = 10, window: int = 3600, **extra: str) -> Headers:
    headers = {"ratelimit-remaining": [f"{remaining};w={window}"], "ratelimit-limit": [f"{limit};w={window}"]}
    headers.update({k: [v] for k, v in extra.items()})
    return Headers(headers)


class AllowanceTests(unittest.TestCase):
    def test_announcement(self):
        self.assertEqual(parse_announcement("98;w=21600"), (98, 21600.0))
        self.assertEqual(parse_announcement("0"), (0, None))
        self.assertEqual(parse_announcement(None), (None, None))
        self.assertEqual(parse_announcement("many"), (None, None))

    def test_in_flight_gets_count_and_old_word_expires(self):
        a = Allowance("docker.io", "anonymous")
        self.assertIsNone(a.left(0), "nothing said yet")
        self.assertFalse(a.observe(200, announced(3), now=100))
        a.inflight = 2
        self.assertEqual(a.left(100), 1)
        self.assertIsNone(a.left(100 + 3601), "an announcement older than its window says nothing")

    def test_a_429_runs_out_until_its_retry_after(self):
        a = Allowance("docker.io", "anonymous")
        self.assertTrue(a.observe(429, announced(0, **{"Retry-After": "30"}), now=100))
        self.assertFalse(a.observe(429, announced(0), now=101), "said once per exhaustion")
        self.assertEqual(a.left(110), 0)
        self.assertEqual(a.retry_in(110), 20)
        self.assertIsNone(a.left(130), "past the upstream's reset: ask again")

    def test_another_replicas_word_counts_only_when_newer(self):
        a, other = Allowance("docker.io", "anonymous"), Allowance("docker.io", "anonymous")
        a.observe(200, announced(7), now=100)
        other.observe(429, announced(0, **{"Retry-After": "30"}), now=90)
        self.assertFalse(a.adopt(other.said()), "an older announcement replaced ours")
        self.assertEqual(a.left(100), 7)
        other.observe(429, announced(0, **{"Retry-After": "30"}), now=110)
        self.assertTrue(a.adopt(other.said()))
        self.assertEqual((a.left(110), a.retry_in(110)), (0, 30))
        for junk in (None, "gone", {"remaining": "0", "seen": 200}, {**other.said(), "seen": None}):
            self.assertFalse(a.adopt(junk), junk)

    def test_retry_estimate_without_retry_after(self):
        a = Allowance("docker.io", "anonymous")
        a.observe(200, announced(0, limit=10, window=3600), now=0)
        self.assertEqual(a.retry_in(0), 360, "a sliding window frees one pull every window/limit")


class ConfigTests(unittest.TestCase):
    def test_keys(self):
        config = build_config({"pull_budget": {"reserve": "35%", "wait": "2s"}})
        self.assertEqual((config.pull_reserve, config.pull_wait), (35.0, 2.0))
        self.assertEqual(build_config({"pull_budget": {"reserve": 10}}).pull_reserve, 10.0)
        for bad, where in (
            ({"reserve": "lots"}, "pull_budget.reserve"),
            ({"reserve": "120%"}, "pull_budget.reserve"),
            ({"reserve": True}, "pull_budget.reserve"),
            ({"wait": "soon"}, "pull_budget.wait"),
            ({"spend": 1}, "pull_budget.spend"),
        ):
            with self.assertRaises(ValueError) as caught:
                build_config({"pull_budget": bad})
            self.assertIn(where, str(caught.exception))


class BudgetTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self, ratelimit=10)
        self.proxy = Proxy(self, self.fake.registry_url, pull_budget={"reserve": "20%", "wait": "5s"})
        self.image = self.fake.add_image("library/hello", "1.0", layer_sizes=[100])

    def manifest_gets(self):
        """Manifest GETs past the auth challenge: the ones Docker Hub counts (or refuses with 429)."""
        return len([r for r in self.fake.find("registry", "GET", "/manifests/") if r.status != 401])

    @defer.inlineCallbacks
    def fetch(self, path):
        response = yield self.proxy.get(path)
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def metrics(self):
        response = yield self.proxy.get("/metrics")
        return (yield response.text())

    @defer.inlineCallbacks
    def test_low_budget_keeps_a_moved_tag_and_spends_on_what_the_cache_lacks(self):
        response, body = yield self.fetch("/v2/library/hello/manifests/1.0")
        self.assertEqual(body, self.image.body)
        moved = self.fake.add_image("library/hello", "1.0", layer_sizes=[10])
        other = self.fake.add_image("library/other", "1", layer_sizes=[10])
        self.proxy.mirror.manifests.tag_ttl = 0
        self.fake.ratelimit_remaining = 2  # others behind the same address spent the rest: 20% of 10 left
        self.fake.clear_requests()

        response, body = yield self.fetch("/v2/library/hello/manifests/1.0")
        self.assertEqual(body, self.image.body, "a low budget was spent on a tag the cache can answer")
        self.assertEqual(response.headers.getRawHeaders("Warning"), ['110 - "Response is Stale"'])
        self.assertEqual(self.manifest_gets(), 0)
        self.assertEqual(self.fake.count("registry", "HEAD", "/manifests/1.0"), 1, "the free HEAD still asks")

        response, body = yield self.fetch("/v2/library/other/manifests/1")
        self.assertEqual((response.code, body), (200, other.body), "the reserve is for images the cache lacks")
        self.assertEqual(self.manifest_gets(), 1)

        self.fake.ratelimit_remaining = 10  # the window moved on: the next HEAD says so
        response, body = yield self.fetch("/v2/library/hello/manifests/1.0")
        self.assertEqual(body, moved.body)
        self.assertIsNone(response.headers.getRawHeaders("Warning"))
        text = yield self.metrics()
        self.assertEqual(value(text, "dioproxy_pull_budget_actions_total", account="anonymous", action="held"), 1)
        self.assertEqual(value(text, "dioproxy_stale_answers_total", reason="budget"), 1)
        self.assertEqual(value(text, "dioproxy_upstream_ratelimit_remaining", account="anonymous"), 9)

    @defer.inlineCallbacks
    def test_used_up_budget_refuses_with_the_reset_and_sends_no_more_gets(self):
        yield self.fetch("/v2/library/hello/manifests/1.0")
        self.proxy.mirror.manifests.tag_ttl = 0
        self.fake.add_image("library/hello", "1.0", layer_sizes=[10])  # moved: would cost a GET
        cold = [self.fake.add_image(f"library/cold{i}", "1", layer_sizes=[10]) for i in range(4)]
        self.fake.ratelimit_remaining = 0
        self.fake.ratelimit_retry_after = 120
        self.fake.clear_requests()

        response, body = yield self.fetch("/v2/library/cold0/manifests/1")  # the one GET that learns it
        self.assertEqual(response.code, 429)
        self.assertEqual(self.manifest_gets(), 1)
        for i in range(1, 4):
            response, body = yield self.fetch(f"/v2/library/cold{i}/manifests/1")
            self.assertEqual(response.code, 429)
            error = json.loads(body)["errors"][0]
            self.assertEqual(error["code"], "TOOMANYREQUESTS")
            self.assertIn("anonymous", error["message"])
            self.assertIn("configure credentials", error["message"])
            retry = int(response.headers.getRawHeaders("Retry-After")[0])
            self.assertTrue(100 <= retry <= 120, retry)
        self.assertEqual(self.manifest_gets(), 1, "GETs were sent into a used-up budget")
        self.assertEqual(self.fake.count("registry", "HEAD", "/manifests/"), 3, "one free HEAD probe each")

        response, body = yield self.fetch("/v2/library/hello/manifests/1.0")
        self.assertEqual((response.code, body), (200, self.image.body), "a cached tag is still served")
        self.assertEqual(self.manifest_gets(), 1)
        response, body = yield self.fetch(f"/v2/library/hello/blobs/{self.image.layer_digests[0]}")
        self.assertEqual(response.code, 200, "blobs do not count against the limit")

        status = yield (yield self.proxy.get("/", headers=JSON)).json()
        [hub] = [u for u in status["upstreams"] if u["registry"] == "docker.io"]
        self.assertEqual((hub["ratelimit"]["state"], hub["ratelimit"]["remaining"]), ("gone", 0))
        self.assertGreater(hub["ratelimit"]["retry_in"], 60)
        page = yield (yield self.proxy.get("/")).text()
        self.assertIn("used up: back in", page)
        text = yield self.metrics()
        self.assertEqual(value(text, "dioproxy_pull_budget_actions_total", action="refused"), 3)
        self.assertEqual(value(text, "dioproxy_upstream_ratelimit_remaining", registry="docker.io"), 0)

        self.fake.ratelimit_remaining = 10  # reset: the next probe sees it
        response, body = yield self.fetch("/v2/library/cold1/manifests/1")
        self.assertEqual((response.code, body), (200, cold[1].body))

    @defer.inlineCallbacks
    def test_a_reset_within_the_wait_is_waited_for(self):
        cold = self.fake.add_image("library/cold", "1", layer_sizes=[10])
        self.fake.ratelimit_remaining = 0
        self.fake.ratelimit_retry_after = 1
        response, _ = yield self.fetch("/v2/library/hello/manifests/1.0")
        self.assertEqual(response.code, 429)

        def reset():
            self.fake.ratelimit_remaining = 10

        reactor.callLater(0.5, reset)
        started = time.monotonic()
        response, body = yield self.fetch("/v2/library/cold/manifests/1")
        self.assertEqual((response.code, body), (200, cold.body))
        self.assertGreater(time.monotonic() - started, 0.4, "it cannot have had the budget before the reset")
        text = yield self.metrics()
        self.assertEqual(value(text, "dioproxy_pull_budget_actions_total", action="waited"), 1)

    @defer.inlineCallbacks
    def test_identical_requests_spend_one_pull(self):
        self.fake.ratelimit_remaining = 1
        responses = yield defer.gatherResults([self.fetch("/v2/library/hello/manifests/1.0") for _ in range(10)])
        self.assertEqual({(r.code, b) for r, b in responses}, {(200, self.image.body)})
        self.assertEqual(self.manifest_gets(), 1)
        self.assertEqual(self.fake.ratelimit_remaining, 0)


class AccountTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_each_account_has_its_own_budget(self):
        fake = start_upstream(self, ratelimit=10, account_ratelimit=100, users={"alice": "s3cret"})
        image = fake.add_image("library/hello", "1.0", layer_sizes=[10])
        fake.ratelimit_remaining = 0  # the address's anonymous pulls are used up
        upstream = {"url": fake.registry_url, "username": "alice", "password": "s3cret"}
        proxy = Proxy(self, fake.registry_url, upstreams={"docker.io": upstream})
        response = yield proxy.get("/v2/library/hello/manifests/1.0")
        self.assertEqual((response.code, (yield response.content())), (200, image.body))
        self.assertEqual(fake.ratelimit_left("alice"), 99)
        text = yield (yield proxy.get("/metrics")).text()
        self.assertEqual(value(text, "dioproxy_upstream_ratelimit_remaining", account="alice"), 99)
        self.assertEqual(value(text, "dioproxy_upstream_ratelimit_limit", account="alice"), 100)
        status = yield (yield proxy.get("/", headers=JSON)).json()
        [hub] = [u for u in status["upstreams"] if u["registry"] == "docker.io"]
        self.assertEqual((hub["ratelimit"]["account"], hub["ratelimit"]["state"]), ("alice", "plenty"))

        # Signed out by a reload: the address's anonymous budget is another one, and it is used up.
        other = fake.add_image("library/other", "1", layer_sizes=[10])
        proxy.mirror.apply(build_config(None, [f"docker.io={fake.registry_url}"], proxy.cache_dir))
        response = yield proxy.get("/v2/library/other/manifests/1")
        self.assertEqual(response.code, 429)
        self.assertIn("anonymous", (yield response.json())["errors"][0]["message"])
        self.assertEqual(fake.ratelimit_left("alice"), 99)
        self.assertNotEqual(other.digest, image.digest)
