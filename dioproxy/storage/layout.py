"""The cache directory's layout: where each thing lies under it. Paths only, no I/O: the store
(:mod:`dioproxy.storage.disk`) and the directory scans (:mod:`dioproxy.storage.cachedir`) take every path from here.

    blobs/sha256/ab/<hex>          blob bytes, named by their digest
    manifests/sha256/<hex>         media type, a newline, then the manifest bytes
    repos/<registry>/<name>/_tags/<tag>   JSON tag entry ({"digest", "media_type", "size", "checked"})
    private/<hex>                  JSON list of the repositories credentialed content was seen in
    tmp/                           fills in progress (<hex>.part, locked by their owner: storage/partial.py)
    index.db                       the cache index (storage/index.py names its own file)
    lastuse.json                   last uses as versions before the index kept them: read once, then removed

``_tags`` cannot collide with a repository path: name components never start with ``_``.
"""

from __future__ import annotations

import os

from dioproxy.storage.base import BLOB, MANIFEST

#: The directories a cache directory starts with.
DIRS = ("blobs/sha256", "manifests/sha256", "repos", "tmp")
TAGS = "_tags"
LASTUSE_FILE = "lastuse.json"


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def blob_name(digest: str) -> str:
    """Where a blob lies under ``blobs/sha256/`` (what an nginx location for ``X-Accel-Redirect`` aliases)."""
    hexdigest = _hex(digest)
    return f"{hexdigest[:2]}/{hexdigest}"


def blobs_dir(root: str) -> str:
    return os.path.join(root, "blobs", "sha256")


def blob_path(root: str, digest: str) -> str:
    return os.path.join(blobs_dir(root), blob_name(digest))


def manifests_dir(root: str) -> str:
    return os.path.join(root, "manifests", "sha256")


def manifest_path(root: str, digest: str) -> str:
    return os.path.join(manifests_dir(root), _hex(digest))


def entry_path(root: str, kind: str, digest: str) -> str:
    return blob_path(root, digest) if kind == BLOB else manifest_path(root, digest)


def entry_dir(root: str, kind: str, prefix: str) -> str:
    """The directory holding the entries of ``kind`` whose digest starts with ``prefix``; for blobs the prefix
    names the first two hex digits (``sha256:ab``): a blob directory holds one such prefix."""
    return os.path.join(blobs_dir(root), _hex(prefix)[:2]) if kind == BLOB else manifests_dir(root)


def slices() -> list[tuple[str, str]]:
    """``(kind, digest prefix)``: the manifests, and each of the 256 blob directories (``blobs/sha256/<2 hex>/``)."""
    return [(MANIFEST, "sha256:")] + [(BLOB, f"sha256:{i:02x}") for i in range(256)]


def repos_dir(root: str) -> str:
    return os.path.join(root, "repos")


def tags_dir(root: str, registry: str, name: str) -> str:
    return os.path.join(repos_dir(root), registry, name, TAGS)


def tag_path(root: str, registry: str, name: str, tag: str) -> str:
    return os.path.join(tags_dir(root, registry, name), tag)


def record_path(root: str, digest: str) -> str:
    return os.path.join(root, "private", _hex(digest))


def tmp_dir(root: str) -> str:
    return os.path.join(root, "tmp")


def lastuse_path(root: str) -> str:
    return os.path.join(root, LASTUSE_FILE)
