"""Tag entries shared by the replicas: a tag one replica checked with its upstream is fresh for all of them, so a
tag is revalidated once per ``cache.tag_ttl`` for the fleet, not once per replica. Redis unreachable: each replica
keeps and checks its own entries, as without a fleet."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from twisted.internet import defer

from dioproxy.fleet.redis import FleetUnavailable, Redis
from dioproxy.fleet.values import SharedValues
from dioproxy.storage.base import TagEntry

#: How long Redis keeps an entry nobody rechecked (stale serving and the offline window use old entries too).
KEEP = 7 * 86400.0


class FleetTags:
    def __init__(self, redis: Redis) -> None:
        self.values = SharedValues(redis, "tag")

    async def get(self, registry: str, name: str, tag: str) -> TagEntry | None:
        try:
            data: Any = await self.values.get(f"{registry}/{name}:{tag}")
        except FleetUnavailable:
            return None
        try:
            return TagEntry(**data) if isinstance(data, dict) else None
        except TypeError:
            return None

    def put(self, registry: str, name: str, tag: str, entry: TagEntry) -> None:
        """Share a checked entry, in the background (a client never waits for Redis to take it)."""
        d = defer.ensureDeferred(self.values.set(f"{registry}/{name}:{tag}", asdict(entry), KEEP))
        d.addErrback(lambda f: f.trap(FleetUnavailable))
