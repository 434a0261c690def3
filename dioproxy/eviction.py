"""A size-bounded cache: least-recently-used eviction of blobs and manifests past ``cache.max_size``.

- Sizes and last-use times live in the cache index (:mod:`dioproxy.storage.index`, SQLite, shared by every process on
  the directory), touched only from the ``index`` thread. A hit costs a dict entry here: stored entries and last
  uses are written in batches, before each check (every second) and at shutdown.
- The start-up scan and the hourly rescan reconcile the store with the index in the background, one of its slices
  (a blob prefix directory, the manifests) at a time: listed by the store (in its ``disk`` pool), merged in the
  ``index`` thread. Entries of a directory that predates the index start from their file's mtime (or the old
  ``lastuse.json``).
- The bound counts the stored entries (of every process) plus the blobs being downloaded here now (their
  announced size), so disk use stays under it while fills run, not only once they are done.
- Victims are chosen by a query (least recently used first, a few hundred per turn) and taken out of the index
  in one transaction, then deleted by the store (in its ``disk`` pool). An entry being read here (a client streaming
  that blob) is pinned and never evicted; pins are per process. A blob being filled is not an entry yet.
- ``cache.max_age``: entries not read for that long are removed too.
- With the shared tier (``storage.s3``), ``held`` names the entries not uploaded yet: they stay, like pinned
  ones; while it answers None (it does not know yet: its first reconcile is not done) nothing is evicted.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from dioproxy.pools import PoolTimeout
from dioproxy.storage.base import BLOB, KINDS, MANIFEST, Key
from dioproxy.storage.disk import DiskStorage
from dioproxy.storage.index import CacheIndex, index_path

log = Logger()

#: Victims taken per turn: the hooks and metrics run on the reactor, so a big expiry goes in slices.
SLICE = 500
#: Seconds before opening the index or a scan that failed for a passing reason runs again.
SCAN_RETRY = 10.0
#: Passing reasons: a flood of connections at start can take every descriptor (EMFILE, which SQLite reports as
#: "unable to open database file"), a busy disk can time the pool out.
PASSING = (OSError, PoolTimeout, sqlite3.OperationalError)


class IndexedStorage(DiskStorage):
    """The disk storage, telling the cache bound about each entry it stores."""

    def __init__(self, root: str, pool: Any = None) -> None:
        super().__init__(root, pool)
        self.on_store: Callable[[str, str, int], None] | None = None

    def commit_blob(self, temp_path: str, digest: str) -> str:
        size = os.stat(temp_path).st_size
        final = super().commit_blob(temp_path, digest)
        if self.on_store:
            self.on_store(BLOB, digest, size)
        return final

    def write_manifest(self, digest: str, media_type: str, body: bytes) -> None:
        super().write_manifest(digest, media_type, body)
        if self.on_store:
            self.on_store(MANIFEST, digest, len(media_type.encode()) + 1 + len(body))


class CacheBound:
    """Keeps the cache under ``max_size`` (bytes, None = unbounded) and drops entries unused for ``max_age``."""

    def __init__(
        self,
        storage: IndexedStorage,
        reactor: Any,
        metrics: Any = None,
        max_size: int | None = None,
        max_age: float | None = None,
        inflight: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.time,
        check_interval: float = 1.0,
        rescan_interval: float = 3600.0,
        *,
        pools: Any,
    ) -> None:
        self.storage = storage
        self.reactor = reactor
        self.metrics = metrics
        self.max_size = max_size
        self.max_age = max_age
        self.inflight = inflight
        self.clock = clock
        self.check_interval = check_interval
        self.rescan_interval = rescan_interval
        self.pools = pools
        self.index: CacheIndex | None = None  # opened in the index thread by start()
        #: Totals of the index (every process's entries), as of our last call to it.
        self.size = 0
        self.counts = dict.fromkeys(KINDS, 0)
        self.pins: dict[Key, set] = {}
        self.ready = False
        self._added: dict[Key, tuple[int, float]] = {}  # not yet written to the index
        self._touched: dict[Key, float] = {}
        self._leaving: set[Key] = set()  # out of the index, files being deleted
        self._checking = False
        self._check_again = False
        self._check_call: Any = None
        self._retry_call: Any = None
        self._loops: list[task.LoopingCall] = []
        self._ready_waiters: list[defer.Deferred] = []
        self._scan: defer.Deferred | None = None
        self._working = 0  # calls to the pools under way (stop waits for them)
        self._quiet: list[defer.Deferred] = []
        self._stopped = False
        #: ``f(kind, digest)`` after an entry was evicted, for state kept about it elsewhere (private records).
        self.on_evict: list[Callable[[str, str], None]] = []
        #: Entries that must stay whatever the bound says; None: all of them, for now.
        self.held: Callable[[], set[Key] | None] = set
        storage.on_store = self.added

    # -- life ------------------------------------------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Open the index, reconcile it with the directory (in the background), then start the periodic check
        and rescan."""
        self._stopped = False
        d = self.pools.index.run(CacheIndex, index_path(self.storage.root))
        d.addCallback(self._opened)
        d.addErrback(self._failed, "cannot open the cache index", self.start)
        return self._track(d)

    def _opened(self, index: CacheIndex) -> defer.Deferred | None:
        if self._stopped:
            return self.pools.index.run(index.close)
        self.index = index
        return self.rescan().addCallback(lambda _: self._start_loops())

    def _start_loops(self) -> None:
        if self._stopped:
            return
        for interval, f in ((self.check_interval, self.check), (self.rescan_interval, self.rescan)):
            if interval and interval > 0:
                loop = task.LoopingCall(f)
                loop.clock = self.reactor
                loop.start(interval, now=False).addErrback(lambda f: log.failure("cache bound loop failed", f))
                self._loops.append(loop)

    def stop(self) -> defer.Deferred:
        """Stop the timers, let the calls under way end (a scan ends after its current slice), write what is not in
        the index yet and close it."""
        self._stopped = True
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        for call in (self._check_call, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        quiet: defer.Deferred = defer.Deferred()
        if self._working:
            self._quiet.append(quiet)
        else:
            quiet.callback(None)
        return quiet.addCallback(lambda _: self._close())

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        """Count ``d`` (the whole chain of a call to the pools) as work under way until it fires."""
        self._working += 1

        def done(result: Any) -> Any:
            self._working -= 1
            if not self._working:
                waiters, self._quiet = self._quiet, []
                for w in waiters:
                    w.callback(None)
            return result

        return d.addBoth(done)

    def _close(self) -> defer.Deferred:
        index, self.index = self.index, None
        if index is None:
            return defer.succeed(None)
        d = self._write(index)
        d.addErrback(lambda f: log.warn("cannot write the last uses to the cache index: {e}", e=f.getErrorMessage()))
        d.addCallback(lambda _: self.pools.index.run(index.close))
        return d

    def when_ready(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if self.ready:
            d.callback(None)
        else:
            self._ready_waiters.append(d)
        return d

    def configure(self, max_size: int | None, max_age: float | None) -> None:
        self.max_size, self.max_age = max_size, max_age
        self.schedule_check()

    # -- the index -------------------------------------------------------------------------------------------

    def _write(self, index: CacheIndex, f: Callable[..., Any] | None = None, *args: Any) -> defer.Deferred:
        """In the index thread: write the batched changes, then ``f(index, *args)``; fires with its result (and
        refreshes our totals). The batch is kept for the next call if this one fails."""
        added, touched = self._added, self._touched
        self._added, self._touched = {}, {}
        d = self.pools.index.run(_in_index, index, added, touched, f, args)

        def done(result: tuple[Any, tuple[dict, dict]]) -> Any:
            value, (counts, sizes) = result
            self.counts, self.size = counts, sum(sizes.values())
            return value

        def failed(failure: Any) -> Any:
            for key, when in touched.items():
                self._touched[key] = max(when, self._touched.get(key, 0.0))
            self._added = {**added, **self._added}
            return failure

        return d.addCallbacks(done, failed)

    def flush(self) -> defer.Deferred:
        """Write the batched changes now (and refresh the totals)."""
        if self.index is None:
            return defer.succeed(None)
        return self._track(self._write(self.index))

    # -- scan ------------------------------------------------------------------------------------------------

    def rescan(self) -> defer.Deferred:
        """Reconcile the index with the directory, slice by slice, in the background.

        Also how entries removed behind our back (``dioproxy purge``, ``verify --repair``) leave the index.
        """
        if self._scan is not None or self.index is None:
            return defer.succeed(None)
        d = self._scan = defer.ensureDeferred(self._reconcile(self.index))
        d.addErrback(self._failed, "cache index scan failed", self.rescan)
        d.addBoth(self._scan_done)
        return self._track(d)

    def _failed(self, failure: Any, what: str, again: Callable[[], Any]) -> None:
        """Try ``again`` later after a passing failure instead of leaving the index unready until the next rescan
        (an hour); anything else is a bug and is logged as one."""
        if not failure.check(*PASSING):
            log.failure(what, failure)
            return
        log.warn("{what} ({e}); trying again in {s} s", what=what, e=failure.getErrorMessage(), s=SCAN_RETRY)
        if not self._stopped:
            self._retry_call = self.reactor.callLater(SCAN_RETRY, again)

    def _scan_done(self, result: Any) -> Any:
        self._scan = None
        return result

    async def _reconcile(self, index: CacheIndex) -> None:
        old = await self.storage.legacy_last_uses()  # a directory from before the index
        added = removed = 0
        for kind, prefix in self.storage.slices():
            if self._stopped:
                return
            listed_at = self.clock()
            found = await self.storage.list_entries(kind, prefix)
            more, gone = await self._write(
                index, CacheIndex.reconcile, kind, prefix, found, listed_at, old[kind], set(self._leaving)
            )
            added, removed = added + more, removed + gone
        if any(old.values()):
            await self.storage.drop_legacy_last_uses()  # migrated into the index
        self._scanned(added, removed)

    def _scanned(self, added: int, removed: int) -> None:
        first = not self.ready
        self.ready = True
        if first:
            log.info(
                "cache index: {n} entries, {size} bytes (bound: {bound}); {added} found, {removed} gone",
                n=sum(self.counts.values()),
                size=self.size,
                bound=self.max_size or "none",
                added=added,
                removed=removed,
            )
            waiters, self._ready_waiters = self._ready_waiters, []
            for w in waiters:
                w.callback(None)
        self.check()

    # -- events ----------------------------------------------------------------------------------------------

    def added(self, kind: str, digest: str, size: int) -> None:
        """``IndexedStorage.on_store``: a verified entry was stored."""
        key = (kind, digest)
        self._added[key] = (size, self.clock())
        self._touched.pop(key, None)
        self.schedule_check()

    def touch(self, kind: str, digest: str) -> None:
        key = (kind, digest)
        self._touched[key] = max(self.clock(), self._touched.get(key, 0.0))

    def reading(self, digest: str, request: Any) -> None:
        """A client is about to read this blob: it counts as used, and is not evicted while the request lasts."""
        key = (BLOB, digest)
        self.touch(BLOB, digest)
        if request.finished or getattr(request, "_disconnected", False):
            return
        self.pins.setdefault(key, set()).add(request)
        request.notifyFinish().addBoth(self._unpin, key, request)

    def _unpin(self, result: Any, key: Key, request: Any) -> None:
        readers = self.pins.get(key)
        if readers is not None:
            readers.discard(request)
            if not readers:
                del self.pins[key]
        self.touch(*key)
        self.schedule_check()

    def pinned(self, key: Key) -> bool:
        """Being read now. Requests whose end we were not told about (a paused channel) are dropped here."""
        readers = self.pins.get(key)
        if not readers:
            return False
        live = {r for r in readers if not (r.finished or getattr(r, "_disconnected", False))}
        if live:
            self.pins[key] = live
            return True
        del self.pins[key]
        return False

    def _pinned(self) -> set[Key]:
        """Entries eviction must leave: read now, or held (not in the bucket yet)."""
        return {key for key in list(self.pins) if self.pinned(key)} | (self.held() or set())

    def request_done(self, request: Any) -> None:
        """A manifest was served: its digest is in the response headers (tags too, and 304s)."""
        if request.code not in (200, 304) or b"/manifests/" not in (request.path or b""):
            return
        digests = request.responseHeaders.getRawHeaders("Docker-Content-Digest") or []
        if digests:
            self.touch(MANIFEST, digests[0])

    # -- eviction --------------------------------------------------------------------------------------------

    def total(self) -> int:
        """What the bound is checked against: stored entries plus blobs being downloaded."""
        return self.size + self.inflight()

    def schedule_check(self) -> None:
        """Check soon, once: after the current call chain (a fill's bookkeeping) has finished."""
        if self._check_call is None or not self._check_call.active():
            self._check_call = self.reactor.callLater(0, self.check)

    def check(self) -> None:
        """Write the batched changes, then evict what max_age and the bound ask for (one slice; the next
        follows at once if there is more)."""
        if not self.ready or self.index is None or self.held() is None:
            return
        if self._checking:
            self._check_again = True
            return
        self._checking = True
        before = self.clock() - self.max_age if self.max_age else None
        room = self.max_size - self.inflight() if self.max_size is not None else None
        d = self._write(self.index, CacheIndex.claim, self._pinned(), SLICE, before, room)
        d.addCallback(self._claimed, room)
        d.addErrback(lambda f: log.failure("cache bound check failed", f))
        d.addBoth(self._checked)
        self._track(d)

    def _claimed(self, claimed: tuple[list, int], room: int | None) -> defer.Deferred:
        victims, wanted = claimed
        if len(victims) >= SLICE:
            self._check_again = True
        elif wanted > 0 and room is not None:
            log.warn(
                "cache is {excess} bytes over its bound of {bound}: the rest is being read or downloaded",
                excess=wanted,
                bound=self.max_size,
            )
        return self._evict(victims)

    def _checked(self, _: Any) -> None:
        self._checking = False
        if self._check_again and not self._stopped:
            self._check_again = False
            self.schedule_check()

    async def _make_room(self, nbytes: int) -> None:
        freed = 0
        while freed < nbytes and self.index is not None and self.held() is not None:
            victims, _ = await self._write(
                self.index, CacheIndex.claim, self._pinned(), SLICE, None, None, nbytes - freed
            )
            if victims:
                log.warn(
                    "cache disk full: evicting {n} entries ({freed} bytes) to make room",
                    n=len(victims),
                    freed=sum(v[2] for v in victims),
                )
            freed += await self._evict(victims)
            if len(victims) < SLICE:
                return

    def make_room(self, nbytes: int) -> defer.Deferred:
        """The disk is full (whatever the bound says): evict least recently used, unpinned entries totalling
        ``nbytes``; fires once their files are deleted."""
        return self._track(defer.ensureDeferred(self._make_room(nbytes)))

    def _evict(self, victims: list[tuple[str, str, int, str]]) -> defer.Deferred:
        """Delete entries taken out of the index from the store; fires with the bytes freed."""
        if not victims:
            return defer.succeed(0)
        keys = [(kind, digest) for kind, digest, _, _ in victims]
        self._leaving.update(keys)
        d = self.storage.delete_entries(keys)
        d.addCallback(self._evicted, victims)
        d.addErrback(lambda f: log.failure("eviction: cannot delete files", f) or 0)

        def settled(result: Any) -> Any:
            self._leaving.difference_update(keys)
            return result

        return d.addBoth(settled)

    def _evicted(self, errors: list[str | None], victims: list[tuple[str, str, int, str]]) -> int:
        freed = 0
        for (kind, digest, size, reason), error in zip(victims, errors):
            if error == "gone":  # removed behind our back (purge, repair): gone all the same
                freed += size
                continue
            if error is not None:
                log.warn("cannot evict {kind} {digest}: {e}", kind=kind, digest=digest, e=error)
                continue
            freed += size
            for hook in self.on_evict:
                hook(kind, digest)
            if self.metrics is not None:
                self.metrics.evicted(kind, reason, size)
            log.debug(
                "evicted {kind} {digest} ({size} bytes, {reason})", kind=kind, digest=digest, size=size, reason=reason
            )
        return freed

    # -- metrics ---------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "cache_size": self.size,
            "cache_entries": dict(self.counts),
            "max_size": self.max_size or 0,
            "pinned": sum(1 for key in list(self.pins) if self.pinned(key)),
            "ready": 1 if self.ready else 0,
        }


def _in_index(
    index: CacheIndex,
    added: dict[Key, tuple[int, float]],
    touched: dict[Key, float],
    f: Callable[..., Any] | None,
    args: tuple,
) -> tuple[Any, tuple[dict, dict]]:
    """Runs in the index thread: the batch, the call, the totals after it."""
    index.apply(added, touched)
    value = f(index, *args) if f is not None else None
    return value, index.totals()


def inflight_bytes(fills: Any) -> int:
    """Disk space the fills in progress will take: their announced size, or what they wrote so far."""
    if fills is None:
        return 0
    return sum(f.size if f.size is not None else f.written for f in list(fills.fills.values()))
