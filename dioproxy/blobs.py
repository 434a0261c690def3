"""Blobs: how a blob GET or HEAD is answered, free of HTTP (the resource translates; a responder sends).

In order: a cached blob (after the private-content check), through nginx when it offers to send the file; else
the one fill for the digest, followed while it grows; else (no cache, a full disk, a HEAD with no fill under
way) the upstream's answer piped through uncached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer

from dioproxy.errors import RegistryError, UpstreamError, blob_unknown
from dioproxy.eviction import CacheBound
from dioproxy.fill import DiskFull, Fill, FillManager, OwnerFailed
from dioproxy.private import PrivateContent, repository
from dioproxy.responders import AccelRedirect, CachedFile, GrowingFile, KnownSize, Redirect, Responder, UpstreamAnswer
from dioproxy.routing import Target
from dioproxy.storage.disk import DiskStorage, blob_name
from dioproxy.upstream import UpstreamClient, discard


@dataclass
class BlobAsk:
    """One request for a blob, as the service needs it."""

    target: Target
    digest: str
    head: bool
    #: The client's ``Range``, for an upstream answer (a local file applies it itself).
    range: str | None
    #: nginx's location for ``X-Accel-Redirect`` when nginx offers to send a cached file, else None.
    accel: str | None
    #: Pins the blob against eviction while it lasts (the request: ``finished``, ``notifyFinish``).
    reader: Any
    #: hit | miss | pass, once decided (the access log's word for it, failures included).
    outcome: str | None = None
    #: Another replica of the fleet asks (:mod:`dioproxy.fleet.fills`): answered from the cache or a fill under
    #: way only, never by starting one or asking the upstream.
    peer: bool = False


class Blobs:
    """Decides between the cache, a fill and the upstream for each blob request; owns no bytes itself."""

    def __init__(
        self,
        storage: DiskStorage | None,
        fills: FillManager | None,
        cache: CacheBound | None,
        private: PrivateContent | None,
        client_for: Callable[[Target], UpstreamClient],
    ) -> None:
        self.storage = storage  # the local tier; None: no cache at all
        self.fills = fills
        self.cache = cache
        self.private = private
        self.client_for = client_for
        #: ``storage.s3.redirect_ttl`` when ``storage.s3.redirect`` is on: cached GETs go to the bucket.
        self.redirect_ttl: float | None = None

    async def respond(self, ask: BlobAsk) -> Responder:
        """The responder for ``ask``; raises a RegistryError / UpstreamError for an answer without a blob.

        With ``storage.s3.redirect``, a GET of a blob the bucket holds is redirected there, after the same
        private-content check as a hit; a blob not uploaded yet is sent by us.
        """
        if self.storage is None:
            return await self._upstream(ask)
        self.cache.reading(ask.digest, ask.reader)  # last use; never evicted while this request reads it
        if self.fills.bucket is not None:
            self.fills.bucket.used(ask.digest)  # and the bucket's, for the fleet's bound
        redirect = self.redirect_ttl is not None and not ask.head and not ask.peer
        local = await self.storage.size(ask.digest) is not None
        if local:
            await self.private.check(ask.target, ask.digest, "blobs")
        if redirect and await self._shared_size(ask, checked=local) is not None:
            ask.outcome = "hit"
            return Redirect(self.fills.bucket.blob_url(ask.digest, self.redirect_ttl))
        if local:
            responder = await self._cached(ask)
            if responder is not None:
                return responder
        try:
            fill = await self._fill(ask.target, ask.digest, ask.head or ask.peer)
        except DiskFull:
            fill = None
        if fill is None and ask.peer:
            raise blob_unknown(ask.digest)
        if fill is None:
            size = await self._shared_size(ask) if ask.head else None
            if size is not None:
                ask.outcome = "hit"
                return KnownSize(size)
            return await self._upstream(ask)
        ask.outcome = "hit" if fill.source == "bucket" else "miss"  # a miss is what the upstream was asked for
        if not fill.done:
            try:
                return GrowingFile(fill.open(), fill)
            except FileNotFoundError:  # the fill was committed between ready() and open()
                pass
        source = await self.storage.open(ask.digest)
        if source is None:  # evicted the moment it was committed
            raise blob_unknown(ask.digest)
        return CachedFile(source)

    async def _cached(self, ask: BlobAsk) -> Responder | None:
        """A hit, already checked for private content: nginx sends it when it offered, else we do."""
        ask.outcome = "hit"
        if ask.accel:
            return AccelRedirect(ask.accel + blob_name(ask.digest))
        source = await self.storage.open(ask.digest)
        return CachedFile(source) if source is not None else None

    async def _shared_size(self, ask: BlobAsk, checked: bool = False) -> int | None:
        """The size of the shared tier's copy when ``ask`` may read it, else None (no bucket, not there, private
        elsewhere, the store silent). ``checked``: the local private check passed already. The size and the
        private record are asked for at once (a redirect waits for the slower, not for both in turn)."""
        bucket = self.fills.bucket
        if bucket is None:
            return None
        if checked:
            return await bucket.blob_size(ask.digest)
        size, allowed = await defer.gatherResults(
            [
                defer.ensureDeferred(bucket.blob_size(ask.digest)),
                defer.ensureDeferred(bucket.may_serve(ask.digest, repository(ask.target))),
            ],
            consumeErrors=True,
        ).addErrback(lambda f: f.value.subFailure.raiseException())
        return size if allowed else None

    async def _fill(self, target: Target, digest: str, join_only: bool) -> Fill | None:
        """The fill this request reads, once the upstream answered and ``target`` may read it; None when
        ``join_only`` (a HEAD, a peer replica) and no fill is under way.

        A fill runs with its first requester's repository. A follower through another repository waits until
        the upstream confirmed that one holds the blob too (content fetched with credentials has no record yet);
        and when the upstream does not have the blob where the fill asked, the follower asks under its own name.
        Checked again once the fill answered: one from the shared tier's bucket has copied the bucket's private
        record to the local tier by then, and one in another process has told whose it is.
        """
        key = repository(target)
        while True:
            client = self.client_for(target)
            fill = self.fills.join(digest, client, target) if join_only else self.fills.start(digest, client, target)
            if fill is None:
                return None
            theirs = fill.repository != key
            if theirs:
                await self.private.check(target, digest, "blobs", fill.credentialed)
            try:
                await fill.ready()
            except OwnerFailed:
                continue  # another process's fill ended before an answer: ask again
            except RegistryError as e:
                if not theirs or e.code != "BLOB_UNKNOWN":
                    raise
                continue  # at once, in the turn the fill failed: nothing else can start one in between
            if fill.repository != key and (fill.source == "bucket" or fill.foreign):
                await self.private.check(target, digest, "blobs", fill.credentialed)
            return fill

    async def _upstream(self, ask: BlobAsk) -> Responder:
        """No cache for this one: the upstream's answer. A HEAD asks for the first byte only: the size is in
        ``Content-Range`` and no blob is sent."""
        ask.outcome = "pass"
        target, digest = ask.target, ask.digest
        wanted = "bytes=0-0" if ask.head else ask.range
        response = await self.client_for(target).request(
            "GET", f"/v2/{target.name}/blobs/{digest}", target.name, {"Range": wanted} if wanted else {}
        )
        if response.code == 404:
            await discard(response)
            raise blob_unknown(digest)
        if response.code not in (200, 206, 416):
            await discard(response)
            raise UpstreamError(target.registry, f"HTTP {response.code} for blob {digest}", response.code)
        return UpstreamAnswer(response, digest)
