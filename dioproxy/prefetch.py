"""Keep images warm: which manifests and blobs of an image a prefetch wants (the platforms asked for).

Shared by ``dioproxy prefetch`` (through a running proxy) and the mirror's own scheduled prefetch, so both pick
the same platforms and the same blobs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from dioproxy.names import DIGEST_RE


def _digest(value: object) -> str:
    if not isinstance(value, str) or not DIGEST_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a sha256 digest")
    return value


def platform_of(entry: dict) -> str:
    """``os/arch[/variant]`` of an index entry."""
    p = entry.get("platform") or {}
    text = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    return text + (f"/{p['variant']}" if p.get("variant") else "")


def wanted(platform: str, platforms: Sequence[str]) -> bool:
    """No platforms means all; ``linux/arm64`` also means its variants (``linux/arm64/v8``)."""
    return not platforms or any(platform == w or platform.startswith(w + "/") for w in platforms)


def select_platforms(index_body: bytes, platforms: Sequence[str]) -> list[tuple[str, str]]:
    """``(digest, platform)`` of the index entries wanted; ValueError when none is (naming what there is) or the
    index is malformed."""
    entries = json.loads(index_body).get("manifests", [])
    chosen = [(_digest(e.get("digest")), platform_of(e)) for e in entries if wanted(platform_of(e), platforms)]
    if not chosen:
        available = ", ".join(sorted({platform_of(e) for e in entries}))
        raise ValueError(f"no manifest for {', '.join(platforms)} (has: {available})")
    return chosen


def blobs_of(manifest_body: bytes) -> dict[str, int]:
    """The config and layer blobs of an image manifest, with their announced sizes; ValueError if malformed."""
    doc = json.loads(manifest_body)
    blobs = {}
    for descriptor in [doc.get("config") or {}, *(doc.get("layers") or [])]:
        if "digest" in descriptor:
            blobs[_digest(descriptor["digest"])] = int(descriptor.get("size") or 0)
    return blobs
