"""The status page at ``/``: its data (traffic ring, most pulled, health, fills, cache, snippets), the JSON and HTML
answers, escaping of what comes from outside, the login when closed. The page in a real browser:
tests/test_status_browser.py."""

from __future__ import annotations

import base64
import json
import time

import bcrypt
from twisted.internet import defer
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from dioproxy import snippets, status, statuspage
from dioproxy.status import Popular, StatusBoard, Traffic, client_snippets, page_data
from tests.harness import Proxy, start_upstream
from tests.test_ops_metrics import Puller
from tests.test_ops_reload import eventually

HOSTILE = '<script>alert("x")</script>&<img src=x onerror=alert(1)>'
JSON = {"Accept": ["application/json"]}
BROWSER = {"Accept": ["text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"]}


class FakeRequest:
    """What ``Mirror.request_done`` sees of a finished request."""

    def __init__(self, path: str, outcome: str, sent: int = 0, registry: str = "docker.io", repository=None, **kw):
        self.path = path.encode()
        self.method = kw.get("method", b"GET")
        self.code = kw.get("code", 200)
        self.dioproxy_outcome = outcome
        self.dioproxy_registry = registry
        if repository is not None:
            self.dioproxy_repository = repository
        self.sentLength = sent
        self.responseHeaders = Headers({"Docker-Content-Digest": [kw["digest"]]} if "digest" in kw else {})


class StandInHealth:
    """The contract of ``mirror.health`` (dioproxy/health.py, from the outages work)."""

    def __init__(self, entries: dict) -> None:
        self.entries = entries

    def snapshot(self) -> dict:
        return self.entries

    def stop(self) -> None:
        """Mirror.close cancels the real one's probes; a stand-in runs none."""


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TrafficTests(unittest.TestCase):
    def test_minutes_buckets_and_ratio(self):
        traffic = Traffic()
        base = 1_700_000_000 // 60 * 60
        traffic.add(base + 1, True, 100)
        traffic.add(base + 2, True, 50)
        traffic.add(base + 3, False, 1000)
        traffic.add(base - 120, False, 7)  # two minutes earlier
        hour = traffic.window(base + 30, 60, 1)
        self.assertEqual(len(hour["buckets"]), 60)
        self.assertEqual(
            hour["buckets"][-1], {"start": base, "hits": 2, "misses": 1, "cached_bytes": 150, "fetched_bytes": 1000}
        )
        self.assertEqual(hour["buckets"][-3]["fetched_bytes"], 7)
        self.assertEqual((hour["hits"], hour["misses"], hour["cached_bytes"], hour["fetched_bytes"]), (2, 2, 150, 1007))
        self.assertEqual(hour["hit_ratio"], 0.5)
        day = traffic.window(base + 30, 24 * 60, 15)
        self.assertEqual(len(day["buckets"]), 96)
        self.assertEqual((day["hits"], day["misses"]), (2, 2))

    def test_a_day_old_minute_is_forgotten_and_memory_stays_bounded(self):
        traffic = Traffic()
        base = 1_700_000_000 // 60 * 60
        traffic.add(base, True, 100)
        later = base + 24 * 3600  # the same slot, one lap later
        self.assertEqual(traffic.window(later, 24 * 60, 15)["hits"], 0, "yesterday's minute is not in today's day")
        for i in range(3 * 24 * 60):  # three days of traffic, one request a minute
            traffic.add(base + i * 60, False, 1)
        self.assertEqual({len(a) for a in (traffic.stamp, traffic.hits, traffic.fetched_bytes)}, {24 * 60})
        self.assertEqual(traffic.window(base + (3 * 24 * 60 - 1) * 60, 24 * 60, 15)["misses"], 24 * 60)
        self.assertIsNone(Traffic().window(base, 60, 1)["hit_ratio"], "no requests: no ratio, not 0 %")


class PopularTests(unittest.TestCase):
    def test_ranked_by_pulls_with_tags(self):
        popular = Popular()
        for tag in ("3.19", "3.19", "3.20"):
            popular.add("docker.io", "library/alpine", 10, 100.0, tag, "sha256:" + "a" * 64)
        popular.add("docker.io", "library/alpine", 5000, 101.0, None, None)  # a blob of it
        popular.add("ghcr.io", "acme/tool", 10, 102.0, "1.0", None)
        popular.add("ghcr.io", "never/tagged", 10, 102.0, None, None)
        [alpine, tool] = popular.top()
        self.assertEqual(
            (alpine["repository"], alpine["pulls"], alpine["bytes"], alpine["last_pull"]),
            ("library/alpine", 3, 5030, 100.0),
        )
        self.assertEqual([(t["tag"], t["pulls"]) for t in alpine["tags"]], [("3.19", 2), ("3.20", 1)])
        self.assertEqual(tool["registry"], "ghcr.io")

    def test_bounded_least_recently_pulled_forgotten(self):
        popular = Popular(max_repositories=10, max_tags=3)
        popular.add("docker.io", "library/hot", 1, 0.0, "1", None)
        for i in range(1000):
            popular.add("docker.io", f"crawl/n{i}", 1, float(i), "latest", None)
            if i % 5 == 0:
                popular.add("docker.io", "library/hot", 1, float(i), f"t{i}", None)
        self.assertEqual(len(popular.repositories), 10)
        self.assertIn(("docker.io", "library/hot"), popular.repositories, "what is pulled often stays")
        self.assertEqual(popular.repositories[("docker.io", "library/hot")]["pulls"], 1 + 200, "and keeps its count")
        self.assertLessEqual(len(popular.repositories[("docker.io", "library/hot")]["tags"]), 3)
        self.assertEqual(popular.top(n=1)[0]["repository"], "library/hot")


class BoardTests(unittest.TestCase):
    def test_fed_by_finished_requests(self):
        clock = Clock(1_700_000_000.0)
        board = StatusBoard(clock)
        digest = "sha256:" + "b" * 64
        board.request_done(
            FakeRequest("/v2/alpine/manifests/3.19", "miss", 500, repository="library/alpine", digest=digest)
        )
        board.request_done(FakeRequest(f"/v2/alpine/manifests/{digest}", "hit", 400, repository="library/alpine"))
        board.request_done(FakeRequest(f"/v2/alpine/blobs/{digest}", "hit", 9000, repository="library/alpine"))
        board.request_done(
            FakeRequest("/v2/alpine/manifests/3.19", "hit", 0, repository="library/alpine", method=b"HEAD")
        )
        board.request_done(FakeRequest("/metrics", "-", 12345))
        [row] = board.popular.top()
        self.assertEqual(row["pulls"], 1, "a pull is a manifest GET by tag; by digest, HEAD and blobs are not")
        self.assertEqual(row["bytes"], 500 + 400 + 9000)
        self.assertEqual(row["tags"], [{"tag": "3.19", "pulls": 1, "last_pull": clock.now, "digest": digest}])
        hour = board.traffic.window(clock.now, 60, 1)
        self.assertEqual((hour["hits"], hour["misses"], hour["cached_bytes"], hour["fetched_bytes"]), (3, 1, 9400, 500))

    def test_snippets_come_from_the_client_config_templates(self):
        items = {
            f["path"]: f["text"]
            for item in client_snippets("m.test:5000", ["docker.io", "ghcr.io"], "docker.io", False)
            for f in item["files"]
        }
        self.assertEqual(items["/etc/docker/daemon.json"], snippets.render_docker_daemon_json("m.test:5000"))
        self.assertEqual(
            items["/etc/containers/registries.conf.d/50-dioproxy.conf"],
            snippets.podman_registries_conf("m.test:5000", ["ghcr.io"]),
        )
        self.assertEqual(
            items["/etc/containerd/certs.d/ghcr.io/hosts.toml"],
            snippets.containerd_hosts_toml("m.test:5000", "ghcr.io"),
        )
        self.assertIn("/etc/containerd/certs.d/_default/hosts.toml", items)
        self.assertIn('config_path = "/etc/containerd/certs.d"', items["/etc/containerd/config.toml"])

    def test_https_snippets_have_no_plain_http(self):
        secure = client_snippets("m.test", ["docker.io", "ghcr.io"], "docker.io", True)
        text = "".join(f["text"] for item in secure for f in item["files"])
        self.assertIn("https://m.test", text)
        self.assertNotIn("http://", text)
        self.assertNotIn("insecure", text)
        self.assertEqual(json.loads(secure[0]["files"][0]["text"]), {"registry-mirrors": ["https://m.test"]})


def fill_row(digest: str, written: int, followers: int, owner: bool) -> dict:
    return {
        "digest": digest,
        "written": written,
        "size": 1000,
        "bytes_per_second": 10.0,
        "eta_seconds": 1.0,
        "followers": followers,
        "owner": owner,
    }


class SharesTests(unittest.TestCase):
    """``--workers N``: each worker's share of the page (as it crosses the socket: JSON), merged by the one asked."""

    def setUp(self):
        fake = start_upstream(self)
        self.workers = [Proxy(self, fake.registry_url).mirror for _ in range(2)]

    def feed(self, mirror, path: str, outcome: str, sent: int, repository: str, **kw) -> None:
        mirror.status.request_done(FakeRequest(path, outcome, sent, repository=repository, **kw))

    def test_counters_summed_top_lists_merged_fills_once(self):
        first, second = self.workers
        d1, d2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
        for mirror, hot in ((first, "library/a"), (second, "library/b")):
            for _ in range(3):
                self.feed(mirror, f"/v2/{hot}/manifests/1", "hit", 10, hot, digest=d1)
            for _ in range(2):  # second on each worker, first overall
                self.feed(mirror, "/v2/library/both/manifests/2", "miss", 100, "library/both", digest=d2)
        self.feed(second, "/v2/library/both/manifests/3", "hit", 1, "library/both")
        shares = [status.share(first, 0), json.loads(json.dumps(status.share(second, 1)))]
        shares[0]["fills"] = [fill_row(d1, 900, 2, True), fill_row(d2, 50, 0, True)]
        shares[1]["fills"] = [fill_row(d1, 400, 3, False)]  # following worker 0's fill of d1 from the disk
        data = page_data(first, "http://m.test", shares, 3)
        hour = data["traffic"]["hour"]
        self.assertEqual((hour["hits"], hour["misses"], hour["cached_bytes"]), (3 + 3 + 1, 2 + 2, 61))
        self.assertEqual(data["traffic"]["day"]["fetched_bytes"], 400)
        self.assertEqual([(r["repository"], r["pulls"]) for r in data["popular"][:1]], [("library/both", 5)])
        both = data["popular"][0]
        self.assertEqual([(t["tag"], t["pulls"]) for t in both["tags"]], [("2", 4), ("3", 1)])
        self.assertEqual(both["bytes"], 401)
        self.assertEqual(
            sorted((r["repository"], r["pulls"]) for r in data["popular"][1:]),
            [("library/a", 3)] * 1 + [("library/b", 3)],
        )
        self.assertEqual(
            [(f["digest"], f["written"], f["followers"]) for f in data["fills"]], [(d1, 900, 5), (d2, 50, 0)]
        )
        self.assertEqual(
            (data["workers"]["count"], data["workers"]["answered"], data["workers"]["missing"]), (3, 2, [2])
        )
        page = statuspage.render(data)
        self.assertIn("2 of 3 workers answered", page)
        self.assertIn("worker 2 left out", page)
        alone = page_data(first, "http://m.test")
        self.assertIsNone(alone["workers"], "one process: no workers line")
        self.assertNotIn("workers answered", statuspage.render(alone))

    def test_merging_full_shares_is_cheap(self):
        """Four workers each with a full day and a full popular table: what the worker asked does (its own share,
        three siblings' read from JSON, merged, rendered); measured, bound with slack."""
        now = time.time()
        for mirror in self.workers:
            board = mirror.status
            for i in range(24 * 60):
                board.traffic.add(now - i * 60, i % 3 == 0, 1000 * i)
            for i in range(board.popular.max_repositories):
                for t in range(board.popular.max_tags):
                    board.popular.add("docker.io", f"team/repo{i}", 100, now - i, f"v{t}", None)
        texts = [json.dumps(status.share(self.workers[1], i)) for i in (1, 2, 3)]  # made in the siblings
        began = time.perf_counter()
        for _ in range(5):
            shares = [status.share(self.workers[0], 0)] + [json.loads(text) for text in texts]
            data = page_data(self.workers[0], "http://m.test", shares, 4)
            statuspage.render(data)
        each = (time.perf_counter() - began) / 5
        print(
            f"\nfour full shares ({len(texts[0]) // 1024} KiB of JSON each) merged and rendered: {each * 1000:.1f} ms"
        )
        self.assertEqual(data["traffic"]["day"]["misses"], 4 * 24 * 60 * 2 // 3)
        self.assertEqual(data["popular"][0]["pulls"], 4 * 20)
        self.assertLess(each, 0.5)


def basic(user: str, password: str) -> dict:
    return {"Authorization": ["Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()]}


class PageTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.fake = start_upstream(self, auth_mode=None)
        self.proxy = Proxy(self, self.fake.registry_url, cache={"max_size": "1GB"})
        yield self.proxy.mirror.cache.when_ready()

    @defer.inlineCallbacks
    def get_json(self, headers=None):
        response = yield self.proxy.get("/", headers={**JSON, **(headers or {})})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/json"])
        return (yield response.json())

    @defer.inlineCallbacks
    def test_json_after_pulls(self):
        image = self.fake.add_image("library/alpine", "3.19", layer_sizes=[300_000])
        puller = Puller(self, self.proxy)
        yield puller.pull(image)
        yield puller.pull(image)
        data = yield self.get_json({"Host": ["mirror.test:5000"]})
        self.assertEqual(data["url"], "http://mirror.test:5000")
        texts = "".join(f["text"] for client in data["snippets"] for f in client["files"])
        self.assertIn('"http://mirror.test:5000"', texts, "the snippets name the address the client reached")
        [row] = data["popular"]
        served = len(image.body) * 2 + sum(len(b) for b in image.blobs.values()) * 2
        self.assertEqual(
            (row["registry"], row["repository"], row["pulls"], row["bytes"]), ("docker.io", "library/alpine", 2, served)
        )
        self.assertEqual(row["tags"][0]["tag"], "3.19")
        self.assertEqual(row["tags"][0]["digest"], image.digest)
        hour = data["traffic"]["hour"]
        self.assertEqual(hour["misses"], 1 + len(image.blobs), "the first pull: manifest and blobs fetched")
        self.assertEqual(hour["hits"], 1 + len(image.blobs))
        self.assertEqual(hour["hit_ratio"], 0.5)
        self.assertEqual(data["traffic"]["day"]["cached_bytes"], hour["cached_bytes"])
        self.assertEqual(data["cache"]["max_size"], 1_000_000_000)
        self.assertEqual(data["cache"]["size"], self.proxy.mirror.cache.size)
        self.assertGreater(data["cache"]["size"], 300_000)
        [hub] = [u for u in data["upstreams"] if u["registry"] == "docker.io"]
        self.assertEqual(hub["state"], "ok", "mirror.health saw the pull succeed")
        self.assertEqual(hub["ratelimit"]["remaining"], self.fake.ratelimit_remaining)
        self.assertEqual(hub["ratelimit"]["limit"], self.fake.ratelimit_limit)
        self.assertLess(hub["ratelimit"]["remaining"], hub["ratelimit"]["limit"])

    @defer.inlineCallbacks
    def test_health_from_the_mirror(self):
        now = time.time()
        self.proxy.mirror.health = StandInHealth(
            {
                "docker.io": {
                    "last_success": now - 5,
                    "last_error": None,
                    "last_error_at": None,
                    "offline_until": None,
                },
                "ghcr.io": {
                    "last_success": now - 100,
                    "last_error": "connection refused",
                    "last_error_at": now - 3,
                    "offline_until": now + 27,
                },
                "quay.io": {
                    "last_success": now - 100,
                    "last_error": "HTTP 503",
                    "last_error_at": now - 3,
                    "offline_until": None,
                },
            }
        )
        data = yield self.get_json()
        states = {u["registry"]: u["state"] for u in data["upstreams"]}
        self.assertEqual(states["docker.io"], "ok")
        self.assertEqual(states["ghcr.io"], "offline")
        self.assertEqual(states["quay.io"], "failing")
        self.assertEqual(states["gcr.io"], "unknown", "health has no news of it yet")
        ghcr = next(u for u in data["upstreams"] if u["registry"] == "ghcr.io")
        self.assertEqual(ghcr["health"]["last_error"], "connection refused")
        response = yield self.proxy.get("/", headers=BROWSER)
        page = yield response.text()
        self.assertIn("connection refused", page)
        self.assertIn('class="badge offline"', page)

    @defer.inlineCallbacks
    def test_a_fill_in_progress(self):
        image = self.fake.add_image("library/big", "1.0", layer_sizes=[4_000_000])
        [layer] = image.layer_digests
        self.fake.slow(400_000)
        request = self.proxy.get(f"/v2/library/big/blobs/{layer}")
        fills = yield eventually(lambda: self._fills_written(), timeout=30)
        [fill] = fills
        self.assertEqual((fill["digest"], fill["size"], fill["followers"]), (layer, 4_000_000, 1))
        self.assertGreater(fill["bytes_per_second"], 0)
        self.assertGreater(fill["eta_seconds"], 0)
        response = yield self.proxy.get("/", headers=BROWSER)
        page = yield response.text()
        self.assertIn(f'max="{4_000_000}"></progress>', page)
        self.fake.slow(None)
        response = yield request
        yield response.content()

    @defer.inlineCallbacks
    def _fills_written(self):
        data = yield self.get_json()
        return [f for f in data["fills"] if f["written"] > 0]

    @defer.inlineCallbacks
    def test_html_for_a_browser(self):
        response = yield self.proxy.get("/", headers=BROWSER)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["text/html; charset=utf-8"])
        self.assertIn("default-src 'none'", response.headers.getRawHeaders("Content-Security-Policy")[0])
        self.assertEqual(response.headers.getRawHeaders("Vary"), ["Accept"])
        page = yield response.text()
        self.assertTrue(page.startswith("<!doctype html>"))
        self.assertIn('<svg id="traffic-hour"', page)
        self.assertIn("/etc/docker/daemon.json", page)
        self.assertNotIn("<script", page.lower())
        status, headers = yield self.proxy.head("/")
        self.assertEqual((status, headers["content-type"]), (200, "text/html; charset=utf-8"))
        self.assertGreater(int(headers["content-length"]), 1000, "HEAD: the length of the page it would send")
        response = yield self.proxy.get("/nothing")
        self.assertEqual(response.code, 404, "only / itself is the page")
        response = yield self.proxy.get("/", method="POST")
        self.assertEqual(response.code, 405)

    @defer.inlineCallbacks
    def test_hostile_names_and_errors_are_escaped(self):
        mirror = self.proxy.mirror
        mirror.status.request_done(
            FakeRequest(f"/v2/x/manifests/{HOSTILE}", "miss", 1, registry=HOSTILE, repository=HOSTILE, digest=HOSTILE)
        )
        mirror.health = StandInHealth(
            {
                "docker.io": {
                    "last_success": None,
                    "last_error": HOSTILE,
                    "last_error_at": time.time(),
                    "offline_until": None,
                }
            }
        )
        response = yield self.proxy.get("/", headers={**BROWSER, "Host": ['"><script>alert(2)</script>']})
        page = yield response.text()
        self.assertNotIn("<script", page)
        self.assertNotIn("<img", page)
        self.assertIn(statuspage.esc(HOSTILE), page)
        self.assertIn("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;", page)
        data = yield self.get_json()
        self.assertEqual(data["popular"][0]["repository"], HOSTILE, "JSON carries the data itself, safely encoded")

    def test_page_data_is_fast_with_full_history(self):
        """Nothing in it scales with the cache: full ring, full popular table; measured, bound with slack."""
        mirror = self.proxy.mirror
        board = mirror.status
        now = time.time()
        for i in range(24 * 60):
            board.traffic.add(now - i * 60, i % 3 == 0, 1000 * i)
        for i in range(board.popular.max_repositories):
            for t in range(board.popular.max_tags):
                board.popular.add("docker.io", f"team/repo{i}", 100, now - i, f"v{t}", None)
        began = time.perf_counter()
        for _ in range(10):
            statuspage.render(page_data(mirror, "http://mirror.test:5000"))
        each = (time.perf_counter() - began) / 10
        print(f"\nstatus page with a full day and {len(board.popular.repositories)} repositories: {each * 1000:.1f} ms")
        self.assertLess(each, 0.5)


class ClosedTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        htpasswd = self.mktemp()
        with open(htpasswd, "wb") as f:
            f.write(b"alice:" + bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)) + b"\n")
        self.proxy = Proxy(self, self.fake.registry_url, auth={"htpasswd": htpasswd})

    @defer.inlineCallbacks
    def test_login_required(self):
        for headers in (BROWSER, JSON, {**BROWSER, **basic("alice", "wrong")}):
            response = yield self.proxy.get("/", headers=headers)
            self.assertEqual(response.code, 401)
            body = yield response.text()
            self.assertNotIn("daemon.json", body)
            self.assertEqual(
                response.headers.getRawHeaders("WWW-Authenticate"),
                ['Basic realm="dioproxy"'],
                "a browser can answer Basic",
            )
        response = yield self.proxy.get("/", headers={**BROWSER, **basic("alice", "wonderland")})
        self.assertEqual(response.code, 200)
        page = yield response.text()
        self.assertIn("login required", page)
        self.assertIn("docker login", page)
        response = yield self.proxy.get("/token?service=dioproxy", headers=basic("alice", "wonderland"))
        token = (yield response.json())["token"]
        response = yield self.proxy.get("/", headers={**JSON, "Authorization": [f"Bearer {token}"]})
        self.assertEqual(response.code, 200, "a token from /token is good here too")
        self.assertTrue((yield response.json())["closed"])
