"""Grammar of repository names, tags and digests (distribution spec), checked before anything touches disk."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dioproxy.errors import digest_invalid, manifest_unknown, name_invalid, tag_invalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_HOSTILE_TAG = re.compile(r"[\x00-\x1f\x7f/\\]")
MAX_NAME = 255

#: A path segment is a registry host if it looks like one (GUIDE §1).
HOST_RE = re.compile(r"(?:localhost|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+|[A-Za-z0-9.-]+:[0-9]+)(?::[0-9]+)?")


def check_name(name: str) -> str:
    if len(name) > MAX_NAME or not NAME_RE.fullmatch(name):
        raise name_invalid(name)
    return name


def check_digest(digest: str) -> str:
    if not DIGEST_RE.fullmatch(digest):
        raise digest_invalid(digest)
    return digest


def is_digest(reference: str) -> bool:
    return ":" in reference


def check_reference(reference: str, name: str = "") -> str:
    """A manifest reference is a tag or a digest.

    A tag outside the grammar cannot exist (no registry accepts it on push), so it is simply unknown: 404
    ``MANIFEST_UNKNOWN``, as registries and the OCI conformance suite answer, and no upstream is asked. Only what
    could act on a path or a header (separators, dot segments, control characters) is refused as invalid (400).
    """
    if is_digest(reference):
        return check_digest(reference)
    if TAG_RE.fullmatch(reference):
        return reference
    if _HOSTILE_TAG.search(reference) or reference in (".", ".."):
        raise tag_invalid(reference)
    raise manifest_unknown(name, reference[:300], "manifest unknown: not a valid tag")


def looks_like_host(segment: str) -> bool:
    return bool(HOST_RE.fullmatch(segment))


@dataclass(frozen=True)
class ImageRef:
    """An image as ``docker pull`` names it, resolved: ``alpine:3.19`` is docker.io, ``library/alpine``, ``3.19``."""

    registry: str
    name: str
    reference: str  # tag or digest; "" when none was given and there is no default

    def __str__(self) -> str:
        sep = "@" if ":" in self.reference else ":"
        return f"{self.registry}/{self.name}{sep}{self.reference}"


def parse_image(text: str, default_tag: str | None = "latest") -> ImageRef:
    """``[registry/]name[:tag][@digest]``, as ``docker pull`` reads it; ValueError names what is wrong."""
    rest, _, digest = text.partition("@")
    first, sep, remainder = rest.partition("/")
    if sep and (looks_like_host(first) or first == "localhost"):
        registry, rest = first, remainder
    else:
        registry = "docker.io"
    name, reference = rest, default_tag
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, reference = name[:colon], name[colon + 1 :]
    if digest:
        reference = digest
    if registry == "docker.io" and "/" not in name:
        name = "library/" + name
    try:
        check_name(name)
        if reference is not None:
            check_reference(reference)
    except Exception as e:
        raise ValueError(f"{text!r} is not an image reference ({getattr(e, 'message', e)})") from None
    return ImageRef(registry, name, reference or "")
