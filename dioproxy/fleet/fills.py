"""One upstream fetch per blob for every replica: a lease per digest in Redis, the others stream from its owner.

A replica about to fetch a blob from the upstream asks for the digest's lease first. Granted, it fetches, renewing
the lease while the fill runs, and lets it go once the blob is committed. Refused, it streams the blob from the
owner instead: a blob GET on the owner's own API (``advertise`` + ``/v2/<name>/blobs/<digest>?ns=<registry>``)
signed with the fleet's ``secret`` (:func:`sign`), which the owner answers from its cache or the fill under way and
never by starting a fill or asking its upstream. The bytes go through the follower's own fill (its hot tier, its
sha256, its hold-back), so its clients get them as they come, verified at the end as always.

When the owner dies its lease expires within :data:`LEASE_TTL`; a follower whose stream broke takes the lease and
resumes from the upstream with ``Range`` at the bytes it holds. Redis unreachable: every call raises
:class:`FleetUnavailable` at once and the replica fetches on its own, as without a fleet.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import time
from typing import Any
from urllib.parse import quote

from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web import client as webclient

from dioproxy.fleet.lease import Holder, Lease, Leases
from dioproxy.fleet.redis import FleetUnavailable, Redis
from dioproxy.routing import Target
from dioproxy.upstream import IdleDeadline

log = Logger()

#: A fill's lease lives this long unless renewed (every third of it): how long followers wait for a dead owner.
LEASE_TTL = 6.0
#: The header a replica signs its peer requests with, and how old a signature may be.
PEER_HEADER = "X-Dioproxy-Peer"
SIGNATURE_AGE = 300.0


def sign(secret: str, path: str, now: float) -> str:
    """``<time>.<hmac>`` over the request's path and query: what the owner checks before it answers a peer."""
    stamp = str(int(now))
    mac = hmac.new(secret.encode(), f"{stamp}\n{path}".encode(), hashlib.sha256).hexdigest()
    return f"{stamp}.{mac}"


def verify(secret: str, path: str, signature: str, now: float) -> bool:
    stamp, _, mac = signature.partition(".")
    if not stamp.isdigit() or abs(now - int(stamp)) > SIGNATURE_AGE:
        return False
    expected = hmac.new(secret.encode(), f"{stamp}\n{path}".encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, expected)


class FleetFills:
    """The fleet's side of a fill: who fetches a digest, and the stream from the replica that does."""

    def __init__(self, redis: Redis, secret: str, advertise: str, reactor: Any, timeout: float) -> None:
        self.redis = redis
        self.leases = Leases(redis)
        self.secret = secret
        self.advertise = advertise
        self.reactor = reactor
        self.timeout = timeout  # for a peer's answer and each pause in its body (timeouts.read)
        self.claims = {"owner": 0, "follower": 0, "alone": 0}  # what claim() answered (/metrics)
        pool = webclient.HTTPConnectionPool(reactor, persistent=True)
        self._pool = pool
        self.http = HTTPClient(webclient.Agent(reactor, connectTimeout=min(10.0, timeout), pool=pool))

    async def claim(self, digest: str) -> Lease | Holder | None:
        """Our lease on ``digest`` (fetch it), its holder's address (stream from there), or None: Redis does not
        answer, fetch it alone."""
        try:
            for _ in range(3):  # a lease that expired between our two questions: ask again
                lease = await self.leases.acquire(f"fill:{digest}", LEASE_TTL, self.advertise)
                if lease is not None:
                    self.claims["owner"] += 1
                    return lease
                holder = await self.leases.holder(f"fill:{digest}")
                if holder is not None:
                    self.claims["follower"] += 1
                    return holder
        except FleetUnavailable as e:
            log.info("fleet unavailable ({e}): fetching {digest} without it", e=e, digest=digest)
        self.claims["alone"] += 1
        return None

    def keep(self, lease: Lease) -> task.LoopingCall:
        """Renew ``lease`` every third of its life until stopped (a renewal that fails is the lease lost: the
        fill goes on; at worst a follower fetches the rest too)."""

        async def renew() -> None:
            try:
                if not await self.leases.renew(lease, LEASE_TTL):
                    log.warn("lease on {name} lost (expired or taken)", name=lease.name)
            except FleetUnavailable:
                pass

        loop = task.LoopingCall(lambda: defer.Deferred.fromCoroutine(renew()))
        loop.clock = self.reactor
        loop.start(LEASE_TTL / 3, now=False).addErrback(lambda f: log.failure("renewing {n}", f, n=lease.name))
        return loop

    async def release(self, lease: Lease) -> None:
        with contextlib.suppress(FleetUnavailable):  # else it expires on its own
            await self.leases.release(lease)

    async def stream(self, holder: Holder, target: Target, digest: str, start: int) -> Any:
        """The owner's answer for the blob from byte ``start`` (its body read under an idle deadline)."""
        path = f"/v2/{quote(target.name)}/blobs/{digest}?ns={quote(target.registry)}"
        headers = {PEER_HEADER: sign(self.secret, path, time.time())}
        if start:
            headers["Range"] = f"bytes={start}-"
        d = self.http.get(holder.url + path, headers=headers, unbuffered=True)
        response = await d.addTimeout(self.timeout, self.reactor)
        return _Watched(response, self.reactor, self.timeout, holder.url)

    async def close(self) -> None:
        await self._pool.closeCachedConnections()
        await self.redis.close()


class _Watched:
    """A peer's response whose body is read under an :class:`IdleDeadline`."""

    def __init__(self, response: Any, reactor: Any, timeout: float, url: str) -> None:
        self.response = response
        self.code, self.length, self.headers = response.code, response.length, response.headers
        self._deadline = (reactor, timeout, "peer", url)

    def deliverBody(self, protocol: Any) -> None:
        self.response.deliverBody(IdleDeadline(protocol, *self._deadline))
