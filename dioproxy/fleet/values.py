"""Small JSON values shared by the fleet, each with a TTL: tag entries (a tag checked by one replica is trusted by
all until its TTL), the pull budget's last announcements, and whatever else is small, replaceable and fine to
lose (Redis restarted empty: every replica asks the upstream once more).

A value that is not JSON, or larger than :data:`MAX_VALUE`, reads as missing: it was not written by us, and
nothing a replica reads from Redis is trusted more than a cache miss.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import Logger

from dioproxy.fleet.redis import PREFIX, Redis

log = Logger()

#: Largest value written or read (a tag entry is about 200 bytes).
MAX_VALUE = 64 * 1024

# ARGV: the value, its TTL in ms, the field that orders values, ours. One that is not ours to read is replaced.
_SET_NEWER = """
local old = redis.call('GET', KEYS[1])
if old then
  local ok, there = pcall(cjson.decode, old)
  if ok and type(there) == 'table' and tonumber(there[ARGV[3]]) and tonumber(there[ARGV[3]]) >= tonumber(ARGV[4]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class SharedValues:
    """JSON values under ``<prefix><namespace>:<key>``, e.g. ``SharedValues(redis, "tag")``."""

    def __init__(self, redis: Redis, namespace: str, prefix: str = PREFIX) -> None:
        self.redis, self.base = redis, f"{prefix}{namespace}:"

    def key(self, key: str) -> str:
        return self.base + key

    async def get(self, key: str) -> Any | None:
        """The value, or None (missing, expired, unreadable); FleetUnavailable if Redis cannot be asked."""
        return self.decode(key, await self.redis.call("GET", self.key(key)))

    def decode(self, key: str, data: Any) -> Any | None:
        """What Redis held under ``key`` as a value, or None (missing, unreadable)."""
        if data is None:
            return None
        if not isinstance(data, str) or len(data) > MAX_VALUE:
            log.warn("shared value {key} unreadable or too large: ignored", key=self.key(key))
            return None
        try:
            return json.loads(data)
        except ValueError:
            log.warn("shared value {key} is not JSON: ignored", key=self.key(key))
            return None

    async def set(self, key: str, value: Any, ttl: float) -> None:
        """Replace the value, to expire ``ttl`` seconds from now; ValueError if it is too large."""
        data = json.dumps(value, separators=(",", ":"))
        if len(data) > MAX_VALUE:
            raise ValueError(f"shared value {key} is {len(data)} bytes, more than {MAX_VALUE}")
        await self.redis.call("SET", self.key(key), data, "PX", max(1, round(ttl * 1000)))

    async def set_newer(
        self, key: str, value: dict[str, Any], ttl: float, order: str, deadline: float | None = None
    ) -> bool:
        """:meth:`set`, unless the value there has an ``order`` at least as large as ``value[order]`` (a number):
        the newest wins whatever order the writes arrive in. False if the one there was kept."""
        data = json.dumps(value, separators=(",", ":"))
        if len(data) > MAX_VALUE:
            raise ValueError(f"shared value {key} is {len(data)} bytes, more than {MAX_VALUE}")
        args = [data, max(1, round(ttl * 1000)), order, repr(float(value[order]))]
        return bool(await self.redis.eval(_SET_NEWER, [self.key(key)], args, deadline=deadline))

    async def delete(self, key: str) -> None:
        await self.redis.call("DEL", self.key(key))
