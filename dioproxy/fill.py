"""One fill per blob digest: the upstream bytes go to a temp file while sha256 runs; readers follow the file.

The fill never waits for a reader, so a slow client cannot slow the download, and memory stays flat whatever the
blob's size. Readers may only read up to ``readable()``, which holds back the tail of the blob until its digest
is confirmed: no client ever receives a complete body whose digest is wrong. On a mismatch the fill fails,
the temp file is removed and every reader's connection is aborted.

Sources, in order: the shared tier's bucket (:mod:`dioproxy.storage.bucket`) when it has the blob and may serve
it to the fill's repository, then the upstream. Both write through the same append, sha256 and hold-back; a bucket
read that breaks off goes on from the upstream with ``Range`` at the offset written (the resume path). A mismatch
on bytes that came from the bucket deletes its object, so the next fill asks the upstream and uploads good bytes.

One fill per digest for every process on the cache directory (``--workers``): the fill's file is a partial file
(:mod:`dioproxy.storage.partial`) locked by its owner. Another process follows it from the disk with the same
hold-back (its end is the rename into ``blobs/``, its failure the unlink); when the owner dies, one follower takes
the file over and resumes from the sources with ``Range`` at the bytes already written.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Awaitable
from typing import Any, Callable

from twisted.internet import defer, protocol, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client as webclient

from dioproxy.errors import RegistryError, UpstreamError, blob_unknown
from dioproxy.fleet.lease import Holder
from dioproxy.pools import BlockingPool
from dioproxy.private import repository
from dioproxy.routing import Target
from dioproxy.storage import partial
from dioproxy.storage.bucket import Bucket
from dioproxy.storage.cachedir import BLOB
from dioproxy.storage.disk import DiskStorage
from dioproxy.storage.partial import Claim, FillInfo
from dioproxy.upstream import UpstreamClient, abandon, header

log = Logger()

#: Bytes withheld from readers until the digest is verified.
HOLD_BACK = 64 * 1024
#: How many times a broken upstream body is resumed with ``Range`` before the fill gives up.
RESUMES = 3


#: How often a follower of another process's fill looks at its file, and every how many looks it checks that
#: the owner lives (by trying its lock).
POLL, TAKE_EVERY = 0.02, 10

#: A fill streamed from another replica: how many times it asks the fleet again after a break, and how long it
#: waits after one that brought nothing (the owner's lease expires within fleet.fills.LEASE_TTL).
PEER_TRIES, PEER_RETRY = 40, 0.5

#: How often a fill read in a thread (from the bucket) tells its followers of the bytes it appended.
PROGRESS_EVERY = 0.02

#: After the cache disk filled up, how long blob misses stream through uncached before we try caching again.
DISK_FULL_BACKOFF = 30.0


class FillFailed(Exception):
    """The fill could not produce verified bytes; readers abort their connections."""


class DiskFull(Exception):
    """The cache disk is full: serve this blob straight from the upstream, uncached."""


class OwnerFailed(Exception):
    """The fill another process ran ended before the upstream answered: ask again (and maybe run it here)."""


def write_all(fd: int, data: bytes) -> None:
    """Append to the fill's file; a short write is finished, an error (ENOSPC...) raised."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def is_disk_full(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__
    return False


class Fill:
    """A download of one blob in progress, readable by any number of followers.

    It runs with the repository of its first requester, ``target``: the upstream answers for that one. A fill
    another process runs is followed through the same object (``repository`` and ``credentialed`` are then the
    owner's, and ``target`` the one this process would take it over with).
    """

    def __init__(self, digest: str, path: str, target: Target, started: float = 0.0) -> None:
        self.digest = digest
        self.path = path
        self.target = target
        self.repository = repository(target)
        #: Fetched with credentials: private content, though its record is only written once it is verified.
        self.credentialed = target.upstream.credentials is not None
        #: Run by another process (until this one takes it over).
        self.foreign = False
        self.started = started  # reactor time: the status page shows the fill's rate
        self.size: int | None = None
        self.written = 0
        self.done = False
        self.failure: Failure | None = None
        self.answered = False  # the upstream answered 200/206: ``size`` is known (or known to be unknown)
        self.source = "upstream"  # or "bucket": the shared tier answered first
        self._waiters: list[defer.Deferred] = []

    async def ready(self) -> None:
        """Wait until the upstream answered; raises what the fill failed with (404 → BLOB_UNKNOWN)."""
        while not (self.answered or self.failure):
            await self.wait()
        if self.failure:
            self.failure.raiseException()

    def open(self) -> int:
        """A read descriptor on the growing file (FileNotFoundError once it was committed)."""
        return os.open(self.path, os.O_RDONLY)

    def readable(self) -> int:
        """How many bytes a reader may have right now."""
        if self.done:
            return self.written
        limit = self.written - HOLD_BACK
        if self.size is not None:
            limit = min(limit, self.size - 1)
        return max(0, limit)

    def wait(self) -> defer.Deferred:
        """Fires on the next progress (more bytes, success or failure)."""
        d: defer.Deferred = defer.Deferred()
        if self.done or self.failure:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


class _BodyWriter(protocol.Protocol):
    """Appends an upstream body to the fill's file, hashing as it goes (a stalled body is dropped by the upstream
    client's :class:`~dioproxy.upstream.IdleDeadline`, and then resumed)."""

    def __init__(self, runner: _FillRunner, skip: int) -> None:
        self.runner = runner
        self.skip = skip  # bytes to drop: a 200 answer to a Range request restarts from zero
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.skip:
            cut = min(self.skip, len(data))
            self.skip -= cut
            data = data[cut:]
            if not data:
                return
        try:
            self.runner.append(data)
        except (OSError, FillFailed) as e:
            self.runner.error = e
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:
        self.reason = reason
        self.lost.callback(None)


class _ThreadedAppend:
    """The sink of a read in another thread: appends and hashes there (the runner's file and sha256 are not
    touched on the reactor meanwhile), and reports progress to the reactor a few times a second."""

    def __init__(self, runner: _FillRunner, base: int, reactor: Any) -> None:
        self.runner = runner
        self.base = base  # fill.written when the read began
        self.written = 0  # appended by the thread so far
        self.reactor = reactor
        self._told = 0.0
        self._lock = threading.Lock()
        self._abandoned = False

    def stopped(self) -> bool:
        return self._abandoned or self.runner.stopping()

    def abandon(self) -> None:
        """On the reactor, when the read's wait gave up: the thread appends nothing more from now on (it may still
        be queued or running), so the upstream can take over the file."""
        with self._lock:
            self._abandoned = True

    def append(self, chunk: memoryview) -> None:
        fill = self.runner.fill
        if fill.size is not None and self.base + self.written + len(chunk) > fill.size:
            raise FillFailed(f"the store sent more than the {fill.size} bytes of {fill.digest}")
        with self._lock:
            if self._abandoned:
                raise FillFailed("abandoned")
            write_all(self.runner.fd, chunk)
            self.runner.sha.update(chunk)
            self.written += len(chunk)
        now = time.monotonic()
        if now - self._told >= PROGRESS_EVERY:
            self._told = now
            self.reactor.callFromThread(self.progress)

    def progress(self) -> None:
        """On the reactor: followers may read what the thread appended."""
        fill = self.runner.fill
        if self.base + self.written > fill.written:
            fill.written = self.base + self.written
            fill._notify()


class _FillRunner:
    """Drives one :class:`Fill` from the upstream: request, resume on a cut, verify, commit."""

    def __init__(self, fill: Fill, claim: Claim, client: UpstreamClient, manager: FillManager) -> None:
        self.fill = fill
        self.claim = claim
        self.fd = claim.fd
        self.client = client
        self.name = fill.target.name
        self.storage = manager.storage
        self.disk = manager.disk
        self.make_room = manager.make_room
        self.verified = manager.verified
        self.bucket = manager.bucket
        self.manager_reactor = manager.reactor
        self.fleet = manager.fleet
        self.lease: Any = None  # the fleet's lease on this digest, while we fetch it
        self.keeper: Any = None
        self.stopping = lambda: manager.stopping
        self.sha = hashlib.sha256()
        self.error: Exception | None = None
        self.from_bucket = 0  # bytes the bucket gave
        self.from_peer = 0  # bytes another replica gave (it uploads what it fetched)

    def append(self, data: bytes) -> None:
        fill = self.fill
        if fill.size is not None and fill.written + len(data) > fill.size:
            raise FillFailed(f"upstream sent more than the {fill.size} bytes it announced")
        write_all(self.fd, data)
        self.sha.update(data)
        fill.written += len(data)
        fill._notify()

    async def run(self) -> None:
        fill = self.fill
        if fill.written:  # taken over from a process that died: its bytes count, once hashed
            self.sha = await self.disk.run(_hash_prefix, self.fd, fill.written, timeout=60 + fill.written / 2**24)
        self._tell()
        if self.bucket is not None:
            await self._from_bucket()
        try:
            if fill.size is None or fill.written < fill.size:
                await (self._via_fleet() if self.fleet is not None else self._from_upstream())
            await self._verify_and_commit()
        finally:
            if self.lease is not None:
                self.keeper.stop()
                await self.fleet.release(self.lease)

    async def _verify_and_commit(self) -> None:
        fill = self.fill
        got = "sha256:" + self.sha.hexdigest()
        if got != fill.digest:
            if self.from_bucket:
                log.warn("blob {digest} in the object store is damaged: deleting it", digest=fill.digest)
                self.bucket.discard(BLOB, fill.digest)
            raise FillFailed(f"sources sent bytes with digest {got}, not {fill.digest}")
        await self.disk.run(os.fsync, self.fd)
        if self.verified is not None:
            await self.verified(fill.target, fill.digest)  # before the blob appears: no process may find it unrecorded
        await self.storage.commit(fill.path, fill.digest)  # followers in other processes: the tail is theirs
        if self.bucket is not None and self.from_bucket + self.from_peer < fill.written:
            self.bucket.blob_stored(fill.digest)  # the bucket lacked it (or said nothing): upload, in the background

    async def _from_bucket(self) -> None:
        """As much of the blob as the bucket gives; any failure of the store leaves the rest to the upstream.

        The bytes are received, hashed and appended in a reader thread (:meth:`Bucket.read_blob_into`), the
        followers told of them here, on the reactor, a few times a second and when the read ends."""
        fill = self.fill
        size = await self.bucket.blob_size(fill.digest)
        if size is None or not await self.bucket.may_serve(fill.digest, repository(fill.target)):
            return
        if fill.size is None:
            fill.size = size
        if size != fill.size:
            return  # the bucket's copy is not this blob: the upstream's will be verified
        await self._check_space(size)
        fill.answered = True
        fill.source = "bucket"
        self._tell()
        fill._notify()
        copy = _ThreadedAppend(self, fill.written, self.manager_reactor)
        try:
            await self.bucket.read_blob_into(fill.digest, fill.written, copy.append, copy.stopped, size)
        except FillFailed:
            copy.abandon()
            raise
        except Exception as e:
            copy.abandon()
            log.warn(
                "object store read of {digest} broke off at {n} bytes ({e}); going on from the upstream",
                digest=fill.digest,
                n=copy.base + copy.written,
                e=e,
            )
        finally:
            copy.progress()
        self.from_bucket += copy.written

    async def _via_fleet(self) -> None:
        """With ``coordination``: fetch from the upstream only under the digest's lease; while another replica
        holds it, stream from that one (a broken stream is resumed there, or here once its lease is gone)."""
        fill = self.fill
        for _ in range(PEER_TRIES):
            claim = await self.fleet.claim(fill.digest)
            if not isinstance(claim, Holder):  # ours, or no fleet to ask
                if claim is not None:
                    self.lease, self.keeper = claim, self.fleet.keep(claim)
                return await self._from_upstream()
            before = fill.written
            if not await self._from_peer(claim):  # not for us there (or not there): the upstream decides
                return await self._from_upstream()
            if fill.size is not None and fill.written >= fill.size:
                return
            if fill.written == before:  # nothing from it: wait for it to come back or for its lease to expire
                await task.deferLater(self.manager_reactor, PEER_RETRY, lambda: None)
        log.warn("fill of {digest}: its owner keeps failing us; fetching it here", digest=fill.digest)
        await self._from_upstream()

    async def _from_peer(self, holder: Holder) -> bool:
        """What the replica holding the lease gives of the blob (it sends verified bytes only: its tail last).
        False when it answered 404: it has no fill of it, or our repository may not read it (its private-content
        check asked the upstream under our name)."""
        fill = self.fill
        try:
            response = await self.fleet.stream(holder, fill.target, fill.digest, fill.written)
        except Exception as e:
            log.info("peer {url} did not answer for {digest}: {e}", url=holder.url, digest=fill.digest, e=e)
            return True
        if response.code == 404:
            abandon(response)
            return False
        wanted = 206 if fill.written else 200
        size = response.length if wanted == 200 and isinstance(response.length, int) else fill.size
        if response.code != wanted or size is None or (fill.size is not None and size != fill.size):
            abandon(response)
            log.info("peer {url} answered {code} for {digest}", url=holder.url, code=response.code, digest=fill.digest)
            return True
        if not fill.written:
            try:
                await self._check_space(size)
            except Exception:
                abandon(response)
                raise
        if not fill.answered:
            fill.size, fill.answered, fill.source = size, True, "peer"
            self._tell()
            fill._notify()
        writer = _BodyWriter(self, 0)
        before = fill.written
        response.deliverBody(writer)
        await writer.lost
        self.from_peer += fill.written - before
        if self.error is not None:
            raise FillFailed(str(self.error)) from self.error
        return True

    async def _from_upstream(self) -> None:
        fill = self.fill
        path = f"/v2/{self.name}/blobs/{fill.digest}"
        attempt = 0
        while True:
            headers = {"Range": f"bytes={fill.written}-"} if fill.written else {}
            response = await self.client.request("GET", path, self.name, headers)
            try:
                skip = self._check_response(response)
                if fill.size is not None and not fill.written:
                    await self._check_space(fill.size)
            except Exception:
                abandon(response)  # an error status or no room: its body is not wanted
                raise
            if not fill.answered:
                fill.answered = True
                self._tell()
                fill._notify()
            writer = _BodyWriter(self, skip)
            response.deliverBody(writer)
            await writer.lost
            reason = writer.reason
            if self.error is not None:
                raise FillFailed(str(self.error)) from self.error
            if reason.check(webclient.ResponseDone) and (fill.size is None or fill.written == fill.size):
                break
            attempt += 1
            if attempt > RESUMES:
                raise FillFailed(f"upstream body broke off at {fill.written} bytes, {RESUMES} resumes failed")
            log.info(
                "upstream body of {digest} broke off at {n} bytes; resuming",
                digest=fill.digest,
                n=fill.written,
            )

    def _tell(self) -> None:
        """What followers in other processes must know, in the fill's info file."""
        fill = self.fill
        info = FillInfo(fill.repository, fill.credentialed, fill.source, fill.size, fill.answered, os.getpid())
        partial.write_info(fill.path, info)

    async def _check_space(self, size: int) -> None:
        """Make room on the disk for a fill (least recently used entries go), or refuse it: the clients then
        stream the blob through uncached."""
        needed = size + 1024 * 1024 - self.storage.free_bytes()
        if needed > 0 and self.make_room is not None:
            await self.make_room(needed)
            needed = size + 1024 * 1024 - self.storage.free_bytes()
        if needed > 0:
            raise DiskFull(f"{size} bytes do not fit on the cache disk")

    def _check_response(self, response: Any) -> int:
        """Learn the size from the first answer; on a resume, how many bytes to skip. Raises on errors."""
        fill = self.fill
        if response.code in (401, 403, 404):  # not in this repository (or not for us): another may have it
            raise blob_unknown(fill.digest)
        if response.code == 200:
            length = response.length if isinstance(response.length, int) else None
            if fill.size is None:
                fill.size = length
            elif length is not None and length != fill.size:
                raise FillFailed(f"upstream changed the size of {fill.digest}")
            return fill.written
        if response.code == 206 and fill.written:
            content_range = header(response, "Content-Range") or ""
            if content_range.startswith(f"bytes {fill.written}-"):
                total = content_range.rpartition("/")[2]
                if fill.size is None and total.isdigit():  # a fill taken over: the size comes with the rest
                    fill.size = int(total)
                return 0
        raise UpstreamError(self.client.registry, f"HTTP {response.code} for blob {fill.digest}", 502)


class _Follower:
    """Drives a :class:`Fill` another process runs: its progress is its file's size, its end the file's path
    (renamed into ``blobs/``: verified; gone otherwise: failed). When the owner dies, this process takes over."""

    def __init__(self, fill: Fill, claim: Claim, client: UpstreamClient, manager: FillManager) -> None:
        self.fill = fill
        self.claim = claim
        self.client = client
        self.manager = manager
        self.looks = 0
        self.loop = task.LoopingCall(self.look)
        self.loop.clock = manager.reactor

    def start(self) -> None:
        self.loop.start(POLL, now=True).addErrback(self._broken)

    def look(self) -> None:
        fill, claim = self.fill, self.claim
        self.looks += 1
        if not fill.answered:
            info = partial.read_info(claim.path)
            if info is not None:
                fill.repository, fill.credentialed, fill.source = info.repository, info.credentialed, info.source
                if info.answered:
                    fill.size, fill.answered = info.size, True
        written = claim.written
        grew = written != fill.written
        fill.written = written
        if not partial.same_file(claim.path, claim.fd):
            self._ended()
        elif self.looks % TAKE_EVERY == 0 and claim.take():
            self._take_over()
        elif grew:
            fill._notify()

    def _ended(self) -> None:
        fill = self.fill
        committed = partial.same_file(self.manager.storage.blob_path(fill.digest), self.claim.fd)
        if committed:
            fill.answered = fill.done = True
            fill.size = fill.written
        elif fill.answered:
            fill.failure = Failure(FillFailed(f"the fill of {fill.digest} in another process failed"))
        else:
            fill.failure = Failure(OwnerFailed(fill.digest))
        self.stop()

    def _take_over(self) -> None:
        """The owner died: its lock is ours. Append to what it wrote; our readers never notice."""
        fill = self.fill
        log.info("fill of {digest} lost its process at {n} bytes: taken over", digest=fill.digest, n=fill.written)
        self.loop.stop()
        del self.manager.following[fill.digest]
        del self.manager._followers[fill.digest]
        fill.repository = repository(fill.target)
        fill.credentialed = fill.target.upstream.credentials is not None
        self.manager.run(fill, self.claim, self.client)

    def _broken(self, failure: Failure) -> None:
        log.failure("following the fill of {digest}", failure, digest=self.fill.digest)
        self.fill.failure = failure
        self.stop()

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()
        if self.manager._followers.get(self.fill.digest) is self:
            del self.manager.following[self.fill.digest], self.manager._followers[self.fill.digest]
            self.claim.release(remove=False)
        self.fill._notify()


def _hash_prefix(fd: int, size: int) -> Any:
    """sha256 of the first ``size`` bytes of ``fd`` (in the disk pool: a taken-over fill's bytes so far)."""
    sha = hashlib.sha256()
    done = 0
    while done < size:
        chunk = os.pread(fd, min(1 << 20, size - done), done)
        if not chunk:
            raise FillFailed("the partial file shrank")
        sha.update(chunk)
        done += len(chunk)
    return sha


class FillManager:
    """Finds or starts the one fill for a digest, so concurrent requests never cause a second upstream GET."""

    def __init__(
        self,
        storage: DiskStorage,
        reactor: Any,
        disk: BlockingPool,
        on_done: Callable[[Fill, float], None] | None = None,
        make_room: Callable[[int], defer.Deferred] | None = None,
    ) -> None:
        self.storage = storage
        self.reactor = reactor
        #: The thread pool the fsync before a commit runs in.
        self.disk = disk
        self.on_done = on_done
        #: Frees at least that many bytes of the cache disk (the size bound's least recently used entries).
        self.make_room = make_room
        #: ``f(target, digest)`` once a blob is verified, before it is committed (the private record); raising
        #: fails the fill.
        self.verified: Callable[[Target, str], Awaitable[None]] | None = None
        #: The shared tier (``storage.s3``): the first source of a fill, and where new blobs are uploaded.
        self.bucket: Bucket | None = None
        #: The fleet (``coordination``): who fetches a digest from the upstream, and the stream from that replica.
        self.fleet: Any = None
        self.fills: dict[str, Fill] = {}  # the fills this process runs
        self.following: dict[str, Fill] = {}  # fills other processes run, followed from the disk
        self._followers: dict[str, _Follower] = {}
        self.stopping = False
        self.disk_full_until = 0.0

    def get(self, digest: str) -> Fill | None:
        return self.fills.get(digest) or self.following.get(digest)

    def stop(self) -> None:
        """Shutting down: stop following other processes' fills (their readers are cut with the connections) and
        reading from the bucket."""
        self.stopping = True
        for follower in list(self._followers.values()):
            follower.stop()

    def start(self, digest: str, client: UpstreamClient, target: Target) -> Fill:
        """The fill under way for ``digest`` (here or in another process on the cache directory), or a new one
        asking ``client`` for it in ``target``'s repository."""
        existing = self.get(digest)
        if existing is not None:
            return existing
        if self.reactor.seconds() < self.disk_full_until:
            raise DiskFull()
        try:
            claim = partial.claim(self.storage.tmp, digest)
        except OSError as e:
            if is_disk_full(e):
                self._disk_full()
                raise DiskFull() from e
            raise
        if not claim.owned:
            return self._follow(claim, digest, client, target)
        fill = Fill(digest, claim.path, target, self.reactor.seconds())
        if self.storage.blob_size(digest) is not None:  # committed by another process a moment ago
            claim.release(remove=True)
            fill.repository = ""  # unknown: the caller checks private content as for anyone else's fill
            fill.answered = fill.done = True
            return fill
        self.run(fill, claim, client)
        return fill

    def join(self, digest: str, client: UpstreamClient, target: Target) -> Fill | None:
        """The fill under way for ``digest`` here or in another process on the cache directory; None if there is
        none (a HEAD or another replica's request starts none)."""
        existing = self.get(digest)
        if existing is not None:
            return existing
        claim = partial.held(self.storage.tmp, digest)
        return None if claim is None else self._follow(claim, digest, client, target)

    def _follow(self, claim: Claim, digest: str, client: UpstreamClient, target: Target) -> Fill:
        """Follow the fill another process runs in ``claim``'s file (and take it over if that process dies)."""
        fill = Fill(digest, claim.path, target, self.reactor.seconds())
        # Whose it is comes with the owner's info file: until then, nobody's, and private.
        fill.foreign, fill.repository, fill.credentialed = True, "", True
        self.following[digest] = fill
        self._followers[digest] = _Follower(fill, claim, client, self)
        self._followers[digest].start()
        return fill

    def run(self, fill: Fill, claim: Claim, client: UpstreamClient) -> None:
        """Drive ``fill`` from its sources, appending to the claimed file (bytes already there, left by an owner
        that died, are resumed from, not fetched again); the claim is let go when it ends."""
        fill.written = os.lseek(claim.fd, 0, os.SEEK_END)
        self.fills[fill.digest] = fill
        runner = _FillRunner(fill, claim, client, self)
        d = defer.ensureDeferred(runner.run())
        d.addBoth(self._finished, fill, runner, self.reactor.seconds())

    def _finished(self, result: Any, fill: Fill, runner: _FillRunner, began: float) -> None:
        runner.claim.release(remove=isinstance(result, Failure))  # a failed fill's file goes before its lock
        del self.fills[fill.digest]
        if isinstance(result, Failure):
            fill.failure = result
            if is_disk_full(result.value):
                self._disk_full()
            elif not isinstance(result.value, RegistryError):
                log.warn("fill of {digest} failed: {why}", digest=fill.digest, why=result.getErrorMessage())
            fill._notify()
        else:
            fill.done = True
            fill.size = fill.written
            if self.on_done:
                self.on_done(fill, self.reactor.seconds() - began)
            fill._notify()

    def _disk_full(self) -> None:
        if self.reactor.seconds() >= self.disk_full_until:
            log.warn("cache disk full: streaming blobs through uncached for {s:.0f} s", s=DISK_FULL_BACKOFF)
        self.disk_full_until = self.reactor.seconds() + DISK_FULL_BACKOFF
