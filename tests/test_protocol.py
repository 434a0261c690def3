"""Protocol edges the OCI conformance suite and registries' clients rely on (issue 9, section 6)."""

import json
import os
import threading
from urllib.parse import quote

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import ResponseFailed

from dioproxy.pools import Pools
from dioproxy.storage import disk as storage_module
from dioproxy.storage.disk import DiskStorage
from tests.harness import Proxy, start_upstream
from tests.test_ops_metrics import value
from tests.test_ops_reload import eventually

DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MAIN = threading.current_thread()


class ByDigestTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        self.proxy = Proxy(self, self.fake.registry_url)
        self.image = self.fake.add_image("library/multi", "1.0", platforms=["linux/arm64", "linux/amd64"])

    @defer.inlineCallbacks
    def get(self, reference, accept=DOCKER_V2):
        response = yield self.proxy.get(f"/v2/library/multi/manifests/{reference}", headers={"Accept": [accept]})
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def test_an_index_asked_for_by_digest_is_that_index(self):
        """Only a tag may stand for the linux/amd64 image; a digest names exact bytes."""
        response, body = yield self.get(self.image.digest)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.image.body)
        self.assertEqual(response.headers.getRawHeaders("Docker-Content-Digest"), [self.image.digest])
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), [self.image.media_type])

    @defer.inlineCallbacks
    def test_a_tag_still_gets_the_platform_default(self):
        response, body = yield self.get("1.0")
        amd64 = self.image.platform("linux/amd64")
        self.assertEqual(body, amd64.body)
        self.assertEqual(response.headers.getRawHeaders("Docker-Content-Digest"), [amd64.digest])
        self.assertEqual(json.loads(body)["mediaType"], amd64.media_type)


class OddTagTests(unittest.TestCase):
    """A tag outside the grammar cannot exist anywhere: 404 MANIFEST_UNKNOWN, as the conformance suite expects,
    without asking the upstream. Input that could reach a path or a header stays a 400."""

    def setUp(self):
        self.fake = start_upstream(self)
        self.proxy = Proxy(self, self.fake.registry_url)
        self.fake.add_image("library/hello", "1.0")

    @defer.inlineCallbacks
    def error(self, reference, method="GET"):
        response = yield self.proxy.get(f"/v2/library/hello/manifests/{reference}", method=method)
        body = yield response.content()
        code = json.loads(body)["errors"][0]["code"] if body else None
        return response.code, code

    @defer.inlineCallbacks
    def test_odd_and_unknown_tags_are_unknown(self):
        # .INVALID_MANIFEST_NAME is what the OCI conformance suite asks for; the rest break the grammar too.
        for reference in [".INVALID_MANIFEST_NAME", "-x", "a" * 129, "tag%20with%20space", "%25", "x@y", "nope"]:
            self.assertEqual((yield self.error(reference)), (404, "MANIFEST_UNKNOWN"), reference)
        response = yield self.proxy.get("/v2/library/hello/manifests/.x", method="HEAD")
        self.assertEqual(response.code, 404)
        self.assertEqual([r.path for r in self.fake.find("registry") if "nope" not in r.path], [], "asked upstream")

    @defer.inlineCallbacks
    def test_hostile_references_stay_invalid(self):
        for reference in ["..", ".", "a%2fb", "..%2f..%2fetc", "a%5cb", "bad%0d%0atag", "nul%00", "tab%09"]:
            self.assertEqual((yield self.error(reference)), (400, "MANIFEST_INVALID"), reference)
        for reference in ["sha256:abc", "sha256:" + "A" * 64, "md5:" + "a" * 32]:
            self.assertEqual((yield self.error(reference)), (400, "DIGEST_INVALID"), reference)
        self.assertEqual(self.fake.count("registry", path_contains="/manifests/"), 0)


SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"


class ReferrersTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        self.proxy = Proxy(self, self.fake.registry_url)
        self.image = self.fake.add_image("library/hello", "1.0")
        self.signature = self.fake.add_referrer("library/hello", self.image, SIGNATURE)
        self.sbom = self.fake.add_referrer("library/hello", self.image, SBOM, {"org.example": "yes"})
        self.path = f"/v2/hello/referrers/{self.image.digest}"

    @defer.inlineCallbacks
    def referrers(self, query="", path=None):
        response = yield self.proxy.get((path or self.path) + query)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/vnd.oci.image.index.v1+json"])
        body = yield response.json()
        return response, [(e["digest"], e.get("artifactType")) for e in body["manifests"]]

    @defer.inlineCallbacks
    def test_fallback_tag_when_the_upstream_has_no_api(self):
        response, entries = yield self.referrers()
        self.assertEqual(sorted(entries), sorted([(self.signature, SIGNATURE), (self.sbom, SBOM)]))
        self.assertIsNone(response.headers.getRawHeaders("OCI-Filters-Applied"))
        tag = self.image.digest.replace(":", "-")
        self.assertEqual(self.fake.count("registry", "GET", f"/manifests/{tag}"), 1)
        yield self.referrers()  # the tag is cached like any other: within its TTL no upstream manifest GET
        self.assertEqual(self.fake.count("registry", "GET", f"/manifests/{tag}"), 1)

    @defer.inlineCallbacks
    def test_fallback_tag_is_filtered_by_artifact_type(self):
        response, entries = yield self.referrers(f"?artifactType={quote(SBOM)}")
        self.assertEqual(entries, [(self.sbom, SBOM)])
        self.assertEqual(response.headers.getRawHeaders("OCI-Filters-Applied"), ["artifactType"])

    @defer.inlineCallbacks
    def test_empty_index_only_when_neither_exists(self):
        other = self.fake.add_image("library/hello", "2.0")
        path = f"/v2/hello/referrers/{other.digest}"
        response, entries = yield self.referrers(path=path)
        self.assertEqual(entries, [])
        response, entries = yield self.referrers(f"?artifactType={quote(SBOM)}", path=path)
        self.assertEqual((entries, response.headers.getRawHeaders("OCI-Filters-Applied")), ([], ["artifactType"]))

    @defer.inlineCallbacks
    def test_pass_through_keeps_filters_and_pages_through_us(self):
        self.fake.referrers_api = True
        self.fake.referrers_page = 1
        for i in range(2):
            self.fake.add_referrer("library/hello", self.image, SBOM, {"n": str(i)})
        response, first = yield self.referrers(f"?artifactType={quote(SBOM)}&ns=docker.io")
        self.assertEqual(response.headers.getRawHeaders("OCI-Filters-Applied"), ["artifactType"])
        [link] = response.headers.getRawHeaders("Link")
        self.assertTrue(link.startswith(f"<{self.proxy.url}{self.path}?"), link)
        self.assertTrue(link.endswith('>; rel="next"'), link)
        self.assertIn("ns=docker.io", link)
        seen = list(first)
        while link:
            response = yield self.proxy.get(link[1 : link.index(">")][len(self.proxy.url) :])
            seen += [(e["digest"], e["artifactType"]) for e in (yield response.json())["manifests"]]
            link = (response.headers.getRawHeaders("Link") or [""])[0]
        self.assertEqual(len(seen), 3)
        self.assertEqual({t for _, t in seen}, {SBOM})
        self.assertIn((self.sbom, SBOM), seen)
        self.assertEqual(self.fake.count("registry", "GET", "/manifests/sha256-"), 0, "the API answered")


class BlobEdgeTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        self.proxy = Proxy(self, self.fake.registry_url)
        self.empty = self.fake.add_blob(b"")
        self.data = b"0123456789"
        self.digest = self.fake.add_blob(self.data)

    @defer.inlineCallbacks
    def test_head_of_an_uncached_blob_has_its_length_the_empty_one_too(self):
        """The upstream answers ``Range: bytes=0-0`` on the empty blob with 416 ``bytes */0``: length 0."""
        status, headers = yield self.proxy.head(f"/v2/library/hello/blobs/{self.empty}")
        self.assertEqual((status, headers.get("content-length")), (200, "0"))
        self.assertEqual(headers.get("docker-content-digest"), self.empty)
        status, headers = yield self.proxy.head(f"/v2/library/hello/blobs/{self.digest}")
        self.assertEqual((status, headers.get("content-length")), (200, "10"))

    @defer.inlineCallbacks
    def fetch(self, digest, range_header):
        response = yield self.proxy.get(f"/v2/library/hello/blobs/{digest}", headers={"Range": [range_header]})
        body = yield response.content()
        return response.code, response.headers.getRawHeaders("Content-Range"), body

    @defer.inlineCallbacks
    def test_ranges_follow_rfc_9110(self):
        yield self.fetch(self.digest, "bytes=0-")  # cached now
        yield self.fetch(self.empty, "bytes=0-")
        self.assertEqual((yield self.fetch(self.digest, "bytes=5-2")), (200, None, self.data), "invalid: ignored")
        self.assertEqual((yield self.fetch(self.digest, "bytes=x-1")), (200, None, self.data))
        self.assertEqual((yield self.fetch(self.digest, "bytes=-3")), (206, ["bytes 7-9/10"], b"789"))
        self.assertEqual((yield self.fetch(self.digest, "bytes=10-")), (416, ["bytes */10"], b""))
        self.assertEqual((yield self.fetch(self.empty, "bytes=-5")), (416, ["bytes */0"], b""))
        self.assertEqual((yield self.fetch(self.empty, "bytes=0-0")), (416, ["bytes */0"], b""))
        self.assertEqual((yield self.fetch(self.empty, "bytes=3-1")), (200, None, b""))
        self.assertEqual(self.fake.count("cdn", "GET"), 2, "all but the first two from the cache")


class IfNoneMatchTests(unittest.TestCase):
    """RFC 9110 If-None-Match: ``*``, lists, weak tags (compared weakly); blobs answer 304 like manifests."""

    def setUp(self):
        self.fake = start_upstream(self)
        self.image = self.fake.add_image("library/hello", "1.0", layer_sizes=[5000])
        self.layer = self.image.layer_digests[0]

    def matching(self, digest):
        return ["*", f'"{digest}"', f'W/"{digest}"', f'"sha256:{"0" * 64}", W/"{digest}"', f'"x",  "{digest}"']

    @defer.inlineCallbacks
    def status(self, proxy, path, condition, method="GET"):
        if method == "HEAD":
            response = yield proxy.get(path, method="HEAD", headers={"If-None-Match": [condition]})
        else:
            response = yield proxy.get(path, headers={"If-None-Match": [condition]})
        body = yield response.content()
        if response.code == 304:
            self.assertEqual(body, b"")
        return response.code

    @defer.inlineCallbacks
    def check(self, proxy, path, digest):
        for condition in self.matching(digest):
            self.assertEqual((yield self.status(proxy, path, condition)), 304, condition)
            self.assertEqual((yield self.status(proxy, path, condition, "HEAD")), 304, condition)
        for condition in [f'"sha256:{"0" * 64}"', digest[:20], f'"{digest}x"']:
            self.assertEqual((yield self.status(proxy, path, condition)), 200, condition)

    @defer.inlineCallbacks
    def test_manifests(self):
        proxy = Proxy(self, self.fake.registry_url)
        yield self.check(proxy, "/v2/library/hello/manifests/1.0", self.image.digest)
        self.assertEqual((yield self.status(proxy, "/v2/library/hello/manifests/nope", "*")), 404)

    @defer.inlineCallbacks
    def test_blobs_cold_and_cached(self):
        proxy = Proxy(self, self.fake.registry_url)
        path = f"/v2/library/hello/blobs/{self.layer}"
        self.assertEqual((yield self.status(proxy, path, "*", "HEAD")), 304, "uncached HEAD")
        self.assertEqual((yield self.status(proxy, path, "*")), 304, "uncached GET")
        yield self.check(proxy, path, self.layer)
        missing = f"/v2/library/hello/blobs/sha256:{'1' * 64}"
        self.assertEqual((yield self.status(proxy, missing, "*")), 404)

    @defer.inlineCallbacks
    def test_blobs_passed_through(self):
        proxy = Proxy(self, self.fake.registry_url, cache={"enabled": False})
        yield self.check(proxy, f"/v2/library/hello/blobs/{self.layer}", self.layer)


class AbortedTests(unittest.TestCase):
    """A response cut mid-body (here: a blob failing its digest) is logged and counted as aborted, not as a 200."""

    @defer.inlineCallbacks
    def test_a_digest_mismatch_is_aborted_in_the_log_and_the_metrics(self):
        fake = start_upstream(self)
        proxy = Proxy(self, fake.registry_url)
        digest = fake.add_blob(os.urandom(300_000))
        fake.corrupt_blob(digest)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        with self.assertRaises(ResponseFailed):
            yield (yield proxy.get(f"/v2/library/hello/blobs/{digest}")).content()
        yield eventually(lambda: [e for e in events if e.get("log_namespace") == "dioproxy.access"])
        [line] = [e for e in events if e.get("log_namespace") == "dioproxy.access"]
        self.assertEqual((line["status"], line["aborted"]), ("aborted", True))
        self.assertGreater(line["bytes"], 0, "the body was cut, not refused")
        self.assertIn(f"/blobs/{digest} aborted ", line["line"])
        text = proxy.mirror.metrics.exposition().decode()
        self.assertEqual(value(text, "dioproxy_requests_total", endpoint="blobs", status="aborted"), 1)
        self.assertEqual(value(text, "dioproxy_requests_total", endpoint="blobs", status="200"), 0)
        self.assertEqual(value(text, "dioproxy_requests_aborted_total", endpoint="blobs"), 1)


class SmallFileTests(unittest.TestCase):
    """Manifests, tag entries and records are fsynced before their rename, in the disk pool, never on the reactor;
    until the write is done the bytes are served from memory."""

    def setUp(self):
        self.calls = []  # (what, path, on the reactor thread?)
        self.gate = threading.Event()
        self.addCleanup(self.gate.set)
        real_fsync, real_rename = os.fsync, os.rename

        def fsync(fd):
            self.calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), threading.current_thread() is MAIN))
            self.gate.wait(30)
            real_fsync(fd)

        def rename(src, dst):
            self.calls.append(("rename", (src, dst), threading.current_thread() is MAIN))
            real_rename(src, dst)

        self.patch(storage_module.os, "fsync", fsync)
        self.patch(storage_module.os, "rename", rename)

    def renamed(self, root):
        """Final paths (relative to root) renamed into place, each checked to follow an fsync of its temp file."""
        done, synced = [], set()
        for what, path, on_reactor in self.calls:
            self.assertFalse(on_reactor, f"{what} {path} on the reactor thread")
            if what == "fsync":
                synced.add(path)
            elif path[1].startswith(root):
                self.assertIn(path[0], synced, f"{path[1]} renamed before its fsync")
                done.append(os.path.relpath(path[1], root))
        return done

    @defer.inlineCallbacks
    def test_storage_writes_in_order_and_reads_what_is_pending(self):
        pools = Pools(reactor)
        self.addCleanup(pools.stop)
        self.addCleanup(self.gate.set)  # before the pools stop: a stuck thread would hold up the join
        storage = DiskStorage(self.mktemp(), pools.disk)
        path = os.path.join(storage.root, "repos", "r", "n", "_tags", "t")
        first = storage.write_small(path, b"1")
        yield eventually(lambda: self.calls)  # the first write is stuck in its fsync
        second = storage.write_small(path, b"2")
        self.assertEqual(storage.read_small(path), b"2")
        storage.delete_tag("r", "n", "t")
        self.assertIsNone(storage.read_small(path))
        third = storage.write_small(path, b"3")
        self.assertFalse(os.path.exists(path))
        self.assertFalse(first.called or second.called or third.called)
        self.gate.set()
        self.assertEqual((yield defer.gatherResults([first, second, third])), [True, True, True])
        yield storage.settled()
        self.assertEqual((storage.read_small(path), storage._writing, storage._queued), (b"3", {}, {}))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"3", "the latest write wins")
        self.assertEqual(self.renamed(storage.root), ["repos/r/n/_tags/t"] * 2, "1, then 3 (2 was superseded)")
        blocked = os.path.join(path, "below-a-file")
        self.assertFalse((yield storage.write_small(blocked, b"x")), "a failed write says so")
        self.assertIsNone(storage.read_small(blocked))

    @defer.inlineCallbacks
    def test_a_pull_is_served_while_its_files_are_being_written(self):
        fake = start_upstream(self)
        proxy = Proxy(self, fake.registry_url)
        image = fake.add_image("library/hello", "1.0")
        for _ in range(2):  # the fsync hangs: the reactor does not
            response = yield proxy.get("/v2/library/hello/manifests/1.0")
            self.assertEqual((yield response.content()), image.body)
        self.assertFalse(os.path.exists(proxy.mirror.storage.manifest_path(image.digest)))
        self.gate.set()
        yield proxy.mirror.storage.settled()
        hexdigest = image.digest.split(":")[1]
        self.assertEqual(
            sorted(self.renamed(proxy.cache_dir)),
            [f"manifests/sha256/{hexdigest}", "repos/docker.io/library/hello/_tags/1.0"],
        )

    @defer.inlineCallbacks
    def test_a_damaged_manifest_file_is_removed_never_served(self):
        self.gate.set()
        fake = start_upstream(self)
        proxy = Proxy(self, fake.registry_url)
        image = fake.add_image("library/hello", "1.0")
        path = f"/v2/library/hello/manifests/{image.digest}"
        yield (yield proxy.get(path)).content()
        yield proxy.mirror.storage.settled()
        stored = proxy.mirror.storage.manifest_path(image.digest)
        with open(stored, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"XYZ")
        proxy.mirror.manifests.drop_memory()  # as a restart would
        yield fake.stop()
        response = yield proxy.get(path)
        self.assertEqual(response.code, 503, "not the damaged bytes, nor a hit")
        yield response.content()
        yield proxy.mirror.storage.settled()
        self.assertFalse(os.path.exists(stored), "the damaged file was removed")
