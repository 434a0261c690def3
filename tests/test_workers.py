"""``--workers 2``: a real supervisor and two worker processes on one port and one cache directory."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal

import treq
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from dioproxy import siblings
from dioproxy.metrics import GAUGE_MERGE
from dioproxy.storage.partial import read_info
from tests.harness import ProxyProcess, eventually, start_upstream
from tests.test_ops_metrics import _full_metrics, value

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
            f.write("cache:\n  tag_ttl: 300\ntimeouts:\n  offline: 60\n")
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

    def served_by(self, path: str | None = None, status: int = 200) -> dict[str, int]:
        """GETs of ``path`` (the blob's) answered ``status`` in each worker's access log."""
        counts: dict[str, int] = {}
        path = re.escape(path or self.path)
        for worker in re.findall(rf"\[worker (\d+)\].*GET {path} {status} ", self.log()):
            counts[worker] = counts.get(worker, 0) + 1
        return counts

    @defer.inlineCallbacks
    def fetch(self, path: str | None = None):
        response = yield self.client.get(self.url + (path or self.path))
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
        with open(f"/proc/{self.proxy.pid}/task/{self.proxy.pid}/children") as f:
            workers = [int(pid) for pid in f.read().split()]
        self.proxy.process.send_signal(signal.SIGTERM)
        for pid in workers:  # as systemd does: the whole cgroup gets it too
            os.kill(pid, signal.SIGTERM)
        code, body = yield pending
        self.assertEqual((code, sha(body)), (200, self.digest))
        yield eventually(lambda: self.proxy.process.poll() is not None, timeout=40, why="the supervisor exited")
        self.assertIn(self.proxy.process.returncode, (0, -signal.SIGTERM))  # twist ends as its signal says
        self.assertEqual(len(re.findall(r"\[worker \d\].*Received SIGTERM", self.log())), 2)
        self.assertNotIn("Traceback", self.log())

    @defer.inlineCallbacks
    def scrape(self):
        """One ``/metrics`` over a new connection (the kernel picks the worker) and the worker that answered."""
        before = self.served_by("/metrics")
        code, body = yield self.fetch("/metrics")
        self.assertEqual(code, 200)
        yield eventually(lambda: sum(self.served_by("/metrics").values()) > sum(before.values()), why="logged")
        after = self.served_by("/metrics")
        return body.decode(), next(w for w in after if after[w] > before.get(w, 0))

    @defer.inlineCallbacks
    def test_metrics_cover_both_workers_whichever_answers(self):
        results = yield defer.gatherResults([self.fetch() for _ in range(CLIENTS)])
        self.assertEqual([(code, sha(body)) for code, body in results], [(200, self.digest)] * CLIENTS)
        yield eventually(lambda: sum(self.served_by().values()) == CLIENTS, why="every GET in the access logs")
        self.assertEqual(sorted(self.served_by()), ["0", "1"], "both workers served clients")
        answered_by = set()
        for _ in range(40):  # until both workers answered a scrape (spread by the kernel: 1 in 2 each time)
            text, worker = yield self.scrape()
            answered_by.add(worker)
            self.assertEqual(value(text, "dioproxy_scrape_workers"), 2, text)
            self.assertEqual(value(text, "dioproxy_scrape_workers_missing"), 0)
            self.assertEqual(value(text, "dioproxy_requests_total", endpoint="blobs", status="200"), CLIENTS, worker)
            self.assertEqual(value(text, "dioproxy_request_duration_seconds_count", endpoint="blobs"), CLIENTS)
            self.assertEqual(value(text, "dioproxy_sent_bytes_total", endpoint="blobs"), CLIENTS * len(self.data))
            self.assertEqual(value(text, "dioproxy_fills_total"), 1)
            self.assertEqual(value(text, "dioproxy_upstream_requests_total"), len(self.fake.requests))
            self.assertEqual(value(text, "dioproxy_cache_size_bytes"), len(self.data), worker)
            self.assertEqual(value(text, "dioproxy_cache_entries", kind="blob"), 1)
            self.assertEqual(value(text, "dioproxy_build_info"), 1)
            if len(answered_by) == 2 and _ >= 3:
                break
        self.assertEqual(answered_by, {"0", "1"}, "every scrape went to one worker")
        self.assertEqual(self.fake.count("cdn", "GET", self.digest), 1)

    @defer.inlineCallbacks
    def test_a_sibling_that_does_not_answer_is_left_out_within_the_deadline(self):
        code, _ = yield self.fetch()  # one blob GET, in one worker's counts
        self.assertEqual(code, 200)
        stopped = yield eventually(self.owner_pid_of_worker(1), why="worker 1's pid")
        os.kill(stopped, signal.SIGSTOP)
        self.addCleanup(os.kill, stopped, signal.SIGCONT)
        for _ in range(12):  # a scrape that reaches the stopped worker waits for it: cut short, tried again
            d = self.scrape()
            d.addTimeout(siblings.SIBLING_TIMEOUT + 3, reactor)
            try:
                started = reactor.seconds()
                text, worker = yield d
            except Exception:  # cut short by the timeout (ResponseNeverReceived)
                continue
            self.assertEqual(worker, "0")
            self.assertLess(reactor.seconds() - started, siblings.SIBLING_TIMEOUT + 1)
            self.assertEqual(value(text, "dioproxy_scrape_workers"), 1)
            self.assertEqual(value(text, "dioproxy_scrape_workers_missing"), 1)
            break
        else:
            self.fail("no scrape reached the worker still running")

    @defer.inlineCallbacks
    def page(self, accept: str = "application/json"):
        """One status page over a new connection (the kernel picks the worker): its body and who answered."""
        before = self.served_by("/")
        response = yield self.client.get(self.url + "/", headers={"Accept": [accept]})
        body = yield response.content()
        self.assertEqual(response.code, 200, body)
        yield eventually(lambda: sum(self.served_by("/").values()) > sum(before.values()), why="logged")
        after = self.served_by("/")
        worker = next(w for w in after if after[w] > before.get(w, 0))
        return (json.loads(body) if accept == "application/json" else body.decode()), worker

    @defer.inlineCallbacks
    def test_the_status_page_counts_both_workers_traffic_whichever_answers(self):
        image = self.fake.add_image("library/app", "1.0", layer_sizes=[10])
        manifest = "/v2/library/app/manifests/1.0"
        results = yield defer.gatherResults([self.fetch() for _ in range(CLIENTS)])
        self.assertEqual([(code, sha(body)) for code, body in results], [(200, self.digest)] * CLIENTS)
        for _ in range(10):
            code, _ = yield self.fetch(manifest)
            self.assertEqual(code, 200)
        yield eventually(lambda: sum(self.served_by().values()) == CLIENTS, why="every blob GET logged")
        yield eventually(lambda: sum(self.served_by(manifest).values()) == 10, why="every pull logged")
        self.assertEqual(sorted(self.served_by()), ["0", "1"], "both workers served clients")
        self.assertEqual(sorted(self.served_by(manifest)), ["0", "1"], "both workers served pulls")
        text, _ = yield self.scrape()  # flushes both workers' index batches; their totals follow within 1 s
        size = value(text, "dioproxy_cache_size_bytes")
        yield task.deferLater(reactor, 2.5, lambda: None)
        answered_by = set()
        for attempt in range(40):  # until both workers answered (1 in 2 each time)
            data, worker = yield self.page()
            answered_by.add(worker)
            hour = data["traffic"]["hour"]
            self.assertEqual(hour["hits"] + hour["misses"], CLIENTS + 10, worker)
            self.assertEqual(
                hour["cached_bytes"] + hour["fetched_bytes"], CLIENTS * len(self.data) + 10 * len(image.body)
            )
            self.assertEqual(data["traffic"]["day"]["hits"], hour["hits"])
            [row] = data["popular"]
            self.assertEqual(
                (row["repository"], row["pulls"], row["tags"][0]["digest"]), ("library/app", 10, image.digest)
            )
            self.assertEqual(
                {k: data["workers"][k] for k in ("count", "answered", "missing", "answered_by")},
                {"count": 2, "answered": 2, "missing": [], "answered_by": int(worker)},
            )
            self.assertEqual(data["cache"]["size"], size, "the shared cache counted once")
            self.assertEqual(data["fills"], [])
            if len(answered_by) == 2 and attempt >= 3:
                break
        self.assertEqual(answered_by, {"0", "1"}, "every page came from one worker")
        page, _ = yield self.page("text/html")
        self.assertIn("2 of 2 workers answered", page)

    @defer.inlineCallbacks
    def test_a_worker_that_does_not_answer_is_left_out_of_the_status_page_within_the_deadline(self):
        code, _ = yield self.fetch()
        self.assertEqual(code, 200)
        stopped = yield eventually(self.owner_pid_of_worker(1), why="worker 1's pid")
        os.kill(stopped, signal.SIGSTOP)
        self.addCleanup(os.kill, stopped, signal.SIGCONT)
        seen = set()
        for _ in range(12):  # a page that reaches the stopped worker waits for it: cut short, tried again
            for accept in ("application/json", "text/html"):
                d = self.page(accept)
                d.addTimeout(siblings.STATUS_TIMEOUT + 3, reactor)
                try:
                    started = reactor.seconds()
                    data, worker = yield d
                except Exception:  # cut short by the timeout
                    continue
                self.assertEqual(worker, "0")
                self.assertLess(reactor.seconds() - started, siblings.STATUS_TIMEOUT + 1)
                if accept == "text/html":
                    self.assertIn("1 of 2 workers answered", data)
                    self.assertIn("worker 1 left out", data)
                else:
                    self.assertEqual((data["workers"]["answered"], data["workers"]["missing"]), (1, [1]))
                seen.add(accept)
            if len(seen) == 2:
                break
        self.assertEqual(len(seen), 2, "no page reached the worker still running")

    def owner_pid_of_worker(self, index: int):
        """A check for :func:`eventually`: the pid of worker ``index`` (a child of the supervisor)."""

        def check() -> int | None:
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = f.read().split(b"\0")
                except OSError:
                    continue
                if ppid == self.proxy.pid and b"--index" in argv and argv[argv.index(b"--index") + 1] == b"%d" % index:
                    return int(pid)
            return None

        return check

    @defer.inlineCallbacks
    def test_a_registry_one_worker_took_offline_is_skipped_by_the_other(self):
        manifest = "/v2/library/gone/manifests/latest"
        self.fake.fail_next(10_000, status=503)  # every registry request, the probe's HEAD /v2/ too
        code, _ = yield self.fetch(manifest)
        self.assertEqual(code, 502)  # the upstream's 503s, after the retries
        first = self.fake.count("registry", path_contains="/manifests/")
        self.assertEqual(first, 3, "the first request: three attempts, then the window")
        for _ in range(16):  # new connections each: the kernel spreads them over both workers
            code, body = yield self.fetch(manifest)
            self.assertEqual(code, 503)
            self.assertIn(b"offline", body)
        yield eventually(lambda: sum(self.served_by(manifest, 503).values()) == 16, why="every answer logged")
        self.assertEqual(sorted(self.served_by(manifest, 503)), ["0", "1"], "both workers answered")
        self.assertEqual(self.fake.count("registry", path_contains="/manifests/"), first, "a worker asked anyway")
        self.assertLessEqual(self.fake.count("registry", path_contains="/v2/", method="HEAD"), 1, "one probe")

        # The registry is back: the probe of one worker (at most every 5 s) ends the window for both.
        self.fake.reset_faults()
        self.fake.add_image("library/gone", "latest", layer_sizes=[10])

        @defer.inlineCallbacks
        def answered():
            code, _ = yield self.fetch(manifest)
            return code == 200

        yield eventually(answered, timeout=15, step=0.2, why="the window ended")
        for _ in range(16):
            code, _ = yield self.fetch(manifest)
            self.assertEqual(code, 200)
        yield eventually(lambda: sum(self.served_by(manifest).values()) >= 17, why="logged")
        self.assertEqual(sorted(self.served_by(manifest)), ["0", "1"], "one worker still has it offline")

    def test_every_gauge_says_how_workers_combine_it(self):
        metrics = _full_metrics()
        metrics.budget_action("docker.io", "anonymous", "held")
        state = metrics._state
        metrics.watch(lambda: {**state(), "budget": [{"registry": "r", "account": "a", "remaining": 1, "limit": 2}]})
        gauges = {f.name for f in metrics.registry.collect() if f.type == "gauge"}
        self.assertIn("dioproxy_upstream_ratelimit_remaining", gauges)
        self.assertEqual(gauges - set(GAUGE_MERGE), set())
