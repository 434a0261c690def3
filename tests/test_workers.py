"""``--workers 2``: a real supervisor and two worker processes on one port and one cache directory."""

from __future__ import annotations

import hashlib
import os
import re
import signal

import treq
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from dioproxy.storage.partial import read_info
from tests.harness import ProxyProcess, eventually, start_upstream

MB = 1024 * 1024
CLIENTS = 16


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class WorkersTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = start_upstream(self)
        self.cache = os.path.abspath(self.mktemp())
        self.data = os.urandom(8 * MB + 11)
        self.digest = self.fake.add_blob(self.data)
        self.path = f"/v2/library/x/blobs/{self.digest}"
        self.config = os.path.abspath(self.mktemp())
        with open(self.config, "w") as f:
            f.write("cache:\n  tag_ttl: 300\n")
        self.proxy = ProxyProcess(self, self.cache, self.fake.registry_url, "--workers", "2", "--config", self.config)
        self.url = f"http://127.0.0.1:{self.proxy.port}"
        yield self.proxy.listening()
        yield eventually(lambda: len(self.workers_up()) == 2, timeout=30, why="two workers listening")
        self.client = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    def log(self) -> str:
        with open(self.proxy.log_path, errors="replace") as f:
            return f.read()

    def workers_up(self) -> set[str]:
        return set(re.findall(r"\[worker (\d+)\].*MirrorSite starting", self.log()))

    def served_by(self) -> dict[str, int]:
        """Blob GETs answered 200 in each worker's access log."""
        counts: dict[str, int] = {}
        for worker in re.findall(rf"\[worker (\d+)\].*GET {re.escape(self.path)} 200 ", self.log()):
            counts[worker] = counts.get(worker, 0) + 1
        return counts

    @defer.inlineCallbacks
    def fetch(self):
        response = yield self.client.get(self.url + self.path)
        body = yield response.content()
        return response.code, body

    def owner_pid(self) -> int | None:
        info = read_info(os.path.join(self.cache, "tmp", self.digest.split(":")[1] + ".part"))
        return info.pid if info is not None and info.answered else None

    @defer.inlineCallbacks
    def test_sixteen_cold_clients_over_both_workers_make_one_upstream_get(self):
        self.fake.slow(16 * MB)  # about half a second: every client arrives while the fill runs
        results = yield defer.gatherResults([self.fetch() for _ in range(CLIENTS)])
        self.assertEqual([(code, sha(body)) for code, body in results], [(200, self.digest)] * CLIENTS)
        self.assertEqual(self.fake.count("cdn", "GET", self.digest), 1, "a worker fetched the blob again")
        yield eventually(lambda: sum(self.served_by().values()) == CLIENTS, why="every GET in the access logs")
        self.assertEqual(sorted(self.served_by()), ["0", "1"], "both workers served clients")
        self.assertEqual(os.listdir(os.path.join(self.cache, "tmp")), [])

    @defer.inlineCallbacks
    def test_the_other_workers_clients_survive_the_death_of_the_filling_worker(self):
        self.fake.slow(4 * MB)  # two seconds
        pending = [self.fetch() for _ in range(CLIENTS)]
        results = defer.DeferredList(pending, consumeErrors=True)
        pid = yield eventually(self.owner_pid, why="the fill's owner named in its info file")
        yield task.deferLater(reactor, 0.5, lambda: None)  # mid-body
        os.kill(pid, signal.SIGKILL)
        outcomes = yield results
        good = [body for ok, r in outcomes if ok for code, body in [r] if code == 200 and sha(body) == self.digest]
        for ok, r in outcomes:
            if ok:
                self.assertEqual((r[0], sha(r[1])), (200, self.digest), "a client got a wrong body")
        self.assertGreaterEqual(len(good), 1, "nobody on the surviving worker finished")
        self.assertEqual(len(good), sum(self.served_by().values()))
        gets = self.fake.find("cdn", "GET", self.digest)
        self.assertLessEqual(len(gets), 2)
        self.assertEqual([r.headers.get("range") is not None for r in gets[1:]], [True] * (len(gets) - 1))
        with open(os.path.join(self.cache, "blobs", "sha256", self.digest[7:9], self.digest[7:]), "rb") as f:
            self.assertEqual(sha(f.read()), self.digest)
        yield eventually(lambda: "starting it again" in self.log(), why="the supervisor noticed")
        yield eventually(lambda: len(re.findall(r"MirrorSite starting", self.log())) == 3, why="a new worker")
        code, body = yield self.fetch()
        self.assertEqual((code, sha(body)), (200, self.digest))

    @defer.inlineCallbacks
    def test_sighup_reaches_every_worker(self):
        with open(self.config, "w") as f:
            f.write("cache:\n  tag_ttl: 60\n")
        os.kill(self.proxy.pid, signal.SIGHUP)
        yield eventually(
            lambda: len(set(re.findall(r"\[worker (\d+)\].*config reloaded", self.log()))) == 2,
            why="both workers reloaded",
        )

    @defer.inlineCallbacks
    def test_sigterm_lets_a_download_under_way_finish(self):
        self.fake.slow(8 * MB)  # about a second
        pending = self.fetch()
        yield eventually(self.owner_pid, why="the download started")
        self.proxy.process.send_signal(signal.SIGTERM)
        code, body = yield pending
        self.assertEqual((code, sha(body)), (200, self.digest))
        yield eventually(lambda: self.proxy.process.poll() is not None, timeout=40, why="the supervisor exited")
        self.assertIn(self.proxy.process.returncode, (0, -signal.SIGTERM))  # twist ends as its signal says
        self.assertEqual(len(re.findall(r"\[worker \d\].*Received SIGTERM", self.log())), 2)
