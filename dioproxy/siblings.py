"""``/metrics`` and the status page under ``--workers N``: whichever worker answers, they cover all of them.

Each worker also listens on a private Unix socket in the run directory (``worker-<i>.sock``, the directory is
0700) where it serves its own registry alone (``/metrics``) and its own share of the status page (``/status``,
:func:`dioproxy.status.share`). The worker a scrape reaches fetches its siblings' expositions concurrently, each
with a :data:`SIBLING_TIMEOUT` deadline, and merges them with its own (:func:`dioproxy.metrics.merge`). A sibling
that does not answer in time is left out of that scrape and counted in ``dioproxy_scrape_workers_missing``. The
status page does the same with :data:`STATUS_TIMEOUT` (a person waits for it) and says who was left out.

Why this and not prometheus-client's multiprocess mode: that mode keeps values in mmapped files per process and
cannot merge the gauges we compute at scrape time from live objects (fills under way, the index totals, the pull
budget); it is switched on for a whole process by an environment variable, where tests run many mirrors in one
process, each with its own registry; and its files need their own life cycle. Here each worker stays exactly the
single-process mirror, and the price is plain: a worker that restarts (or misses a scrape) takes its counts out
of the sums, which Prometheus reads as a counter reset.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from dioproxy import status
from dioproxy.metrics import NAMESPACE, Families, merge

log = Logger()

#: The gauges only an exposition merged from several workers has.
SCRAPE_GAUGES = (f"{NAMESPACE}_scrape_workers", f"{NAMESPACE}_scrape_workers_missing")
#: How long a scrape waits for a sibling's exposition (a worker busy streaming answers in milliseconds).
SIBLING_TIMEOUT = 2.0
#: How long the status page waits for a sibling's share.
STATUS_TIMEOUT = 1.0


def socket_path(run_dir: str, index: int) -> str:
    return os.path.join(run_dir, f"worker-{index}.sock")


class _Endpoints:
    """``http://worker-<i>/``: worker ``i``'s private socket."""

    def __init__(self, reactor: Any, run_dir: str) -> None:
        self.reactor = reactor
        self.run_dir = run_dir

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        index = int(uri.host.decode("ascii").removeprefix("worker-"))
        return UNIXClientEndpoint(self.reactor, socket_path(self.run_dir, index), timeout=SIBLING_TIMEOUT)


class Siblings:
    """The other workers' expositions and status shares, fetched over their private sockets."""

    def __init__(self, mirror: Any, run_dir: str, index: int, count: int) -> None:
        self.mirror = mirror
        self.index = index
        self.count = count
        self.others = [i for i in range(count) if i != index]
        pool = HTTPConnectionPool(mirror.reactor, persistent=False)
        self.agent = Agent.usingEndpointFactory(mirror.reactor, _Endpoints(mirror.reactor, run_dir), pool=pool)

    async def exposition(self) -> bytes:
        """Every worker's metrics that answered in time, as one text exposition."""
        fetched = await defer.DeferredList([self._metrics(i) for i in self.others], consumeErrors=True)
        await _flushed(self.mirror)  # after the siblings wrote theirs: the index totals cover every worker
        families = [list(self.mirror.metrics.registry.collect())]
        for i, (ok, result) in zip(self.others, fetched):
            if ok:
                families.append(result)
            else:
                log.warn("worker {i} gave no metrics for this scrape: {e}", i=i, e=result.getErrorMessage())
        answered = GaugeMetricFamily(SCRAPE_GAUGES[0], "Workers whose metrics this exposition sums", len(families))
        missing = GaugeMetricFamily(
            SCRAPE_GAUGES[1],
            "Workers left out of this exposition (no answer within the deadline: their counts are missing)",
            len(self.others) + 1 - len(families),
        )
        families[0] += [answered, missing]
        return generate_latest(Families(merge(families)))

    async def shares(self) -> list[dict[str, Any]]:
        """Every worker's status share that came within :data:`STATUS_TIMEOUT`, ours first."""
        fetched = await defer.DeferredList([self._share(i) for i in self.others], consumeErrors=True)
        shares = [status.share(self.mirror, self.index)]
        for i, (ok, result) in zip(self.others, fetched):
            if ok:
                shares.append(result)
            else:
                log.warn("worker {i} gave no status for this page: {e}", i=i, e=result.getErrorMessage())
        return shares

    def _metrics(self, index: int) -> defer.Deferred:
        d = self._fetch(index, "metrics", SIBLING_TIMEOUT)
        d.addCallback(lambda body: list(text_string_to_metric_families(body.decode("utf-8"))))
        return d

    def _share(self, index: int) -> defer.Deferred:
        d = self._fetch(index, "status", STATUS_TIMEOUT)
        d.addCallback(json.loads)
        return d

    def _fetch(self, index: int, what: str, timeout: float) -> defer.Deferred:
        d = self.agent.request(b"GET", f"http://worker-{index}/{what}".encode())

        def read(response: Any) -> defer.Deferred:
            if response.code != 200:
                raise RuntimeError(f"HTTP {response.code}")
            return readBody(response)

        d.addCallback(read)
        d.addTimeout(timeout, self.mirror.reactor)
        return d


async def _flushed(mirror: Any) -> None:
    """The batched index changes written and the totals read back (so far as the index answers in time)."""
    if mirror.cache is None:
        return
    d = mirror.cache.flush()
    d.addTimeout(SIBLING_TIMEOUT, mirror.reactor)
    try:
        await d
    except Exception as e:  # a slow or failing index: the totals of our last call to it
        log.warn("cache index not flushed for the scrape: {e}", e=e)


class _OwnMetrics(resource.Resource):
    """This worker's own exposition, for a sibling's scrape."""

    isLeaf = True

    def __init__(self, mirror: Any) -> None:
        super().__init__()
        self.mirror = mirror

    def render_GET(self, request: server.Request) -> Any:
        d = defer.ensureDeferred(_flushed(self.mirror))

        def send(_: Any) -> None:
            request.setHeader("Content-Type", CONTENT_TYPE_LATEST)
            request.write(self.mirror.metrics.exposition())
            request.finish()

        d.addCallback(send)
        d.addErrback(lambda f: (log.failure("own metrics", f), request.loseConnection()))
        return server.NOT_DONE_YET


class _OwnStatus(resource.Resource):
    """This worker's share of the status page, for the sibling a browser reached."""

    isLeaf = True

    def __init__(self, mirror: Any, index: int) -> None:
        super().__init__()
        self.mirror, self.index = mirror, index

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader("Content-Type", "application/json")
        return json.dumps(status.share(self.mirror, self.index), separators=(",", ":")).encode()


class _QuietSite(server.Site):
    noisy = False

    def log(self, request: server.Request) -> None:
        """No access-log line: the public scrape that asked has its own."""


class OwnShare(service.Service):
    """Serves this worker's exposition and status share on its private socket in the run directory."""

    def __init__(self, mirror: Any, run_dir: str, index: int) -> None:
        self.mirror = mirror
        self.index = index
        self.path = socket_path(run_dir, index)
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by this worker's predecessor, which died
        root = resource.Resource()
        root.putChild(b"metrics", _OwnMetrics(self.mirror))
        root.putChild(b"status", _OwnStatus(self.mirror, self.index))
        self.port = self.mirror.reactor.listenUNIX(self.path, _QuietSite(root), mode=0o600)

    def stopService(self) -> Any:
        super().stopService()
        return self.port.stopListening() if self.port is not None else None
