"""Guarantees that breaking the code on purpose must turn red (issue 9 section 8: mutations the suite missed).

Each test names the mutation it was written against in its docstring.
"""

from __future__ import annotations

import os

import treq
from twisted.internet import defer
from twisted.trial import unittest
from twisted.web.client import ResponseFailed

from tests.harness import Proxy, eventually, start_upstream

MB = 1024 * 1024
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


class FollowerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_follower_has_body_bytes_while_the_fill_runs(self):
        """Mutation: followers get nothing until the fill is done."""
        fake = start_upstream(self)
        proxy = Proxy(self, fake.registry_url)
        data = os.urandom(3 * MB)
        digest = fake.add_blob(data)
        fake.slow(1_000_000)  # the fill takes about 3 s whatever the machine's speed
        path = f"/v2/library/hello/blobs/{digest}"
        leader = yield proxy.get(path)
        yield fake.wait_for_requests(1, "cdn", "GET", digest)
        follower = yield proxy.get(path)
        got: dict[str, list[bytes]] = {"leader": [], "follower": []}
        done = [treq.collect(leader, got["leader"].append), treq.collect(follower, got["follower"].append)]
        yield eventually(lambda: sum(map(len, got["follower"])) > 0, why="the follower got no byte")
        self.assertIsNotNone(proxy.mirror.fills.get(digest), "the fill was still running")
        self.assertEqual(fake.count("cdn", "GET", digest), 1, "it is a follower of the one fill")
        yield defer.gatherResults(done)
        self.assertEqual([b"".join(got["leader"]), b"".join(got["follower"])], [data, data])


class UnknownSizeTests(unittest.TestCase):
    """The upstream sends the blob chunked, without Content-Length: the fill does not know where the end is."""

    def setUp(self):
        self.fake = start_upstream(self)
        self.fake.chunked = True
        self.proxy = Proxy(self, self.fake.registry_url)
        self.data = os.urandom(2 * MB)
        self.digest = self.fake.add_blob(self.data)
        self.path = f"/v2/library/hello/blobs/{self.digest}"

    @defer.inlineCallbacks
    def test_a_damaged_blob_of_unknown_size_keeps_its_tail(self):
        """Mutation: no hold-back when the size is unknown (the client got every byte, then the abort)."""
        self.fake.corrupt_blob(self.digest)
        response = yield self.proxy.get(self.path)
        received: list[bytes] = []
        yield self.assertFailure(treq.collect(response, received.append), ResponseFailed)
        self.assertLess(len(b"".join(received)), len(self.data), "the whole damaged blob went out")
        self.assertFalse(os.path.exists(self.proxy.blob_file(self.digest)))

    @defer.inlineCallbacks
    def test_a_good_blob_of_unknown_size_is_whole_and_cached(self):
        self.assertNotIn("content-length", (yield self._upstream_headers()))
        response = yield self.proxy.get(self.path)
        self.assertEqual((yield response.content()), self.data)
        self.assertTrue(os.path.exists(self.proxy.blob_file(self.digest)))

    @defer.inlineCallbacks
    def _upstream_headers(self):
        response = yield self.proxy.client.get(self.fake.cdn_blob_url(self.digest))
        yield response.content()
        return {k.decode().lower() for k, _ in response.headers.getAllRawHeaders()}


class ManifestDigestTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        self.image = self.fake.add_image("library/hello", "1.0", layer_sizes=[10])

    @defer.inlineCallbacks
    def assert_refused_then_healed(self, proxy: Proxy):
        path = f"/v2/library/hello/manifests/{self.image.digest}"
        self.fake.lie_about("library/hello", self.image.digest, self.image.body.replace(b"1", b"2", 1))
        response = yield proxy.get(path)
        self.assertEqual(response.code, 502)
        self.assertEqual((yield response.json())["errors"][0]["code"], "DIGEST_INVALID")
        self.fake.lie_about("library/hello", self.image.digest, self.image.body)
        response = yield proxy.get(path)
        self.assertEqual((yield response.content()), self.image.body, "nothing of the lie was kept")

    def test_a_manifest_by_digest_is_verified(self):
        """Mutation: the digest check of a manifest fetched by digest removed (Manifests._by_digest)."""
        return self.assert_refused_then_healed(Proxy(self, self.fake.registry_url))

    def test_a_manifest_by_digest_is_verified_without_a_cache(self):
        """Mutation: the same check removed from the pass-through path (cache.enabled: false)."""
        return self.assert_refused_then_healed(Proxy(self, self.fake.registry_url, cache={"enabled": False}))


class TagTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        self.fake.add_image("library/hello", "1.0", layer_sizes=[10])
        self.path = "/v2/library/hello/manifests/1.0"

    @defer.inlineCallbacks
    def pull(self, proxy: Proxy) -> int:
        response = yield proxy.get(self.path)
        yield response.content()
        return response.code

    @defer.inlineCallbacks
    def test_tag_ttl_comes_from_the_config(self):
        """Mutation: Mirror ignores config.tag_ttl (a constant TTL instead)."""
        for ttl, heads in ((0, 1), ("1h", 0)):
            proxy = Proxy(self, self.fake.registry_url, cache={"tag_ttl": ttl})
            self.assertEqual((yield self.pull(proxy)), 200)
            self.fake.clear_requests()
            self.assertEqual((yield self.pull(proxy)), 200)
            self.assertEqual(self.fake.count("registry", "HEAD", "/manifests/1.0"), heads, f"tag_ttl {ttl}")

    @defer.inlineCallbacks
    def test_a_tag_deleted_upstream_is_forgotten_on_disk(self):
        """Mutation: a deleted upstream tag's entry is not forgotten (in memory or on disk)."""
        proxy = Proxy(self, self.fake.registry_url, cache={"tag_ttl": 0})
        self.assertEqual((yield self.pull(proxy)), 200)
        self.assertIsNotNone(proxy.mirror.storage.read_tag("docker.io", "library/hello", "1.0"))
        self.fake.untag("library/hello", "1.0")
        self.assertEqual((yield self.pull(proxy)), 404)
        self.assertIsNone(proxy.mirror.storage.read_tag("docker.io", "library/hello", "1.0"))
        again = Proxy(self, self.fake.registry_url, proxy.cache_dir)
        self.fake.fail_next(20, 503)
        self.assertNotEqual((yield self.pull(again)), 200, "a deleted tag came back stale after a restart")
