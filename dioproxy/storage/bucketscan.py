"""Reading the bucket (``storage.s3``) as a whole, blocking: the ``dioproxy`` admin command's view of the shared
tier, as :mod:`dioproxy.storage.cachedir` is its view of the cache directory.

Plain boto3 calls, no Twisted (the command is not a reactor), on the same client the mirror makes
(:func:`dioproxy.objectstore.boto_client`: credentials, endpoint, s3v4 signatures, deadlines) and the key layout of
:mod:`dioproxy.storage.bucket`. Every call's failure is an :class:`~dioproxy.objectstore.ObjectStoreError`; the
first one, :meth:`BucketScan.check`, names the configuration key to fix. Listings go a page at a time and bodies
a chunk at a time, so memory does not grow with the bucket or the blob.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dioproxy.config import S3Storage
from dioproxy.objectstore import (
    BLOBS,
    MANIFESTS,
    ObjectInfo,
    ObjectStoreError,
    blob_key,
    boto_client,
    config_error,
    control_error,
    manifest_key,
)
from dioproxy.storage.base import TagEntry
from dioproxy.storage.bucket import MAX_SMALL
from dioproxy.storage.cachedir import BLOB, MANIFEST

TAGS = "tags/"
PRIVATE = "private/"
CHUNK = 1024 * 1024
_DIGEST_KEY = re.compile(r"(?:blobs|manifests)/sha256/([0-9a-f]{2})/([0-9a-f]{64})")


def key_digest(key: str) -> str | None:
    """``blobs/sha256/<ab>/<hex>`` (or ``manifests/...``) -> ``sha256:<hex>``; None for a key off the layout."""
    match = _DIGEST_KEY.fullmatch(key)
    if not match or match[2][:2] != match[1]:
        return None
    return "sha256:" + match[2]


def kind_key(kind: str, digest: str) -> str:
    return blob_key(digest) if kind == BLOB else manifest_key(digest)


@dataclass
class BucketTag:
    registry: str
    name: str
    tag: str
    key: str  # relative to the prefix
    entry: TagEntry | None  # None: unreadable
    etag: str


@dataclass
class Checked:
    """What hashing an object found: the sha256 of its content (the manifest bytes after the media type line),
    the ETag of the version read, or why it is not a valid entry at all."""

    digest: str | None
    etag: str
    size: int
    problem: str | None = None


class BucketScan:
    """One bucket and prefix, read (and pruned) with blocking calls; ``connections`` calls may run at once."""

    def __init__(self, settings: S3Storage, *, timeout: float = 30.0, connections: int = 8) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self.timeout = timeout
        self.label = f"s3://{self.bucket}/{self.prefix}"
        self.client = boto_client(
            settings, timeout=timeout, connect_timeout=min(10.0, timeout), connections=connections
        )

    def _call(self, operation: str, **params: Any) -> Any:
        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **params)
        except Exception as e:
            what = f"{self.label}: {operation}" + (f" {params['Key'][len(self.prefix) :]}" if "Key" in params else "")
            translated = control_error(e, what, self.timeout)
            if translated is None:
                raise
            raise translated from None

    def check(self) -> None:
        """The bucket answers a list with these credentials; else a ``StoreConfigError`` naming the key to fix."""
        try:
            self._call("list_objects_v2", Prefix=self.prefix, MaxKeys=1)
        except ObjectStoreError as e:
            raise config_error(e, self.settings, self.timeout) from None

    def objects(self, under: str = "") -> Iterator[ObjectInfo]:
        """Every object under ``under`` (relative keys), one listing page in memory at a time."""
        token = None
        cut = len(self.prefix)
        while True:
            params: dict[str, Any] = {"Prefix": self.prefix + under, "MaxKeys": 1000}
            if token:
                params["ContinuationToken"] = token
            answer = self._call("list_objects_v2", **params)
            for o in answer.get("Contents", ()):
                yield ObjectInfo(o["Key"][cut:], o["Size"], o.get("ETag", ""), o["LastModified"].timestamp())
            token = answer.get("NextContinuationToken") if answer.get("IsTruncated") else None
            if not token:
                return

    def entries(self, kind: str) -> Iterator[tuple[str, ObjectInfo]]:
        """``(digest, info)`` of every blob or manifest object named by a digest (keys off the layout skipped)."""
        for info in self.objects(BLOBS if kind == BLOB else MANIFESTS):
            digest = key_digest(info.key)
            if digest is not None:
                yield digest, info

    def read_small(self, key: str, limit: int = MAX_SMALL) -> tuple[bytes, str] | None:
        """``(bytes, etag)`` of a small object, None if absent; ValueError past ``limit`` bytes."""
        answer = self._get(key)
        if answer is None:
            return None
        with answer["Body"] as body:
            data = self._read(body, key, limit + 1)
        if len(data) > limit:
            raise ValueError(f"{key}: larger than {limit} bytes")
        return data, answer.get("ETag", "")

    def _get(self, key: str) -> Any:
        """The store's answer to a GET of ``key`` (its body unread), None if there is no such object."""
        try:
            return self._call("get_object", Key=self.prefix + key)
        except ObjectStoreError as e:
            if e.status == 404:
                return None
            raise

    def _read(self, body: Any, key: str, n: int) -> bytes:
        try:
            return body.read(n)
        except Exception as e:
            translated = control_error(e, f"{self.label}: reading {key}", self.timeout)
            raise (translated or ObjectStoreError(f"{self.label}: reading {key}: {e}")) from None

    def manifest(self, digest: str) -> tuple[str, bytes] | None:
        """(media type, bytes) of a manifest in the bucket if there and matching its digest, else None."""
        found = self.read_small(manifest_key(digest))
        if found is None:
            return None
        media_type, _, body = found[0].partition(b"\n")
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            return None
        return media_type.decode("utf-8", "replace"), body

    def hash(self, kind: str, key: str) -> Checked | None:
        """Stream the object through sha256, ``CHUNK`` bytes at a time; None if it is gone."""
        answer = self._get(key)
        if answer is None:
            return None
        sha, size, etag = hashlib.sha256(), 0, answer.get("ETag", "")
        with answer["Body"] as body:
            if kind == MANIFEST:
                data = self._read(body, key, MAX_SMALL + 1)
                media_type, newline, manifest = data.partition(b"\n")
                if len(data) > MAX_SMALL:
                    return Checked(None, etag, len(data), f"larger than {MAX_SMALL} bytes")
                if not newline or not media_type:
                    return Checked(None, etag, len(data), "not a manifest entry (no media type line)")
                return Checked("sha256:" + hashlib.sha256(manifest).hexdigest(), etag, len(data))
            while data := self._read(body, key, CHUNK):
                sha.update(data)
                size += len(data)
        return Checked("sha256:" + sha.hexdigest(), etag, size)

    def delete(self, key: str, etag: str | None = None) -> bool:
        """Remove ``key``; with ``etag``, only that version of it (``If-Match``): False if the object was
        replaced meanwhile (a replica uploading verified bytes over a damaged object must not lose them)."""
        params: dict[str, Any] = {"Key": self.prefix + key}
        if etag:
            params["IfMatch"] = etag
        try:
            self._call("delete_object", **params)
        except ObjectStoreError as e:
            if e.status == 412:
                return False
            if e.status != 501 or not etag:
                raise
            # A store without conditional deletes: compare the ETag just before (a window of one round trip).
            try:
                head = self._call("head_object", Key=self.prefix + key)
            except ObjectStoreError as e2:
                if e2.status == 404:
                    return False
                raise
            if head.get("ETag") != etag:
                return False
            self._call("delete_object", Key=self.prefix + key)
        return True

    def tags(self) -> Iterator[BucketTag]:
        """Every tag entry under ``tags/<registry>/<name>/<tag>`` (one GET each)."""
        for info in self.objects(TAGS):
            registry, _, rest = info.key[len(TAGS) :].partition("/")
            name, _, tag = rest.rpartition("/")
            if not registry or not name or not tag:
                continue
            try:
                found = self.read_small(info.key)
            except ValueError:  # too large: not one of ours
                yield BucketTag(registry, name, tag, info.key, None, info.etag)
                continue
            if found is None:  # deleted since the listing
                continue
            try:
                entry = TagEntry(**json.loads(found[0]))
            except (ValueError, TypeError):
                entry = None
            yield BucketTag(registry, name, tag, info.key, entry, found[1])
