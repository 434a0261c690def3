"""Replicas on one Redis (``coordination``): one upstream fetch per blob for all of them (dioproxy/fleet/fills.py).

Mirrors with their own cache directories and a real ``redis-server``; in the owner-dies test the replica that owns
the fill is a real process, SIGKILLed mid-body.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time

import treq
import yaml
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from dioproxy import __version__
from dioproxy.fleet import presence
from dioproxy.fleet.tags import FleetTags
from tests import redisserver
from tests.harness import Proxy, ProxyProcess, eventually, start_upstream
from tests.seaweed import free_ports
from tests.test_logins import basic, write_htpasswd

MB = 1024 * 1024
SECRET = "a shared random string for the tests"


def claims(proxy: Proxy, outcome: str) -> float:
    """What the replica's /metrics says its lease requests answered."""
    value = proxy.mirror.metrics.registry.get_sample_value("dioproxy_fleet_claims_total", {"outcome": outcome})
    return value or 0


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FleetTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = yield redisserver.shared("fleet")
        self.fake = start_upstream(self)
        self.data = os.urandom(8 * MB + 3)  # a fresh digest: no lease of an earlier test applies
        self.digest = self.fake.add_blob(self.data)
        self.path = f"/v2/library/x/blobs/{self.digest}"

    def coordination(self, port: int) -> dict:
        return {"redis": self.redis.url, "secret": SECRET, "advertise": f"http://127.0.0.1:{port}"}

    def replica(self) -> Proxy:
        port = free_ports(1)[0]
        return Proxy(self, self.fake.registry_url, port=port, coordination=self.coordination(port))

    @defer.inlineCallbacks
    def fetch(self, url: str):
        """(status, body, seconds to the first body byte, seconds in all)."""
        began = reactor.seconds()
        response = yield treq.get(url + self.path, unbuffered=True, persistent=False)
        chunks, first = [], []

        def got(chunk: bytes) -> None:
            first or first.append(reactor.seconds() - began)
            chunks.append(chunk)

        yield treq.collect(response, got)
        return response.code, b"".join(chunks), first[0] if first else None, reactor.seconds() - began

    @defer.inlineCallbacks
    def test_sixteen_clients_over_three_replicas_make_one_upstream_get(self):
        replicas = [self.replica() for _ in range(3)]
        self.fake.slow(8 * MB)  # about a second
        results = yield defer.gatherResults([self.fetch(replicas[i % 3].url) for i in range(16)])
        self.assertEqual([(code, sha(body)) for code, body, _, _ in results], [(200, self.digest)] * 16)
        self.assertEqual(self.fake.count("cdn", "GET", self.digest), 1, "a replica fetched the blob again")
        took = min(total for _, _, _, total in results)
        self.assertLess(max(first for _, _, first, _ in results), took / 2, "a client waited for the whole fill")
        for proxy in replicas:  # each replica kept what passed in its own hot tier
            with open(proxy.blob_file(self.digest), "rb") as f:
                self.assertEqual(sha(f.read()), self.digest)
        owners = sum(claims(p, "owner") for p in replicas)
        self.assertEqual((owners, sum(claims(p, "follower") for p in replicas) >= 2), (1, True))

    @defer.inlineCallbacks
    def test_redis_down_each_replica_fetches_alone(self):
        replicas = [self.replica() for _ in range(2)]
        yield threads.deferToThread(self.redis.stop)
        try:
            began = time.monotonic()
            results = yield defer.gatherResults([self.fetch(p.url) for p in replicas])
            self.assertLess(time.monotonic() - began, 10, "a client waited for Redis")
        finally:
            yield threads.deferToThread(self.redis.start)
        self.assertEqual([(code, sha(body)) for code, body, _, _ in results], [(200, self.digest)] * 2)
        self.assertEqual([claims(p, "alone") for p in replicas], [1, 1])

    @defer.inlineCallbacks
    def test_a_bad_signature_is_refused(self):
        proxy = self.replica()
        response = yield proxy.get(self.path, headers={"X-Dioproxy-Peer": [f"{int(time.time())}.00"]})
        self.assertEqual(response.code, 403)
        self.assertEqual(self.fake.count("cdn", "GET", self.digest), 0)

    @defer.inlineCallbacks
    def test_the_followers_clients_finish_when_the_owner_is_killed(self):
        port = free_ports(1)[0]
        config = os.path.abspath(self.mktemp())
        with open(config, "w") as f:
            yaml.safe_dump({"coordination": self.coordination(port)}, f)
        owner = ProxyProcess(
            self, os.path.abspath(self.mktemp()), self.fake.registry_url, "--config", config, port=port
        )
        yield owner.listening()
        self.fake.slow(4 * MB)  # two seconds
        starter = self.fetch(f"http://127.0.0.1:{port}")
        starter.addErrback(lambda _: None)  # its connection dies with the owner
        yield self.fake.wait_for_requests(1, "cdn", "GET", self.digest, timeout=20)
        followers = [self.replica() for _ in range(2)]
        pending = [self.fetch(p.url) for p in followers for _ in range(3)]
        yield task.deferLater(reactor, 0.7, lambda: None)  # mid-body
        os.kill(owner.pid, signal.SIGKILL)
        results = yield defer.gatherResults(pending)
        self.assertEqual([(code, sha(body)) for code, body, _, _ in results], [(200, self.digest)] * 6)
        gets = self.fake.find("cdn", "GET", self.digest)
        self.assertLessEqual(len(gets), 2, "more than one more upstream GET after the owner died")
        self.assertTrue(all(r.headers.get("range") for r in gets[1:]), "the rest was not asked for with Range")


class FleetPrivateTests(unittest.TestCase):
    """Credentialed content streamed between replicas stays with the repositories the upstream lets read it."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = yield redisserver.shared("fleet")
        self.ghcr = start_upstream(self, users={"bot": "pat"}, private=["acme/private"])
        self.ghcr.strict_repos = True
        self.secret = self.ghcr.add_image("acme/private", "1.0", layer_sizes=[4 * MB])
        self.layer = self.secret.layer_digests[0]
        self.ghcr.add_image("attacker/x", "1.0", layer_sizes=[10])

    def replica(self) -> Proxy:
        port = free_ports(1)[0]
        coordination = {"redis": self.redis.url, "secret": SECRET, "advertise": f"http://127.0.0.1:{port}"}
        upstream = {"url": self.ghcr.registry_url, "username": "bot", "password": "pat"}
        return Proxy(
            self, self.ghcr.registry_url, port=port, coordination=coordination, upstreams={"ghcr.io": upstream}
        )

    @defer.inlineCallbacks
    def test_another_repository_is_not_served_a_private_fill_from_a_peer(self):
        owner, other = self.replica(), self.replica()
        gate = self.ghcr.gate_blob(self.layer)
        self.addCleanup(lambda: gate.called or gate.callback(None))
        rightful = owner.get(f"/v2/ghcr.io/acme/private/blobs/{self.layer}")
        yield self.ghcr.wait_for_requests(1, "cdn", "GET", self.layer)
        attacker = other.get(f"/v2/ghcr.io/attacker/x/blobs/{self.layer}")
        yield self.ghcr.wait_for_requests(1, "registry", "HEAD", f"attacker/x/blobs/{self.layer}", timeout=10)
        gate.callback(None)
        response = yield attacker
        yield response.content()
        self.assertEqual(response.code, 404, "a peer served credentialed content to another repository")
        response = yield rightful
        self.assertEqual(((yield response.content()) == self.secret.layers[0], response.code), (True, 200))
        self.assertIsNone(other.mirror.storage.blob_size(self.layer), "the other replica stored it")


class FleetTagTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = yield redisserver.shared("fleet")
        self.fake = start_upstream(self)
        self.name = f"library/t{time.monotonic_ns()}"  # a tag no earlier test shared
        self.image = self.fake.add_image(self.name, "1.0", layer_sizes=[1000])

    def replica(self) -> Proxy:
        port = free_ports(1)[0]
        coordination = {"redis": self.redis.url, "secret": SECRET, "advertise": f"http://127.0.0.1:{port}"}
        return Proxy(self, self.fake.registry_url, port=port, coordination=coordination)

    @defer.inlineCallbacks
    def test_a_tag_checked_by_one_replica_is_fresh_for_the_others(self):
        first, second = self.replica(), self.replica()
        path = f"/v2/{self.name}/manifests/1.0"
        response = yield first.get(path)
        self.assertEqual(sha((yield response.content())), self.image.digest)
        tags = FleetTags(first.mirror.fleet.redis)
        yield eventually(lambda: defer.ensureDeferred(tags.get("docker.io", self.name, "1.0")), why="entry shared")
        self.fake.clear_requests()
        response = yield second.get(path)
        self.assertEqual(sha((yield response.content())), self.image.digest)
        answered = [
            r for r in self.fake.find("registry", None, "/manifests/") if r.status != 401
        ]  # not the token dance
        asked = [(r.method, r.path.rsplit("/", 1)[-1]) for r in answered]
        self.assertEqual(asked, [("GET", self.image.digest)], "the second replica checked the tag again")


class FleetLoginTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.redis = yield redisserver.shared("fleet")
        self.fake = start_upstream(self)
        self.fake.add_image("library/hello", "1.0", layer_sizes=[100])

    @defer.inlineCallbacks
    def test_a_login_on_one_replica_holds_on_the_others(self):
        htpasswd = write_htpasswd(self, 4)
        replicas = []
        for _ in range(2):
            port = free_ports(1)[0]
            coordination = {"redis": self.redis.url, "secret": SECRET, "advertise": f"http://127.0.0.1:{port}"}
            replicas.append(
                Proxy(self, self.fake.registry_url, port=port, coordination=coordination, auth={"htpasswd": htpasswd})
            )
        response = yield replicas[0].get(
            "/token?scope=repository:library/hello:pull", headers=basic("alice", "wonderland")
        )
        token = (yield response.json())["token"]
        response = yield replicas[1].get(
            "/v2/library/hello/manifests/1.0", headers={"Authorization": [f"Bearer {token}"]}
        )
        yield response.content()
        self.assertEqual(response.code, 200, "the other replica refused a token its sibling issued")


class FleetStatusTests(unittest.TestCase):
    """The status page lists the replicas Redis has seen (dioproxy/fleet/presence.py), and renders with Redis down."""

    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = yield redisserver.shared("fleet-status")  # its own: only this test's replicas heartbeat there
        self.fake = start_upstream(self)

    def replica(self) -> Proxy:
        port = free_ports(1)[0]
        coordination = {"redis": self.redis.url, "secret": SECRET, "advertise": f"http://127.0.0.1:{port}"}
        return Proxy(self, self.fake.registry_url, port=port, coordination=coordination)

    @defer.inlineCallbacks
    def page(self, proxy: Proxy, accept: str = "application/json"):
        began = reactor.seconds()
        response = yield proxy.get("/", headers={"Accept": [accept]})
        body = yield response.content()
        self.assertEqual(response.code, 200)
        self.assertLess(reactor.seconds() - began, 1.0, "the page waited for Redis")
        return json.loads(body) if accept == "application/json" else body.decode()

    @defer.inlineCallbacks
    def listed(self, proxy: Proxy):
        data = yield self.page(proxy)
        return [row["url"] for row in data["fleet"]["replicas"]]

    @defer.inlineCallbacks
    def test_the_page_lists_both_replicas_and_survives_redis_down(self):
        replicas = [self.replica() for _ in range(2)]
        urls = sorted(p.url for p in replicas)
        for proxy in replicas:
            yield eventually(
                lambda proxy=proxy: self.listed(proxy).addCallback(lambda got: got == urls), timeout=15, why="both"
            )
        data = yield self.page(replicas[0])
        fleet = data["fleet"]
        self.assertEqual((fleet["redis"], fleet["me"]), ("up", replicas[0].url))
        for row, proxy in zip(fleet["replicas"], sorted(replicas, key=lambda p: p.url)):
            self.assertEqual((row["versions"], row["fills"], row["workers"]), ([__version__], 0, 1))
            self.assertAlmostEqual(row["started"], proxy.mirror.presence.started, delta=0.01)
            self.assertLess(data["now"] - row["last_seen"], presence.TTL)
        page = yield self.page(replicas[1], "text/html")
        self.assertIn("2 replicas seen in the last 15 s", page)
        for url in urls:
            self.assertIn(f"<code>{url}</code>", page)

        yield threads.deferToThread(self.redis.stop)
        try:
            for proxy in replicas:
                yield eventually(
                    lambda proxy=proxy: self.page(proxy).addCallback(lambda d: d["fleet"]["redis"] == "down"),
                    timeout=15,
                    why="Redis seen down",
                )
            data = yield self.page(replicas[0])
            self.assertEqual(data["fleet"]["replicas"], [])
            self.assertIn("Redis", data["fleet"]["error"])
            page = yield self.page(replicas[0], "text/html")
            self.assertIn("coordination unreachable", page)
            self.assertIn("Traffic", page, "the rest of the page is there")
        finally:
            yield threads.deferToThread(self.redis.start)
        for proxy in replicas:  # back (empty: every replica heartbeats again)
            yield eventually(
                lambda proxy=proxy: self.listed(proxy).addCallback(lambda got: got == urls), timeout=20, why="back"
            )

    def test_workers_of_one_replica_are_one_row(self):
        members = [
            {"url": "http://b", "version": "1", "started": 20.0, "fills": 2, "last_seen": 5.0},
            {"url": "http://a", "version": "1", "started": 30.0, "fills": 0, "last_seen": 7.0},
            {"url": "http://b", "version": "2", "started": 10.0, "fills": 1, "last_seen": 9.0},
        ]
        rows = presence._replicas(members)
        self.assertEqual([r["url"] for r in rows], ["http://a", "http://b"])
        self.assertEqual(
            {k: rows[1][k] for k in ("versions", "started", "fills", "workers", "last_seen")},
            {"versions": ["1", "2"], "started": 10.0, "fills": 3, "workers": 2, "last_seen": 9.0},
        )
