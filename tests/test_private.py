"""Content fetched with upstream credentials fails closed: marked only once the upstream confirmed, visible to every
process on the cache directory, never served through another repository the upstream did not vouch for."""

import contextlib
import json
import os
import time

from twisted.internet import defer
from twisted.trial import unittest
from twisted.web.client import ResponseFailed

from dioproxy.config import build_config
from dioproxy.storage import disk as storage_module
from tests.harness import Proxy, eventually, start_upstream


class PrivateBlobTests(unittest.TestCase):
    def setUp(self):
        self.ghcr = start_upstream(self, users={"bot": "pat"}, private=["acme/private"])
        self.ghcr.strict_repos = True
        self.secret = self.ghcr.add_image("acme/private", "1.0", layer_sizes=[300_000])
        self.layer = self.secret.layer_digests[0]
        self.ghcr.add_image("attacker/x", "1.0", layer_sizes=[10])
        self.proxy = self.start_proxy()

    def start_proxy(self, cache_dir=None):
        upstream = {"url": self.ghcr.registry_url, "username": "bot", "password": "pat"}
        return Proxy(self, self.ghcr.registry_url, cache_dir=cache_dir, upstreams={"ghcr.io": upstream})

    @defer.inlineCallbacks
    def fetch(self, path, proxy=None):
        response = yield (proxy or self.proxy).get(path)
        body = yield response.content()
        return response.code, body

    def record(self, digest):
        return os.path.join(self.proxy.cache_dir, "private", digest.split(":", 1)[1])

    @defer.inlineCallbacks
    def test_a_refused_request_leaves_no_mark(self):
        """attacker/x asks for the secret layer first (the upstream says 404), org/secret then caches it: the
        attacker's name must not have been recorded as holding it."""
        code, _ = yield self.fetch(f"/v2/ghcr.io/attacker/x/blobs/{self.layer}")
        self.assertEqual(code, 404)
        code, body = yield self.fetch(f"/v2/ghcr.io/acme/private/blobs/{self.layer}")
        self.assertEqual((code, body == self.secret.layers[0]), (200, True))
        code, body = yield self.fetch(f"/v2/ghcr.io/attacker/x/blobs/{self.layer}")
        self.assertEqual(code, 404, "the private bytes went to a repository the upstream refused")
        self.assertNotIn(self.secret.layers[0][:1000], body)

    @defer.inlineCallbacks
    def test_the_record_is_on_disk_before_the_blob_appears(self):
        """Another process on the cache directory sees only the disk: the blob must never be there before its
        record, however slow the disk pool is with the record's write."""
        real_replace = storage_module._replace

        def slow_replace(tmp, path, data):
            if os.sep + "private" + os.sep in path:
                time.sleep(0.3)  # in the disk pool's thread
            real_replace(tmp, path, data)

        self.patch(storage_module, "_replace", slow_replace)
        storage = self.proxy.mirror.storage
        seen_at_commit = []
        real_commit = storage.commit_blob

        def commit_blob(temp_path, digest):
            seen_at_commit.append(os.path.exists(self.record(digest)))
            return real_commit(temp_path, digest)

        self.patch(storage, "commit_blob", commit_blob)
        code, _ = yield self.fetch(f"/v2/ghcr.io/acme/private/blobs/{self.layer}")
        self.assertEqual((code, seen_at_commit), (200, [True]))

    @defer.inlineCallbacks
    def test_a_corrupt_record_counts_as_private(self):
        code, _ = yield self.fetch(f"/v2/ghcr.io/acme/private/blobs/{self.layer}")
        self.assertEqual(code, 200)
        for damage in (b"{not json", b'{"a": 1}', b""):
            with open(self.record(self.layer), "wb") as f:
                f.write(damage)
            restarted = self.start_proxy(cache_dir=self.proxy.cache_dir)
            code, _ = yield self.fetch(f"/v2/ghcr.io/attacker/x/blobs/{self.layer}", proxy=restarted)
            self.assertEqual(code, 404, damage)
        # The rightful repository is confirmed again by the upstream and served.
        code, body = yield self.fetch(f"/v2/ghcr.io/acme/private/blobs/{self.layer}", proxy=restarted)
        self.assertEqual((code, body == self.secret.layers[0]), (200, True))

    @defer.inlineCallbacks
    def test_an_unreadable_record_counts_as_private(self):
        code, _ = yield self.fetch(f"/v2/ghcr.io/acme/private/blobs/{self.layer}")
        self.assertEqual(code, 200)
        os.unlink(self.record(self.layer))
        os.mkdir(self.record(self.layer))  # open() fails with EISDIR, not ENOENT
        restarted = self.start_proxy(cache_dir=self.proxy.cache_dir)
        code, _ = yield self.fetch(f"/v2/ghcr.io/attacker/x/blobs/{self.layer}", proxy=restarted)
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_records_are_shared_by_processes_on_one_cache_directory(self):
        other = self.start_proxy(cache_dir=self.proxy.cache_dir)  # started before the record exists
        code, _ = yield self.fetch(f"/v2/ghcr.io/acme/private/blobs/{self.layer}")
        self.assertEqual(code, 200)
        code, _ = yield self.fetch(f"/v2/ghcr.io/attacker/x/blobs/{self.layer}", proxy=other)
        self.assertEqual(code, 404, "the other process took a new private digest for public")
        code, body = yield self.fetch(f"/v2/ghcr.io/acme/private/blobs/{self.layer}", proxy=other)
        self.assertEqual((code, body == self.secret.layers[0]), (200, True))

    @defer.inlineCallbacks
    def test_a_follower_from_another_repository_waits_for_the_upstream(self):
        """While acme/private's fill runs there is no record yet: a follower through another repository is served
        only once the upstream said (HEAD, with its own name) that this repository holds the blob too."""
        self.ghcr.add_image("acme/also", "1.0", layers=[self.secret.layers[0]])
        gate = self.ghcr.gate_blob(self.layer)
        self.addCleanup(lambda: gate.called or gate.callback(None))
        first = self.proxy.get(f"/v2/ghcr.io/acme/private/blobs/{self.layer}")
        yield self.ghcr.wait_for_requests(1, "cdn", "GET", self.layer)
        self.assertFalse(os.path.exists(self.record(self.layer)), "marked before the upstream confirmed")
        attacker = self.fetch(f"/v2/ghcr.io/attacker/x/blobs/{self.layer}")
        yield self.ghcr.wait_for_requests(1, "registry", "HEAD", f"attacker/x/blobs/{self.layer}", timeout=10)
        code, _ = yield attacker
        self.assertEqual(code, 404, "a follower from another repository was served a credentialed fill")
        heads = self.ghcr.find("registry", "HEAD", f"attacker/x/blobs/{self.layer}")
        self.assertEqual([r.status for r in heads][-1:], [404])
        also = self.proxy.get(f"/v2/ghcr.io/acme/also/blobs/{self.layer}")
        yield self.ghcr.wait_for_requests(1, "registry", "HEAD", f"acme/also/blobs/{self.layer}")
        gate.callback(None)
        for pending in (first, also):
            response = yield pending
            body = yield response.content()
            self.assertEqual((response.code, body == self.secret.layers[0]), (200, True))
        self.assertEqual(self.ghcr.count("cdn", "GET", self.layer), 1, "the follower shared the fill")
        with open(self.record(self.layer)) as f:
            self.assertEqual(sorted(json.load(f)), ["ghcr.io/acme/also", "ghcr.io/acme/private"])

    @defer.inlineCallbacks
    def test_nothing_is_cached_without_its_record(self):
        with open(os.path.join(self.proxy.cache_dir, "private"), "w"):
            pass  # no record can be written under a file
        code, body = yield self.fetch(f"/v2/ghcr.io/acme/private/manifests/{self.secret.digest}")
        self.assertEqual((code, body), (200, self.secret.body))
        self.assertIsNone(self.proxy.mirror.storage.read_manifest(self.secret.digest))
        self.assertIsNone(self.proxy.mirror.manifests.store.get(self.secret.digest))
        # The fill fails rather than commit a blob without its record (its readers are cut off before the tail).
        with contextlib.suppress(ResponseFailed):
            code, _ = yield self.fetch(f"/v2/ghcr.io/acme/private/blobs/{self.layer}")
            self.assertNotEqual(code, 200)
        self.assertIsNone(self.proxy.mirror.storage.blob_size(self.layer))

    @defer.inlineCallbacks
    def test_records_go_with_their_content(self):
        code, _ = yield self.fetch(f"/v2/ghcr.io/acme/private/blobs/{self.layer}")
        self.assertEqual(code, 200)
        yield self.proxy.mirror.cache.when_ready()
        self.assertTrue(os.path.exists(self.record(self.layer)))
        yield self.proxy.mirror.cache.make_room(10**15)  # evicts everything
        yield self.proxy.mirror.storage.settled()  # the record is deleted in the disk pool's queue
        self.assertFalse(os.path.exists(self.record(self.layer)))


class ForeignFillTests(unittest.TestCase):
    """A fill runs with its first requester's repository; the upstream's 404 there is not the follower's answer."""

    @defer.inlineCallbacks
    def follow(self, hub, latency):
        hub.strict_repos = True
        image = hub.add_image("team/b", "1", layer_sizes=[200_000])
        hub.add_image("team/a", "1", layer_sizes=[10])
        layer = image.layer_digests[0]
        proxy = Proxy(self, hub.registry_url)
        hub.latency = latency  # team/a's GET is refused after team/b's request joined the fill
        first = proxy.get(f"/v2/team/a/blobs/{layer}")
        fill = yield eventually(lambda: proxy.mirror.fills.get(layer))
        second = proxy.get(f"/v2/team/b/blobs/{layer}")
        yield eventually(lambda: len(fill._waiters) >= 2)
        response = yield first
        yield response.content()
        self.assertEqual(response.code, 404)
        response = yield second
        body = yield response.content()
        self.assertEqual((response.code, body == image.layers[0]), (200, True))
        self.assertEqual(hub.count("registry", "GET", f"team/b/blobs/{layer}"), 1)

    def test_a_follower_retries_with_its_own_repository(self):
        return self.follow(start_upstream(self, require_auth=False), latency=2.0)

    def test_also_when_the_first_repository_is_not_for_us(self):
        """The upstream answers 401 for a repository our token does not cover: for a blob, as for a manifest, that
        is BLOB_UNKNOWN there, not an upstream failure."""
        return self.follow(start_upstream(self, private=["team/a"]), latency=1.0)


class TokenCacheTests(unittest.TestCase):
    """Tokens are keyed by the credentials they were fetched with, and bounded."""

    def setUp(self):
        self.ghcr = start_upstream(self, users={"bot": "pat", "bot2": "pat2"}, private=["acme/private"])
        self.secret = self.ghcr.add_image("acme/private", "1.0")
        self.ghcr.add_image("acme/private", "2.0")
        self.ghcr.add_image("acme/public", "1.0")
        self.credentialed = {"url": self.ghcr.registry_url, "username": "bot", "password": "pat"}
        self.proxy = Proxy(
            self, self.ghcr.registry_url, upstreams={"ghcr.io": self.credentialed, "quay.io": self.ghcr.registry_url}
        )

    @defer.inlineCallbacks
    def fetch(self, path):
        response = yield self.proxy.get(path)
        body = yield response.content()
        return response.code, body

    @defer.inlineCallbacks
    def test_a_credentialed_token_never_serves_an_anonymous_upstream(self):
        code, _ = yield self.fetch("/v2/quay.io/acme/public/manifests/1.0")  # quay.io learns the challenge
        self.assertEqual(code, 200)
        code, _ = yield self.fetch("/v2/ghcr.io/acme/private/manifests/1.0")
        self.assertEqual(code, 200)
        code, _ = yield self.fetch("/v2/quay.io/acme/private/manifests/1.0")
        self.assertEqual(code, 404, "the anonymous upstream used a token fetched with credentials")

    @defer.inlineCallbacks
    def test_a_reload_drops_the_tokens_of_old_credentials(self):
        code, _ = yield self.fetch("/v2/ghcr.io/acme/private/manifests/1.0")
        self.assertEqual(code, 200)
        mirror = self.proxy.mirror
        self.assertTrue(mirror.tokens._tokens)
        mirror.apply(build_config({"upstreams": {"ghcr.io": self.ghcr.registry_url}}, [], self.proxy.cache_dir))
        self.assertFalse(
            [key for key in mirror.tokens._tokens if key[-1] != "anonymous"], "tokens of old credentials remain"
        )
        code, _ = yield self.fetch("/v2/ghcr.io/acme/private/manifests/2.0")
        self.assertEqual(code, 404, "a token of the removed credentials was used")
        # What was seen with credentials stays private: another repository is asked about, and refused.
        code, _ = yield self.fetch(f"/v2/ghcr.io/acme/public/manifests/{self.secret.digest}")
        self.assertEqual(code, 404)

    def test_the_cache_is_bounded(self):
        from dioproxy.upstream import TokenCache

        clock = [0.0]
        cache = TokenCache(lambda: clock[0], max_entries=3)
        for n in range(5):
            cache.put(("realm", "service", f"repository:r{n}:pull", "anonymous"), f"t{n}", 300)
            if n == 2:
                self.assertEqual(cache.get(("realm", "service", "repository:r0:pull", "anonymous")), "t0")
        self.assertEqual(len(cache), 3)
        self.assertEqual(cache.get(("realm", "service", "repository:r0:pull", "anonymous")), "t0", "recently used")
        self.assertIsNone(cache.get(("realm", "service", "repository:r1:pull", "anonymous")), "least recently used")
        self.assertEqual(cache.get(("realm", "service", "repository:r4:pull", "anonymous")), "t4")

    @defer.inlineCallbacks
    def test_client_chosen_names_cannot_grow_it(self):
        mirror = self.proxy.mirror
        mirror.tokens.max_entries = 5
        for n in range(8):
            code, _ = yield self.fetch(f"/v2/quay.io/made-up/n{n}/manifests/1")
            self.assertEqual(code, 404)
        self.assertLessEqual(len(mirror.tokens), 5)
