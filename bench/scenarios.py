"""The five scenarios of issue 4, the shared tier's of issue 10 (:mod:`bench.tier`), and ``--workers``' and the
fleet's of issue 11 (:mod:`bench.workers`, :mod:`bench.fleet`); each returns table rows and never raises for a
failed measurement.

Every number comes from a client in its own process (:mod:`bench.clients`) or from ``/proc`` and the upstream's
access log, never from a server's own account. Each measurement is wrapped by :func:`attempt`: a failure becomes the
cell's text (``error: …``) and the run goes on, so one broken anchor does not hide the others.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import clients
from .memory import Sampler, group_cpu, group_rss
from .plan import MB, Plan
from .profile import Profiler, slug
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
    #: With ``--profile``: where py-spy's samples of dioproxy go, one file per measurement.
    profile_dir: Path | None = None

    @property
    def proxies(self) -> tuple[Server, Server]:
        return (self.ours, self.cncf)


def attempt(stage: Stage, server: Server, what: str, measure: Callable[[], float], profile: bool = True) -> Cell:
    """``measure()``, or the error text if it (or the server) failed; with ``--profile``, dioproxy is sampled."""
    if server.name in stage.down:
        return f"{server.name} not running: {stage.down[server.name]}"
    profiling: contextlib.AbstractContextManager = contextlib.nullcontext()
    if stage.profile_dir is not None and isinstance(server, DioProxy) and profile:
        # Named after the server too when there are several dioproxies (the shared tier's, 1 and 2 workers).
        name = what if server.name == DioProxy.name else f"{server.name} {what}"
        profiling = Profiler(server.pid, stage.profile_dir / f"{slug(name)}.raw")
    try:
        with profiling:
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


@dataclass
class Wrk:
    """What :func:`wrk_rounds` measured, per server name: the figure (the median req/s, or why there is none), the
    req/s (or error) of each run, and ``[CPU seconds, requests]`` of the server's process group over all runs."""

    figures: dict[str, Cell]
    runs: dict[str, list[Cell]]
    cpu: dict[str, list[float]]


def wrk_rounds(stage: Stage, urls: dict[Server, str]) -> Wrk:
    """wrk on the cached tag at each of ``urls`` (a server's URL of the tag, or nginx's static copy of its bytes),
    with the Accept header of a real client.

    First one GET each, which fills the cache and must return the upstream's manifest bytes: a server that answers
    wrong (or not at all) gets no load. Then ``wrk_rounds`` runs of ``wrk_seconds / wrk_rounds`` each, the servers in
    turn, median reported: a neighbour's burst of CPU on a shared machine then spoils one short run of one server,
    not a whole figure.
    """
    plan, headers = stage.plan, {"Accept": MANIFEST_ACCEPT}
    cpu: dict[str, list[float]] = {server.name: [0.0, 0] for server in urls}  # seconds, requests
    runs: dict[str, list[Cell]] = {server.name: [] for server in urls}
    wrong: dict[str, Cell] = {}

    def check(url: str) -> float:
        body = _get(url, headers)  # the first request fills the cache
        if body != stage.upstream.manifest:
            raise RuntimeError(f"served {len(body)} bytes that are not the upstream's manifest")
        return len(body)

    for server, url in urls.items():
        answer = attempt(stage, server, "manifest bytes", lambda url=url: check(url), False)
        if isinstance(answer, str):
            wrong[server.name] = answer  # no load on a server that answers wrong (or not at all)
    for _ in range(plan.wrk_rounds):
        for server, url in urls.items():
            if server.name in wrong:
                continue

            def measure(server: Server = server, url: str = url) -> float:
                before = group_cpu(server.pid)
                result = clients.wrk(url, plan.wrk_seconds / plan.wrk_rounds, plan.wrk_connections, headers)
                cpu[server.name][0] += group_cpu(server.pid) - before
                cpu[server.name][1] += result.requests
                if result.errors > result.requests / 100:
                    raise RuntimeError(f"{result.errors} of {result.requests} requests failed")
                return result.requests_per_second

            runs[server.name].append(attempt(stage, server, "cached tag req/s", measure))
    figures = {server.name: wrong.get(server.name) or _median(runs[server.name]) for server in urls}
    return Wrk(figures, runs, cpu)


def cached_manifest(stage: Stage) -> list[Row]:
    """wrk on a cached tag (:func:`wrk_rounds`); nginx serves a static file of the same bytes."""
    plan, path = stage.plan, f"/v2/{MANIFEST_REPOSITORY}/manifests/{MANIFEST_TAG}"
    measured = wrk_rounds(
        stage,
        {
            stage.ours: stage.ours.url + path,
            stage.cncf: stage.cncf.url + path,
            stage.nginx: stage.nginx.url + "/manifests/benchhello",
        },
    )
    cpu = measured.cpu
    ours, cncf, nginx = (measured.figures[server.name] for server in (stage.ours, stage.cncf, stage.nginx))
    stage.notes.append(
        "Scenario 1: CPU time per request: "
        + ", ".join(f"{name} {c[0] / c[1] * 1e6:.0f} µs" for name, c in cpu.items() if c[1])
        + " (the CNCF proxy's includes its HEAD to the upstream, which the upstream's CPU is not counted for)."
    )
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
    parts = [f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f}x {name}" for value, name in pairs if value]
    return ", ".join(parts) or "-"


# -- 2 -------------------------------------------------------------------------------------------------------------


def warm_blob(stage: Stage) -> list[Row]:
    """A cached 256 MB blob to curl: one stream, then ``warm_streams`` at once; rounds interleave the servers.

    On two shared cores one run of one server is at the mercy of whatever else runs that second, so each figure is
    the median of ``rounds`` runs taken in turn (ours, CNCF, nginx, ours, …). The CPU time each server spent per
    GB served, read from ``/proc``, goes into the notes: unlike MB/s it does not depend on how fast the client is.
    """
    plan, blob = stage.plan, stage.upstream.blobs["warm"]
    servers = (stage.ours, stage.cncf, stage.nginx)
    urls = {
        stage.ours.name: stage.ours.url + blob.url_path(),
        stage.cncf.name: stage.cncf.url + blob.url_path(),
        stage.nginx.name: stage.nginx.url + "/blobs/warm",
    }
    for proxy in stage.proxies:  # the cold download that makes it warm (through the far link)
        attempt(stage, proxy, "priming the warm blob (s)", lambda u=urls[proxy.name]: _prime(u, blob.digest))

    rows = []
    size = f"{blob.size / MB:.0f} MB"
    for streams in (1, plan.warm_streams):
        label = "1 stream" if streams == 1 else f"{streams} streams"
        runs: dict[str, list[Cell]] = {server.name: [] for server in servers}
        cpu: dict[str, list[float]] = {server.name: [0.0, 0.0] for server in servers}  # seconds, bytes
        for _ in range(plan.rounds if streams == 1 else max(1, plan.rounds // 2)):
            for server in servers:

                def measure(server: Server = server, streams: int = streams, cpu: dict = cpu) -> float:
                    before = group_cpu(server.pid)
                    wall, total, times = clients.curl_streams(urls[server.name], streams)
                    cpu[server.name][0] += group_cpu(server.pid) - before
                    cpu[server.name][1] += total
                    if total != blob.size * streams:
                        raise RuntimeError(f"got {total} bytes, not {streams} x {blob.size}")
                    # One stream: curl's own clock, which leaves out starting the curl process.
                    return total / (times[0] if streams == 1 else wall) / MB

                runs[server.name].append(attempt(stage, server, f"warm blob {label} MB/s", measure))
        ours, cncf, nginx = (_median(runs[server.name]) for server in servers)
        stage.notes.append(
            f"Scenario 2, {label}: CPU seconds per GB served: "
            + ", ".join(f"{name} {c[0] / (c[1] / 1e9):.2f}" for name, c in cpu.items() if c[1])
            + f" (summed over {len(runs[stage.ours.name])} runs each; the throughput above is their median)."
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


def _median(cells: list[Cell]) -> Cell:
    """The median of the runs that produced a number; the first error if none did."""
    numbers = [c for c in cells if isinstance(c, (int, float))]
    if numbers:
        return statistics.median(numbers)
    return next((c for c in cells if isinstance(c, str)), None)


def _prime(url: str, digest: str) -> float:
    return clients.fetch(url, 1, digest).total


# -- 3 -------------------------------------------------------------------------------------------------------------


@dataclass
class Cold:
    ttfb: Cell = None
    total: Cell = None
    crowd: Cell = None
    gets_one: Cell = None
    gets: Cell = None


def cold_blob(stage: Stage) -> list[Row]:
    """Uncached blobs through the far link: one client (first body byte, total), then 16 clients of another blob."""
    plan, upstream = stage.plan, stage.upstream
    one, crowd = upstream.blobs["cold-1"], upstream.blobs["cold-16"]
    results: dict[str, Cold] = {}
    for proxy in stage.proxies:
        result = results[proxy.name] = Cold()
        if proxy.name in stage.down:
            result.ttfb = f"not running: {stage.down[proxy.name]}"
            result.total = result.crowd = result.gets_one = result.gets = result.ttfb
            stage.cold_rss[proxy.name] = result.ttfb
            continue
        with Sampler(proxy.pid) as sampler:
            single: dict[str, float] = {}

            def first(proxy: Server = proxy, single: dict[str, float] = single) -> float:
                fetched = clients.fetch(proxy.url + one.url_path(), 1, one.digest)
                single["total"] = fetched.total
                return fetched.ttfb

            mark = upstream.log_offset()
            result.ttfb = attempt(stage, proxy, "cold blob, 1 client, first body byte (s)", first)
            result.total = single.get("total", result.ttfb)
            time.sleep(0.5)  # the registry writes its access-log line after the response
            result.gets_one = attempt(
                stage,
                proxy,
                "upstream GETs for one client",
                lambda mark=mark: upstream.blob_gets(mark, one.digest),
                False,
            )
            mark = upstream.log_offset()
            result.crowd = attempt(
                stage,
                proxy,
                f"cold blob, {plan.cold_clients} clients, total (s)",
                lambda proxy=proxy: clients.fetch(proxy.url + crowd.url_path(), plan.cold_clients, crowd.digest).wall,
            )
            time.sleep(0.5)
            result.gets = attempt(
                stage,
                proxy,
                "upstream GETs for the crowd",
                lambda mark=mark: upstream.blob_gets(mark, crowd.digest),
                False,
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
            "cold blob, 1 client: upstream blob GETs",
            "GETs",
            ours.gets_one,
            cncf.gets_one,
            None,
            "-",
            "exactly 1",
            None if _number(ours.gets_one) is None else ours.gets_one == 1,
            target_value=1,
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

    def measure(server: Server) -> Callable[[], float]:
        def run() -> float:
            idle = group_rss(server.pid) / MB
            with Sampler(server.pid) as sampler:
                got = clients.slow_readers(urls[server.name], plan.slow_readers, plan.slow_rate, plan.slow_seconds)
            stage.notes.append(
                f"Scenario 4, {server.name}: {idle:.0f} MB resident before, {sum(got) / MB:.0f} MB served to "
                f"{plan.slow_readers} readers in {plan.slow_seconds:g} s; peak PSS {sampler.peak_pss_mb:.0f} MB."
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


# -- 6 -------------------------------------------------------------------------------------------------------------


def shared_tier(stage: Stage) -> list[Row]:
    """The shared tier on a real SeaweedFS: see :mod:`bench.tier` (which builds on this module)."""
    from .tier import shared_tier as run

    return run(stage)


# -- 7 -------------------------------------------------------------------------------------------------------------


def workers(stage: Stage) -> list[Row]:
    """``--workers 2`` against one worker: see :mod:`bench.workers` (which builds on this module)."""
    from .workers import workers as run

    return run(stage)


# -- 8 -------------------------------------------------------------------------------------------------------------


def fleet(stage: Stage) -> list[Row]:
    """A cold blob over 3 replicas on one Redis and one bucket, against 16 clients on one and the CNCF proxy on
    shared storage: see :mod:`bench.fleet` (which builds on this module)."""
    from .fleet import fleet as run

    return run(stage)


#: In the order they run: memory last, because the CNCF proxy may go on downloading for readers that have left;
#: the shared tier, the workers and the fleet before it, their servers stopped when they end.
SCENARIOS: dict[str, Callable[[Stage], list[Row]]] = {
    "1": cached_manifest,
    "2": warm_blob,
    "3": cold_blob,
    "5": image_pulls,
    "6": shared_tier,
    "7": workers,
    "8": fleet,
    "4": memory,
}
