"""A size-bounded cache: least-recently-used eviction of blobs and manifests past ``cache.max_size``.

- Last-use times live in memory (an LRU-ordered index): a hit costs no disk write. They survive restarts through
  a snapshot (``lastuse.json``) written every few minutes and at shutdown; entries the snapshot does not know
  start from their file's mtime. The start-up scan of the directory runs in a thread.
- The bound counts the stored entries plus the blobs being downloaded now (their announced size), so disk use
  stays under it while fills run, not only once they are done. It is checked after each new entry and every
  second.
- An entry being read (a client streaming that blob) is pinned and never evicted; a blob being filled is not an
  entry yet. Evicting a blob renames it into ``tmp/`` (atomic, instant) and deletes it in a thread.
- ``cache.max_age``: entries not read for that long are removed too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Callable

from twisted.internet import defer, task, threads
from twisted.logger import Logger

from dioproxy.cachedir import BLOB, KINDS, MANIFEST, entry_path, load_lastuse, save_lastuse, scan
from dioproxy.storage import DiskStorage

log = Logger()

Key = tuple[str, str]  # (kind, digest)


class CacheIndex:
    """Entries by (kind, digest) → [size, last use], least recently used first."""

    def __init__(self) -> None:
        self._lru: OrderedDict[Key, list] = OrderedDict()
        self.size = 0
        self.counts = dict.fromkeys(KINDS, 0)

    def __contains__(self, key: Key) -> bool:
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, key: Key) -> list | None:
        return self._lru.get(key)

    def add(self, key: Key, size: int, used: float) -> None:
        """A new (or rewritten) entry; it counts as just used."""
        self.remove(key)
        self._lru[key] = [size, used]
        self.size += size
        self.counts[key[0]] += 1

    def touch(self, key: Key, now: float) -> bool:
        entry = self._lru.get(key)
        if entry is None:
            return False
        entry[1] = max(entry[1], now)
        self._lru.move_to_end(key)
        return True

    def remove(self, key: Key) -> list | None:
        entry = self._lru.pop(key, None)
        if entry is not None:
            self.size -= entry[0]
            self.counts[key[0]] -= 1
        return entry

    def oldest(self) -> Iterator[tuple[Key, list]]:
        """The entries, least recently used first, lazily: callers stop early, and must not modify the index
        while iterating (collect first, then remove)."""
        return iter(self._lru.items())

    def first(self) -> tuple[Key, list] | None:
        return next(iter(self._lru.items()), None)

    def items(self) -> list[tuple[Key, list]]:
        return list(self._lru.items())

    def replace(self, entries: list[tuple[Key, int, float]]) -> None:
        """Rebuild from a scan: ``(key, size, last use)``, ordered here by last use."""
        self._lru.clear()
        self.size = 0
        self.counts = dict.fromkeys(KINDS, 0)
        for key, size, used in sorted(entries, key=lambda e: e[2]):
            self._lru[key] = [size, used]
            self.size += size
            self.counts[key[0]] += 1


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
        snapshot_interval: float = 300.0,
        rescan_interval: float = 3600.0,
    ) -> None:
        self.storage = storage
        self.reactor = reactor
        self.metrics = metrics
        self.max_size = max_size
        self.max_age = max_age
        self.inflight = inflight
        self.clock = clock
        self.check_interval = check_interval
        self.snapshot_interval = snapshot_interval
        self.rescan_interval = rescan_interval
        self.index = CacheIndex()
        self.pins: dict[Key, set] = {}
        self.ready = False
        self._scanning = False
        self._during_scan: dict[Key, tuple[int, float] | None] = {}  # added (size, time) or removed (None)
        self._touched_during_scan: dict[Key, float] = {}
        self._dirty = False
        self._check_call: Any = None
        self._loops: list[task.LoopingCall] = []
        self._ready_waiters: list[defer.Deferred] = []
        self._scan: defer.Deferred | None = None
        self._stopped = False
        #: ``f(kind, digest)`` after an entry was evicted, for state kept about it elsewhere (private records).
        self.on_evict: list[Callable[[str, str], None]] = []
        storage.on_store = self.added

    # -- life ------------------------------------------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Scan the directory (in a thread), then start the periodic check, snapshot and rescan."""
        d = self.rescan()
        d.addCallback(lambda _: self._start_loops())
        return d

    def _start_loops(self) -> None:
        if self._stopped:
            return
        for interval, f in (
            (self.check_interval, self.check),
            (self.snapshot_interval, self.snapshot),
            (self.rescan_interval, self.rescan),
        ):
            if interval and interval > 0:
                loop = task.LoopingCall(f)
                loop.clock = self.reactor
                loop.start(interval, now=False).addErrback(lambda f: log.failure("cache bound loop failed", f))
                self._loops.append(loop)

    def stop(self) -> defer.Deferred:
        """Stop the timers and write the last-use snapshot (after a scan still running has finished)."""
        self._stopped = True
        if self._scan is not None:
            d: defer.Deferred = defer.Deferred()
            self._scan.addBoth(lambda _: self._stop_now().chainDeferred(d))
            return d
        return self._stop_now()

    def _stop_now(self) -> defer.Deferred:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self._check_call is not None and self._check_call.active():
            self._check_call.cancel()
        if not self.ready:
            return defer.succeed(None)
        return self.snapshot(force=True)

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

    # -- scan ------------------------------------------------------------------------------------------------

    def rescan(self) -> defer.Deferred:
        """Rebuild the index from the directory in a thread; changes made meanwhile are merged in afterwards.

        Also how entries removed behind our back (``dioproxy purge``, ``verify --repair``) leave the index.
        """
        if self._scanning:
            return defer.succeed(None)
        self._scanning = True
        self._during_scan = {}
        self._touched_during_scan = {}
        root = self.storage.root
        d = threads.deferToThread(_scan_with_lastuse, root)
        d.addCallback(self._scanned)
        d.addErrback(self._scan_failed)
        self._scan = d
        return d

    def _scanned(self, entries: list[tuple[Key, int, float]]) -> None:
        # Last-use times we know in memory are newer than the snapshot's.
        known = {key: value[1] for key, value in self.index.items()}
        merged = {key: (size, max(used, known.get(key, 0.0))) for key, size, used in entries}
        for key, change in self._during_scan.items():
            if change is None:
                merged.pop(key, None)
            else:
                merged[key] = change
        for key, when in self._touched_during_scan.items():
            if key in merged:
                merged[key] = (merged[key][0], max(merged[key][1], when))
        self.index.replace([(key, size, used) for key, (size, used) in merged.items()])
        self._scanning, self._scan = False, None
        self._during_scan, self._touched_during_scan = {}, {}
        first = not self.ready
        self.ready = True
        if first:
            log.info(
                "cache index: {n} entries, {size} bytes (bound: {bound})",
                n=len(self.index),
                size=self.size,
                bound=self.max_size or "none",
            )
            waiters, self._ready_waiters = self._ready_waiters, []
            for w in waiters:
                w.callback(None)
        self.check()

    def _scan_failed(self, failure: Any) -> None:
        self._scanning, self._scan = False, None
        log.failure("cache index scan failed", failure)

    # -- events ----------------------------------------------------------------------------------------------

    def added(self, kind: str, digest: str, size: int) -> None:
        """``IndexedStorage.on_store``: a verified entry was stored."""
        key = (kind, digest)
        now = self.clock()
        self.index.add(key, size, now)
        if self._scanning:
            self._during_scan[key] = (size, now)
        self._dirty = True
        self.schedule_check()

    def touch(self, kind: str, digest: str) -> None:
        key = (kind, digest)
        now = self.clock()
        if not self.index.touch(key, now) and self._scanning:
            self._touched_during_scan[key] = now
        self._dirty = True

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

    def request_done(self, request: Any) -> None:
        """A manifest was served: its digest is in the response headers (tags too, and 304s)."""
        if request.code not in (200, 304) or b"/manifests/" not in (request.path or b""):
            return
        digests = request.responseHeaders.getRawHeaders("Docker-Content-Digest") or []
        if digests:
            self.touch(MANIFEST, digests[0])

    # -- eviction --------------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes of the stored entries."""
        return self.index.size

    def total(self) -> int:
        """What the bound is checked against: stored entries plus blobs being downloaded."""
        return self.size + self.inflight()

    def schedule_check(self) -> None:
        """Check soon, once: after the current call chain (a fill's bookkeeping) has finished."""
        if self._check_call is None or not self._check_call.active():
            self._check_call = self.reactor.callLater(0, self.check)

    def check(self) -> None:
        if not self.ready:
            return
        if self.max_age:
            limit = self.clock() - self.max_age
            expired = []
            for key, (_size, used) in self.index.oldest():
                if used >= limit:
                    break
                if not self.pinned(key):
                    expired.append(key)
            for key in expired:
                self._evict(key, "age")
        if self.max_size is None:
            return
        excess = self.total() - self.max_size
        if excess <= 0:
            return
        victims = []
        for key, (size, _used) in self.index.oldest():
            if excess <= 0:
                break
            if not self.pinned(key):
                victims.append(key)
                excess -= size
        for key in victims:
            self._evict(key, "size")
        if excess > 0:
            log.warn(
                "cache is {excess} bytes over its bound of {bound}: the rest is being read or downloaded",
                excess=excess,
                bound=self.max_size,
            )

    def make_room(self, nbytes: int) -> defer.Deferred:
        """The disk is full (whatever the bound says): evict least recently used, unpinned entries totalling
        ``nbytes``; fires once their files are deleted."""
        victims, freed = [], 0
        for key, (size, _used) in self.index.oldest():
            if freed >= nbytes:
                break
            if not self.pinned(key):
                victims.append(key)
                freed += size
        if victims:
            log.warn("cache disk full: evicting {n} entries ({freed} bytes) to make room", n=len(victims), freed=freed)
        return defer.gatherResults([self._evict(key, "space") for key in victims])

    def _evict(self, key: Key, reason: str) -> defer.Deferred:
        """Fires with the bytes freed once the entry's file is gone."""
        entry = self.index.remove(key)
        if entry is None:
            return defer.succeed(0)
        if self._scanning:
            self._during_scan[key] = None
        kind, digest = key
        path = entry_path(self.storage.root, kind, digest)
        try:
            if kind == BLOB:
                # Rename now (instant, and a new request can no longer find it), delete in a thread.
                doomed = os.path.join(self.storage.tmp, f"evicted.{digest.split(':', 1)[1]}.{secrets.token_hex(4)}")
                os.rename(path, doomed)
                deleted = threads.deferToThread(_unlink, doomed)
                deleted.addErrback(lambda f: log.failure("eviction unlink", f))
            else:
                os.unlink(path)
                deleted = defer.succeed(None)
        except FileNotFoundError:
            return defer.succeed(entry[0])  # removed behind our back (purge, repair): gone all the same
        except OSError as e:
            log.warn("cannot evict {kind} {digest}: {e}", kind=kind, digest=digest, e=e)
            return defer.succeed(0)
        self._dirty = True
        for hook in self.on_evict:
            hook(kind, digest)
        if self.metrics is not None:
            self.metrics.evicted(kind, reason, entry[0])
        log.debug(
            "evicted {kind} {digest} ({size} bytes, {reason})", kind=kind, digest=digest, size=entry[0], reason=reason
        )
        return deleted.addCallback(lambda _: entry[0])

    # -- snapshot --------------------------------------------------------------------------------------------

    def snapshot(self, force: bool = False) -> defer.Deferred:
        """Write the last-use times (in a thread) if anything changed since the last snapshot."""
        if not (self._dirty or force) or not self.ready:
            return defer.succeed(None)
        self._dirty = False
        data: dict[str, dict[str, float]] = {kind: {} for kind in KINDS}
        for (kind, digest), (_, used) in self.index.items():
            data[kind][digest] = round(used, 1)
        d = threads.deferToThread(save_lastuse, self.storage.root, data)
        d.addErrback(lambda f: log.warn("cannot write the last-use snapshot: {e}", e=f.getErrorMessage()))
        return d

    # -- metrics ---------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "cache_size": self.size,
            "cache_entries": dict(self.index.counts),
            "max_size": self.max_size or 0,
            "pinned": sum(1 for key in list(self.pins) if self.pinned(key)),
            "ready": 1 if self.ready else 0,
        }


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _scan_with_lastuse(root: str) -> list[tuple[Key, int, float]]:
    snapshot = load_lastuse(root)
    return [((e.kind, e.digest), e.size, max(e.mtime, snapshot[e.kind].get(e.digest, 0.0))) for e in scan(root)]


def inflight_bytes(fills: Any) -> int:
    """Disk space the fills in progress will take: their announced size, or what they wrote so far."""
    if fills is None:
        return 0
    return sum(f.size if f.size is not None else f.written for f in list(fills.fills.values()))
