"""Content fetched with upstream credentials is served only to requests for a repository it was seen in.

Blobs and manifests are stored once per digest, whichever repository they came from. For content of a
credentialed upstream (possibly private), knowing a digest must not be enough to read it through another
repository name: we remember where it was seen, and otherwise ask the upstream whether the requesting
repository has it before serving.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from twisted.logger import Logger

from dioproxy.errors import blob_unknown, manifest_unknown
from dioproxy.routing import Target
from dioproxy.storage import DiskStorage
from dioproxy.upstream import MANIFEST_TYPES, UpstreamClient, discard

log = Logger()


class PrivateContent:
    def __init__(self, storage: DiskStorage, client_for: Callable[[Target], UpstreamClient]) -> None:
        self.storage = storage
        self.client_for = client_for
        self._seen: dict[str, set[str]] = {}
        # Which digests have a record at all, listed once: a cache hit on public content costs no syscall.
        try:
            self._recorded = {"sha256:" + name for name in os.listdir(os.path.join(storage.root, "private"))}
        except FileNotFoundError:
            self._recorded = set()

    def _path(self, digest: str) -> str:
        return os.path.join(self.storage.root, "private", digest.split(":", 1)[1])

    def seen(self, digest: str) -> set[str] | None:
        """Where a credentialed digest was seen; None for content that came without credentials."""
        if digest not in self._recorded:
            return None
        if digest not in self._seen:
            try:
                with open(self._path(digest), "rb") as f:
                    self._seen[digest] = set(json.load(f))
            except (FileNotFoundError, ValueError):
                self._recorded.discard(digest)
                return None
        return self._seen[digest]

    def mark(self, target: Target, digest: str) -> None:
        """Record that ``target`` holds ``digest``, if the content comes with credentials."""
        repositories = self.seen(digest)
        if repositories is None:
            if target.upstream.credentials is None:
                return
            repositories = set()
        key = f"{target.registry}/{target.name}"
        if key in repositories:
            return
        repositories.add(key)
        self._seen[digest] = repositories
        self._recorded.add(digest)
        try:
            self.storage.write_small(self._path(digest), json.dumps(sorted(repositories)).encode())
        except OSError as e:  # kept in memory; a full disk must not fail the pull
            log.warn("cannot record where {digest} was seen: {e}", digest=digest, e=e)

    async def check(self, target: Target, digest: str, kind: str) -> None:
        """Raise BLOB_UNKNOWN / MANIFEST_UNKNOWN unless ``target`` may read this cached content."""
        repositories = self.seen(digest)
        if repositories is None or f"{target.registry}/{target.name}" in repositories:
            return
        headers = {"Accept": ", ".join(MANIFEST_TYPES)} if kind == "manifests" else {}
        response = await self.client_for(target).request(
            "HEAD", f"/v2/{target.name}/{kind}/{digest}", target.name, headers
        )
        await discard(response)
        if response.code != 200:
            raise blob_unknown(digest) if kind == "blobs" else manifest_unknown(target.name, digest)
        self.mark(target, digest)
