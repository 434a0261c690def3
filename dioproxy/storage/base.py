"""What the cache keeps, as interfaces: a blob store and a metadata store.

Today's one implementation is the cache directory (:class:`~dioproxy.storage.disk.DiskStorage`, both at once).
An object store shared by many replicas is meant to implement :class:`BlobStore` too, so every call of it returns
a Deferred, even where the disk answers at once: callers never assume an answer in the same turn. Fills always
write to a temp file on this machine (the local tier) and hand it to :meth:`BlobStore.commit` once verified.

The metadata store holds small records (manifests, tag entries, private records) read on every request: reads
answer at once, a write still under way included; writes return a Deferred firing with True once the bytes are
durable (False: the write failed and was logged). Last uses live in the cache index
(:mod:`dioproxy.storage.index`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred

#: ``kind`` of an entry: blobs and manifests are kept apart, a digest may be both.
BLOB, MANIFEST = "blob", "manifest"
KINDS = (BLOB, MANIFEST)
#: ``(kind, digest)``: one stored entry, as the cache bound names it.
Key = tuple[str, str]
#: ``(digest, size, mtime)`` of a stored entry, as listings give them.
Listed = tuple[str, int, float]


@dataclass
class TagEntry:
    digest: str
    media_type: str
    size: int
    checked: float


class BlobSource(Protocol):
    """A stored blob, opened for sending ranges of it. ``fd`` is a descriptor for a file on this machine
    (pread, sendfile); a remote store's source has none and is sent by an object-store stream responder."""

    size: int
    fd: int | None

    def close(self) -> None: ...


class BlobStore(Protocol):
    """Verified blobs by digest."""

    def size(self, digest: str) -> Deferred[int | None]:
        """The blob's size; None if it is not stored."""

    def open(self, digest: str) -> Deferred[BlobSource | None]:
        """The blob, open for reading; None if it is not stored. The caller closes it."""

    def commit(self, temp_path: str, digest: str) -> Deferred[None]:
        """Store a local temp file whose bytes were verified against ``digest`` as that blob."""

    def delete(self, digests: list[str]) -> Deferred[list[str | None]]:
        """Remove blobs; per digest None (removed), ``"gone"`` (was not there) or what went wrong."""

    def list(self, prefix: str) -> Deferred[list[Listed]]:
        """The stored blobs whose digest starts with ``prefix`` (``sha256:ab``)."""


class MetadataStore(Protocol):
    """Manifests by digest, tag entries, private records."""

    def read_manifest(self, digest: str) -> tuple[str, bytes] | None:
        """(media type, bytes), or None: missing, or not matching its digest (then it is removed, never served)."""

    def write_manifest(self, digest: str, media_type: str, body: bytes) -> None: ...

    def has_manifest(self, digest: str) -> bool: ...

    def delete_manifests(self, digests: list[str]) -> Deferred[list[str | None]]:
        """As :meth:`BlobStore.delete`."""

    def list_manifests(self, prefix: str) -> Deferred[list[Listed]]: ...

    def read_tag(self, registry: str, name: str, tag: str) -> TagEntry | None: ...

    def write_tag(self, registry: str, name: str, tag: str, entry: TagEntry) -> None: ...

    def delete_tag(self, registry: str, name: str, tag: str) -> None: ...

    def list_tags(self, registry: str, name: str) -> Deferred[list[str]]:
        """The sorted tags of a repository we hold an entry for."""

    def read_record(self, digest: str) -> bytes | None:
        """The private record of a digest (:mod:`dioproxy.private`); None if there is none. May raise OSError."""

    def write_record(self, digest: str, data: bytes) -> Deferred[bool]: ...

    def delete_record(self, digest: str) -> Deferred[bool]: ...

    def settled(self) -> Deferred[None]:
        """Fires once every write asked for so far is durable."""


class Store(BlobStore, MetadataStore, Protocol):
    """Blobs and their metadata in one place (the cache directory), entries of both kinds by ``(kind, digest)``
    for the cache bound (:mod:`dioproxy.eviction`)."""

    def slices(self) -> list[tuple[str, str]]:
        """``(kind, digest prefix)`` pieces that together list every entry, each cheap to list on its own."""

    def list_entries(self, kind: str, prefix: str) -> Deferred[list[Listed]]:
        """The stored entries of ``kind`` whose digest starts with ``prefix`` (a piece of :meth:`slices`)."""

    def delete_entries(self, keys: list[Key]) -> Deferred[list[str | None]]:
        """Remove entries; per key None (removed), ``"gone"`` (was not there) or what went wrong."""
