"""Faults survived: a full cache disk, DNS failure, a SIGKILLed proxy; the cache is never damaged."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import tempfile

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest
from twisted.web.client import ResponseFailed

from dioproxy import fill as fill_module
from tests.harness import ROOT, Proxy, ProxyProcess, start_upstream

MB = 1024 * 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def cached_entries_are_sound(cache_dir: str) -> list[str]:
    """Every blob file's content matches the digest in its name; returns the digests found."""
    found = []
    blobs = os.path.join(cache_dir, "blobs", "sha256")
    for shard in os.listdir(blobs):
        for name in os.listdir(os.path.join(blobs, shard)):
            with open(os.path.join(blobs, shard, name), "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == name, f"damaged cache entry {name}"
            found.append("sha256:" + name)
    return found


class DiskFullTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        self.image = self.fake.add_image("library/hello", "1.0", layer_sizes=[1000])

    def mount_small_disk(self, size_mb: int) -> str:
        """A real size-limited file system for the cache (tmpfs); the suite runs as root, as CI does."""
        if os.geteuid() != 0:
            self.fail("this test mounts a small tmpfs and must run as root (CI does)")
        path = tempfile.mkdtemp(prefix="dioproxy-full-")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", path], check=True)
        self.addCleanup(lambda: subprocess.run(["umount", "-l", path], check=False) and None)
        return path

    @defer.inlineCallbacks
    def test_full_disk_evicts_least_recently_used(self):
        """No size bound set, but the disk is full: old entries make room for the new blob."""
        cache = self.mount_small_disk(6)
        proxy = Proxy(self, self.fake.registry_url, cache_dir=cache)
        yield proxy.mirror.cache.when_ready()
        first, second = os.urandom(3 * MB), os.urandom(3 * MB)
        a, b = self.fake.add_blob(first), self.fake.add_blob(second)
        for digest, data in ((a, first), (b, second)):
            response = yield proxy.get(f"/v2/library/hello/blobs/{digest}")
            self.assertEqual((yield response.content()), data)
        self.assertEqual(sorted(cached_entries_are_sound(cache)), [b], "a made room for b")
        yield proxy.mirror.storage.settled()  # small writes (manifests, tags) still on their way are not leftovers
        self.assertEqual(proxy.temp_files(), [])

    @defer.inlineCallbacks
    def test_blob_larger_than_the_disk_streams_through(self):
        cache = self.mount_small_disk(6)
        proxy = Proxy(self, self.fake.registry_url, cache_dir=cache)
        yield proxy.mirror.cache.when_ready()
        small, huge = os.urandom(MB), os.urandom(8 * MB)
        a, b = self.fake.add_blob(small), self.fake.add_blob(huge)
        response = yield proxy.get(f"/v2/library/hello/blobs/{a}")
        self.assertEqual((yield response.content()), small)
        for _ in range(2):  # does not fit even in an empty cache: served uncached, every time
            response = yield proxy.get(f"/v2/library/hello/blobs/{b}")
            self.assertEqual(response.code, 200)
            self.assertEqual(sha((yield response.content())), b)
        self.assertFalse(os.path.exists(proxy.blob_file(b)))
        response = yield proxy.get("/v2/library/hello/manifests/1.0")
        self.assertEqual((yield response.content()), self.image.body, "manifests keep working")
        yield proxy.mirror.storage.settled()  # small writes (manifests, tags) still on their way are not leftovers
        self.assertEqual(proxy.temp_files(), [])

    @defer.inlineCallbacks
    def test_enospc_mid_fill(self):
        """The disk fills while a blob is written (another writer took the space): nothing damaged is kept,
        and blob misses go through uncached until the back-off ends."""
        proxy = Proxy(self, self.fake.registry_url)
        data = os.urandom(2 * MB)
        digest = self.fake.add_blob(data)
        real_write = fill_module.write_all
        written = [0]

        def filling_write(fd, data):
            written[0] += len(data)
            if written[0] > MB:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write(fd, data)

        self.patch(fill_module, "write_all", filling_write)
        try:
            response = yield proxy.get(f"/v2/library/hello/blobs/{digest}")
            body = yield response.content()
            self.assertNotEqual(sha(body), digest, "a blob whose caching failed was delivered whole")
        except ResponseFailed:
            pass
        yield proxy.mirror.storage.settled()  # small writes (manifests, tags) still on their way are not leftovers
        self.assertEqual(proxy.temp_files(), [])
        self.assertFalse(os.path.exists(proxy.blob_file(digest)))
        response = yield proxy.get(f"/v2/library/hello/blobs/{digest}")
        self.assertEqual((yield response.content()), data, "the retry streams through")
        self.assertFalse(os.path.exists(proxy.blob_file(digest)))
        self.patch(fill_module, "write_all", real_write)
        proxy.mirror.fills.disk_full_until = 0  # the back-off is over
        response = yield proxy.get(f"/v2/library/hello/blobs/{digest}")
        self.assertEqual((yield response.content()), data)
        self.assertTrue(os.path.exists(proxy.blob_file(digest)))


class DNSTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_unresolvable_upstream(self):
        fake = start_upstream(self)
        proxy = Proxy(self, fake.registry_url, upstreams={"quay.io": "https://registry.invalid"})
        response = yield proxy.get("/v2/quay.io/a/b/manifests/1")
        self.assertEqual(response.code, 503)
        error = (yield response.json())["errors"][0]
        self.assertIn("quay.io", error["message"])
        self.assertIn("DNS", error["message"])


class KillTests(unittest.TestCase):
    """SIGKILL a real ``twistd dioproxy`` during concurrent fills; restart on the same cache."""

    timeout = 120

    @defer.inlineCallbacks
    def test_sigkill_during_fills(self):
        fake = start_upstream(self)
        blobs = [os.urandom(4 * MB + i) for i in range(4)]
        digests = [fake.add_blob(b) for b in blobs]
        fake.slow(2 * MB)  # each fill takes about two seconds
        cache = os.path.join(os.path.abspath(self.mktemp()), "cache")
        os.makedirs(cache)
        first = ProxyProcess(self, cache, fake.registry_url)
        yield first.listening()
        readers = [threads.deferToThread(_curl, first.port, d) for d in digests]
        yield fake.wait_for_requests(4, "cdn", "GET", timeout=10)
        yield task.deferLater(reactor, 0.8, lambda: None)
        yield threads.deferToThread(first.kill, signal.SIGKILL)
        yield defer.DeferredList(readers)
        leftovers = os.listdir(os.path.join(cache, "tmp"))
        self.assertTrue(leftovers, "the kill should have interrupted fills in progress")
        self.assertEqual(cached_entries_are_sound(cache), [])

        fake.slow(None)
        again = ProxyProcess(self, cache, fake.registry_url)
        yield again.listening()
        port = again.port
        self.assertEqual(os.listdir(os.path.join(cache, "tmp")), [], "leftovers are removed at start")
        bodies = yield defer.gatherResults([threads.deferToThread(_curl, port, d) for d in digests])
        self.assertEqual([sha(b) for b in bodies], digests)
        self.assertEqual(sorted(cached_entries_are_sound(cache)), sorted(digests))
        verify = yield threads.deferToThread(
            subprocess.run,
            [sys.executable, "-m", "dioproxy.admin", "verify", "--cache-dir", cache],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        self.assertEqual(verify.returncode, 0, verify.stdout + verify.stderr)


def _curl(port: int, digest: str) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/library/x/blobs/{digest}", timeout=30) as r:
            return r.read()
    except Exception as e:  # the kill cuts these readers off; the test only cares about the cache
        return repr(e).encode()
