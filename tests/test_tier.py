"""The shared tier (``storage.s3``) against a real SeaweedFS (tests/seaweed.py): mirrors on one bucket share
blobs, manifests, tag entries and private records; every read from the bucket is verified; the store failing
never fails a client who can be served from the hot tier or the upstream."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

import treq
import yaml
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed

from dioproxy.config import ConfigError, build_config
from dioproxy.fill import HOLD_BACK
from dioproxy.fleet import bucketuse
from dioproxy.objectstore import StoreConfigError, blob_key, manifest_key
from dioproxy.storage.bucket import record_key, tag_key
from tests import redisserver, seaweed
from tests.harness import Proxy, ProxyProcess, eventually, start_upstream
from tests.seaweed import free_ports

MB = 2**20


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _TierTest(unittest.TestCase):
    #: A store of this test's own (it is paused or stopped), else the one shared by the class.
    own_store = False

    @defer.inlineCallbacks
    def setUp(self):
        if self.own_store:
            self.sw = seaweed.SeaweedFS(tempfile.mkdtemp(prefix="seaweed-tier-", dir="."))
            yield threads.deferToThread(self.sw.start)
            self.addCleanup(lambda: threads.deferToThread(self.sw.stop))
        else:
            self.sw = yield seaweed.shared("tier")
        self.prefix = f"t/{self.id().rsplit('.', 1)[-1]}/{time.time_ns()}/"
        self.s3 = self.sw.client()
        self.fake = start_upstream(self)

    def s3_config(self, **changes):
        return self.sw.s3_settings(changes.pop("prefix", self.prefix), **changes)

    def mirror(self, cache_dir=None, timeout=3, s3=None, **config):
        config.setdefault("timeouts", {"read": timeout})
        storage = {"s3": self.s3_config(**(s3 or {}))}
        proxy = Proxy(self, self.fake.registry_url, cache_dir=cache_dir, storage=storage, **config)
        proxy.mirror.bucket.reconcile_retry = 0.5
        proxy.mirror.bucket.retry_first = 0.2
        return proxy

    def object(self, key: str) -> bytes | None:
        """An object's bytes, read behind the mirror's back (in a thread)."""

        def read():
            try:
                return self.s3.get_object(Bucket=self.sw.bucket, Key=self.prefix + key)["Body"].read()
            except self.s3.exceptions.NoSuchKey:
                return None

        return threads.deferToThread(read)

    @defer.inlineCallbacks
    def fetch(self, proxy, path):
        response = yield proxy.get(path)
        body = yield response.content()
        return response.code, body

    @defer.inlineCallbacks
    def pull(self, proxy, repo, image):
        """What a client pulls: the tag, its manifest, every blob; asserts each is right."""
        code, body = yield self.fetch(proxy, f"/v2/{repo}/manifests/{image.tag}")
        self.assertEqual((code, sha(body)), (200, image.digest))
        for manifest in image.manifests:
            code, body = yield self.fetch(proxy, f"/v2/{repo}/manifests/{manifest.digest}")
            self.assertEqual((code, sha(body)), (200, manifest.digest))
        for digest, data in image.blobs.items():
            code, body = yield self.fetch(proxy, f"/v2/{repo}/blobs/{digest}")
            self.assertEqual((code, body == data), (200, True), f"blob {digest}")


class SharedTierTests(_TierTest):
    @defer.inlineCallbacks
    def test_a_second_mirror_with_an_empty_tier_asks_the_upstream_nothing(self):
        image = self.fake.add_image("library/app", "1.0", layer_sizes=[3 * MB, 200_000], platforms=["linux/amd64"])
        first = self.mirror()
        yield self.pull(first, "library/app", image)
        yield first.mirror.bucket.idle()
        for digest, data in image.blobs.items():
            self.assertEqual((yield self.object(blob_key(digest))), data)
        stored = yield self.object(manifest_key(image.digest))
        self.assertEqual(sha(stored.partition(b"\n")[2]), image.digest)
        entry = json.loads((yield self.object(tag_key("docker.io", "library/app", "1.0"))))
        self.assertEqual(entry["digest"], image.digest)

        self.fake.clear_requests()
        second = self.mirror()
        self.assertEqual(os.listdir(os.path.join(second.cache_dir, "blobs", "sha256")), [])
        for digest, data in image.blobs.items():  # what skopeo and containerd ask before a GET
            status, headers = yield second.head(f"/v2/library/app/blobs/{digest}")
            self.assertEqual((status, headers.get("content-length")), (200, str(len(data))))
        yield self.pull(second, "library/app", image)
        self.assertEqual(self.fake.requests, [], "the second mirror asked the upstream")
        # ... and kept what passed in its hot tier: a third pull reads nothing from the bucket either.
        for digest in image.blobs:
            self.assertTrue(os.path.exists(second.blob_file(digest)))
        self.assertEqual(second.mirror.bucket.pending(), 0, "content read from the bucket was uploaded again")
        labels = {"endpoint": "blobs", "status": "200", "outcome": "miss", "registry": "docker.io"}
        misses = second.mirror.metrics.registry.get_sample_value("dioproxy_requests_total", labels)
        self.assertIsNone(misses, "blobs read from the bucket were counted as upstream fetches")

    @defer.inlineCallbacks
    def test_a_damaged_object_is_never_delivered_whole_and_is_replaced(self):
        data = os.urandom(3 * MB + 5)
        digest = self.fake.add_blob(data)
        path = f"/v2/library/app/blobs/{digest}"
        first = self.mirror()
        yield self.fetch(first, path)
        yield first.mirror.bucket.idle()
        damaged = bytearray(data)
        damaged[len(data) // 2] ^= 0x01
        yield threads.deferToThread(
            self.s3.put_object, Bucket=self.sw.bucket, Key=self.prefix + blob_key(digest), Body=bytes(damaged)
        )

        self.fake.clear_requests()
        second = self.mirror()
        received = []
        try:
            response = yield second.get(path)
            yield treq.collect(response, received.append)
            body = b"".join(received)
        except ResponseFailed:
            body = None
        self.assertIsNone(body, "the connection was not aborted")
        self.assertLessEqual(sum(map(len, received)), len(data) - HOLD_BACK, "the held-back tail reached the client")
        self.assertNotEqual(body, data, "a damaged object was delivered whole")
        self.assertEqual(self.fake.count("cdn", "GET", digest), 0, "the damaged fill came from the bucket")
        self.assertFalse(os.path.exists(second.blob_file(digest)), "a damaged blob was stored")
        self.assertEqual(second.temp_files(), [])
        yield eventually(  # deleted in the background, once the fill failed
            lambda: self.object(blob_key(digest)).addCallback(lambda found: found is None),
            why="the damaged object is still in the bucket",
        )

        code, body = yield self.fetch(second, path)
        self.assertEqual((code, body == data), (200, True))
        self.assertEqual(self.fake.count("cdn", "GET", digest), 1, "the refetch did not go upstream")
        yield second.mirror.bucket.idle()
        self.assertEqual((yield self.object(blob_key(digest))), data, "the bucket did not get verified bytes")

    @defer.inlineCallbacks
    def test_a_damaged_manifest_in_the_bucket_is_refetched(self):
        image = self.fake.add_image("library/app", "1.0", layer_sizes=[10])
        first = self.mirror()
        yield self.pull(first, "library/app", image)
        yield first.mirror.bucket.idle()
        key = self.prefix + manifest_key(image.digest)
        stored = (yield self.object(manifest_key(image.digest))).replace(b'"', b"'", 1)
        yield threads.deferToThread(self.s3.put_object, Bucket=self.sw.bucket, Key=key, Body=stored)
        self.fake.clear_requests()
        second = self.mirror()
        code, body = yield self.fetch(second, f"/v2/library/app/manifests/{image.digest}")
        self.assertEqual((code, sha(body)), (200, image.digest))
        gets = [r for r in self.fake.find("registry", "GET", f"manifests/{image.digest}") if r.status == 200]
        self.assertEqual(len(gets), 1)
        yield second.mirror.bucket.idle()
        self.assertEqual(sha((yield self.object(manifest_key(image.digest))).partition(b"\n")[2]), image.digest)

    @defer.inlineCallbacks
    def test_wrong_credentials_are_a_clear_error_at_start(self):
        proxy = Proxy(
            self,
            self.fake.registry_url,
            storage={"s3": self.s3_config(secret_key="not-the-secret")},
        )
        e = yield self.assertFailure(proxy.mirror.bucket_started, StoreConfigError)
        self.assertEqual(e.key, "storage.s3.secret_key")

    @defer.inlineCallbacks
    def test_wrong_credentials_stop_the_process_naming_the_key(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            yaml.safe_dump({"storage": {"s3": self.s3_config(secret_key="not-the-secret")}}, f)
        process = ProxyProcess(self, os.path.abspath(self.mktemp()), self.fake.registry_url, "--config", path)
        yield eventually(lambda: process.process.poll() is not None, timeout=30, why="the proxy kept running")
        with open(process.log_path) as f:
            log = f.read()
        self.assertIn("storage.s3.secret_key", log)


class RedirectTests(_TierTest):
    @defer.inlineCallbacks
    def test_cached_blobs_are_read_from_the_bucket_itself(self):
        image = self.fake.add_image("library/app", "1.0", layer_sizes=[2 * MB, 1000])
        first = self.mirror(s3={"redirect": True, "redirect_ttl": "1m"})
        yield self.pull(first, "library/app", image)  # nothing uploaded yet: the mirror sends them itself
        yield first.mirror.bucket.idle()

        self.fake.clear_requests()
        second = self.mirror(s3={"redirect": True, "redirect_ttl": "1m"})
        plain = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        for digest, data in image.blobs.items():
            response = yield second.get(f"/v2/library/app/blobs/{digest}", allow_redirects=False)
            yield response.content()
            self.assertEqual(response.code, 307)
            location = response.headers.getRawHeaders("Location")[0]
            self.assertTrue(location.startswith(self.sw.endpoint), location)
            self.assertEqual(response.headers.getRawHeaders("Cache-Control"), ["no-store"])
            direct = yield plain.get(location)  # what a client does: no credentials, straight to the store
            self.assertEqual((direct.code, (yield direct.content()) == data), (200, True))
            status, headers = yield second.head(f"/v2/library/app/blobs/{digest}")
            self.assertEqual((status, headers.get("content-length")), (200, str(len(data))), "HEAD stays with us")
        self.assertEqual(self.fake.requests, [])
        self.assertEqual(os.listdir(os.path.join(second.cache_dir, "blobs", "sha256")), [], "bytes went through us")
        heads = []
        head = second.mirror.bucket.store.head
        second.mirror.bucket.store.head = lambda key: heads.append(key) or head(key)
        for digest in image.blobs:  # a blob the bucket was seen to hold is redirected without asking it again
            response = yield second.get(f"/v2/library/app/blobs/{digest}", allow_redirects=False)
            yield response.content()
            self.assertEqual(response.code, 307)
        self.assertEqual(heads, [])
        yield eventually(lambda: first.mirror.bucket.reconciled, why="the first reconcile")  # it ends a down time
        first.mirror.bucket._mark_down()  # what a failed read does: a client is not sent to a store that fails
        digest, data = next(iter(image.blobs.items()))
        response = yield first.get(f"/v2/library/app/blobs/{digest}", allow_redirects=False)
        self.assertEqual((response.code, (yield response.content()) == data), (200, True), "sent to a failing store")
        code, body = yield self.fetch(second, f"/v2/library/app/manifests/{image.tag}")
        self.assertEqual((code, sha(body)), (200, image.digest), "manifests stay with the mirror")


class PrivateAcrossReplicasTests(_TierTest):
    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.ghcr = start_upstream(self, users={"bot": "pat"}, private=["acme/private"])
        self.ghcr.strict_repos = True
        self.secret = self.ghcr.add_image("acme/private", "1.0", layer_sizes=[300_000])
        self.layer = self.secret.layer_digests[0]
        self.ghcr.add_image("attacker/x", "1.0", layer_sizes=[10])

    def ghcr_mirror(self, **s3):
        upstream = {"url": self.ghcr.registry_url, "username": "bot", "password": "pat"}
        return self.mirror(upstreams={"ghcr.io": upstream}, s3=s3)

    @defer.inlineCallbacks
    def test_no_redirect_to_credentialed_content_for_another_repository(self):
        first = self.ghcr_mirror()
        code, _ = yield self.fetch(first, f"/v2/ghcr.io/acme/private/blobs/{self.layer}")
        self.assertEqual(code, 200)
        yield first.mirror.bucket.idle()
        second = self.ghcr_mirror(redirect=True)
        path = f"/v2/ghcr.io/{{}}/blobs/{self.layer}"
        response = yield second.get(path.format("attacker/x"), allow_redirects=False)
        yield response.content()
        self.assertEqual(response.code, 404, "another repository was sent to the credentialed blob")
        response = yield second.get(path.format("acme/private"), allow_redirects=False)
        yield response.content()
        self.assertEqual(response.code, 307)

    @defer.inlineCallbacks
    def test_credentialed_content_is_not_served_from_the_bucket_to_another_repository(self):
        first = self.ghcr_mirror()
        code, _ = yield self.fetch(first, f"/v2/ghcr.io/acme/private/blobs/{self.layer}")
        self.assertEqual(code, 200)
        code, _ = yield self.fetch(first, f"/v2/ghcr.io/acme/private/manifests/{self.secret.digest}")
        self.assertEqual(code, 200)
        yield first.mirror.bucket.idle()
        record = json.loads((yield self.object(record_key(self.layer))))
        self.assertEqual(record, ["ghcr.io/acme/private"])

        second = self.ghcr_mirror()
        self.ghcr.clear_requests()
        for kind in ("blobs", "manifests"):
            digest = self.layer if kind == "blobs" else self.secret.digest
            code, _ = yield self.fetch(second, f"/v2/ghcr.io/attacker/x/{kind}/{digest}")
            self.assertEqual(code, 404, f"a replica served credentialed {kind} through another repository")
        status, _ = yield second.head(f"/v2/ghcr.io/attacker/x/blobs/{self.layer}")
        self.assertEqual(status, 404, "a HEAD told another repository the credentialed blob's size")
        self.assertFalse(os.path.exists(second.blob_file(self.layer)))
        code, body = yield self.fetch(second, f"/v2/ghcr.io/acme/private/blobs/{self.layer}")
        self.assertEqual((code, body == self.secret.layers[0]), (200, True))
        self.assertEqual(self.ghcr.count("cdn", "GET", self.layer), 0, "the allowed repository went upstream")
        # The bucket's record came with it: the local check refuses the other repository too.
        code, _ = yield self.fetch(second, f"/v2/ghcr.io/attacker/x/blobs/{self.layer}")
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_the_record_goes_up_before_its_blob(self):
        first = self.ghcr_mirror()
        seen = []
        store = first.mirror.bucket.store
        put_file, put_bytes = store.put_file, store.put_bytes
        store.put_file = lambda path, key: seen.append(key) or put_file(path, key)
        store.put_bytes = lambda key, data, replace=False: seen.append(key) or put_bytes(key, data, replace)
        yield self.fetch(first, f"/v2/ghcr.io/acme/private/blobs/{self.layer}")
        yield first.mirror.bucket.idle()
        self.assertLess(seen.index(record_key(self.layer)), seen.index(blob_key(self.layer)))


class StoreFaultTests(_TierTest):
    own_store = True

    @defer.inlineCallbacks
    def test_store_down_at_start(self):
        yield threads.deferToThread(self.sw.stop)
        data = os.urandom(2 * MB)
        digest = self.fake.add_blob(data)
        proxy = self.mirror()
        yield proxy.mirror.bucket_started  # down is no reason not to start
        code, body = yield self.fetch(proxy, f"/v2/library/app/blobs/{digest}")
        self.assertEqual((code, body == data), (200, True))
        yield threads.deferToThread(self.sw.start)
        yield eventually(lambda: proxy.mirror.bucket.pending() == 0 and proxy.mirror.bucket.reconciled, timeout=30)
        self.assertEqual((yield self.object(blob_key(digest))), data)

    @defer.inlineCallbacks
    def test_store_stalled_during_an_upload(self):
        proxy = self.mirror(timeout=2)
        yield proxy.mirror.bucket_started
        yield eventually(lambda: proxy.mirror.bucket.reconciled)
        data = os.urandom(2 * MB)
        digest = self.fake.add_blob(data)
        self.sw.pause()
        try:
            code, body = yield self.fetch(proxy, f"/v2/library/app/blobs/{digest}")
            self.assertEqual((code, body == data), (200, True))
            self.assertEqual(proxy.mirror.bucket.held(), {("blob", digest)})
            yield eventually(lambda: proxy.mirror.bucket._retries, timeout=15, why="no upload attempt failed")
        finally:
            self.sw.resume()
        yield proxy.mirror.bucket.idle()
        self.assertEqual((yield self.object(blob_key(digest))), data)
        code, body = yield self.fetch(proxy, f"/v2/library/app/blobs/{digest}")
        self.assertEqual((code, body == data), (200, True))

    @defer.inlineCallbacks
    def test_store_stalled_during_a_read(self):
        data = os.urandom(24 * MB)
        digest = self.fake.add_blob(data)
        path = f"/v2/library/app/blobs/{digest}"
        first = self.mirror()
        yield self.fetch(first, path)
        yield first.mirror.bucket.idle()
        second = self.mirror(timeout=2)
        bucket = second.mirror.bucket
        read_blob_into = bucket.read_blob_into

        def stalling(digest, start, sink, stopped, size):
            def first_bytes(chunk):  # in the reader thread: the store stalls once the read has begun
                if not self.sw_paused:
                    self.sw_paused = True
                    self.sw.pause()
                sink(chunk)

            return read_blob_into(digest, start, first_bytes, stopped, size)

        self.sw_paused = False
        bucket.read_blob_into = stalling
        self.fake.clear_requests()
        try:
            code, body = yield self.fetch(second, path)
        finally:
            self.sw.resume()
        self.assertEqual((code, body == data), (200, True))
        self.assertTrue(self.sw_paused)
        resumed = [r for r in self.fake.find("cdn", "GET", digest) if r.headers.get("range")]
        self.assertEqual(len(resumed), 1, "the upstream was not asked for the rest")
        self.assertNotEqual(resumed[0].headers["range"], "bytes=0-")
        with open(second.blob_file(digest), "rb") as f:
            self.assertEqual(sha(f.read()), digest)


class NoEvictionBeforeUploadTests(_TierTest):
    own_store = True

    @defer.inlineCallbacks
    def test_a_blob_not_uploaded_yet_is_never_evicted(self):
        proxy = self.mirror(cache={"max_size": 1 * MB})
        yield eventually(lambda: proxy.mirror.bucket.reconciled and proxy.mirror.cache.ready)
        blobs = {self.fake.add_blob(os.urandom(600_000)): None for _ in range(3)}
        self.sw.pause()
        try:
            for digest in blobs:
                code, _ = yield self.fetch(proxy, f"/v2/library/app/blobs/{digest}")
                self.assertEqual(code, 200)
            yield proxy.mirror.cache.flush()
            proxy.mirror.cache.check()
            yield proxy.mirror.cache.flush()
            for digest in blobs:
                self.assertTrue(os.path.exists(proxy.blob_file(digest)), "evicted before it was uploaded")
        finally:
            self.sw.resume()
        yield proxy.mirror.bucket.idle()
        yield eventually(
            lambda: sum(os.path.exists(proxy.blob_file(d)) for d in blobs) < 3, why="the bound did not evict"
        )


class BucketBoundTests(_TierTest):
    """``storage.s3.max_size`` / ``max_age`` with ``coordination``: the fleet's bound on the bucket."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.redis = yield redisserver.shared("bucket-bound")
        yield threads.deferToThread(self.redis.flush)
        self.patch(bucketuse, "PROTECT", 0.0)  # the blobs below were all used a moment ago

    def bounded(self, **s3):
        port = free_ports(1)[0]
        coordination = {"redis": self.redis.url, "secret": "x" * 20, "advertise": f"http://127.0.0.1:{port}"}
        return self.mirror(s3=s3, coordination=coordination)

    @defer.inlineCallbacks
    def test_the_least_recently_used_blobs_leave_a_bucket_over_its_bound(self):
        proxy = self.bounded(max_size="5MB")
        yield eventually(lambda: proxy.mirror.bucket.reconciled, why="the first reconcile")
        blobs = [os.urandom(2 * 10**6) for _ in range(3)]
        digests = [self.fake.add_blob(b) for b in blobs]
        for digest in digests:
            yield self.fetch(proxy, f"/v2/library/app/blobs/{digest}")
            yield proxy.mirror.bucket.idle()
            yield defer.ensureDeferred(proxy.mirror.bucket_bound.use.flush())
            yield task.deferLater(reactor, 1.1, lambda: None)  # last uses a second apart
        self.assertEqual((yield defer.ensureDeferred(proxy.mirror.bucket_bound.use.total())), 6 * 10**6)
        self.assertEqual((yield defer.ensureDeferred(proxy.mirror.bucket_bound.evict())), 1)
        present = []
        for digest in digests:
            present.append((yield self.object(blob_key(digest))) is not None)
        self.assertEqual(present, [False, True, True], "not the least recently used one left")
        self.assertEqual((yield defer.ensureDeferred(proxy.mirror.bucket_bound.use.total())), 4 * 10**6)
        self.assertEqual(
            (yield defer.ensureDeferred(proxy.mirror.bucket_bound.evict())), 0, "under the bound: nothing more"
        )
        code, body = yield self.fetch(proxy, f"/v2/library/app/blobs/{digests[0]}")  # the hot tier still has it
        self.assertEqual((code, body == blobs[0]), (200, True))

    @defer.inlineCallbacks
    def test_blobs_unused_for_max_age_leave_the_bucket(self):
        proxy = self.bounded(max_age="1s")
        data = os.urandom(1000)
        digest = self.fake.add_blob(data)
        yield self.fetch(proxy, f"/v2/library/app/blobs/{digest}")
        yield proxy.mirror.bucket.idle()
        yield defer.ensureDeferred(proxy.mirror.bucket_bound.use.flush())
        self.assertEqual((yield defer.ensureDeferred(proxy.mirror.bucket_bound.evict())), 0, "used within max_age")
        yield task.deferLater(reactor, 2.1, lambda: None)
        self.assertEqual((yield defer.ensureDeferred(proxy.mirror.bucket_bound.evict())), 1)
        self.assertIsNone((yield self.object(blob_key(digest))))

    @defer.inlineCallbacks
    def test_a_listing_counts_blobs_the_fleet_forgot_without_refreshing_known_ones(self):
        first = self.bounded(max_size="1GB")
        yield eventually(lambda: first.mirror.bucket.reconciled, why="the first reconcile")
        kept, forgotten = os.urandom(1000), os.urandom(3000)
        for data in (kept, forgotten):
            yield self.fetch(first, f"/v2/library/app/blobs/{self.fake.add_blob(data)}")
        yield first.mirror.bucket.idle()
        use = first.mirror.bucket_bound.use
        yield defer.ensureDeferred(use.flush())
        used = dict((yield defer.ensureDeferred(use.oldest(10, time.time() + 1))))
        yield defer.ensureDeferred(use.forget(sha(forgotten)))  # as after a Redis restart, for this one
        self.assertEqual((yield defer.ensureDeferred(use.total())), 1000)
        yield task.deferLater(reactor, 1.1, lambda: None)
        yield first.mirror.bucket.reconcile()
        yield defer.ensureDeferred(use.flush())
        self.assertEqual((yield defer.ensureDeferred(use.total())), 4000, "the forgotten blob is counted again")
        again = dict((yield defer.ensureDeferred(use.oldest(10, time.time() + 1))))
        self.assertEqual(again[sha(kept)], used[sha(kept)], "a listing is not a use")
        self.assertGreater(again[sha(forgotten)], used[sha(forgotten)])

    def test_a_bound_needs_coordination(self):
        with self.assertRaises(ConfigError) as caught:
            build_config({"storage": {"s3": self.s3_config(max_size="1GB")}}, [], self.mktemp())
        self.assertIn("storage.s3.max_size: needs coordination.redis", str(caught.exception))
