"""The shared tier (``storage.s3``): one bucket behind the local cache directory, shared by every replica.

The cache directory stays the hot tier: every byte a client gets still passes through a local file and its
sha256 (:mod:`dioproxy.fill`). This module is what the mirror knows about the bucket:

- keys (relative to ``storage.s3.prefix``; :mod:`dioproxy.objectstore` makes the digest ones)::

      blobs/sha256/<ab>/<hex>                 blob bytes
      manifests/sha256/<ab>/<hex>             media type, a newline, the manifest bytes (as on disk)
      tags/<registry>/<name>/<tag>            JSON tag entry, with the time the upstream was last asked
      private/<ab>/<hex>                      JSON list of the repositories credentialed content was seen in

- reads on a local miss (a blob's size and private record, a manifest, a tag entry). A read that fails marks
  the store down for :data:`DOWN_FOR` seconds, during which reads are skipped: the caller goes to the upstream
  at once instead of waiting for each deadline.
- writes in the background: a queue of uploads (blobs, manifests, tag entries, records), a few at a time, each
  attempt under a deadline, retried with backoff until the store takes it. A blob or manifest goes up after its
  private record, so no replica ever finds credentialed content in the bucket without it.
- a reconcile at start and every :data:`RECONCILE_EVERY` seconds: every verified local blob and manifest the
  bucket lacks is queued. Until the first one is done, :meth:`Bucket.held` holds the whole hot tier against
  eviction; after it, the entries still queued.

Fails closed for private content: a bucket record that names other repositories sends the request upstream
(which checks access); a record that cannot be read counts like the store being down.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import asdict
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from dioproxy.objectstore import ObjectStore, ObjectStoreError, StoreConfigError, blob_key, manifest_key
from dioproxy.storage.base import TagEntry
from dioproxy.storage.cachedir import BLOB, MANIFEST
from dioproxy.storage.disk import DiskStorage, listing

log = Logger()

#: The deadline of every call to the store (at most ``timeouts.read``): a read on a client's path that takes longer
#: is abandoned for the upstream.
STORE_TIMEOUT = 10.0
#: After a failed read, how long reads skip the store (the upload queue keeps trying on its own schedule).
DOWN_FOR = 10.0
#: Seconds between reconciles ("upload what the bucket lacks").
RECONCILE_EVERY = 600.0
#: Uploads under way at once.
UPLOADS = 2
#: Backoff of a failed upload: first wait, doubling up to the cap, with jitter.
RETRY_FIRST, RETRY_CAP = 1.0, 300.0
#: An upload attempt's deadline: this long plus its size at this rate (slower is a store in trouble).
ATTEMPT_BASE, ATTEMPT_RATE = 60.0, 2 * 2**20
#: Blob sizes remembered from the store's answers, uploads and listings (most recent kept), each for KNOWN_FOR
#: seconds: a blob key names its bytes, and an object is deleted only as damaged (then forgotten here) or by the
#: fleet's bound, which never removes a blob used within a longer time (dioproxy.fleet.bucketuse.PROTECT).
KNOWN_BLOBS, KNOWN_FOR = 100_000, 300.0
#: Largest manifest, tag entry or record read back (a damaged or hostile object must not fill memory).
MAX_SMALL = 4 * 2**20 + 1024

Job = tuple[str, str]  # (kind, what): ("blob" | "manifest" | "record", digest) or ("tag", "registry/name:tag")


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def record_key(digest: str) -> str:
    return f"private/{_hex(digest)[:2]}/{_hex(digest)}"


def tag_key(registry: str, name: str, tag: str) -> str:
    return f"tags/{registry}/{name}/{tag}"


class Bucket:
    """The shared tier over one :class:`~dioproxy.objectstore.ObjectStore`, in front of the local ``storage``."""

    def __init__(self, store: ObjectStore, storage: DiskStorage, reactor: Any) -> None:
        self.store = store
        self.storage = storage
        self.reactor = reactor
        self.down_until = 0.0
        self.reconciled = False  # the first reconcile is done: the queue knows every entry the bucket lacks
        self._queued: dict[Job, Callable[[], Awaitable[None]]] = {}  # waiting or under way, in order
        self._running: dict[Job, defer.Deferred] = {}
        self._retries: dict[Job, int] = {}
        self._timers: dict[Job, Any] = {}
        self._idle: list[defer.Deferred] = []
        self._loop: task.LoopingCall | None = None
        self._stopped = False
        self._tags: dict[str, bytes] = {}  # tag key -> the entry to upload
        self._discarding: dict[str, defer.Deferred] = {}  # key of a damaged object -> its deletion
        self._sizes: OrderedDict[str, tuple[int, float]] = OrderedDict()  # digest -> (size, when learned)
        #: ``storage.s3.max_size`` / ``max_age``: the fleet's record of the blobs' last uses.
        self.use: Any = None
        #: Seconds before a failed reconcile (the store down at start) runs again.
        self.reconcile_retry = 10.0
        #: First wait before an upload is tried again (doubling up to RETRY_CAP).
        self.retry_first = RETRY_FIRST

    # -- life ----------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the store, then reconcile now and periodically. A store that does not answer is no reason not to
        serve (the hot tier and the upstream do); one that refuses our configuration is: StoreConfigError."""
        try:
            await self.store.check()
        except StoreConfigError as e:
            if e.key != "storage.s3.endpoint":
                raise
            log.warn("object store unreachable at start ({e}): serving from the cache and upstreams", e=e)
            self._mark_down()
        self._loop = task.LoopingCall(self.reconcile)
        self._loop.clock = self.reactor
        self._loop.start(RECONCILE_EVERY, now=True).addErrback(lambda f: log.failure("bucket reconcile loop", f))

    def stop(self) -> defer.Deferred:
        """Stop the timers and the uploads under way (a queued upload is found again by the next reconcile)."""
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        for upload in list(self._running.values()):
            upload.cancel()
        return self.store.stop()

    def up(self) -> bool:
        return self.reactor.seconds() >= self.down_until

    def _mark_down(self, why: Exception | None = None) -> None:
        if self.up() and why is not None:
            log.warn("object store failed ({e}): reads skip it for {s:.0f} s", e=why, s=DOWN_FOR)
        self.down_until = self.reactor.seconds() + DOWN_FOR

    async def _read(self, call: Callable[[], Any]) -> Any:
        """``call()``'s answer, or None when the store is down or fails (then it is down for a while)."""
        if not self.up():
            return None
        try:
            return await call()
        except (ObjectStoreError, ValueError, OSError) as e:
            self._mark_down(e)
            return None

    # -- reads on a local miss -------------------------------------------------------------------------------

    def blob_url(self, digest: str, ttl: float) -> str:
        """A presigned URL of the blob, valid ``ttl`` seconds (no I/O: signing only)."""
        return self.store.presign_get(blob_key(digest), ttl)

    async def blob_size(self, digest: str) -> int | None:
        """The size of the bucket's copy, None if absent or the store does not say; a known blob costs no request."""
        known = self._sizes.get(digest)
        if known is not None and self.up() and self.reactor.seconds() - known[1] < KNOWN_FOR:
            self._sizes.move_to_end(digest)
            return known[0]
        info = await self._read(lambda: self.store.head(blob_key(digest)))
        if info is None:
            return None
        self._known(digest, info.size)
        return info.size

    def _known(self, digest: str, size: int, use: bool = True) -> None:
        """Remember that the bucket holds ``digest``; ``use``: a client's request or our upload brought it up, not a
        listing (which only makes a blob the fleet's bound did not know of countable)."""
        self._sizes[digest] = (size, self.reactor.seconds())
        self._sizes.move_to_end(digest)
        if len(self._sizes) > KNOWN_BLOBS:
            self._sizes.popitem(last=False)
        if use:
            self.used(digest)
        elif self.use is not None:
            self.use.seen(digest, size)

    def used(self, digest: str) -> None:
        """A blob was asked for: if the bucket holds it, the fleet's bound counts the use."""
        known = self._sizes.get(digest)
        if self.use is not None and known is not None:
            self.use.touch(digest, known[0])

    def remove_blob(self, digest: str) -> defer.Deferred:
        """The fleet's bound takes an unused blob out of the bucket."""
        self._sizes.pop(digest, None)
        return self.store.delete(blob_key(digest))

    def read_blob_into(
        self, digest: str, start: int, sink: Callable[[memoryview], None], stopped: Callable[[], bool], size: int
    ) -> defer.Deferred:
        """The blob from ``start`` into ``sink`` (in a reader thread: :meth:`ObjectStore.read_into`), under a
        deadline for its ``size`` as an upload's; an error if the store fails (the store is then down a while)."""
        deadline = ATTEMPT_BASE + (size - start) / ATTEMPT_RATE
        return self.store.read_into(blob_key(digest), start, sink, stopped, deadline).addErrback(self._read_failed)

    def _read_failed(self, failure: Failure) -> Failure:
        self.read_failed(failure.value)
        return failure

    def read_failed(self, why: Exception) -> None:
        """A read of the store broke (a body cut or stalled): leave the store alone for a while."""
        self._mark_down(why)

    async def record(self, digest: str) -> tuple[bool, set[str] | None]:
        """``(answered, repositories)``: the bucket's private record of a digest (None: there is none, public).
        ``answered`` False: the store did not say, so nothing of this digest may be served from it."""
        if not self.up():
            return False, None
        try:
            data = await self.store.get_bytes(record_key(digest), MAX_SMALL)
        except (ObjectStoreError, ValueError) as e:
            self._mark_down(e)
            return False, None
        if data is None:
            return True, None
        try:
            repositories = json.loads(data)
        except ValueError:
            repositories = None
        if not isinstance(repositories, list) or not all(isinstance(r, str) for r in repositories):
            log.warn("private record of {digest} in the bucket damaged: treated as private", digest=digest)
            return True, set()
        return True, set(repositories)

    async def may_serve(self, digest: str, repository: str) -> bool:
        """Whether the bucket's copy of ``digest`` may be served to ``repository``; if its record names it, the
        record is copied to the local tier first (the local checks and other followers then see it)."""
        answered, repositories = await self.record(digest)
        if not answered:
            return False
        if repositories is None:
            return True
        if repository not in repositories:
            return False
        local = self.storage.read_record(digest)
        with contextlib.suppress(ValueError, TypeError):  # damaged locally: the bucket's list replaces it
            repositories |= set(json.loads(local)) if local else set()
        return await self.storage.write_record(digest, json.dumps(sorted(repositories)).encode())

    async def read_manifest(self, digest: str) -> tuple[str, bytes] | None:
        """(media type, bytes) of a manifest in the bucket, verified against its digest; a damaged one is deleted
        from the bucket (the upstream's copy replaces it) and None returned."""
        data = await self._read(lambda: self.store.get_bytes(manifest_key(digest), MAX_SMALL))
        if data is None:
            return None
        media_type, _, body = data.partition(b"\n")
        if "sha256:" + _sha256(body) != digest:
            log.warn("manifest {digest} in the bucket does not match its digest: deleting it", digest=digest)
            self.discard(MANIFEST, digest)
            return None
        return media_type.decode("utf-8", "replace"), body

    async def read_tag(self, registry: str, name: str, tag: str) -> TagEntry | None:
        data = await self._read(lambda: self.store.get_bytes(tag_key(registry, name, tag), MAX_SMALL))
        if data is None:
            return None
        try:
            return TagEntry(**json.loads(data))
        except (ValueError, TypeError):
            log.warn("tag entry {r}/{n}:{t} in the bucket unreadable: ignored", r=registry, n=name, t=tag)
            return None

    def discard(self, kind: str, digest: str) -> None:
        """Delete a damaged object from the bucket (in the background), so the next fill goes upstream; the upload
        of good bytes waits for it (a create-only write would find the damaged object and leave it)."""
        key = blob_key(digest) if kind == BLOB else manifest_key(digest)
        self._sizes.pop(digest, None)
        d = self.store.delete(key)
        d.addErrback(lambda f: log.warn("cannot delete damaged {key}: {e}", key=key, e=f.getErrorMessage()))
        self._discarding[key] = d
        d.addBoth(lambda _: self._discarding.pop(key, None) if self._discarding.get(key) is d else None)

    # -- writes in the background ----------------------------------------------------------------------------

    def blob_stored(self, digest: str) -> None:
        """A verified blob was committed locally: upload it (after its record)."""
        self._enqueue((BLOB, digest), lambda: self._upload_entry(BLOB, digest))

    def manifest_stored(self, digest: str) -> None:
        self._enqueue((MANIFEST, digest), lambda: self._upload_entry(MANIFEST, digest))

    def record_written(self, digest: str) -> None:
        """A private record changed locally: merge it into the bucket's."""
        self._enqueue(("record", digest), lambda: self._upload_record(digest))

    def tag_checked(self, registry: str, name: str, tag: str, entry: TagEntry) -> None:
        """A tag entry was (re)checked with the upstream: share it, its check time included."""
        key = tag_key(registry, name, tag)
        self._tags[key] = json.dumps(asdict(entry)).encode()  # the job sends the latest entry when it runs
        self._enqueue(("tag", key), lambda: self._upload_tag(key))

    async def _upload_tag(self, key: str) -> None:
        data = self._tags.pop(key)
        try:
            await self.store.put_bytes(key, data, replace=True)
        except BaseException:
            self._tags.setdefault(key, data)  # unless a newer one came meanwhile
            raise

    def held(self) -> set[tuple[str, str]] | None:
        """Entries eviction must keep (uploads not done); None: all of them (the first reconcile is not done)."""
        if not self.reconciled:
            return None
        return {job for job in self._queued if job[0] in (BLOB, MANIFEST)}

    def pending(self) -> int:
        return len(self._queued)

    def idle(self) -> defer.Deferred:
        """Fires once the queue is empty (tests; a shutdown that wants its uploads done)."""
        d: defer.Deferred = defer.Deferred()
        if not self._queued:
            d.callback(None)
        else:
            self._idle.append(d)
        return d

    def _enqueue(self, job: Job, upload: Callable[[], Awaitable[Any]]) -> None:
        if job in self._queued or self._stopped:
            return
        self._queued[job] = upload
        self._pump()

    def _pump(self) -> None:
        if self._stopped:
            return
        for job, upload in list(self._queued.items()):
            if len(self._running) >= UPLOADS:
                return
            if job in self._running or job in self._timers:
                continue
            d = self._running[job] = defer.ensureDeferred(upload())
            d.addTimeout(self._deadline(job), self.reactor)
            d.addBoth(self._uploaded, job)

    def _deadline(self, job: Job) -> float:
        size = 0
        if job[0] == BLOB:
            size = self.storage.blob_size(job[1]) or 0
        return ATTEMPT_BASE + size / ATTEMPT_RATE

    def _uploaded(self, result: Any, job: Job) -> None:
        self._running.pop(job, None)
        if isinstance(result, Failure) and not result.check(FileNotFoundError) and not self._stopped:
            tries = self._retries[job] = self._retries.get(job, 0) + 1
            wait = min(RETRY_CAP, self.retry_first * 2 ** (tries - 1)) * random.uniform(0.8, 1.2)
            log.warn(
                "upload of {job} to the object store failed ({e}); again in {s:.1f} s",
                job=f"{job[0]} {job[1]}",
                e=result.getErrorMessage(),
                s=wait,
            )
            self._timers[job] = self.reactor.callLater(wait, self._retry, job)
            return
        self._queued.pop(job, None)
        self._retries.pop(job, None)
        if not self._queued:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)
        self._pump()

    def _retry(self, job: Job) -> None:
        del self._timers[job]
        self._pump()

    async def _upload_entry(self, kind: str, digest: str) -> None:
        """A blob or manifest from the local tier, its private record first (FileNotFoundError: gone meanwhile)."""
        if self.storage.read_record(digest) is not None:
            await self._upload_record(digest)
        key = blob_key(digest) if kind == BLOB else manifest_key(digest)
        if key in self._discarding:
            await self._discarding[key]
        if kind == BLOB:
            path = self.storage.blob_path(digest)
            await self.store.put_file(path, key)
            with contextlib.suppress(OSError):
                self._known(digest, os.stat(path).st_size)
            return
        data = self.storage.read_small(self.storage.manifest_path(digest))
        if data is None:
            raise FileNotFoundError(digest)
        await self.store.put_bytes(key, data)

    async def _upload_record(self, digest: str) -> None:
        """The union of the local record and the bucket's (replicas add repositories; none is ever dropped by us,
        and a lost one only costs its repository one question to the upstream)."""
        local = self.storage.read_record(digest)
        if local is None:
            return
        try:
            repositories = set(json.loads(local))
        except (ValueError, TypeError):
            return  # damaged locally: the local check treats it as private; nothing worth sharing
        data = await self.store.get_bytes(record_key(digest), MAX_SMALL)
        try:
            theirs = set(json.loads(data)) if data is not None else set()
        except (ValueError, TypeError):
            theirs = set()  # damaged in the bucket: ours replaces it
        if data is not None and theirs >= repositories:
            return
        merged = json.dumps(sorted(repositories | theirs)).encode()
        await self.store.put_bytes(record_key(digest), merged, replace=True)

    # -- reconcile -------------------------------------------------------------------------------------------

    def reconcile(self) -> defer.Deferred:
        """Queue every local blob and manifest the bucket lacks (one prefix slice at a time; in the background)."""
        d = defer.ensureDeferred(self._reconcile())
        d.addErrback(self._reconcile_failed)
        return d

    def _reconcile_failed(self, failure: Any) -> None:
        log.warn(
            "object store reconcile failed ({e}); again in {s:.0f} s",
            e=failure.getErrorMessage(),
            s=self.reconcile_retry,
        )
        if not self._stopped:
            self._timers[("reconcile", "")] = self.reactor.callLater(self.reconcile_retry, self._reconcile_again)

    def _reconcile_again(self) -> None:
        del self._timers[("reconcile", "")]
        self.reconcile()

    async def _reconcile(self) -> None:
        root, queued = self.storage.root, 0
        pool = self.storage.pool
        local_manifests = await _in_pool(pool, listing, os.path.join(root, "manifests", "sha256"))
        by_prefix: dict[str, list[str]] = {}
        for digest, _, _ in local_manifests:
            by_prefix.setdefault(_hex(digest)[:2], []).append(digest)
        for ab in (f"{i:02x}" for i in range(256)):
            if self._stopped:
                return
            blobs = await _in_pool(pool, listing, os.path.join(root, "blobs", "sha256", ab))
            for kind, digests, prefix in (
                (BLOB, [d for d, _, _ in blobs], f"blobs/sha256/{ab}/"),
                (MANIFEST, by_prefix.get(ab, []), f"manifests/sha256/{ab}/"),
            ):
                if not digests:
                    continue
                there: dict[str, int] = {}
                await self.store.walk(prefix, lambda page, there=there: there.update((i.key, i.size) for i in page))
                if kind == BLOB:
                    for digest in digests:
                        if blob_key(digest) in there:
                            self._known(digest, there[blob_key(digest)], use=False)
                for digest in digests:
                    key = blob_key(digest) if kind == BLOB else manifest_key(digest)
                    if key not in there:
                        queued += 1
                        (self.blob_stored if kind == BLOB else self.manifest_stored)(digest)
        if not self.reconciled:
            log.info("object store {label}: reconciled, {n} local entries to upload", label=self.store.label, n=queued)
        self.reconciled = True
        self.down_until = 0.0  # it answered every listing: reads may use it again


def _in_pool(pool: Any, f: Callable[..., Any], *args: Any) -> Any:
    return defer.maybeDeferred(f, *args) if pool is None else pool.run(f, *args)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
