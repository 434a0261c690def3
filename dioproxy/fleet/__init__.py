"""The fleet: what replicas of one mirror share so that a blob is fetched once for all of them (issue 11).

Replicas coordinate through Redis, never through each other's state: a lease per digest says who fills it and
where followers can stream it from, tag entries are shared so a tag is revalidated once per TTL per fleet, and a
"committed" event tells waiting replicas a fill is done. Redis is a help, not a dependency: every call has a
deadline, and when Redis is down or slow every call raises :class:`~dioproxy.fleet.redis.FleetUnavailable` at
once, which callers take as "act per replica" (fill it yourself, check the tag yourself; still verified).

- :mod:`~dioproxy.fleet.redis`: our thin interface over txredisapi: deadlines, the down-breaker, reconnection,
  subscriptions.
- :mod:`~dioproxy.fleet.lease`: per-key leases with owner tokens, fencing numbers and the owner's URL.
- :mod:`~dioproxy.fleet.values`: small shared JSON values with a TTL (tag entries).
- :mod:`~dioproxy.fleet.events`: "digest committed" announcements between replicas.

At a glance (every call a coroutine that may raise FleetUnavailable)::

    redis = Redis.from_url("redis://redis.example:6379/0")
    leases = Leases(redis)
    lease = await leases.acquire(digest, ttl=30, url=advertise)  # None: another replica fills it
    holder = await leases.holder(digest)                         # holder.url: stream from there
    await leases.renew(lease, 30); await leases.still_held(lease); await leases.release(lease)
    tags = SharedValues(redis, "tag"); await tags.set(key, entry, ttl); await tags.get(key)
    committed = Committed(redis, advertise); await committed.announce(digest)
    subscription = committed.listen(on_committed, on_subscribed)
    await redis.close()
"""
