"""Manifests: digest-keyed bytes (verified), tags mapped to digests for ``tag_ttl``, revalidated with HEAD.

Docker Hub counts manifest GETs, not HEADs, against its rate limit: a tag within its TTL costs the upstream
nothing; past it, one HEAD; a body is fetched only when the digest is new. When the upstream fails, the last known
digest is served (stale) rather than failing the pull, at once while the registry is offline
(:mod:`dioproxy.health`). A tag the upstream does not know is remembered for a short while, so a storm of requests
for a typo costs the upstream one. Every manifest GET is spent from the account's pull budget
(:mod:`dioproxy.budget`): when it runs low, a cached tag that moved upstream is served as it is; when it is gone,
nothing is fetched blind.

With the shared tier (``storage.s3``, :mod:`dioproxy.storage.bucket`) a local miss asks the bucket before the
upstream: a tag entry keeps the time the upstream was last asked, so another replica within ``tag_ttl`` asks the
upstream nothing; manifest bytes are verified against their digest, and served only to a repository the bucket's
private record allows. What the upstream tells us is written through to the bucket in the background.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from dioproxy.errors import RegistryError, UpstreamError, manifest_unknown
from dioproxy.fleet.tags import FleetTags
from dioproxy.health import Offline
from dioproxy.names import is_digest
from dioproxy.private import PrivateContent, repository
from dioproxy.routing import Target
from dioproxy.singleflight import SingleFlight
from dioproxy.storage.base import MetadataStore, TagEntry
from dioproxy.storage.bucket import Bucket
from dioproxy.upstream import MANIFEST_TYPES, UpstreamClient, discard, header, read_limited

log = Logger()

MAX_MANIFEST = 4 * 1024 * 1024
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
ACCEPT = ", ".join(MANIFEST_TYPES)


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    body: bytes
    outcome: str  # hit | miss | stale | pass


def sha256_digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def media_type_of(body: bytes, declared: str | None) -> str:
    """The upstream's Content-Type, or the ``mediaType`` field when the upstream sent something generic."""
    if declared and declared.split(";")[0].strip() in MANIFEST_TYPES:
        return declared.split(";")[0].strip()
    try:
        field = json.loads(body).get("mediaType")
    except (ValueError, AttributeError):
        field = None
    return field if isinstance(field, str) and field else (declared or "application/vnd.oci.image.manifest.v1+json")


class ManifestStore:
    """Manifest bytes by digest: a bounded in-memory LRU in front of the disk."""

    def __init__(self, storage: MetadataStore | None, memory_budget: int = 64 * 1024 * 1024) -> None:
        self.storage = storage
        self.budget = memory_budget
        self._lru: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._bytes = 0

    def get(self, digest: str) -> tuple[str, bytes] | None:
        """(media type, bytes) from memory or disk; a damaged file counts as missing (the storage removes it)."""
        entry = self._lru.get(digest)
        if entry is not None:
            self._lru.move_to_end(digest)
            return entry
        entry = self.storage.read_manifest(digest) if self.storage else None
        if entry is not None:
            self._remember(digest, entry)
        return entry

    def put(self, digest: str, media_type: str, body: bytes) -> None:
        if self.storage:  # written in the disk pool; a failure (a full disk) is logged there: memory still has it
            self.storage.write_manifest(digest, media_type, body)
        self._remember(digest, (media_type, body))

    def drop_memory(self) -> None:
        self._lru.clear()
        self._bytes = 0

    def _remember(self, digest: str, entry: tuple[str, bytes]) -> None:
        if digest in self._lru:
            return
        self._lru[digest] = entry
        self._bytes += len(entry[1])
        while self._bytes > self.budget and len(self._lru) > 1:
            _, (_, old) = self._lru.popitem(last=False)
            self._bytes -= len(old)


class TagIndex:
    """Tag → digest entries: the most recent in memory, all written through to disk so they survive restarts.

    Unknown tags are not remembered, so requests for made-up tags cannot grow our memory.
    """

    MEMORY = 100_000

    def __init__(self, storage: MetadataStore | None) -> None:
        self.storage = storage
        self._entries: OrderedDict[tuple[str, str, str], TagEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def drop_memory(self) -> None:
        self._entries.clear()

    def get(self, registry: str, name: str, tag: str) -> TagEntry | None:
        key = (registry, name, tag)
        entry = self._entries.get(key)
        if entry is None and self.storage:
            entry = self.storage.read_tag(*key)
            if entry is not None:
                self._remember(key, entry)
        return entry

    def _remember(self, key: tuple[str, str, str], entry: TagEntry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        if len(self._entries) > self.MEMORY:
            self._entries.popitem(last=False)

    def put(self, registry: str, name: str, tag: str, entry: TagEntry) -> None:
        self._remember((registry, name, tag), entry)
        if self.storage:
            self.storage.write_tag(registry, name, tag, entry)

    def names(self, registry: str, name: str) -> defer.Deferred:
        """Fires with the sorted tags of a repository we hold an entry for (every entry is on disk)."""
        return self.storage.list_tags(registry, name) if self.storage else defer.succeed([])

    def forget(self, registry: str, name: str, tag: str) -> None:
        self._entries.pop((registry, name, tag), None)
        if self.storage:
            self.storage.delete_tag(registry, name, tag)


class UnknownTags:
    """Tags the upstream answered 404 for, until an expiry: a bounded LRU in memory (typos must not grow it)."""

    MEMORY = 10_000

    def __init__(self) -> None:
        self._expiry: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, key: tuple[str, str, str], until: float) -> None:
        self._expiry[key] = until
        self._expiry.move_to_end(key)
        if len(self._expiry) > self.MEMORY:
            self._expiry.popitem(last=False)

    def forget(self, registry: str) -> None:
        """Drop what ``registry`` said (its URL or credentials changed: a 404 then says nothing about now)."""
        for key in [k for k in self._expiry if k[0] == registry]:
            del self._expiry[key]

    def known(self, key: tuple[str, str, str], now: float) -> bool:
        """Whether ``key`` is still known to be unknown at ``now``."""
        until = self._expiry.get(key)
        if until is not None and now >= until:
            del self._expiry[key]
            until = None
        return until is not None


class Manifests:
    """Answers manifest requests from the cache, asking the upstream only when it must."""

    def __init__(
        self,
        store: ManifestStore,
        tags: TagIndex,
        client_for: Callable[[Target], UpstreamClient],
        clock: Callable[[], float],
        tag_ttl: float,
        caching: bool = True,
        private: PrivateContent | None = None,
        negative_ttl: float = 0.0,
        on_stale: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.tags = tags
        self.client_for = client_for
        self.clock = clock
        self.tag_ttl = tag_ttl
        self.caching = caching
        self.private = private
        #: ``cache.negative_ttl``: how long a tag the upstream answered 404 for is answered 404 from memory.
        self.negative_ttl = negative_ttl
        self.unknown = UnknownTags()
        self.on_stale = on_stale
        #: The shared tier, read on a local miss and written through (None: the cache directory alone).
        self.bucket: Bucket | None = None
        #: ``coordination``: tag entries shared by the replicas (checked by one, fresh for all).
        self.fleet_tags: FleetTags | None = None
        self._flights = SingleFlight()

    def drop_memory(self) -> None:
        """Forget what memory holds, so the disk is read again (after ``dioproxy purge`` changed it)."""
        self.store.drop_memory()
        self.tags.drop_memory()

    async def get(self, target: Target, reference: str, max_age: float | None = None) -> Manifest:
        """The manifest for a tag or digest; concurrent identical requests share one upstream exchange.

        ``max_age`` trusts a cached tag for less than ``tag_ttl`` (0: revalidate now, as the keep-warm prefetch does).
        """
        key = (target.registry, target.name, reference)
        return await self._flights.run(key, lambda: self._get(target, reference, max_age))

    async def _get(self, target: Target, reference: str, max_age: float | None = None) -> Manifest:
        if not self.caching:
            media_type, body = await self._fetch(target, reference)
            digest = sha256_digest(body)
            if is_digest(reference) and digest != reference:
                raise _mismatch(target, reference)
            return Manifest(digest, media_type, body, "pass")
        if is_digest(reference):
            return await self._by_digest(target, reference)
        return await self._by_tag(target, reference, self.tag_ttl if max_age is None else min(max_age, self.tag_ttl))

    async def _by_digest(self, target: Target, digest: str, outcome: str = "hit") -> Manifest:
        cached = self.store.get(digest) or await self._from_bucket(target, digest)
        if cached is not None:
            if self.private:
                await self.private.check(target, digest, "manifests")
            return Manifest(digest, cached[0], cached[1], outcome)
        media_type, body = await self._fetch(target, digest)
        if sha256_digest(body) != digest:
            raise _mismatch(target, digest)
        await self._put(target, digest, media_type, body)
        return Manifest(digest, media_type, body, "miss")

    async def _from_bucket(self, target: Target, digest: str) -> tuple[str, bytes] | None:
        """A manifest the local tier lacks, from the bucket (verified; its private record copied first), kept
        locally; None: not there, not for ``target``'s repository, or the store failed."""
        if self.bucket is None or not await self.bucket.may_serve(digest, repository(target)):
            return None
        entry = await self.bucket.read_manifest(digest)
        if entry is not None:
            self.store.put(digest, *entry)
        return entry

    async def _put(self, target: Target, digest: str, media_type: str, body: bytes) -> None:
        """Cache a manifest the upstream just served for ``target``: its private record first, or not at all."""
        if self.private:
            try:
                await self.private.mark(target, digest)
            except OSError as e:
                log.warn("cannot record where {digest} was seen, not caching it: {e}", digest=digest, e=e)
                return
        self.store.put(digest, media_type, body)
        if self.bucket is not None:
            self.bucket.manifest_stored(digest)

    async def _by_tag(self, target: Target, tag: str, ttl: float) -> Manifest:
        registry, name = target.registry, target.name
        now = self.clock()
        if self.unknown.known((registry, name, tag), now):
            raise manifest_unknown(name, tag)
        entry = self.tags.get(registry, name, tag)
        if entry is None and self.bucket is not None:
            entry = await self.bucket.read_tag(registry, name, tag)
            if entry is not None:
                self.tags.put(registry, name, tag, entry)  # the local tier; the bucket has it
        shared = None
        if self.fleet_tags is not None and (entry is None or now - entry.checked >= ttl):
            shared = await self.fleet_tags.get(registry, name, tag)  # checked by another replica since?
            if shared is not None and (entry is None or shared.checked > entry.checked):
                entry = shared
                self.tags.put(registry, name, tag, entry)
        if entry is not None and now - entry.checked < ttl:
            cached = self.store.get(entry.digest) or await self._from_bucket(target, entry.digest)
            if cached is not None:
                return Manifest(entry.digest, cached[0], cached[1], "hit")
            if entry is shared:  # another replica checked the tag: only the body is missing, fetched by digest
                with contextlib.suppress(RegistryError):  # gone upstream meanwhile: check the tag as usual
                    return await self._by_digest(target, entry.digest)
        try:
            digest = await self._head(target, tag) if entry is not None else None
            client = self.client_for(target)
            moved = entry is not None and (digest is None or self.store.get(digest) is None)
            if moved and await client.budget.holding(client.allowance):
                # The budget is low: the tag keeps its cached digest; the GET is kept for images the cache lacks.
                stale = self._stale(target, tag, entry, "budget")
                if stale is not None:
                    client.budget.note(client.allowance, "held")
                    return stale
            if digest is not None:  # a hit if the digest is one we hold, else its body is fetched once
                manifest = await self._by_digest(target, digest)
            else:
                media_type, body = await self._fetch(target, tag)
                manifest = Manifest(sha256_digest(body), media_type, body, "miss")
                await self._put(target, manifest.digest, media_type, body)
        except UpstreamError as e:
            offline = isinstance(e, Offline)  # said once by dioproxy.health, not for every request
            stale = self._stale(target, tag, entry, "offline" if offline else "error")
            if stale is None:
                raise
            if not offline:
                log.warn(
                    "upstream {registry} failed ({why}); serving stale {name}:{tag}",
                    registry=registry,
                    why=e.reason,
                    name=name,
                    tag=tag,
                )
            return stale
        except RegistryError as e:
            if e.code == "MANIFEST_UNKNOWN":
                self.tags.forget(registry, name, tag)
                if self.negative_ttl > 0:
                    self.unknown.add((registry, name, tag), now + self.negative_ttl)
            raise
        checked = TagEntry(manifest.digest, manifest.media_type, len(manifest.body), now)
        self.tags.put(registry, name, tag, checked)
        if self.bucket is not None:
            self.bucket.tag_checked(registry, name, tag, checked)
        if self.fleet_tags is not None:
            self.fleet_tags.put(registry, name, tag, checked)
        return manifest

    def _stale(self, target: Target, tag: str, entry: TagEntry | None, reason: str) -> Manifest | None:
        """The last known manifest of a tag, served past its check (None if the cache no longer holds it)."""
        cached = self.store.get(entry.digest) if entry is not None else None
        if cached is None:
            return None
        if self.on_stale:
            self.on_stale(target.registry, reason)
        return Manifest(entry.digest, cached[0], cached[1], "stale")

    async def _head(self, target: Target, tag: str) -> str | None:
        """The tag's current digest by HEAD (free on Docker Hub), or None if the upstream will not say."""
        client = self.client_for(target)
        response = await client.request("HEAD", f"/v2/{target.name}/manifests/{tag}", target.name, {"Accept": ACCEPT})
        await discard(response)
        if response.code == 404:
            raise manifest_unknown(target.name, tag)
        digest = header(response, "Docker-Content-Digest")
        return digest if response.code == 200 and digest and digest.startswith("sha256:") else None

    async def _fetch(self, target: Target, reference: str) -> tuple[str, bytes]:
        client = self.client_for(target)
        path = f"/v2/{target.name}/manifests/{reference}"

        async def probe() -> None:  # a HEAD costs no budget and its answer says what is left
            await discard(await client.request("HEAD", path, target.name, {"Accept": ACCEPT}))

        async with client.budget.spending(client.allowance, probe):
            response = await client.request("GET", path, target.name, {"Accept": ACCEPT})
        if response.code != 200:
            await discard(response)
            if response.code in (404, 401, 403):
                raise manifest_unknown(target.name, reference)
            raise UpstreamError(target.registry, f"HTTP {response.code} for manifest {reference}", response.code)
        if isinstance(response.length, int) and response.length > MAX_MANIFEST:
            await discard(response)
            raise _too_large(target, reference)
        try:
            body = await read_limited(response, MAX_MANIFEST)
        except ValueError:
            raise _too_large(target, reference) from None
        return media_type_of(body, header(response, "Content-Type")), body


def _too_large(target: Target, reference: str) -> RegistryError:
    return RegistryError(
        502,
        "MANIFEST_INVALID",
        f"upstream {target.registry} sent a manifest over {MAX_MANIFEST} bytes",
        {"name": target.name, "reference": reference},
    )


def _mismatch(target: Target, digest: str) -> RegistryError:
    return RegistryError(
        502, "DIGEST_INVALID", f"upstream {target.registry} sent a manifest that does not match {digest}"
    )
