"""Moving bytes to clients: a push producer over a (possibly growing) file, a pipe from upstream, Range parsing.

Both respect the client's backpressure: the transport pauses us when its buffer is full and resumes us when it
drains, so memory per client is one chunk whatever the blob size.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from twisted.internet import interfaces, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client as webclient
from twisted.web.server import Request
from zope.interface import implementer

from dioproxy.fill import Fill

log = Logger()

CHUNK = 64 * 1024
_RANGE_SPEC = re.compile(r"\s*([0-9]{0,40})\s*-\s*([0-9]{0,40})\s*")


def parse_range(value: str | None, size: int) -> tuple[int, int] | bool | None:
    """``(start, end_exclusive)`` for one satisfiable byte range; ``None``: serve it whole; ``False``: unsatisfiable.

    As RFC 9110 and twisted.web's ``static.File`` do it: a header that is not one valid ``bytes`` range (garbage,
    another unit, ``last < first``) is ignored, and so are several ranges (the whole body, 200). A valid range that
    does not overlap the content is a 416, a suffix range of an empty blob too: no ``Content-Range`` can describe
    zero bytes.
    """
    if not value:
        return None
    unit, equals, spec = value.partition("=")
    match = _RANGE_SPEC.fullmatch(spec)
    if not equals or unit.strip().lower() != "bytes" or not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        suffix = int(last)
        return False if suffix == 0 or size == 0 else (max(0, size - suffix), size)
    start = int(first)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        return False
    return (start, size if last == "" else min(int(last) + 1, size))


def _abort(request: Request) -> None:
    """Cut the connection so the client cannot mistake what it got for a complete body."""
    transport = request.channel.transport if request.channel else None
    if transport is not None:
        transport.abortConnection()


@implementer(interfaces.IPushProducer)
class FileStreamer:
    """Sends ``[start, end)`` of a file to a request; follows a :class:`Fill` while the file still grows."""

    def __init__(self, request: Request, fd: int, start: int, end: int | None, fill: Fill | None = None) -> None:
        self.request = request
        self.fd = fd  # ours: closed when the body is done or the client left
        self.pos = start
        self.end = end
        self.fill = fill
        self._paused = False
        self._stopped = False
        self._waiting = False

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self._pump()

    def _limit(self) -> int:
        if self.fill is None or self.fill.done:
            return self.end if self.end is not None else self.fill.size
        readable = self.fill.readable()
        return readable if self.end is None else min(self.end, readable)

    def _pump(self) -> None:
        while not (self._paused or self._stopped or self._waiting):
            fill = self.fill
            if fill is not None and fill.failure is not None:
                return self._close(abort=True)
            end = self.end if self.end is not None else (fill.size if fill is not None and fill.done else None)
            if end is not None and self.pos >= end:
                return self._close(abort=False)
            limit = self._limit()
            if self.pos >= limit:
                self._waiting = True
                fill.wait().addCallback(self._progress)
                return
            data = os.pread(self.fd, min(CHUNK, limit - self.pos), self.pos)
            if not data:
                log.error("cache file shrank under a reader at {pos}", pos=self.pos)
                return self._close(abort=True)
            self.pos += len(data)
            self.request.write(data)

    def _progress(self, _: Any) -> None:
        self._waiting = False
        self._pump()

    def _close(self, abort: bool) -> None:
        if self._stopped:
            return
        self._stopped = True
        os.close(self.fd)
        self.request.unregisterProducer()
        if abort:
            _abort(self.request)
        else:
            self.request.finish()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        """The client went away; the fill, if any, goes on for the next client."""
        if not self._stopped:
            self._stopped = True
            os.close(self.fd)


class SendfileStreamer(FileStreamer):
    """A local file to a plain TCP client with ``os.sendfile``: the bytes never pass through Python. Following a
    growing fill, it sends only what the fill lets readers have (``readable()``: the tail is held back until the
    digest matched) and waits for more.

    The body bypasses the transport's buffer, so it starts only once the headers have left, and while the socket
    is full we ask the transport to tell us when it is writable again (its ``doWrite`` resumes a paused producer
    when its own buffer is empty).
    """

    #: Bytes sent per reactor turn, so one fast client cannot starve the others.
    TURN = 4 * 1024 * 1024

    def start(self) -> None:
        self.transport = self.request.channel.transport
        self.request.write(b"")  # the status line and headers, into the transport's buffer
        self.request.registerProducer(self, True)
        self._pump()

    def _pump(self) -> None:
        if self._paused or self._stopped or self._waiting:
            return
        if self.fill is not None and self.fill.failure is not None:
            return self._close(abort=True)
        transport = self.transport
        if transport._tempDataLen or len(transport.dataBuffer) > transport.offset:
            return self._when_writable()  # headers still on their way
        limit = self._limit()
        budget = self.TURN
        while self.pos < limit and budget > 0:
            try:
                sent = os.sendfile(transport.fileno(), self.fd, self.pos, min(limit - self.pos, budget))
            except BlockingIOError:
                return self._when_writable()
            except OSError:  # the client went away
                return self._close(abort=True)
            if sent == 0:
                log.error("cache file shrank under a reader at {pos}", pos=self.pos)
                return self._close(abort=True)
            self.pos += sent
            self.request.sentLength += sent
            budget -= sent
        if self.pos >= self.end:
            return self._close(abort=False)
        if self.pos >= limit:  # caught up with the fill
            self._waiting = True
            self.fill.wait().addCallback(self._progress)
            return
        self._when_writable()

    def _when_writable(self) -> None:
        """Pause as the transport pauses its producer when its buffer is full: it resumes the channel once the
        socket is writable, and the channel's client deadline runs meanwhile."""
        self.transport.producerPaused = True
        self.transport.startWriting()
        self.request.channel.pauseProducing()


def stream_file(request: Request, fd: int, start: int, end: int | None, fill: Fill | None) -> None:
    """Send a file range: by ``sendfile`` on plain TCP when its length is known (the body is not chunked), a
    growing file's too; else through a push producer."""
    transport = request.channel.transport if request.channel else None
    plain_tcp = (
        end is not None
        and transport is not None
        and not interfaces.ISSLTransport.providedBy(transport)
        and hasattr(transport, "dataBuffer")
        and hasattr(os, "sendfile")
    )
    (SendfileStreamer if plain_tcp else FileStreamer)(request, fd, start, end, fill).start()


class UpstreamPipe(protocol.Protocol):
    """Pipes an upstream body straight into the request, backpressure included (the no-cache mode).

    With ``digest`` set, the last chunk is held back until the sha256 of the whole body matches it.
    """

    def __init__(self, request: Request, digest: str | None) -> None:
        self.request = request
        self.digest = digest
        self.sha = hashlib.sha256() if digest else None
        self.held = b""

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)
        self.request.notifyFinish().addErrback(lambda _: self.transport.stopProducing())

    def dataReceived(self, data: bytes) -> None:
        if self.sha is None:
            self.request.write(data)
            return
        self.sha.update(data)
        self.held, data = data, self.held
        if data:
            self.request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:
        if self.request._disconnected or self.request.finished:
            return
        self.request.unregisterProducer()
        complete = reason.check(webclient.ResponseDone) is not None
        if complete and self.sha is not None and "sha256:" + self.sha.hexdigest() != self.digest:
            log.warn("upstream sent bytes that do not match {digest}; aborting the client", digest=self.digest)
            complete = False
        if not complete:
            return _abort(self.request)
        if self.held:
            self.request.write(self.held)
        self.request.finish()
