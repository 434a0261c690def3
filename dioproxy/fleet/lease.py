"""Per-key leases in Redis: one replica at a time fills a digest, and the others know whom to stream it from.

A lease is one Redis string, ``<prefix>lease:<name>`` = ``"<token> <fence> <url>"``, with a PX expiry:

- ``token``: 128 random bits of the owner, so only the owner renews or releases it (compare-and-pexpire,
  compare-and-delete in Lua: nobody else's lease is ever touched, even after ours expired and was taken).
- ``fence``: a number from one fleet-wide counter (INCR), larger for every lease granted. Whatever a lease guards
  can refuse a commit from a smaller number; :meth:`Leases.still_held` is the check before committing.
  If Redis loses the counter (a restart without persistence), the counter starts again from the wall clock in
  microseconds, so later numbers still exceed earlier ones unless over a million leases a second were granted.
- ``url``: the owner's advertised address, for followers (:meth:`Leases.holder`).

Acquiring is one script (INCR then SET NX PX, atomic), so no fence number is spent on a lost race. Every call can
raise :class:`~dioproxy.fleet.redis.FleetUnavailable`: then nobody knows who holds what, and the caller acts
per replica.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from dioproxy.fleet.redis import PREFIX, Redis

_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[2], ARGV[4]) end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. string.format('%d', fence) .. ' ' .. ARGV[2], 'NX', 'PX', ARGV[3])
return fence
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class Lease:
    """A lease we were granted. ``fence`` orders it among every lease of the fleet."""

    name: str
    token: str
    fence: int
    url: str

    @property
    def value(self) -> str:
        return f"{self.token} {self.fence} {self.url}"


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as any replica sees it."""

    url: str
    fence: int


class Leases:
    """The leases of one fleet (every replica with the same Redis and ``prefix``)."""

    def __init__(self, redis: Redis, prefix: str = PREFIX) -> None:
        self.redis, self.prefix = redis, prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}lease:{name}"

    async def acquire(self, name: str, ttl: float, url: str) -> Lease | None:
        """The lease on ``name`` for ``ttl`` seconds, advertising ``url``; None if someone else holds it."""
        if not url or " " in url:
            raise ValueError(f"a lease's URL must be non-empty and have no space: {url!r}")
        token = secrets.token_hex(16)
        now_us = time.time_ns() // 1000
        fence = await self.redis.eval(_ACQUIRE, [self.key(name), f"{self.prefix}fence"], [token, url, _ms(ttl), now_us])
        if fence is None:
            return None
        return Lease(name, token, int(fence), url)

    async def renew(self, lease: Lease, ttl: float) -> bool:
        """Extend our lease to ``ttl`` seconds from now; False if it is no longer ours (expired, taken)."""
        return bool(await self.redis.eval(_RENEW, [self.key(lease.name)], [lease.value, _ms(ttl)]))

    async def release(self, lease: Lease) -> bool:
        """Give our lease up; False if it was no longer ours (then someone else's is left alone)."""
        return bool(await self.redis.eval(_RELEASE, [self.key(lease.name)], [lease.value]))

    async def still_held(self, lease: Lease) -> bool:
        """Whether ``lease`` (this token, this fence) is still the one in Redis: check it right before a commit."""
        return await self.redis.call("GET", self.key(lease.name)) == lease.value

    async def holder(self, name: str) -> Holder | None:
        """Who holds the lease on ``name`` (None: nobody); a follower streams from ``holder.url``."""
        value = await self.redis.call("GET", self.key(name))
        if not isinstance(value, str):
            return None
        try:
            _, fence, url = value.split(" ", 2)
            return Holder(url, int(fence))
        except ValueError:
            return None  # not written by us: as good as nobody


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
