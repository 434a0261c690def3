"""Reading the cache directory as a whole: listings, every entry with its size, tags, the old last-use snapshot.

Plain blocking functions, no Twisted: the store (:class:`~dioproxy.storage.disk.DiskStorage`) runs them in its
disk pool or, for the ``dioproxy`` admin command, at once; the index reads the directory with them when the admin
asks it for last uses. Paths come from :mod:`dioproxy.storage.layout`, the last uses of today from
:mod:`dioproxy.storage.index`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from dioproxy.storage import layout
from dioproxy.storage.base import BLOB, KINDS, MANIFEST, Listed, TagEntry

_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass
class Entry:
    kind: str
    digest: str
    size: int
    mtime: float


def is_cache_dir(root: str) -> bool:
    """Whether a proxy ever stored something here (blobs or tags); the admin refuses any other directory."""
    blobs = os.path.dirname(layout.blobs_dir(root))  # blobs/, whatever digest algorithms it holds
    return os.path.isdir(blobs) or os.path.isdir(layout.repos_dir(root))


def listing(directory: str, prefix: str = "sha256:") -> list[Listed]:
    """The entries of one directory (files named by a sha256 digest) whose digest starts with ``prefix``."""
    try:
        items = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    found = []
    for item in items:
        digest = "sha256:" + item.name
        if not _HEX.fullmatch(item.name) or not digest.startswith(prefix):
            continue
        try:
            st = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        found.append((digest, st.st_size, st.st_mtime))
    return found


def scan(root: str) -> Iterator[Entry]:
    """Every stored blob and manifest (files named by a sha256 digest), with size and mtime."""
    with contextlib.suppress(FileNotFoundError):
        for prefix in os.scandir(layout.blobs_dir(root)):
            if prefix.is_dir(follow_symlinks=False):
                yield from _files(prefix.path, BLOB)
    yield from _files(layout.manifests_dir(root), MANIFEST)


def _files(directory: str, kind: str) -> Iterator[Entry]:
    for digest, size, mtime in listing(directory):
        yield Entry(kind, digest, size, mtime)


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
        with open(layout.lastuse_path(root), "rb") as f:
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
    entry: TagEntry | None  # None: the tag file is unreadable


def tags(root: str) -> Iterator[Tag]:
    """Every tag entry under ``repos/<registry>/<name>/_tags/<tag>``."""
    repos = layout.repos_dir(root)
    for directory, subdirs, files in os.walk(repos):
        if os.path.basename(directory) != layout.TAGS:
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
            yield Tag(repo[0], "/".join(repo[1:]), tag, entry)


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
