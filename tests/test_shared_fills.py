"""One fill per digest for every process on a cache directory (``--workers``; storage/partial.py).

Two mirrors in this process on one cache directory contend for the partial file's lock exactly as two processes
would (``flock`` locks belong to open file descriptions). A real second process plays an owner that dies: it
holds the lock on a partial file with some of the blob's bytes, and is SIGKILLed.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys

from twisted.internet import defer
from twisted.trial import unittest
from twisted.web.client import ResponseFailed

from dioproxy.storage.partial import claim, part_path, remove_unclaimed
from tests.harness import Proxy, eventually, start_upstream

MB = 1024 * 1024

#: A process that claims a partial file, writes ``n`` bytes of a file into it and the info file a fill's owner
#: writes (answered with the size, unless ``fail-early``), says "ready" and waits for its end: SIGKILL, or ("fail")
#: a line on stdin, on which it removes the partial file as a failed fill does.
OWNER = """
import fcntl, json, os, sys, time
path, source, n, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
with open(source, "rb") as f:
    data = f.read()
os.write(fd, data[:n])
answered = mode != "fail-early"
info = {"repository": "docker.io/library/hello", "credentialed": False, "size": len(data) if answered else None,
        "answered": answered, "pid": os.getpid()}
with open(path[: -len(".part")] + ".fill", "w") as f:
    json.dump(info, f)
print("ready", flush=True)
if mode.startswith("fail"):
    sys.stdin.readline()
    os.unlink(path)
    sys.exit(0)
time.sleep(600)
"""


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class SharedFillTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        self.cache = os.path.abspath(self.mktemp())
        self.first = Proxy(self, self.fake.registry_url, cache_dir=self.cache)
        self.second = Proxy(self, self.fake.registry_url, cache_dir=self.cache)
        self.data = os.urandom(2 * MB + 5)
        self.digest = self.fake.add_blob(self.data)
        self.path = f"/v2/library/hello/blobs/{self.digest}"

    @defer.inlineCallbacks
    def fetch(self, proxy, headers=None):
        response = yield proxy.get(self.path, headers=headers)
        body = yield response.content()
        return response, body

    def owner(self, n: int, mode: str = "die") -> subprocess.Popen:
        """A process owning the partial file of the blob with its first ``n`` bytes written."""
        source = os.path.join(self.mktemp())
        with open(source, "wb") as f:
            f.write(self.data)
        tmp = self.first.mirror.storage.tmp
        process = subprocess.Popen(
            [sys.executable, "-c", OWNER, part_path(tmp, self.digest), source, str(n), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(lambda: process.poll() is not None or (process.kill(), process.wait()))
        self.assertEqual(process.stdout.readline().strip(), "ready")
        return process

    @defer.inlineCallbacks
    def test_the_second_process_follows_the_first_ones_fill(self):
        self.fake.slow(4 * MB)
        first = self.fetch(self.first)
        yield self.fake.wait_for_requests(1, "cdn", "GET", self.digest)
        yield eventually(lambda: self.first.mirror.fills.get(self.digest) is not None)
        second = self.fetch(self.second)
        yield eventually(lambda: self.second.mirror.fills.following.get(self.digest) is not None)
        for pending in (first, second):
            response, body = yield pending
            self.assertEqual((response.code, sha(body)), (200, self.digest))
        self.assertEqual(self.fake.count("cdn", "GET", self.digest), 1, "the second process fetched again")
        self.assertEqual(self.first.temp_files(), [])

    @defer.inlineCallbacks
    def test_a_head_in_the_second_process_is_answered_from_the_first_ones_fill(self):
        """A HEAD (or a peer replica's request) starts no fill, but joins one another process runs."""
        self.fake.slow(4 * MB)
        first = self.fetch(self.first)
        yield eventually(lambda: self.first.mirror.fills.get(self.digest) is not None)
        yield self.fake.wait_for_requests(1, "cdn", "GET", self.digest)
        status, headers = yield self.second.head(self.path)
        self.assertEqual((status, headers.get("content-length")), (200, str(len(self.data))))
        yield first
        self.assertEqual(self.fake.count("cdn", "GET", self.digest), 1, "the HEAD asked the upstream")

    @defer.inlineCallbacks
    def test_a_follower_gets_a_range_of_the_growing_file(self):
        self.fake.slow(4 * MB)
        first = self.fetch(self.first)
        yield eventually(lambda: self.first.mirror.fills.get(self.digest) is not None)
        response, body = yield self.fetch(self.second, {"Range": ["bytes=1000-1999"]})
        self.assertEqual((response.code, body), (206, self.data[1000:2000]))
        yield first
        self.assertEqual(self.fake.count("cdn", "GET", self.digest), 1)

    @defer.inlineCallbacks
    def test_a_dead_owners_fill_is_taken_over_with_range(self):
        held = MB + 3
        process = self.owner(held)
        pending = self.fetch(self.second)
        yield eventually(lambda: self.second.mirror.fills.following.get(self.digest) is not None)
        yield eventually(lambda: self.second.mirror.fills.following[self.digest].written == held)
        self.assertEqual(self.fake.count("cdn", "GET", self.digest), 0, "asked the upstream while the owner lived")
        process.send_signal(signal.SIGKILL)
        process.wait()
        response, body = yield pending
        self.assertEqual((response.code, sha(body)), (200, self.digest))
        gets = self.fake.find(None, "GET", self.digest)
        self.assertEqual([r.headers.get("range") for r in gets if r.role == "cdn"], [f"bytes={held}-"])
        with open(self.second.blob_file(self.digest), "rb") as f:
            self.assertEqual(sha(f.read()), self.digest)

    @defer.inlineCallbacks
    def test_the_tail_is_held_back_until_the_owner_commits(self):
        """An owner whose file holds every byte but never commits (its digest did not match) and removes it:
        the follower's client never gets the whole body."""
        process = self.owner(len(self.data), "fail")
        pending = self.fetch(self.second)
        fills = self.second.mirror.fills.following
        yield eventually(lambda: self.digest in fills and fills[self.digest].written == len(self.data))
        process.stdin.write("go\n")
        process.stdin.flush()
        process.wait()
        try:
            _response, body = yield pending
        except ResponseFailed:
            pass
        else:
            self.assertNotEqual(body, self.data, "an unverified tail was delivered")
        self.assertEqual(self.fake.count("cdn", "GET", self.digest), 0)

    @defer.inlineCallbacks
    def test_an_owner_that_fails_before_answering_is_replaced(self):
        process = self.owner(0, "fail-early")
        pending = self.fetch(self.second)
        yield eventually(lambda: self.second.mirror.fills.following.get(self.digest) is not None)
        process.stdin.write("go\n")
        process.stdin.flush()
        process.wait()
        response, body = yield pending
        self.assertEqual((response.code, sha(body)), (200, self.digest))
        self.assertEqual(self.fake.count("cdn", "GET", self.digest), 1)


class PartialFileTests(unittest.TestCase):
    def setUp(self):
        self.tmp = self.mktemp()
        os.makedirs(self.tmp)
        self.digest = "sha256:" + "ab" * 32

    def test_one_owner(self):
        first, second = claim(self.tmp, self.digest), claim(self.tmp, self.digest)
        self.assertEqual((first.owned, second.owned), (True, False))
        self.assertFalse(second.take(), "taken while the owner holds it")
        first.release(remove=False)
        self.assertTrue(second.take())
        second.release(remove=True)
        self.assertFalse(os.path.exists(part_path(self.tmp, self.digest)))

    def test_a_claim_on_a_renamed_file_is_not_taken(self):
        """Committed (renamed away) between a follower's open and its take: the lock it gets names no partial file."""
        first, second = claim(self.tmp, self.digest), claim(self.tmp, self.digest)
        os.rename(first.path, os.path.join(self.tmp, "committed"))
        first.release(remove=False)
        self.assertFalse(second.take())
        second.release(remove=False)

    def test_cleanup_keeps_what_a_live_process_fills(self):
        live = claim(self.tmp, self.digest)
        dead = claim(self.tmp, "sha256:" + "cd" * 32)
        fcntl.flock(dead.fd, fcntl.LOCK_UN)  # its process died
        self.assertEqual(remove_unclaimed(self.tmp), 1)
        self.assertEqual(os.listdir(self.tmp), [os.path.basename(live.path)])
        live.release(remove=True)
        dead.release(remove=False)
