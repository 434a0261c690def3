"""Manifests through the proxy: headers, tag TTL, HEAD revalidation, stale serving, errors (fake Docker Hub)."""

import json
import os

from twisted.internet import defer
from twisted.trial import unittest

from tests.fakeregistry import DOCKER_MANIFEST, OCI_INDEX
from tests.harness import Proxy, start_upstream

ACCEPT_ALL = {
    "Accept": [
        "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
        "application/vnd.docker.distribution.manifest.list.v2+json, "
        "application/vnd.docker.distribution.manifest.v2+json"
    ]
}


class ManifestTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        self.proxy = Proxy(self, self.fake.registry_url)
        self.image = self.fake.add_image("library/hello", "1.0", layer_sizes=[1000])
        self.multi = self.fake.add_image(
            "owner/multi", "2.0", layer_sizes=[500], platforms=["linux/amd64", "linux/arm64"]
        )

    def manifest_gets(self):
        """Manifest GETs the upstream answered (what Docker Hub counts against the rate limit)."""
        return len([r for r in self.fake.find("registry", "GET", "/manifests/") if r.status == 200])

    @defer.inlineCallbacks
    def test_get_by_tag_headers_and_body(self):
        response = yield self.proxy.get("/v2/library/hello/manifests/1.0", headers=ACCEPT_ALL)
        body = yield response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.image.body)
        h = response.headers
        self.assertEqual(h.getRawHeaders("Content-Type"), [DOCKER_MANIFEST])
        self.assertEqual(h.getRawHeaders("Docker-Content-Digest"), [self.image.digest])
        self.assertEqual(h.getRawHeaders("ETag"), [f'"{self.image.digest}"'])
        self.assertEqual(response.length, len(self.image.body))
        self.assertEqual(h.getRawHeaders("OCI-Namespace"), ["docker.io"])

    @defer.inlineCallbacks
    def test_short_docker_hub_name_gains_library(self):
        response = yield self.proxy.get("/v2/hello/manifests/1.0", headers=ACCEPT_ALL)
        self.assertEqual((yield response.content()), self.image.body)
        self.assertEqual(self.manifest_gets(), 1)
        self.assertEqual(self.fake.find("registry", "GET", "/manifests/")[-1].path, "/v2/library/hello/manifests/1.0")

    @defer.inlineCallbacks
    def test_repeated_tag_within_ttl_costs_upstream_nothing(self):
        yield (yield self.proxy.get("/v2/library/hello/manifests/1.0")).content()
        self.fake.clear_requests()
        for _ in range(20):
            response = yield self.proxy.get("/v2/library/hello/manifests/1.0")
            self.assertEqual((yield response.content()), self.image.body)
            response = yield self.proxy.get("/v2/library/hello/manifests/1.0", method="HEAD")
            self.assertEqual(response.code, 200)
        self.assertEqual(self.fake.requests, [], "40 tag requests within the TTL reached the upstream")

    @defer.inlineCallbacks
    def test_expired_tag_is_revalidated_with_head_only(self):
        yield (yield self.proxy.get("/v2/library/hello/manifests/1.0")).content()
        self.proxy.mirror.manifests.tag_ttl = 0
        self.fake.clear_requests()
        remaining = self.fake.ratelimit_remaining
        response = yield self.proxy.get("/v2/library/hello/manifests/1.0")
        self.assertEqual((yield response.content()), self.image.body)
        self.assertEqual(self.fake.count("registry", "HEAD", "/manifests/1.0"), 1)
        self.assertEqual(self.manifest_gets(), 0)
        self.assertEqual(self.fake.ratelimit_remaining, remaining, "a revalidation must not spend rate limit")

    @defer.inlineCallbacks
    def test_moved_tag_fetches_the_new_body_once(self):
        yield (yield self.proxy.get("/v2/library/hello/manifests/1.0")).content()
        moved = self.fake.add_image("library/hello", "1.0", layer_sizes=[10])
        self.proxy.mirror.manifests.tag_ttl = 0
        self.fake.clear_requests()
        response = yield self.proxy.get("/v2/library/hello/manifests/1.0")
        self.assertEqual((yield response.content()), moved.body)
        self.assertEqual(response.headers.getRawHeaders("Docker-Content-Digest"), [moved.digest])
        self.assertEqual(self.manifest_gets(), 1)

    @defer.inlineCallbacks
    def test_stale_when_upstream_fails(self):
        yield (yield self.proxy.get("/v2/library/hello/manifests/1.0")).content()
        self.proxy.mirror.manifests.tag_ttl = 0
        for status in (500, 503, 429):
            self.fake.fail_next(10, status=status, role=None)
            response = yield self.proxy.get("/v2/library/hello/manifests/1.0")
            self.assertEqual(response.code, 200, status)
            self.assertEqual((yield response.content()), self.image.body)
            self.fake.reset_faults()
        yield self.fake.stop()
        response = yield self.proxy.get("/v2/library/hello/manifests/1.0")
        self.assertEqual((response.code, (yield response.content())), (200, self.image.body))

    @defer.inlineCallbacks
    def test_by_digest_is_cached_forever(self):
        path = f"/v2/library/hello/manifests/{self.image.digest}"
        yield (yield self.proxy.get(path)).content()
        self.fake.clear_requests()
        response = yield self.proxy.get(path)
        self.assertEqual((yield response.content()), self.image.body)
        self.assertEqual(self.fake.requests, [])

    @defer.inlineCallbacks
    def test_index_and_platform_manifests(self):
        response = yield self.proxy.get("/v2/owner/multi/manifests/2.0", headers=ACCEPT_ALL)
        body = yield response.content()
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), [OCI_INDEX])
        self.assertEqual(body, self.multi.body)
        for entry in json.loads(body)["manifests"]:
            response = yield self.proxy.get(f"/v2/owner/multi/manifests/{entry['digest']}", headers=ACCEPT_ALL)
            self.assertEqual(response.headers.getRawHeaders("Docker-Content-Digest"), [entry["digest"]])
            self.assertEqual(
                (yield response.content()),
                self.multi.platform(entry["platform"]["os"] + "/" + entry["platform"]["architecture"]).body,
            )

    @defer.inlineCallbacks
    def test_client_without_index_support_gets_linux_amd64(self):
        response = yield self.proxy.get(
            "/v2/owner/multi/manifests/2.0", headers={"Accept": ["application/vnd.oci.image.manifest.v1+json"]}
        )
        self.assertEqual((yield response.content()), self.multi.platform("linux/amd64").body)

    @defer.inlineCallbacks
    def test_if_none_match(self):
        response = yield self.proxy.get(
            "/v2/library/hello/manifests/1.0", headers={"If-None-Match": [f'"{self.image.digest}"']}
        )
        self.assertEqual(response.code, 304)
        self.assertEqual((yield response.content()), b"")

    @defer.inlineCallbacks
    def test_unknown_manifest_is_404(self):
        response = yield self.proxy.get("/v2/library/hello/manifests/nope")
        self.assertEqual(response.code, 404)
        self.assertEqual((yield response.json())["errors"][0]["code"], "MANIFEST_UNKNOWN")

    @defer.inlineCallbacks
    def test_made_up_tags_take_no_memory(self):
        for i in range(30):
            response = yield self.proxy.get(f"/v2/library/hello/manifests/nope{i}")
            self.assertEqual(response.code, 404)
            yield response.content()
        self.assertEqual(len(self.proxy.mirror.manifests.tags), 0)

    @defer.inlineCallbacks
    def test_purged_entries_leave_memory_on_sighup(self):
        """``dioproxy purge`` edits the disk; the SIGHUP it asks for makes a running proxy forget its copies."""
        yield (yield self.proxy.get("/v2/library/hello/manifests/1.0")).content()
        storage = self.proxy.mirror.storage
        yield storage.settled()  # the files are written in the disk pool
        os.unlink(storage.tag_path("docker.io", "library/hello", "1.0"))
        os.unlink(storage.manifest_path(self.image.digest))
        self.proxy.mirror.manifests.drop_memory()  # what the SIGHUP handler calls
        self.fake.clear_requests()
        yield (yield self.proxy.get("/v2/library/hello/manifests/1.0")).content()
        self.assertEqual(self.manifest_gets(), 1, "the purged manifest was fetched again")

    @defer.inlineCallbacks
    def test_deleted_tag_is_forgotten(self):
        yield (yield self.proxy.get("/v2/library/hello/manifests/1.0")).content()
        self.fake.untag("library/hello", "1.0")
        self.proxy.mirror.manifests.tag_ttl = 0
        response = yield self.proxy.get("/v2/library/hello/manifests/1.0")
        self.assertEqual(response.code, 404)
        yield response.content()

    @defer.inlineCallbacks
    def test_concurrent_requests_share_one_upstream_fetch(self):
        responses = yield defer.gatherResults([self.proxy.get("/v2/library/hello/manifests/1.0") for _ in range(10)])
        bodies = yield defer.gatherResults([r.content() for r in responses])
        self.assertEqual(set(bodies), {self.image.body})
        self.assertEqual(self.manifest_gets(), 1)

    @defer.inlineCallbacks
    def test_tags_survive_a_restart(self):
        yield (yield self.proxy.get("/v2/library/hello/manifests/1.0")).content()
        yield self.fake.stop()
        yield self.proxy.mirror.storage.settled()  # as a process that stops does
        again = Proxy(self, self.fake.registry_url, cache_dir=self.proxy.cache_dir)
        response = yield again.get("/v2/library/hello/manifests/1.0")
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.content()), self.image.body)
