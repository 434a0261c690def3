"""The bucket's size bound and age limit for the whole fleet (``storage.s3.max_size`` / ``max_age``).

Every replica tells Redis when it uses a blob the bucket holds (batched, every :data:`FLUSH_EVERY` seconds): a
sorted set of last uses, the blobs' sizes and their total. One replica at a time (a lease) removes the least
recently used blobs past the bound and those unused for ``max_age`` from the bucket; nothing used in the last
:data:`PROTECT` seconds is removed, which is longer than a replica trusts what it remembers of the bucket
(:data:`dioproxy.storage.bucket.KNOWN_FOR`), so no replica redirects a client to an object just removed.
Manifests, tag entries and private records stay (small; a record kept is only ever safer).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from dioproxy.fleet.lease import Leases
from dioproxy.fleet.redis import PREFIX, FleetUnavailable, Redis

log = Logger()

FLUSH_EVERY = 10.0
#: Seconds between the evictor's rounds, and what one round removes at most.
EVICT_EVERY, SLICE = 60.0, 200
#: Blobs used this recently are never removed.
PROTECT = 600.0

_USED, _SIZES, _TOTAL = f"{PREFIX}bucket:used", f"{PREFIX}bucket:sizes", f"{PREFIX}bucket:total"

# ARGV: now, GT (a use: later wins) or NX (only seen in a listing: counted from now if not known), then digest,
# size pairs. A blob counts in the total once, whoever reports it first.
_TOUCH = """
for i = 3, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('INCRBY', KEYS[3], ARGV[i + 1])
  end
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1], ARGV[i])
end
return 1
"""

_FORGET = """
local size = redis.call('HGET', KEYS[2], ARGV[1])
if size then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('DECRBY', KEYS[3], size)
end
redis.call('ZREM', KEYS[1], ARGV[1])
return size
"""


class BucketUse:
    """What the fleet knows of the bucket's blobs: last use, size, total."""

    def __init__(self, redis: Redis, clock: Callable[[], float]) -> None:
        self.redis = redis
        self.clock = clock
        self._pending: dict[str, dict[str, int]] = {"GT": {}, "NX": {}}

    def touch(self, digest: str, size: int) -> None:
        """A blob the bucket holds was used (sent, uploaded): counted at the next flush."""
        self._pending["GT"][digest] = size

    def seen(self, digest: str, size: int) -> None:
        """A blob the bucket holds turned up in a listing: counted (as used now) only if the fleet did not know it."""
        self._pending["NX"][digest] = size

    async def flush(self) -> None:
        for mode in ("GT", "NX"):
            batch, self._pending[mode] = self._pending[mode], {}
            if not batch:
                continue
            args: list[Any] = [f"{self.clock():.3f}", mode]
            for digest, size in batch.items():
                args += [digest, size]
            try:
                await self.redis.eval(_TOUCH, [_USED, _SIZES, _TOTAL], args)
            except FleetUnavailable:
                for digest, size in batch.items():  # kept for the next flush (newer entries win)
                    self._pending[mode].setdefault(digest, size)

    async def total(self) -> int:
        return int(await self.redis.call("GET", _TOTAL) or 0)

    async def oldest(self, n: int, before: float) -> list[tuple[str, float]]:
        """Up to ``n`` blobs last used before ``before``, least recently used first."""
        flat = await self.redis.call("ZRANGEBYSCORE", _USED, "-inf", f"({before}", "WITHSCORES", "LIMIT", 0, n)
        return [(flat[i], float(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def forget(self, digest: str) -> None:
        await self.redis.eval(_FORGET, [_USED, _SIZES, _TOTAL], [digest])


class BucketBound:
    """Keeps the bucket under ``max_size`` and ``max_age``: one replica at a time, a slice per round."""

    def __init__(
        self,
        use: BucketUse,
        leases: Leases,
        remove: Callable[[str], defer.Deferred],
        max_size: int | None,
        max_age: float | None,
        advertise: str,
        reactor: Any,
    ) -> None:
        self.use = use
        self.leases = leases
        self.remove = remove  # deletes the blob's object from the bucket
        self.max_size = max_size
        self.max_age = max_age
        self.advertise = advertise
        self.reactor = reactor
        self.removed = 0
        self._loops: list[task.LoopingCall] = []

    def start(self) -> None:
        for every, call in ((FLUSH_EVERY, self.use.flush), (EVICT_EVERY, self.evict)):
            loop = task.LoopingCall(lambda call=call: defer.ensureDeferred(call()))
            loop.clock = self.reactor
            loop.start(every, now=False).addErrback(lambda f: log.failure("bucket bound", f))
            self._loops.append(loop)

    def stop(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()

    async def evict(self) -> int:
        """One round, if no other replica runs one: returns how many blobs left the bucket."""
        try:
            lease = await self.leases.acquire("bucket-evictor", 2 * EVICT_EVERY, self.advertise)
            if lease is None:
                return 0
            try:
                return await self._round()
            finally:
                await self.leases.release(lease)
        except FleetUnavailable:
            return 0

    async def _round(self) -> int:
        now = self.clock()
        victims: dict[str, float] = {}
        if self.max_age is not None:
            victims.update(await self.use.oldest(SLICE, now - max(self.max_age, PROTECT)))
        excess = (await self.use.total()) - self.max_size if self.max_size is not None else 0
        candidates = [d for d, _ in await self.use.oldest(SLICE, now - PROTECT)] if excess > 0 else []
        if candidates:
            sizes = await self.use.redis.call("HMGET", _SIZES, *candidates)
            for digest, size in zip(candidates, sizes):
                if excess <= 0:
                    break
                victims.setdefault(digest, 0)
                excess -= int(size or 0)
        removed = 0
        for digest in victims:
            try:
                await self.remove(digest)
            except Exception as e:
                log.warn("bucket bound: cannot remove {digest}: {e}", digest=digest, e=e)
                continue
            await self.use.forget(digest)
            removed += 1
        if removed:
            log.info("bucket bound: {n} unused blobs removed from the bucket", n=removed)
        self.removed += removed
        return removed

    @property
    def clock(self) -> Callable[[], float]:
        return self.use.clock
