"""Keep-warm prefetch (``prefetch:``): the scheduled runs against the fake Docker Hub, its configuration, and the
``dioproxy prefetch`` command's platform list and progress bar."""

from __future__ import annotations

import io
import os

from twisted.internet import defer, task
from twisted.trial import unittest

from dioproxy import admin
from dioproxy.config import ConfigError, build_config
from dioproxy.errors import UpstreamError
from dioproxy.fill import Fill
from dioproxy.prefetch import RETRY_FIRST, Prefetcher, fetch_blob, select_platforms
from tests.harness import Proxy, start_upstream
from tests.test_ops_reload import CapturedLog, eventually

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
PLATFORMS = ["linux/amd64", "linux/arm64/v8", "linux/s390x"]
WANTED = ["linux/amd64", "linux/arm64"]  # linux/arm64 also means linux/arm64/v8


def blobs_of(image, platforms):
    return {d for p in platforms for m in [image.platform(p)] for d in [m.config_digest, *m.layer_digests]}


class ScheduleTests(unittest.TestCase):
    """The schedule on a fake clock; the transfers on the real reactor against the fake registry."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = start_upstream(self)
        self.proxy = Proxy(self, self.fake.registry_url)
        self.mirror = self.proxy.mirror
        yield self.mirror.cache.when_ready()
        self.image = self.fake.add_image("library/multi", "1", layer_sizes=[40_000, 90_000], platforms=PLATFORMS)
        self.clock = task.Clock()
        self.mirror.prefetcher.stop()
        self.prefetcher = self.mirror.prefetcher = Prefetcher(self.mirror, self.clock)
        self.prefetcher.start()
        self.addCleanup(self.prefetcher.stop)

    def configure(self, prefetch):
        """Put a ``prefetch:`` list in force the way a reload does (through ``mirror.reloaders``)."""
        # No offline window (timeouts.offline: 0): the schedule's own backoff is under test here, not dioproxy.health.
        data = {"prefetch": prefetch, "timeouts": {"offline": 0}}
        config = build_config(data, [f"docker.io={self.fake.registry_url}"], self.proxy.cache_dir)
        self.mirror.apply(config)

    def cached(self, digests):
        return {d for d in digests if os.path.exists(self.proxy.blob_file(d))}

    @defer.inlineCallbacks
    def run_due(self, seconds):
        """Advance the fake clock; wait for the run that fell due (if any) to finish."""
        self.clock.advance(seconds)
        yield self.prefetcher.idle()

    def next_run_in(self):
        (job,) = self.prefetcher.jobs.values()
        return job.call.getTime() - self.clock.seconds()

    @defer.inlineCallbacks
    def test_listed_platforms_revalidated_on_schedule_new_digests_fetched(self):
        self.configure([{"image": "multi:1", "platforms": WANTED, "every": "1m"}])
        yield self.run_due(0)  # a new item runs at once
        wanted = blobs_of(self.image, ["linux/amd64", "linux/arm64/v8"])
        self.assertEqual(self.cached(wanted), wanted)
        self.assertEqual(self.cached(blobs_of(self.image, ["linux/s390x"])), set())  # not listed: not fetched
        self.assertEqual(self.next_run_in(), 60)

        # Not due yet: nothing happens. Due: one HEAD (tag_ttl is 5 min: the prefetch revalidates anyway).
        self.fake.clear_requests()
        yield self.run_due(59)
        self.assertEqual(self.fake.requests, [])
        yield self.run_due(1)
        self.assertEqual(self.fake.count("registry", "HEAD", "/manifests/1"), 1)
        self.assertEqual(self.fake.count("registry", "GET", "/manifests/"), 0)  # same digest: no body fetched
        self.assertEqual(self.fake.count("registry", "GET", "/blobs/") + self.fake.count("cdn"), 0)

        # The tag moves: its new index and the new platforms' manifests and blobs, and only those, are fetched.
        moved = self.fake.add_image("library/multi", "1", layer_sizes=[50_000], platforms=PLATFORMS)
        self.fake.clear_requests()
        yield self.run_due(60)
        new = blobs_of(moved, ["linux/amd64", "linux/arm64/v8"])
        self.assertEqual(self.cached(new), new)
        self.assertEqual(self.cached(blobs_of(moved, ["linux/s390x"])), set())
        self.assertEqual(self.fake.count("registry", "GET", "/manifests/"), 3)  # the index and two platforms
        self.assertEqual(self.fake.count("cdn"), len(new))

        # A client's pull of a listed platform is now all cache hits: the upstream sees nothing.
        self.fake.clear_requests()
        response = yield self.proxy.get("/v2/library/multi/manifests/1", headers={"Accept": [OCI_INDEX]})
        self.assertEqual((yield response.content()), moved.body)
        arm = moved.platform("linux/arm64/v8")
        response = yield self.proxy.get(f"/v2/library/multi/manifests/{arm.digest}", headers={"Accept": [OCI_INDEX]})
        self.assertEqual((yield response.content()), arm.body)
        for digest in [arm.config_digest, *arm.layer_digests]:
            response = yield self.proxy.get(f"/v2/library/multi/blobs/{digest}")
            self.assertEqual((yield response.content()), moved.blobs[digest])
        self.assertEqual(self.fake.requests, [])

    @defer.inlineCallbacks
    def test_failures_back_off_then_the_schedule_resumes(self):
        log = CapturedLog(self)
        self.configure([{"image": "multi:1", "platforms": ["linux/amd64"], "every": "1h"}])
        yield self.run_due(0)
        self.assertEqual(self.next_run_in(), 3600)

        self.fake.fail_next(1000, status=503, path_contains="/manifests/")
        yield self.run_due(3600)  # the HEAD fails (after the client's own retries): a stale tag is no success
        self.assertEqual(self.next_run_in(), RETRY_FIRST)
        yield self.run_due(RETRY_FIRST)
        self.assertEqual(self.next_run_in(), 2 * RETRY_FIRST)
        yield self.run_due(2 * RETRY_FIRST)
        self.assertEqual(self.next_run_in(), 4 * RETRY_FIRST)
        self.assertIn("prefetch docker.io/library/multi:1 failed (cannot revalidate", log.text())
        self.assertIn("retrying in 60 s", log.text())

        # A blob that arrives damaged is a failure too (the fill verifies it), and is not stored.
        self.fake.reset_faults()
        moved = self.fake.add_image("library/multi", "1", layer_sizes=[30_000], platforms=PLATFORMS)
        bad = moved.platform("linux/amd64").layer_digests[0]
        self.fake.corrupt_blob(bad)
        yield self.run_due(4 * RETRY_FIRST)
        self.assertEqual(self.next_run_in(), 8 * RETRY_FIRST)
        self.assertFalse(os.path.exists(self.proxy.blob_file(bad)))

        self.fake.reset_faults()
        yield self.run_due(8 * RETRY_FIRST)
        self.assertTrue(os.path.exists(self.proxy.blob_file(bad)))
        self.assertEqual(self.next_run_in(), 3600)  # recovered: back on schedule

    @defer.inlineCallbacks
    def test_backoff_never_exceeds_the_period(self):
        self.configure([{"image": "nothing:here", "every": "20s"}])
        yield self.run_due(0)  # 404: MANIFEST_UNKNOWN
        self.assertEqual(self.next_run_in(), RETRY_FIRST)
        yield self.run_due(RETRY_FIRST)
        self.assertEqual(self.next_run_in(), 20)

    @defer.inlineCallbacks
    def test_one_fill_per_digest_shared_with_a_client_pull(self):
        amd = self.image.platform("linux/amd64")
        layer = amd.layer_digests[1]
        gate = self.fake.gate_blob(layer)
        self.configure([{"image": "multi:1", "platforms": ["linux/amd64"], "every": "1h"}])
        self.clock.advance(0)
        yield eventually(lambda: self.fake.held(layer) >= 1)  # the prefetch's download of it is under way
        pulled = self.proxy.get(f"/v2/library/multi/blobs/{layer}")  # a client wants it meanwhile
        yield eventually(lambda: ("blob", layer) in self.mirror.cache.pins)  # the client's request is being served
        gate.callback(None)
        response = yield pulled
        self.assertEqual((yield response.content()), self.image.blobs[layer])
        yield self.prefetcher.idle()
        self.assertEqual(self.fake.count("registry", "GET", layer), 1)  # one fill: one upstream GET
        self.assertTrue(os.path.exists(self.proxy.blob_file(layer)))

    @defer.inlineCallbacks
    def test_reload_keeps_unchanged_items_and_drops_removed_ones(self):
        self.configure([{"image": "multi:1", "platforms": ["linux/amd64"], "every": "1h"}])
        yield self.run_due(0)
        (job,) = self.prefetcher.jobs.values()
        self.configure(
            [
                {"image": "multi:1", "platforms": ["linux/amd64"], "every": "1h"},
                {"image": "multi:1", "platforms": ["linux/s390x"], "every": "2h"},
            ]
        )
        self.assertIs(self.prefetcher.jobs[job.image], job)  # its schedule is kept
        yield self.run_due(0)  # the new one runs at once
        s390x = blobs_of(self.image, ["linux/s390x"])
        self.assertEqual(self.cached(s390x), s390x)
        self.configure([])
        self.assertEqual((self.prefetcher.jobs, self.clock.getDelayedCalls()), ({}, []))


class StalledFillTests(unittest.TestCase):
    def test_a_fill_without_progress_is_given_up_after_its_deadline(self):
        """The wait on a fill has a deadline (2 x timeouts.read + timeouts.connect without a byte), a backstop
        behind the fill's own stall timer; progress restarts it."""
        clock = task.Clock()
        upstream = type("U", (), {"credentials": None})()
        target = type("T", (), {"registry": "docker.io", "name": "library/x", "upstream": upstream})()
        fill = Fill("sha256:" + "c" * 64, "/nonexistent", target)

        class Stub:
            reactor = clock
            config = build_config({"timeouts": {"read": 10, "connect": 5}})
            storage = type("S", (), {"blob_size": staticmethod(lambda digest: None)})()
            fills = type("F", (), {"get": staticmethod(lambda digest: fill)})()

        d = defer.ensureDeferred(fetch_blob(Stub(), target, fill.digest))
        clock.advance(20)
        fill.written = 1
        fill._notify()  # progress: the deadline starts again
        clock.advance(24)
        self.assertNoResult(d)
        clock.advance(1)
        failure = self.failureResultOf(d, UpstreamError)
        self.assertIn("made no progress for 25 s", str(failure.value))


class StartTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_the_mirror_starts_its_prefetch_with_the_configuration(self):
        fake = start_upstream(self)
        image = fake.add_image("owner/tool", "2", layer_sizes=[20_000])
        proxy = Proxy(
            self,
            fake.registry_url,
            upstreams={"ghcr.io": fake.registry_url},
            prefetch=[{"image": "ghcr.io/owner/tool:2", "every": "1h"}],
        )
        yield eventually(lambda: all(os.path.exists(proxy.blob_file(d)) for d in image.blobs))
        yield proxy.mirror.prefetcher.idle()
        proxy.mirror.prefetcher.stop()
        self.assertEqual(proxy.mirror.prefetcher.jobs, {})


class ConfigTests(unittest.TestCase):
    def test_items_and_defaults(self):
        config = build_config(
            {
                "prefetch": [
                    {"image": "library/alpine:3.20", "platforms": ["linux/amd64", "linux/arm64"], "every": "1h"},
                    {"image": "ghcr.io/owner/img:tag"},
                ]
            }
        )
        first, second = config.prefetch
        self.assertEqual(
            (first.registry, first.name, first.reference, first.platforms, first.every),
            ("docker.io", "library/alpine", "3.20", ("linux/amd64", "linux/arm64"), 3600),
        )
        self.assertEqual((str(second), second.platforms, second.every), ("ghcr.io/owner/img:tag", (), 3600))
        self.assertEqual(build_config({}).prefetch, ())

    def test_bad_items_are_refused_naming_the_key(self):
        cases = {
            "prefetch: expected a list": "alpine",
            "prefetch[0]: expected a mapping": ["alpine"],
            "prefetch[0].tag: unknown key": [{"image": "alpine", "tag": "1"}],
            "prefetch[0].image: expected an image": [{"every": "1h"}],
            "prefetch[0].image: 'UPPER' is not an image reference": [{"image": "UPPER"}],
            "prefetch[1].image: 'registry.example.com' is not among the upstreams": [
                {"image": "alpine"},
                {"image": "registry.example.com/a/b:1"},
            ],
            "prefetch[0].platforms: 'amd64' is not os/arch": [{"image": "alpine", "platforms": ["amd64"]}],
            "prefetch[0].platforms: expected a list of strings": [{"image": "alpine", "platforms": [1]}],
            "prefetch[0].every: must be more than 0": [{"image": "alpine", "every": 0}],
            "prefetch[0].every: expected a duration": [{"image": "alpine", "every": "soon"}],
        }
        for message, value in cases.items():
            with self.assertRaises(ConfigError, msg=message) as caught:
                build_config({"prefetch": value})
            self.assertIn(message, str(caught.exception))

    def test_platform_selection(self):
        index = (
            b'{"manifests": [{"digest": "sha256:' + b"a" * 64 + b'", "platform": {"os": "linux", '
            b'"architecture": "arm64", "variant": "v8"}}, {"digest": "sha256:' + b"b" * 64 + b'", "platform": '
            b'{"os": "linux", "architecture": "amd64"}}]}'
        )
        self.assertEqual(select_platforms(index, ["linux/arm64"]), [("sha256:" + "a" * 64, "linux/arm64/v8")])
        self.assertEqual(len(select_platforms(index, [])), 2)
        with self.assertRaisesRegex(ValueError, r"no manifest for linux/s390x \(has: linux/amd64, linux/arm64/v8\)"):
            select_platforms(index, ["linux/s390x"])


class Terminal(io.StringIO):
    def isatty(self):
        return True


class CommandTests(unittest.TestCase):
    def test_comma_separated_platforms(self):
        args = admin.parser().parse_args(
            ["prefetch", "--platform", "linux/amd64,linux/arm64", "--platform", "linux/s390x", "alpine"]
        )
        self.assertEqual(args.platform, ["linux/amd64", "linux/arm64", "linux/s390x"])

    def test_progress_bar_on_a_terminal_plain_lines_otherwise(self):
        terminal = Terminal()
        progress = admin.Progress(terminal, 4_000_000, 2)
        progress.started -= 2  # two seconds in
        progress.add(1_000_000)
        progress.blob_done("sha256:" + "a" * 64, 1_000_000)
        text = terminal.getvalue()
        self.assertIn("\r[#######", text)
        self.assertIn("1.0 MB/4.0 MB 1/2 blobs", text)
        self.assertRegex(text, r"kB/s ETA 0:0[56]")  # 3 MB to go at ~500 kB/s
        plain = io.StringIO()
        progress = admin.Progress(plain, 4_000_000, 2)
        progress.add(4_000_000)
        progress.blob_done("sha256:" + "a" * 64, 4_000_000)
        progress.finish()
        self.assertNotIn("\r", plain.getvalue())
        self.assertIn("[1/2]", plain.getvalue())
        self.assertIn("done: 4.0 MB in 0:00", plain.getvalue())
