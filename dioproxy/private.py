"""Content fetched with upstream credentials is served only to requests for a repository it was seen in.

Blobs and manifests are stored once per digest, whichever repository they came from. For content of a
credentialed upstream (possibly private), knowing a digest must not be enough to read it through another
repository name: we record where the upstream served it, and otherwise ask the upstream whether the requesting
repository has it before serving.

Everything fails closed. A repository is recorded only after the upstream answered 200 for it (a fill records its
repository once the bytes are verified, before they are committed, so no process ever finds the content without
its record). A record that exists but cannot be read counts as private with no repository. Records live only on
disk, one file per digest, read on each request: every process on the cache directory sees a new record at once,
and a public cache hit costs one failed ``open`` (about 2 us).
"""

from __future__ import annotations

import json
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from dioproxy.errors import blob_unknown, manifest_unknown
from dioproxy.routing import Target
from dioproxy.storage.base import Store
from dioproxy.upstream import MANIFEST_TYPES, UpstreamClient, discard

log = Logger()

#: A record names repositories; one longer than this is damaged (and counts as private).
MAX_RECORD = 1024 * 1024


def repository(target: Target) -> str:
    """How a repository is named in a record."""
    return f"{target.registry}/{target.name}"


class PrivateContent:
    def __init__(self, storage: Store, client_for: Callable[[Target], UpstreamClient]) -> None:
        self.storage = storage
        self.client_for = client_for
        #: ``f(digest)`` after a record changed (the shared tier merges it into the bucket's).
        self.on_record: Callable[[str], None] | None = None

    def seen(self, digest: str) -> set[str] | None:
        """Where a credentialed digest was seen; None for content that came without credentials (no record)."""
        try:
            data = self.storage.read_record(digest)  # a record still being written counts too
        except OSError as e:
            log.warn("private record of {digest} unreadable ({e}): treated as private", digest=digest, e=e)
            return set()
        if data is None:
            return None
        try:
            repositories = json.loads(data) if len(data) <= MAX_RECORD else None
        except ValueError:
            repositories = None
        if not isinstance(repositories, list) or not all(isinstance(r, str) for r in repositories):
            log.warn("private record of {digest} damaged: treated as private", digest=digest)
            return set()
        return set(repositories)

    async def mark(self, target: Target, digest: str) -> None:
        """Record that the upstream served ``digest`` for ``target``, if the content comes with credentials.

        Call only after the upstream said so; fires once the record is on disk, where every process sees it.
        Raises OSError when it cannot be written: the caller must then not cache the content, or other requests
        (in other processes too) would take it for public.
        """
        repositories = self.seen(digest)
        if repositories is None:
            if target.upstream.credentials is None:
                return
            repositories = set()
        if repository(target) in repositories:
            return
        repositories.add(repository(target))
        if not await self.storage.write_record(digest, json.dumps(sorted(repositories)).encode()):
            raise OSError(f"cannot write the private record of {digest}")
        if self.on_record is not None:
            self.on_record(digest)

    async def check(self, target: Target, digest: str, kind: str, credentialed: bool = False) -> None:
        """Raise BLOB_UNKNOWN / MANIFEST_UNKNOWN unless ``target`` may read this content.

        ``credentialed``: the content is being fetched with credentials right now (a fill under way), so it is
        private even though its record is not written yet.
        """
        repositories = self.seen(digest)
        if repositories is None and not credentialed:
            return
        if repository(target) in (repositories or ()):
            return
        headers = {"Accept": ", ".join(MANIFEST_TYPES)} if kind == "manifests" else {}
        response = await self.client_for(target).request(
            "HEAD", f"/v2/{target.name}/{kind}/{digest}", target.name, headers
        )
        await discard(response)
        if response.code != 200:
            raise blob_unknown(digest) if kind == "blobs" else manifest_unknown(target.name, digest)
        try:
            await self.mark(target, digest)
        except OSError as e:  # the upstream said yes: serve; the next request asks it again
            log.warn("cannot record where {digest} was seen: {e}", digest=digest, e=e)

    def evicted(self, kind: str, digest: str) -> defer.Deferred:
        """``CacheBound.on_evict``: the record goes with the last cached copy of its content."""
        return self.storage.size(digest).addCallback(self._forget, digest)

    def _forget(self, size: int | None, digest: str) -> None:
        if size is None and not self.storage.has_manifest(digest):
            self.storage.delete_record(digest)
