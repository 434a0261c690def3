"""Announcements that a digest is committed: the replica whose fill committed a digest says so, and the replicas waiting
for it (following the owner's stream, or about to take its lease over) stop waiting at once.

Delivery is at most once (Redis pub/sub): an event published while a replica is not subscribed is lost, so an
announcement is a shortcut, never the only way to learn a fill is done. A waiter also looks at the lease and the
store, and again whenever ``on_subscribed`` says the subscription was (re)made.

A message is JSON ``{"digest": ..., "by": <the committer's advertised URL>}``; anything else is ignored.
"""

from __future__ import annotations

import json
from typing import Callable

from twisted.logger import Logger

from dioproxy.fleet.redis import PREFIX, Redis, Subscription

log = Logger()


class Committed:
    """Announce and hear commits on the channel ``<prefix>committed``."""

    def __init__(self, redis: Redis, url: str, prefix: str = PREFIX) -> None:
        self.redis, self.url, self.channel = redis, url, f"{prefix}committed"

    async def announce(self, digest: str) -> int:
        """Tell the fleet ``digest`` is committed; how many subscribers heard it. FleetUnavailable if Redis is down."""
        return await self.redis.publish(self.channel, json.dumps({"digest": digest, "by": self.url}))

    def listen(
        self,
        on_committed: Callable[[str, str], None],
        on_subscribed: Callable[[], None] | None = None,
    ) -> Subscription:
        """Call ``on_committed(digest, by)`` for every announcement (our own included: compare ``by``)."""

        def received(message: str) -> None:
            try:
                event = json.loads(message)
                digest, by = event["digest"], event["by"]
            except (ValueError, TypeError, KeyError):
                log.warn("unreadable commit announcement ignored: {m!r}", m=str(message)[:200])
                return
            if isinstance(digest, str) and isinstance(by, str):
                on_committed(digest, by)

        return self.redis.subscribe(self.channel, received, on_subscribed)
