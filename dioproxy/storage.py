"""The cache on disk: content-addressed blobs and manifests, and tag entries.

Layout under the cache directory::

    blobs/sha256/ab/<hex>          blob bytes, named by their digest
    manifests/sha256/<hex>         media type, a newline, then the manifest bytes
    repos/<registry>/<name>/_tags/<tag>   JSON tag entry ({"digest", "media_type", "size", "checked"})
    tmp/                           fills in progress; emptied at start

Every entry appears by ``rename`` of a complete, verified temp file, so a crash never leaves a half-written entry
in place. ``_tags`` cannot collide with a repository path: name components never start with ``_``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import asdict, dataclass

from twisted.logger import Logger

log = Logger()


@dataclass
class TagEntry:
    digest: str
    media_type: str
    size: int
    checked: float


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def blob_path(root: str, digest: str) -> str:
    hexdigest = _hex(digest)
    return os.path.join(root, "blobs", "sha256", hexdigest[:2], hexdigest)


def manifest_path(root: str, digest: str) -> str:
    return os.path.join(root, "manifests", "sha256", _hex(digest))


def read_manifest(root: str, digest: str) -> tuple[str, bytes] | None:
    """(media type, bytes) of a stored manifest, or None."""
    try:
        with open(manifest_path(root, digest), "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    media_type, _, body = data.partition(b"\n")
    return media_type.decode("utf-8", "replace"), body


class DiskStorage:
    """Paths and atomic writes; callers have already validated names and digests."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.tmp = os.path.join(self.root, "tmp")
        for sub in ("blobs/sha256", "manifests/sha256", "repos", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)

    def clean_temp(self) -> int:
        """Remove what a crash left in ``tmp/``; returns how many files. Only safe before serving starts."""
        removed = 0
        for entry in os.scandir(self.tmp):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError as e:
                log.warn("cannot remove stale temp file {path}: {e}", path=entry.path, e=e)
        return removed

    # -- blobs ---------------------------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        return blob_path(self.root, digest)

    def blob_size(self, digest: str) -> int | None:
        try:
            return os.stat(self.blob_path(digest)).st_size
        except FileNotFoundError:
            return None

    def temp_file(self, digest: str) -> tuple[str, int]:
        """A new, private temp file for a fill: its path and a write descriptor."""
        path = os.path.join(self.tmp, f"{_hex(digest)}.{secrets.token_hex(6)}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        return path, fd

    def commit_blob(self, temp_path: str, digest: str) -> str:
        final = self.blob_path(digest)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(temp_path, final)
        return final

    # -- manifests -----------------------------------------------------------------------------------------------

    def manifest_path(self, digest: str) -> str:
        return manifest_path(self.root, digest)

    def read_manifest(self, digest: str) -> tuple[str, bytes] | None:
        return read_manifest(self.root, digest)

    def write_manifest(self, digest: str, media_type: str, body: bytes) -> None:
        self.write_small(self.manifest_path(digest), media_type.encode() + b"\n" + body)

    # -- tags ----------------------------------------------------------------------------------------------------

    def tag_path(self, registry: str, name: str, tag: str) -> str:
        return os.path.join(self.root, "repos", registry, name, "_tags", tag)

    def read_tag(self, registry: str, name: str, tag: str) -> TagEntry | None:
        try:
            with open(self.tag_path(registry, name, tag), "rb") as f:
                return TagEntry(**json.load(f))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            log.warn(
                "ignoring unreadable tag entry {registry}/{name}:{tag}: {e}",
                registry=registry,
                name=name,
                tag=tag,
                e=e,
            )
            return None

    def write_tag(self, registry: str, name: str, tag: str, entry: TagEntry) -> None:
        self.write_small(self.tag_path(registry, name, tag), json.dumps(asdict(entry)).encode())

    def delete_tag(self, registry: str, name: str, tag: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tag_path(registry, name, tag))

    # -- helpers -------------------------------------------------------------------------------------------------

    def write_small(self, path: str, data: bytes) -> None:
        """Small files only (manifests, tag entries): written whole, then renamed into place."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temp = os.path.join(self.tmp, f"w.{secrets.token_hex(8)}")
        with open(temp, "wb") as f:
            f.write(data)
        os.rename(temp, path)
