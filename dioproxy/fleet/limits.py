"""Per-client limits kept for the whole fleet: a client spread over the replicas by a load balancer gets
``rate_limit.rate`` in all, not once per replica, and ``LoginThrottle.limit`` failed logins per window in all.

- the request rate: one GCRA step per request in a Lua script (the bucket is one number per client, the time its
  next request would be on schedule, under ``<prefix>rate:<client>`` and expiring when the bucket is full again,
  so idle clients vanish). Redis's clock, not the replicas', so their skew does not matter.
- failed logins: a counter per client (``<prefix>logins:<client>``) expiring at the end of its window.

Each check is one call under :data:`~dioproxy.fleet.redis.QUICK`. When Redis cannot answer
(:class:`~dioproxy.fleet.redis.FleetUnavailable`: down, slow, the breaker open), the replica's own bucket or
counter answers instead, as without a fleet: a request is never refused or held because Redis is down.
"""

from __future__ import annotations

from typing import Callable

from dioproxy.auth import LoginThrottle
from dioproxy.fleet.redis import PREFIX, QUICK, FleetUnavailable, Redis
from dioproxy.policy import RateLimiter

# KEYS[1] the client's bucket; ARGV: milliseconds between requests at the rate, the burst in milliseconds of it.
# Returns 0 (go, counted) or the milliseconds until the request would be on schedule.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local due = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now) + tonumber(ARGV[1])
local early = due - tonumber(ARGV[2]) - now
if early > 0 then return math.ceil(early) end
redis.call('SET', KEYS[1], string.format('%.3f', due), 'PX', math.max(1, math.ceil(due - now)))
return 0
"""

# KEYS[1] the client's failed logins; ARGV[1] the limit. Milliseconds to wait, 0: check the login.
_LOGIN_WAIT = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then return 0 end
return math.max(1, redis.call('PTTL', KEYS[1]))
"""
# KEYS[1] the client's failed logins; ARGV[1] the window in milliseconds (from the first failure).
_LOGIN_FAILED = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""
_LOGIN_SUCCEEDED = """
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
return 1
"""


class FleetRateLimiter:
    """:class:`~dioproxy.policy.RateLimiter`'s buckets in Redis; ``local`` answers when Redis does not."""

    def __init__(
        self, redis: Redis, local: RateLimiter, on_check: Callable[[str], None] | None = None, prefix: str = PREFIX
    ) -> None:
        self.redis, self.local, self.base = redis, local, f"{prefix}rate:"
        #: ``f(where)`` for each check: ``fleet`` (Redis answered) or ``local`` (this replica's bucket did).
        self.on_check = on_check
        self._args = [f"{1000 / local.rate:.3f}", f"{1000 * local.burst / local.rate:.3f}"]

    async def retry_after(self, client: str) -> float:
        """0 if the request may go now (and is counted for the fleet), else seconds until it may."""
        try:
            wait = await self.redis.eval(_GCRA, [self.base + client], self._args, deadline=QUICK)
        except FleetUnavailable:
            self._note("local")
            return await self.local.retry_after(client)
        self._note("fleet")
        return int(wait) / 1000

    def _note(self, where: str) -> None:
        if self.on_check:
            self.on_check(where)


class FleetLoginThrottle:
    """:class:`~dioproxy.auth.LoginThrottle`'s counts in Redis (same limit and window); ``local`` answers when
    Redis does not."""

    def __init__(self, redis: Redis, local: LoginThrottle, prefix: str = PREFIX) -> None:
        self.redis, self.local, self.base = redis, local, f"{prefix}logins:"

    async def retry_after(self, client: str) -> float:
        """Seconds the client must wait before its next login is checked; 0: check it now."""
        try:
            wait = await self._eval(_LOGIN_WAIT, client, self.local.limit)
        except FleetUnavailable:
            return await self.local.retry_after(client)
        return int(wait) / 1000

    async def attempt(self, client: str) -> None:
        try:
            await self._eval(_LOGIN_FAILED, client, max(1, round(self.local.window * 1000)))
        except FleetUnavailable:
            await self.local.attempt(client)

    async def succeeded(self, client: str) -> None:
        try:
            await self._eval(_LOGIN_SUCCEEDED, client)
        except FleetUnavailable:
            await self.local.succeeded(client)

    async def _eval(self, script: str, client: str, *args: int) -> int:
        return await self.redis.eval(script, [self.base + client], list(args), deadline=QUICK)
