"""Reading the cache directory as a whole: entries with sizes, slices of them for the index, tags.

Plain blocking functions, no Twisted: the proxy runs them in its disk pool, the ``dioproxy`` admin command calls
them directly. The layout itself belongs to :mod:`dioproxy.storage.disk`, the last uses to
:mod:`dioproxy.storage.index`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from dioproxy.storage.base import TagEntry
from dioproxy.storage.disk import blob_path, listing, manifest_path

#: ``kind`` of an entry: blobs and manifests live in separate trees, a digest may be in both.
BLOB, MANIFEST = "blob", "manifest"
KINDS = (BLOB, MANIFEST)
#: Last uses as versions before the index kept them (a JSON snapshot): read once into the index, then removed.
LASTUSE_FILE = "lastuse.json"


@dataclass
class Entry:
    kind: str
    digest: str
    path: str
    size: int
    mtime: float


def entry_path(root: str, kind: str, digest: str) -> str:
    return blob_path(root, digest) if kind == BLOB else manifest_path(root, digest)


def scan(root: str) -> Iterator[Entry]:
    """Every stored blob and manifest (files named by a sha256 digest), with size and mtime."""
    blobs = os.path.join(root, "blobs", "sha256")
    with contextlib.suppress(FileNotFoundError):
        for prefix in os.scandir(blobs):
            if prefix.is_dir(follow_symlinks=False):
                yield from _files(prefix.path, BLOB)
    yield from _files(os.path.join(root, "manifests", "sha256"), MANIFEST)


def _files(directory: str, kind: str) -> Iterator[Entry]:
    for digest, size, mtime in listing(directory):
        yield Entry(kind, digest, os.path.join(directory, digest.split(":", 1)[1]), size, mtime)


def slices(root: str) -> list[tuple[str, str, str]]:
    """The directory in pieces the index reconciles one at a time: ``(kind, digest prefix, directory)`` for the
    manifests and for each of the 256 blob prefix directories (``blobs/sha256/<2 hex>/``)."""
    blobs = os.path.join(root, "blobs", "sha256")
    return [(MANIFEST, "sha256:", os.path.join(root, "manifests", "sha256"))] + [
        (BLOB, f"sha256:{i:02x}", os.path.join(blobs, f"{i:02x}")) for i in range(256)
    ]


def load_lastuse(root: str) -> dict[str, dict[str, float]]:
    """``{kind: {digest: unix time}}`` from an old snapshot; empty if there is none or it is unreadable.

    Read in 1 MiB pieces with a regular expression rather than ``json.load``, which would hold the GIL (stalling
    the reactor) for 1.6 s in one go on a snapshot of a million entries; the snapshot's writer never wrote
    anything but ``{"blob": {digest: time, ...}, "manifest": {...}}``."""
    found: dict[str, dict[str, float]] = {kind: {} for kind in KINDS}
    kind: list[str | None] = [None]

    def parse(text: bytes) -> None:
        for m in _SNAPSHOT.finditer(text):
            if m[1]:
                kind[0] = m[1].decode()
            elif kind[0]:
                found[kind[0]][m[2].decode()] = float(m[3])

    rest = b""
    try:
        with open(os.path.join(root, LASTUSE_FILE), "rb") as f:
            while chunk := f.read(1 << 20):
                text = rest + chunk
                cut = text.rfind(b",") + 1  # a piece ends between two entries
                parse(text[:cut])
                rest = text[cut:]
    except OSError:
        return {kind: {} for kind in KINDS}
    parse(rest)
    return found


_SNAPSHOT = re.compile(rb'"(blob|manifest)"\s*:\s*\{|"(sha256:[0-9a-f]{64})"\s*:\s*([0-9][0-9.eE+-]*)')


@dataclass
class Tag:
    registry: str
    name: str
    tag: str
    path: str
    entry: TagEntry | None  # None: the tag file is unreadable


def tags(root: str) -> Iterator[Tag]:
    """Every tag entry under ``repos/<registry>/<name>/_tags/<tag>``."""
    repos = os.path.join(root, "repos")
    for directory, subdirs, files in os.walk(repos):
        if os.path.basename(directory) != "_tags":
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            continue
        subdirs[:] = []
        repo = os.path.relpath(os.path.dirname(directory), repos).split(os.sep)
        if len(repo) < 2:
            continue
        for tag in sorted(files):
            path = os.path.join(directory, tag)
            try:
                with open(path, "rb") as f:
                    entry = TagEntry(**json.load(f))
            except (OSError, ValueError, TypeError):
                entry = None
            yield Tag(repo[0], "/".join(repo[1:]), tag, path, entry)


def references(body: bytes) -> tuple[list[str], list[str]]:
    """``(child manifests, blobs)`` a manifest refers to: an index's manifests, an image's config and layers."""
    try:
        doc = json.loads(body)
    except ValueError:
        return [], []
    if not isinstance(doc, dict):
        return [], []

    def digests(items: object) -> list[str]:
        if not isinstance(items, list):
            return []
        return [i["digest"] for i in items if isinstance(i, dict) and isinstance(i.get("digest"), str)]

    blobs = digests(doc.get("layers"))
    config = doc.get("config")
    if isinstance(config, dict) and isinstance(config.get("digest"), str):
        blobs.insert(0, config["digest"])
    return digests(doc.get("manifests")), blobs
