"""One responder per way of sending a blob's bytes; the :class:`~dioproxy.blobs.Blobs` service picks one.

A responder owns what it holds (a descriptor, an upstream body) from the moment it is made: either ``send``
answers the request with it (status, Range, 304, HEAD, headers, body) and lets go when the body is done, or
``close`` lets go unsent (the client left first). Bytes leave through push producers (:mod:`dioproxy.streaming`)
that pause with the transport, so a client that stops reading meets the channel's write deadline
(:mod:`dioproxy.channel`) and holds at most a chunk of memory.

A way yet to come: an object-store stream (a remote blob store's body sent without the hot tier).
"""

from __future__ import annotations

import os
import re
from typing import Any, Protocol

from twisted.web.server import Request

from dioproxy.fill import Fill
from dioproxy.headers import not_modified, request_header
from dioproxy.storage.base import BlobSource
from dioproxy.streaming import UpstreamPipe, parse_range, stream_file
from dioproxy.upstream import abandon, discard, header


class Responder(Protocol):
    async def send(self, request: Request, head: bool) -> None:
        """Answer ``request`` (a coroutine: a remote way has waits of its own)."""

    def close(self) -> None:
        """Let go of what this holds, unsent."""


class CachedFile:
    """A complete blob in the local store: by ``sendfile`` on plain TCP, else read and written in chunks."""

    def __init__(self, source: BlobSource) -> None:
        self.source = source

    async def send(self, request: Request, head: bool) -> None:
        _send_file(request, self.source.fd, self.source.size, head, None)

    def close(self) -> None:
        self.source.close()


class GrowingFile:
    """A fill under way: the reader follows its temp file up to what the fill lets it read (the held-back tail
    arrives once the digest matched; on a mismatch the connection is aborted)."""

    def __init__(self, fd: int, fill: Fill) -> None:
        self.fd = fd
        self.fill = fill

    async def send(self, request: Request, head: bool) -> None:
        _send_file(request, self.fd, self.fill.size, head, self.fill)

    def close(self) -> None:
        os.close(self.fd)


class AccelRedirect:
    """Behind nginx: ``X-Accel-Redirect`` to the cached file, nginx sends it (sendfile, Range, slow clients)."""

    def __init__(self, location: str) -> None:
        self.location = location

    async def send(self, request: Request, head: bool) -> None:
        request.setHeader("X-Accel-Redirect", self.location)
        request.setHeader("Content-Type", "application/octet-stream")
        request.setHeader("Content-Length", "0")
        request.finish()

    def close(self) -> None:
        pass


class KnownSize:
    """A HEAD for a blob held elsewhere (the shared tier's bucket): headers and size, no bytes."""

    def __init__(self, size: int) -> None:
        self.size = size

    async def send(self, request: Request, head: bool) -> None:
        if not_modified(request):
            request.setResponseCode(304)
        else:
            request.setHeader("Content-Type", "application/octet-stream")
            request.setHeader("Accept-Ranges", "bytes")
            request.setHeader("Content-Length", str(self.size))
        request.finish()

    def close(self) -> None:
        pass


class Redirect:
    """``307`` to where the blob can be read directly (a presigned URL of the bucket): docker, podman,
    containerd and skopeo follow it; the bytes never pass through the mirror."""

    def __init__(self, location: str) -> None:
        self.location = location

    async def send(self, request: Request, head: bool) -> None:
        request.setResponseCode(307)
        request.setHeader("Location", self.location)
        request.setHeader("Cache-Control", "no-store")  # the URL expires: nobody may reuse the redirect
        request.setHeader("Content-Length", "0")
        request.finish()

    def close(self) -> None:
        pass


class UpstreamAnswer:
    """No cache for this blob: the upstream's answer (200, 206, 416) piped straight into the request,
    backpressure included; for a HEAD, only its size (the service asked for the first byte)."""

    def __init__(self, response: Any, digest: str) -> None:
        self.response = response
        self.digest = digest

    async def send(self, request: Request, head: bool) -> None:
        response = self.response
        if not_modified(request):  # the upstream has it: the client's copy is current
            abandon(response)
            request.setResponseCode(304)
            request.finish()
            return
        request.setHeader("Content-Type", "application/octet-stream")
        request.setHeader("Accept-Ranges", "bytes")
        content_range = header(response, "Content-Range")
        if head:
            abandon(response)
            size = response.length if response.code == 200 else _range_total(content_range)
            if size is not None:
                request.setHeader("Content-Length", str(size))
            request.finish()
            return
        request.setResponseCode(response.code)
        if content_range:
            request.setHeader("Content-Range", content_range)
        if isinstance(response.length, int):
            request.setHeader("Content-Length", str(response.length))
        if response.code == 416:
            await discard(response)
            request.finish()
            return
        response.deliverBody(UpstreamPipe(request, self.digest if response.code == 200 else None))

    def close(self) -> None:
        abandon(self.response)


def _send_file(request: Request, fd: int, size: int | None, head: bool, fill: Fill | None) -> None:
    """A local file with Range, 304 and HEAD; ``fill``: it is still growing (``size`` None: unknown yet)."""
    if not_modified(request):
        request.setResponseCode(304)
        return _finish_quietly(request, fd)
    request.setHeader("Content-Type", "application/octet-stream")
    request.setHeader("Accept-Ranges", "bytes")
    start, end = 0, size
    if size is not None:
        wanted = parse_range(request_header(request, "Range"), size)
        if wanted is False:
            request.setResponseCode(416)
            request.setHeader("Content-Range", f"bytes */{size}")
            request.setHeader("Content-Length", "0")
            return _finish_quietly(request, fd)
        if wanted:
            start, end = wanted
            request.setResponseCode(206)
            request.setHeader("Content-Range", f"bytes {start}-{end - 1}/{size}")
        request.setHeader("Content-Length", str(end - start))
    if head:
        return _finish_quietly(request, fd)
    stream_file(request, fd, start, end, fill)


def _finish_quietly(request: Request, fd: int) -> None:
    os.close(fd)
    request.finish()


def _range_total(content_range: str | None) -> int | None:
    """The size in ``bytes 0-0/N``, or in ``bytes */N`` (a 416: the empty blob answers ``Range: bytes=0-0`` so)."""
    match = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", (content_range or "").strip())
    return int(match.group(1)) if match else None
