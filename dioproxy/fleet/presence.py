"""Which replicas of the fleet are alive, for the status page: each one heartbeats a small record into Redis.

Every :data:`HEARTBEAT` seconds each replica (each worker, under ``--workers``) writes its record (advertise URL,
version, start time, fills in progress) and reads everyone's back, in one script: a hash of records and a sorted
set of when Redis last heard each member, by Redis's own clock (the replicas' clocks may disagree). A member not
heard from for :data:`TTL` seconds leaves both; a fleet gone quiet leaves no keys behind.

The page shows the last list read and never waits on Redis itself. Redis down (the call failed, or the client's
breaker is open): the page says coordination is unreachable and since when, and lists nobody.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from dioproxy import __version__
from dioproxy.fleet.redis import PREFIX, FleetUnavailable, Redis

log = Logger()

#: Seconds between heartbeats; a member unheard for TTL is gone (three heartbeats missed).
HEARTBEAT = 5.0
TTL = 3 * HEARTBEAT
#: A record larger than this was not written by us: left out.
MAX_RECORD = 4096

#: KEYS: the records (a hash) and last heard (a sorted set, ms); ARGV: member, record, TTL in ms. Returns Redis's
#: time (ms), then member, last heard, record for every member still alive.
BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
for _, member in ipairs(gone) do
  redis.call('HDEL', KEYS[1], member)
  redis.call('ZREM', KEYS[2], member)
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
local out = {now}
local seen = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #seen, 2 do
  out[#out + 1] = seen[i]
  out[#out + 1] = seen[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[1], seen[i]) or ''
end
return out
"""


class Presence:
    """This process's heartbeat, and the fleet as the last one saw it (:meth:`snapshot`)."""

    def __init__(
        self,
        redis: Redis,
        advertise: str,
        fills: Callable[[], int],
        clock: Callable[[], float],
        reactor: Any,
        prefix: str = PREFIX,
    ) -> None:
        self.redis, self.advertise, self.fills, self.clock, self.reactor = redis, advertise, fills, clock, reactor
        self.keys = [f"{prefix}replicas", f"{prefix}replicas:seen"]
        self.worker: int | None = None  # set under --workers: each worker is a member of its own
        self.started = clock()
        self.members: list[dict[str, Any]] = []
        self.heard: float | None = None  # when Redis last answered a heartbeat (our clock)
        self.error: str | None = None  # why the last one failed, if it did
        self.down_since: float | None = None
        self._loop: task.LoopingCall | None = None

    @property
    def member(self) -> str:
        return self.advertise if self.worker is None else f"{self.advertise}#{self.worker}"

    def start(self) -> None:
        self._loop = task.LoopingCall(lambda: defer.Deferred.fromCoroutine(self.beat()))
        self._loop.clock = self.reactor
        self._loop.start(HEARTBEAT).addErrback(lambda f: log.failure("fleet heartbeat", f))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    async def beat(self) -> None:
        """Write our record, read everyone's (a failure is remembered, never raised: the loop goes on)."""
        record = {
            "url": self.advertise,
            "worker": self.worker,
            "version": __version__,
            "started": self.started,
            "fills": self.fills(),
        }
        try:
            reply = await self.redis.eval(BEAT, self.keys, [self.member, json.dumps(record), round(TTL * 1000)])
        except FleetUnavailable as e:
            if self.error is None:
                self.down_since = self.clock()
            self.error, self.members = str(e), []
            return
        now = self.clock()
        self.heard, self.error, self.down_since = now, None, None
        self.members = _members(reply, now)

    def snapshot(self, now: float) -> dict[str, Any]:
        """The ``fleet`` part of the page: Redis up or down, and the replicas seen within :data:`TTL`."""
        if self.error is None and self.redis.down:  # the breaker opened since our last heartbeat
            self.error, self.members, self.down_since = "Redis does not answer", [], self.redis.down_since
        state = "down" if self.error is not None else "up" if self.heard is not None else "unknown"
        return {
            "redis": state,
            "error": self.error,
            "down_since": self.down_since,
            "checked": self.heard,
            "ttl": TTL,
            "me": self.advertise,
            "replicas": _replicas(self.members) if state == "up" else [],
        }


def _members(reply: Any, now: float) -> list[dict[str, Any]]:
    """The script's answer as records, each with ``last_seen`` on our clock (its age by Redis's)."""
    if not isinstance(reply, list) or not reply:
        return []
    redis_now = int(reply[0])
    members = []
    for i in range(1, len(reply) - 2, 3):
        heard, text = reply[i + 1], reply[i + 2]
        if not isinstance(text, str) or len(text) > MAX_RECORD:
            continue
        try:
            record = json.loads(text)
            age = (redis_now - float(heard)) / 1000
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("url"), str):
            members.append({**record, "last_seen": now - max(0.0, age)})
    return members


def _replicas(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per advertise URL: its workers' fills summed, the earliest start, the latest heartbeat."""
    rows: dict[str, dict[str, Any]] = {}
    for m in members:
        row = rows.setdefault(
            m["url"],
            {"url": m["url"], "versions": [], "started": m.get("started"), "fills": 0, "workers": 0, "last_seen": 0},
        )
        if m.get("version") not in row["versions"]:
            row["versions"].append(m.get("version"))
        started = [x for x in (row["started"], m.get("started")) if isinstance(x, (int, float))]
        row["started"] = min(started) if started else None
        row["fills"] += m.get("fills") if isinstance(m.get("fills"), int) else 0
        row["workers"] += 1
        row["last_seen"] = max(row["last_seen"], m["last_seen"])
    return sorted(rows.values(), key=lambda r: r["url"])
