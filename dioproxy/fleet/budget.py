"""The pull budget shared by the replicas (:mod:`dioproxy.budget`): an upstream counts one account's manifest
GETs whichever replica sends them, so each replica's plenty / low / gone should reflect the whole fleet.

- the newest announcement per (registry, account): ``<prefix>budget:<registry>/<account>``, a JSON value
  written by whichever replica heard one (the newest by its ``seen`` wins, whatever order the writes arrive in)
  and expiring with the announcement's window;
- the GETs in flight: ``<prefix>budget-inflight:<registry>/<account>``, a sorted set of the GETs under way,
  scored by when they were sent (Redis's clock); one older than :data:`INFLIGHT_FOR` (its replica died, or lost
  Redis before it could say the GET was answered) no longer counts.

A replica looks before each decision that may spend a GET (one call under :data:`~dioproxy.fleet.redis.QUICK`)
and shares what it hears in the background. Best-effort: Redis unavailable, each replica goes by what it heard
itself, as without a fleet. Anonymous pulls are counted per address upstream: replicas behind one address share
that budget too; replicas with addresses of their own each correct the shared word with their own next answer
(the free HEAD of a ``gone`` budget asks first).
"""

from __future__ import annotations

import secrets

from twisted.internet import defer

from dioproxy.budget import Allowance
from dioproxy.fleet.redis import PREFIX, QUICK, FleetUnavailable, Redis
from dioproxy.fleet.values import SharedValues

#: How long a GET under way counts for the fleet at most (a manifest GET is answered well within it).
INFLIGHT_FOR = 60.0
#: How long an announcement that names no window is kept (Docker Hub's window is 6 h).
KEEP = 6 * 3600.0

# KEYS: the announcement, the GETs in flight; ARGV[1]: INFLIGHT_FOR in ms. Returns {announcement or nil, GETs}.
_LOOK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[1]))
return {redis.call('GET', KEYS[1]), redis.call('ZCARD', KEYS[2])}
"""
# KEYS[1]: the GETs in flight; ARGV: this GET's name, INFLIGHT_FOR in ms.
_SENT = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class FleetBudget:
    """The fleet's side of every :class:`~dioproxy.budget.Allowance` (``PullBudget.fleet``)."""

    def __init__(self, redis: Redis, prefix: str = PREFIX) -> None:
        self.redis = redis
        self.values = SharedValues(redis, "budget", prefix)
        self.inflight_base = f"{prefix}budget-inflight:"
        self._me, self._count = secrets.token_hex(8), 0
        self._ours: dict[str, int] = {}  # our GETs Redis counts, per allowance

    async def refresh(self, allowance: Allowance) -> None:
        """Take the fleet's newest announcement if newer than ours, and the other replicas' GETs in flight."""
        name = _name(allowance)
        keys = [self.values.key(name), self.inflight_base + name]
        try:
            said, flying = await self.redis.eval(_LOOK, keys, [_ms(INFLIGHT_FOR)], deadline=QUICK)
        except (FleetUnavailable, TypeError, ValueError):  # unavailable, or a reply not shaped as ours
            allowance.elsewhere = 0
            return
        allowance.elsewhere = max(0, int(flying) - self._ours.get(name, 0))
        allowance.adopt(self.values.decode(name, said))

    def share(self, allowance: Allowance) -> None:
        """Tell the fleet what the upstream just said (in the background: no answer waits for Redis)."""
        ttl = allowance.window or KEEP
        d = defer.ensureDeferred(self.values.set_newer(_name(allowance), allowance.said(), ttl, "seen", QUICK))
        d.addErrback(lambda f: f.trap(FleetUnavailable))

    async def sent(self, allowance: Allowance) -> str | None:
        """A GET goes out: counted for the fleet until :meth:`answered`; None if Redis could not count it."""
        name = _name(allowance)
        self._count += 1
        member = f"{self._me}:{self._count}"
        try:
            await self.redis.eval(_SENT, [self.inflight_base + name], [member, _ms(INFLIGHT_FOR)], deadline=QUICK)
        except FleetUnavailable:
            return None
        self._ours[name] = self._ours.get(name, 0) + 1
        return member

    def answered(self, allowance: Allowance, member: str) -> None:
        """The GET :meth:`sent` named ``member`` was answered (or failed): no longer in flight."""
        name = _name(allowance)
        self._ours[name] = max(0, self._ours.get(name, 0) - 1)
        d = defer.ensureDeferred(self.redis.call("ZREM", self.inflight_base + name, member, deadline=QUICK))
        d.addErrback(lambda f: f.trap(FleetUnavailable))


def _name(allowance: Allowance) -> str:
    return f"{allowance.registry}/{allowance.account}"


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
