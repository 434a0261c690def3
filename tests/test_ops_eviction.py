"""The size-bounded cache: LRU eviction, pins, max_age, the start-up index, and the bound under continuous pulls."""

from __future__ import annotations

import contextlib
import os
import socket
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from dioproxy.eviction import CacheBound, IndexedStorage
from dioproxy.metrics import Metrics
from dioproxy.pools import Pools
from dioproxy.storage.cachedir import BLOB, MANIFEST
from dioproxy.storage.index import CacheIndex, last_use, remove_index
from tests.harness import Proxy, eventually, start_upstream
from tests.test_ops_metrics import Puller, value

KB = 1000


def quiet(bound: CacheBound) -> bool:
    """No check scheduled, no call to the index or the disk pool (an eviction's unlinks) under way."""
    pending = bound._check_call is not None and bound._check_call.active()
    return not pending and not bound._working


def digest_of(n: int) -> str:
    return "sha256:" + f"{n:064x}"


class FakeRequest:
    """Just what a pin needs: finished/_disconnected and notifyFinish()."""

    def __init__(self) -> None:
        self.finished = False
        self._disconnected = False
        self._done: list[defer.Deferred] = []

    def notifyFinish(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._done.append(d)
        return d

    def finish(self) -> None:
        self.finished = True
        for d in self._done:
            d.callback(None)


@defer.inlineCallbacks
def lru_keys(bound: CacheBound):
    """The index's entries, least recently used first."""
    index = bound.index
    keys = yield bound.flush().addCallback(lambda _: bound.pools.index.run(lambda: [k for k, _ in index.oldest()]))
    return keys


def recorded_last_use(root: str) -> dict:
    """``{kind: {digest: last use}}`` as the proxy recorded it for the next start."""
    recorded: dict = {BLOB: {}, MANIFEST: {}}
    for (kind, digest), used in last_use(root).items():
        recorded[kind][digest] = used
    return recorded


def forget_last_use(root: str) -> None:
    """Drop the record of last uses: the next start knows only the files."""
    remove_index(root)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class IndexTests(unittest.TestCase):
    def test_lru_order_and_counts(self):
        index = CacheIndex(self.mktemp())
        index.add((BLOB, "a"), 10, 1.0)
        index.add((BLOB, "b"), 20, 2.0)
        index.add((MANIFEST, "c"), 5, 3.0)
        index.touch((BLOB, "a"), 4.0)
        self.assertEqual([k for k, _ in index.oldest()], [(BLOB, "b"), (MANIFEST, "c"), (BLOB, "a")])
        self.assertEqual((index.size, index.counts), (35, {BLOB: 2, MANIFEST: 1}))
        index.add((BLOB, "b"), 25, 5.0)  # rewritten: replaces, counts once
        self.assertEqual((index.size, index.counts[BLOB]), (40, 2))
        index.remove((BLOB, "a"))
        self.assertEqual((index.size, len(index)), (30, 2))
        self.assertIsNone(index.remove((BLOB, "zz")))


class BoundTests(unittest.TestCase):
    """CacheBound on a real directory, driven directly (no timers: check_interval 0)."""

    @defer.inlineCallbacks
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.storage = IndexedStorage(self.root)
        self.clock = Clock()
        self.metrics = Metrics()
        self.pools = Pools(reactor)
        self.addCleanup(self.pools.stop)
        self.bound = self.make_bound(max_size=100 * KB)
        yield self.bound.start()

    def make_bound(self, **kwargs) -> CacheBound:
        bound = CacheBound(
            self.storage,
            reactor,
            self.metrics,
            clock=self.clock,
            check_interval=0,
            rescan_interval=0,
            pools=self.pools,
            **kwargs,
        )
        self.addCleanup(bound.stop)
        return bound

    def put_blob(self, n: int, size: int) -> str:
        digest = digest_of(n)
        path = os.path.join(self.storage.tmp, "new")
        with open(path, "wb") as f:
            f.write(b"x" * size)
        self.storage.commit_blob(path, digest)
        self.clock.now += 1
        return digest

    def exists(self, digest: str) -> bool:
        return os.path.exists(self.storage.blob_path(digest))

    def settle(self):
        """Wait for the scheduled check and the unlink threads to have run."""
        return eventually(lambda: quiet(self.bound), why="the bound is still at work")

    @defer.inlineCallbacks
    def test_least_recently_used_go_first(self):
        digests = [self.put_blob(i, 30 * KB) for i in range(3)]  # 90 KB
        self.bound.touch(BLOB, digests[0])  # now 1 is the oldest
        self.put_blob(3, 30 * KB)  # 120 KB > 100 KB: one must go
        yield self.settle()
        self.assertEqual([self.exists(d) for d in digests], [True, False, True])
        self.assertEqual(self.bound.size, 90 * KB)
        self.assertEqual(value(self.metrics.exposition().decode(), "dioproxy_evictions_total", reason="size"), 1)
        self.assertEqual(
            value(self.metrics.exposition().decode(), "dioproxy_evicted_bytes_total", reason="size"), 30 * KB
        )
        self.assertFalse([f for f in os.listdir(self.storage.tmp) if f.startswith("evicted.")])

    @defer.inlineCallbacks
    def test_manifests_are_evicted_too(self):
        self.storage.write_manifest(digest_of(100), "application/json", b"m" * (60 * KB))
        self.clock.now += 1
        self.put_blob(1, 60 * KB)
        yield self.settle()
        self.assertFalse(os.path.exists(self.storage.manifest_path(digest_of(100))))
        self.assertTrue(self.exists(digest_of(1)))

    @defer.inlineCallbacks
    def test_an_entry_being_read_is_never_evicted(self):
        first = self.put_blob(1, 50 * KB)
        reader = FakeRequest()
        self.bound.reading(first, reader)
        self.clock.now += 1
        for i in range(2, 6):
            self.put_blob(i, 30 * KB)
            yield self.settle()
            self.assertTrue(self.exists(first), "a blob being read was evicted")
        self.assertLessEqual(self.bound.size, 100 * KB)
        reader.finish()
        self.clock.now += 1
        for i in range(6, 9):
            self.put_blob(i, 30 * KB)
        yield self.settle()
        self.assertFalse(self.exists(first), "the blob stayed after its reader left")

    @defer.inlineCallbacks
    def test_a_reader_that_vanished_without_notice_does_not_pin_forever(self):
        first = self.put_blob(1, 50 * KB)
        reader = FakeRequest()
        self.bound.reading(first, reader)
        reader._disconnected = True  # the channel was paused: notifyFinish never fired
        self.put_blob(2, 60 * KB)
        yield self.settle()
        self.assertFalse(self.exists(first))

    @defer.inlineCallbacks
    def test_fills_in_progress_count_against_the_bound(self):
        inflight = [0]
        bound = self.make_bound(max_size=100 * KB, inflight=lambda: inflight[0])
        yield bound.stop()  # replace the default one
        yield self.bound.stop()
        self.bound = bound
        yield bound.start()
        a = self.put_blob(1, 40 * KB)
        b = self.put_blob(2, 40 * KB)
        inflight[0] = 50 * KB  # a fill announced 50 KB: room is made before its bytes arrive
        bound.check()
        yield self.settle()
        self.assertEqual((self.exists(a), self.exists(b)), (False, True))

    @defer.inlineCallbacks
    def test_max_age(self):
        old = self.put_blob(1, 1 * KB)
        self.clock.now += 3600
        young = self.put_blob(2, 1 * KB)
        self.bound.configure(None, 1800)
        yield self.settle()
        self.assertEqual((self.exists(old), self.exists(young)), (False, True))
        self.assertEqual(value(self.metrics.exposition().decode(), "dioproxy_evictions_total", reason="age"), 1)

    @defer.inlineCallbacks
    def test_a_new_bound_applies_at_once(self):
        for i in range(3):
            self.put_blob(i, 30 * KB)
        yield self.settle()
        self.bound.configure(40 * KB, None)
        yield self.settle()
        self.assertEqual(self.bound.size, 30 * KB)
        self.bound.configure(None, None)  # unbounded again
        for i in range(3, 8):
            self.put_blob(i, 30 * KB)
        yield self.settle()
        self.assertEqual(self.bound.size, 180 * KB)

    @defer.inlineCallbacks
    def test_restart_keeps_the_order_from_the_snapshot_and_mtimes(self):
        digests = [self.put_blob(i, 30 * KB) for i in range(3)]
        self.bound.touch(BLOB, digests[0])  # in memory only: no file is written per hit
        mtime = os.stat(self.storage.blob_path(digests[0])).st_mtime
        yield self.bound.stop()
        snapshot = recorded_last_use(self.root)
        self.assertLess(abs(snapshot[BLOB][digests[0]] - self.clock.now), 0.1)
        self.assertEqual(os.stat(self.storage.blob_path(digests[0])).st_mtime, mtime)

        restarted = self.make_bound(max_size=100 * KB)
        yield restarted.start()
        self.assertEqual(restarted.size, 90 * KB)
        order = [k[1] for k in (yield lru_keys(restarted))]
        self.assertEqual(order[-1], digests[0], "the snapshot's last use was lost")
        self.put_blob(9, 30 * KB)
        yield self.settle()
        self.assertTrue(self.exists(digests[0]))

    @defer.inlineCallbacks
    def test_without_a_snapshot_file_times_come_from_mtimes(self):
        digests = [self.put_blob(i, 10 * KB) for i in range(3)]
        for i, d in enumerate(digests):  # oldest file last
            os.utime(self.storage.blob_path(d), (1000 + 10 * (3 - i), 1000 + 10 * (3 - i)))
        yield self.bound.stop()
        forget_last_use(self.root)
        restarted = self.make_bound(max_size=100 * KB)
        yield restarted.start()
        self.assertEqual([k[1] for k in (yield lru_keys(restarted))], list(reversed(digests)))

    @defer.inlineCallbacks
    def test_rescan_drops_what_was_removed_behind_our_back(self):
        a = self.put_blob(1, 10 * KB)
        self.put_blob(2, 10 * KB)
        os.unlink(self.storage.blob_path(a))
        yield self.bound.rescan()
        self.assertEqual(self.bound.size, 10 * KB)
        self.assertNotIn((BLOB, a), (yield lru_keys(self.bound)))

    @defer.inlineCallbacks
    def test_entries_stored_during_the_scan_are_kept(self):
        bound = self.make_bound(max_size=None)
        d = bound.start()
        self.put_blob(1, 10 * KB)  # the scan runs in a thread; this lands while it may still run
        yield d
        self.assertIn((BLOB, digest_of(1)), (yield lru_keys(bound)))


class _StalledReader(protocol.Protocol):
    """Asks for a blob and then reads nothing, with small socket buffers on both ends: the server's producer
    stays paused with the file open, mid-body."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.pauseProducing()

    def send(self) -> None:
        self.transport.write(f"GET {self.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(None)


def disk_usage(root: str) -> int:
    """Apparent size of everything the cache holds on disk, temp files of fills included."""
    total = 0
    for sub in ("blobs", "manifests", "tmp"):
        for directory, _, files in os.walk(os.path.join(root, sub)):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(directory, name)).st_size
    return total


class BoundUnderLoadTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = start_upstream(self, auth_mode=None)
        self.bound = 4_000_000
        self.proxy = Proxy(self, self.fake.registry_url, cache={"max_size": "4MB"})
        self.cache = self.proxy.mirror.cache
        self.cache.check_interval = 0.05  # before its loops start (after the start-up scan)
        yield self.cache.when_ready()
        self.puller = Puller(self, self.proxy)

    @defer.inlineCallbacks
    def test_the_bound_holds_under_a_stream_of_pulls(self):
        """30 images of 400 KB layers (12 MB, three times the bound), three pulls at a time, upstream paced."""
        self.fake.slow(4_000_000)
        images = [self.fake.add_image(f"library/img{i}", "1", layer_sizes=[400_000]) for i in range(30)]
        samples = []
        sampler = task.LoopingCall(lambda: samples.append(disk_usage(self.proxy.cache_dir)))
        sampler.start(0.01)
        try:
            for start in range(0, len(images), 3):
                yield defer.gatherResults([self.puller.pull(image) for image in images[start : start + 3]])
                yield eventually(lambda: quiet(self.cache))
                self.assertLessEqual(disk_usage(self.proxy.cache_dir), self.bound)
        finally:
            sampler.stop()
        peak = max(samples)
        print(f"\ncache disk use over {len(samples)} samples: peak {peak} bytes for a bound of {self.bound}")
        self.assertLessEqual(peak, self.bound * 1.03, "the bound was passed by more than 3%")
        self.assertGreater(disk_usage(self.proxy.cache_dir), self.bound * 0.7, "the cache is not used")
        text = yield self.puller.metrics()
        self.assertGreater(value(text, "dioproxy_evictions_total", reason="size"), 30)
        self.assertLessEqual(value(text, "dioproxy_cache_size_bytes"), self.bound)
        self.assertEqual(value(text, "dioproxy_cache_max_size_bytes"), self.bound)
        # The most recent image is whole and served from the cache.
        self.fake.clear_requests()
        yield self.puller.pull(images[-1])
        self.assertEqual(self.fake.count("cdn"), 0)

    @defer.inlineCallbacks
    def test_a_blob_being_streamed_stays_until_its_client_is_done(self):
        big = self.fake.add_image("library/big", "1", layer_sizes=[2_500_000])
        yield self.puller.pull(big)
        layer = big.layer_digests[0]
        reader = _StalledReader(f"/v2/library/big/blobs/{layer}")
        accepted = []
        factory = self.proxy.port.factory
        build = factory.buildProtocol
        factory.buildProtocol = lambda addr: accepted.append(build(addr)) or accepted[-1]
        self.addCleanup(lambda: reader.transport and reader.transport.abortConnection())
        yield protocol.ClientCreator(reactor, lambda: reader).connectTCP("127.0.0.1", self.proxy.port.getHost().port)
        yield eventually(lambda: accepted and accepted[0].transport is not None)
        accepted[0].transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        factory.buildProtocol = build
        reader.send()
        yield eventually(lambda: len(self.cache.pins) == 1, why="the stalled client is not reading the blob")
        self.assertEqual(len(self.cache.pins), 1, "the stalled client is not reading the blob")
        images = [self.fake.add_image(f"library/small{i}", "1", layer_sizes=[300_000]) for i in range(12)]
        for image in images:
            yield self.puller.pull(image)
            self.assertTrue(os.path.exists(self.proxy.blob_file(layer)), "a blob being read was evicted")
        reader.transport.abortConnection()
        yield reader.closed
        yield eventually(lambda: not self.cache.pins, why="the reader's pin outlived it")
        for image in images[:10]:
            yield self.puller.pull(image)
        yield eventually(lambda: not os.path.exists(self.proxy.blob_file(layer)), why="not evicted")
        self.assertFalse(os.path.exists(self.proxy.blob_file(layer)), "evictable once its reader is gone")
        self.assertLessEqual(disk_usage(self.proxy.cache_dir), self.bound)


class SizeConfigTests(unittest.TestCase):
    def test_sizes(self):
        from dioproxy.config import ConfigError, build_config, parse_size

        cases = {"50GB": 50 * 10**9, "20GiB": 20 * 2**30, "500M": 500 * 10**6, "1.5T": 15 * 10**11, "10 kB": 10**4}
        cases.update({"1KiB": 1024, "4096": 4096, 123: 123, "7b": 7})
        for text, size in cases.items():
            self.assertEqual(parse_size(text, "cache.max_size"), size, text)
        for bad in ("lots", "5XB", "-1", "1e9", True, [], {}, 10**400, float("inf"), "9" * 400):
            self.assertRaises(ConfigError, parse_size, bad, "cache.max_size")
        config = build_config({"cache": {"max_size": "4MB", "max_age": "30d"}})
        self.assertEqual((config.cache_max_size, config.cache_max_age), (4 * 10**6, 30 * 86400))
        unbounded = build_config({"cache": {"max_size": 0, "max_age": None}})
        self.assertEqual((unbounded.cache_max_size, unbounded.cache_max_age), (None, None))
        with self.assertRaises(ConfigError) as caught:
            build_config({"cache": {"max_size": "much"}})
        self.assertIn("cache.max_size", str(caught.exception))
