"""The five scenarios of issue 4; each returns table rows and never raises for a failed measurement.

Every number comes from a client in its own process (:mod:`bench.clients`) or from ``/proc`` and the upstream's
access log, never from a server's own account. Each measurement is wrapped by :func:`attempt`: a failure becomes the
cell's text (``error: …``) and the run goes on, so one broken anchor does not hide the others.
"""

from __future__ import annotations

import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from . import clients
from .memory import Sampler, group_rss
from .plan import MB, Plan
from .report import Cell, Row, ratio
from .servers import CncfProxy, DioProxy, Nginx, Server
from .upstream import (
    IMAGE_REPOSITORY,
    IMAGE_TAG,
    MANIFEST_ACCEPT,
    MANIFEST_REPOSITORY,
    MANIFEST_TAG,
    Upstream,
)

_started = time.monotonic()


def say(message: str) -> None:
    """Progress on stderr; the table goes to stdout."""
    print(f"[bench {time.monotonic() - _started:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass
class Stage:
    """Everything the scenarios run against; ``down`` names servers that did not start, with why."""

    plan: Plan
    upstream: Upstream
    ours: DioProxy
    cncf: CncfProxy
    nginx: Nginx
    down: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Peak RSS of each proxy while scenario 3 ran; reported with scenario 4.
    cold_rss: dict[str, Cell] = field(default_factory=dict)

    @property
    def proxies(self) -> tuple[Server, Server]:
        return (self.ours, self.cncf)


def attempt(stage: Stage, server: Server, what: str, measure: Callable[[], float]) -> Cell:
    """``measure()``, or the error text if it (or the server) failed."""
    if server.name in stage.down:
        return f"{server.name} not running: {stage.down[server.name]}"
    try:
        value = measure()
    except Exception as e:
        say(f"{server.name}: {what}: FAILED {type(e).__name__}: {e}")
        return f"{type(e).__name__}: {e}"
    say(f"{server.name}: {what}: {value:.4g}")
    return value


def _number(cell: Cell) -> float | None:
    return cell if isinstance(cell, (int, float)) else None


def _get(url: str, headers: dict[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read()


# -- 1 -------------------------------------------------------------------------------------------------------------


def cached_manifest(stage: Stage) -> list[Row]:
    """wrk on a cached tag, the Accept header of a real client; nginx serves a static file of the same bytes."""
    plan, path = stage.plan, f"/v2/{MANIFEST_REPOSITORY}/manifests/{MANIFEST_TAG}"
    headers = {"Accept": MANIFEST_ACCEPT}

    def load(url: str) -> Callable[[], float]:
        def measure() -> float:
            body = _get(url, headers)  # the first request fills the cache
            if body != stage.upstream.manifest:
                raise RuntimeError(f"served {len(body)} bytes that are not the upstream's manifest")
            result = clients.wrk(url, plan.wrk_seconds, plan.wrk_connections, headers)
            if result.errors > result.requests / 100:
                raise RuntimeError(f"{result.errors} of {result.requests} requests failed")
            return result.requests_per_second

        return measure

    ours = attempt(stage, stage.ours, "cached tag req/s", load(stage.ours.url + path))
    cncf = attempt(stage, stage.cncf, "cached tag req/s", load(stage.cncf.url + path))
    nginx = attempt(stage, stage.nginx, "static file req/s", load(stage.nginx.url + "/manifests/benchhello"))
    vs_cncf, vs_nginx = ratio(ours, cncf), ratio(ours, nginx)
    return [
        Row(
            "1",
            f"cached tag manifest, wrk {plan.wrk_connections} connections",
            "req/s",
            ours,
            cncf,
            nginx,
            _ratios((vs_cncf, "CNCF"), (vs_nginx, "nginx")),
            "≥ 20x CNCF",
            None if vs_cncf is None else vs_cncf >= 20,
        )
    ]


def _ratios(*pairs: tuple[float | None, str]) -> str:
    parts = [f"{value:.2f}x {name}" if value < 10 else f"{value:.0f}x {name}" for value, name in pairs if value]
    return ", ".join(parts) or "-"


# -- 2 -------------------------------------------------------------------------------------------------------------


def warm_blob(stage: Stage) -> list[Row]:
    """A cached 256 MB blob to curl: one stream (median of ``repeats``), then ``warm_streams`` at once."""
    plan, blob = stage.plan, stage.upstream.blobs["warm"]
    urls = {
        stage.ours.name: stage.ours.url + blob.url_path(),
        stage.cncf.name: stage.cncf.url + blob.url_path(),
        stage.nginx.name: stage.nginx.url + "/blobs/warm",
    }
    for proxy in stage.proxies:  # the cold download that makes it warm (through the far link)
        attempt(stage, proxy, "priming the warm blob (s)", lambda u=urls[proxy.name]: _prime(u, blob.digest))

    def single(url: str) -> Callable[[], float]:
        def measure() -> float:
            times = [clients.curl_streams(url, 1)[2][0] for _ in range(plan.repeats)]
            return blob.size / statistics.median(times) / MB

        return measure

    def parallel(url: str) -> Callable[[], float]:
        def measure() -> float:
            wall, total, _ = clients.curl_streams(url, plan.warm_streams)
            if total != blob.size * plan.warm_streams:
                raise RuntimeError(f"got {total} bytes, not {plan.warm_streams} x {blob.size}")
            return total / wall / MB

        return measure

    rows = []
    size = f"{blob.size / MB:.0f} MB"
    for label, how in (("1 stream", single), (f"{plan.warm_streams} streams", parallel)):
        ours, cncf, nginx = (
            attempt(stage, server, f"warm blob {label} MB/s", how(urls[server.name]))
            for server in (stage.ours, stage.cncf, stage.nginx)
        )
        vs_nginx = ratio(ours, nginx)
        rows.append(
            Row(
                "2",
                f"warm {size} blob, {label}",
                "MB/s",
                ours,
                cncf,
                nginx,
                _ratios((vs_nginx, "nginx"), (ratio(ours, cncf), "CNCF")),
                "≥ 0.9x nginx",
                None if vs_nginx is None else vs_nginx >= 0.9,
            )
        )
    return rows


def _prime(url: str, digest: str) -> float:
    return clients.fetch(url, 1, digest).total


# -- 3 -------------------------------------------------------------------------------------------------------------


@dataclass
class Cold:
    ttfb: Cell = None
    total: Cell = None
    crowd: Cell = None
    gets: Cell = None


def cold_blob(stage: Stage) -> list[Row]:
    """Uncached blobs through the far link: one client (first body byte, total), then 16 clients of another blob."""
    plan, upstream = stage.plan, stage.upstream
    one, crowd = upstream.blobs["cold-1"], upstream.blobs["cold-16"]
    results: dict[str, Cold] = {}
    for proxy in stage.proxies:
        result = results[proxy.name] = Cold()
        if proxy.name in stage.down:
            result.ttfb = result.total = result.crowd = result.gets = f"not running: {stage.down[proxy.name]}"
            stage.cold_rss[proxy.name] = result.ttfb
            continue
        with Sampler(proxy.pid) as sampler:
            single: dict[str, float] = {}

            def first(proxy: Server = proxy, single: dict[str, float] = single) -> float:
                fetched = clients.fetch(proxy.url + one.url_path(), 1, one.digest)
                single["total"] = fetched.total
                return fetched.ttfb

            result.ttfb = attempt(stage, proxy, "cold blob, 1 client, first body byte (s)", first)
            result.total = single.get("total", result.ttfb)
            mark = upstream.log_offset()
            result.crowd = attempt(
                stage,
                proxy,
                f"cold blob, {plan.cold_clients} clients, total (s)",
                lambda proxy=proxy: clients.fetch(proxy.url + crowd.url_path(), plan.cold_clients, crowd.digest).wall,
            )
            time.sleep(0.5)  # the registry writes its access-log line after the response
            result.gets = attempt(
                stage, proxy, "upstream GETs for the crowd", lambda mark=mark: upstream.blob_gets(mark, crowd.digest)
            )
        stage.cold_rss[proxy.name] = sampler.peak_mb
    ours, cncf = results[stage.ours.name], results[stage.cncf.name]
    share = ratio(ours.ttfb, ours.total)
    growth = ratio(ours.crowd, ours.total)
    size = f"{one.size / MB:.0f} MB"
    stage.notes.append(
        f"Scenario 3: the far link carries {plan.link_rate / MB:.0f} MB/s in total (one relay per proxy), so one "
        f"{size} blob needs at least {plan.link_floor:.2f} s."
    )
    return [
        Row(
            "3",
            f"cold {size} blob, 1 client: first body byte",
            "s",
            ours.ttfb,
            cncf.ttfb,
            None,
            f"{share:.1%} of total" if share is not None else "-",
            "≤ 25% of total",
            None if share is None else share <= 0.25,
        ),
        Row(
            "3",
            f"cold {size} blob, 1 client: total",
            "s",
            ours.total,
            cncf.total,
            None,
            _ratios((ratio(ours.total, cncf.total), "CNCF"), (ratio(ours.total, plan.link_floor), "link floor")),
            "-",
        ),
        Row(
            "3",
            f"cold {size} blob, {plan.cold_clients} clients: total",
            "s",
            ours.crowd,
            cncf.crowd,
            None,
            f"{growth:.2f}x one client" if growth is not None else "-",
            "≤ 1.3x one client",
            None if growth is None else growth <= 1.3,
        ),
        Row(
            "3",
            f"cold blob, {plan.cold_clients} clients: upstream blob GETs",
            "GETs",
            ours.gets,
            cncf.gets,
            None,
            "-",
            "exactly 1",
            None if _number(ours.gets) is None else ours.gets == 1,
            target_value=1,
        ),
    ]


# -- 4 -------------------------------------------------------------------------------------------------------------


def memory(stage: Stage) -> list[Row]:
    """Peak RSS of each server's process group with 32 readers at 4 MB/s of a 256 MB blob that starts cold."""
    plan, blob = stage.plan, stage.upstream.blobs["memory"]
    urls = {
        stage.ours.name: stage.ours.url + blob.url_path(),
        stage.cncf.name: stage.cncf.url + blob.url_path(),
        stage.nginx.name: stage.nginx.url + "/blobs/memory",
    }
    served: dict[str, float] = {}

    def measure(server: Server) -> Callable[[], float]:
        def run() -> float:
            idle = group_rss(server.pid) / MB
            with Sampler(server.pid) as sampler:
                got = clients.slow_readers(urls[server.name], plan.slow_readers, plan.slow_rate, plan.slow_seconds)
            served[server.name] = sum(got) / MB
            stage.notes.append(
                f"Scenario 4, {server.name}: {idle:.0f} MB resident before, {sum(got) / MB:.0f} MB served to "
                f"{plan.slow_readers} readers in {plan.slow_seconds:g} s."
            )
            return sampler.peak_mb

        return run

    what = f"{plan.slow_readers} slow readers, peak RSS (MB)"
    ours, cncf, nginx = (attempt(stage, s, what, measure(s)) for s in (stage.ours, stage.cncf, stage.nginx))
    target = plan.memory_target_mb
    rows = [
        Row(
            "4",
            f"{plan.slow_readers} readers at {plan.slow_rate / MB:.0f} MB/s, cold {blob.size / MB:.0f} MB blob: RSS",
            "MB",
            ours,
            cncf,
            nginx,
            _ratios((ratio(ours, cncf), "CNCF")),
            f"≤ {target:.0f} MB",
            None if _number(ours) is None else ours <= target,
            target_value=target,
        )
    ]
    ours3, cncf3 = (stage.cold_rss.get(p.name, "scenario 3 did not run") for p in stage.proxies)
    rows.append(
        Row(
            "4",
            "during scenario 3: peak RSS",
            "MB",
            ours3,
            cncf3,
            None,
            _ratios((ratio(ours3, cncf3), "CNCF")),
            f"≤ {target:.0f} MB",
            None if _number(ours3) is None else ours3 <= target,
            target_value=target,
        )
    )
    return rows


# -- 5 -------------------------------------------------------------------------------------------------------------


def image_pulls(stage: Stage) -> list[Row]:
    """``skopeo copy`` of a whole image to an OCI directory: the first pull (cold, through the far link), then warm."""
    plan, reference = stage.plan, f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
    cold: dict[str, Cell] = {}
    warm: dict[str, Cell] = {}
    for proxy in stage.proxies:
        address = proxy.url.removeprefix("http://")
        cold[proxy.name] = attempt(stage, proxy, "skopeo cold (s)", lambda a=address: clients.skopeo_pull(a, reference))
        warm[proxy.name] = attempt(
            stage,
            proxy,
            "skopeo warm (s)",
            lambda a=address: statistics.median(clients.skopeo_pull(a, reference) for _ in range(plan.repeats)),
        )
    rows = []
    for label, values in (("cold", cold), ("warm", warm)):
        ours, cncf = values[stage.ours.name], values[stage.cncf.name]
        vs = ratio(ours, cncf)
        rows.append(
            Row(
                "5",
                f"skopeo copy of a {plan.image_layer_mib} MiB image, {label}",
                "s",
                ours,
                cncf,
                None,
                _ratios((vs, "CNCF")),
                "≤ 1x CNCF",
                None if vs is None else vs <= 1.0,
            )
        )
    return rows


#: In the order they run: memory last, because the CNCF proxy may go on downloading for readers that have left.
SCENARIOS: dict[str, Callable[[Stage], list[Row]]] = {
    "1": cached_manifest,
    "2": warm_blob,
    "3": cold_blob,
    "5": image_pulls,
    "4": memory,
}
