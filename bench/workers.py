"""Scenario 7, all cores (issue 11 section 4): ``--workers 2`` against one worker, side by side in one run.

Two more mirrors with fresh caches, each behind its own far link (a relay like the stage's), both started with the
stage's proxy command and an explicit ``--workers``: ``dioproxy, 1 worker`` (the table's fifth column) and
``dioproxy, 2 workers`` (its ``dioproxy`` column). The rows:

- the cached tag with wrk, the two mirrors and nginx in turn; target: 2 workers ≥ 1.7x one;
- a warm 256 MB blob to 8 concurrent curls, the same three in turn; target: 2 workers ≥ 1.0x nginx serving the file;
- a cold blob to one curl, then another to 16 concurrent curls, every curl writing its own file on the mirrors'
  disk (a client keeps what it pulls; /dev/null would hide the cost of the writes competing with the fill), two
  fresh blobs per mirror and round; target: 16 clients ≤ 1.3x the time of one client. Every download must be a
  single upstream GET, counted in the upstream's access log: a round with another count is an error, and so is
  its row. Each file is checked against the digest once the clock has stopped.

The times are wall clock from starting the curls to the last one ending, for one client as for 16.
"""

from __future__ import annotations

import contextlib
import hashlib
import shlex
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import clients
from .memory import group_cpu
from .plan import MB
from .report import Cell, Row, ratio
from .scenarios import Stage, _median, _prime, _ratios, attempt, say, wrk_rounds
from .servers import DioProxy, Relay, Server
from .upstream import MANIFEST_REPOSITORY, MANIFEST_TAG, BlobFile

TAG_TARGET = 1.7
WARM_TARGET = 1.0
COLD_TARGET = 1.3


class _Mirrors:
    """The 1-worker and 2-worker mirrors, their relays, and where their curls write."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        base = stage.ours.base.parent / "workers"
        command = shlex.join(stage.ours.daemon.argv[: stage.ours.daemon.argv.index("--port")])
        self.relays: dict[int, Relay] = {}
        self.mirrors: dict[int, DioProxy] = {}
        for n in (1, 2):
            self.relays[n] = Relay(base / f"relay-{n}", stage.upstream.address, stage.plan.link_rate)
            name = "dioproxy, 1 worker" if n == 1 else f"dioproxy, {n} workers"
            # Appended after the command's own options: an explicit --workers wins over a --proxy-arg one.
            self.mirrors[n] = DioProxy(base / f"mirror-{n}", self.relays[n].url, command, ["--workers", str(n)], name)
        self.downloads = base / "downloads"
        self.downloads.mkdir(parents=True)

    def start(self) -> None:
        for n in (1, 2):
            for server in (self.relays[n], self.mirrors[n]):
                try:
                    server.start()
                except Exception as e:
                    say(f"{server.name} did not start: {e}")
                    self.stage.down[server.name] = str(e).splitlines()[0]
                    break  # no mirror without its relay

    def stop(self) -> None:
        for server in (*self.mirrors.values(), *self.relays.values()):
            with contextlib.suppress(Exception):
                server.stop()


def workers(stage: Stage) -> list[Row]:
    """Tag, warm and cold rows for ``--workers 2`` against one worker (see the module's docstring)."""
    pair = _Mirrors(stage)
    try:
        pair.start()
        one, two = pair.mirrors[1], pair.mirrors[2]
        return [_tag(stage, one, two), _warm(stage, one, two), *_cold(stage, pair)]
    finally:
        pair.stop()


def _strict(cells: list[Cell]) -> Cell:
    """The median, unless a round failed: then that round's error (a wrong GET count must not be outvoted)."""
    return next((c for c in cells if isinstance(c, str)), None) or _median(cells)


def _per(cpu: dict[str, list[float]], scale: float, digits: int, unit: str = "") -> str:
    """CPU seconds per counted thing (request, byte) times ``scale``, for every server that counted any."""
    return ", ".join(f"{name} {c[0] / c[1] * scale:.{digits}f}{unit}" for name, c in cpu.items() if c[1])


# -- the cached tag ----------------------------------------------------------------------------------------------


def _tag(stage: Stage, one: DioProxy, two: DioProxy) -> Row:
    """wrk on the cached tag, in ``wrk_rounds`` turns of 1 worker, 2 workers and nginx's static copy."""
    plan, path = stage.plan, f"/v2/{MANIFEST_REPOSITORY}/manifests/{MANIFEST_TAG}"
    measured = wrk_rounds(
        stage, {one: one.url + path, two: two.url + path, stage.nginx: stage.nginx.url + "/manifests/benchhello"}
    )
    cpu, runs = measured.cpu, measured.runs
    single, ours, nginx = (measured.figures[s.name] for s in (one, two, stage.nginx))
    stage.notes.append(
        f"Scenario 7, cached tag: CPU time per request (all processes of each server): {_per(cpu, 1e6, 0, ' µs')}; "
        f"req/s of each wrk run: "
        + "; ".join(f"{name} " + ", ".join(_text(c) for c in cells) for name, cells in runs.items())
        + "."
    )
    vs_one = ratio(ours, single)
    return Row(
        "7",
        f"--workers 2: cached tag manifest, wrk {plan.wrk_connections} connections",
        "req/s",
        ours,
        nginx=nginx,
        single=single,
        ratio=_ratios((vs_one, "1 worker"), (ratio(ours, nginx), "nginx")),
        target=f"≥ {TAG_TARGET}x 1 worker",
        met=None if vs_one is None else vs_one >= TAG_TARGET,
    )


# -- the warm blob -----------------------------------------------------------------------------------------------


def _warm(stage: Stage, one: DioProxy, two: DioProxy) -> Row:
    """``warm_streams`` curls of the cached warm blob, in turns of 1 worker, 2 workers and nginx serving the file."""
    plan, blob, streams = stage.plan, stage.upstream.blobs["warm"], stage.plan.warm_streams
    servers: tuple[Server, ...] = (one, two, stage.nginx)
    urls = {one.name: one.url + blob.url_path(), two.name: two.url + blob.url_path()}
    urls[stage.nginx.name] = stage.nginx.url + "/blobs/warm"
    for mirror in (one, two):  # the cold download that makes it warm (through the far link)
        attempt(stage, mirror, "priming the warm blob (s)", lambda u=urls[mirror.name]: _prime(u, blob.digest))
    runs: dict[str, list[Cell]] = {s.name: [] for s in servers}
    cpu: dict[str, list[float]] = {s.name: [0.0, 0.0] for s in servers}  # seconds, bytes
    for _ in range(max(1, plan.rounds // 2)):
        for server in servers:

            def measure(server: Server = server) -> float:
                before = group_cpu(server.pid)
                wall, total, _ = clients.curl_streams(urls[server.name], streams)
                cpu[server.name][0] += group_cpu(server.pid) - before
                cpu[server.name][1] += total
                if total != blob.size * streams:
                    raise RuntimeError(f"got {total} bytes, not {streams} x {blob.size}")
                return total / wall / MB

            runs[server.name].append(attempt(stage, server, f"warm blob {streams} streams MB/s", measure))
    single, ours, nginx = (_median(runs[s.name]) for s in servers)
    stage.notes.append(
        f"Scenario 7, warm blob, {streams} streams: CPU seconds per GB served: {_per(cpu, 1e9, 2)}; MB/s of each "
        "run: " + "; ".join(f"{name} " + ", ".join(_text(c) for c in cells) for name, cells in runs.items()) + "."
    )
    vs_nginx = ratio(ours, nginx)
    return Row(
        "7",
        f"--workers 2: warm {blob.size / MB:.0f} MB blob, {streams} streams",
        "MB/s",
        ours,
        nginx=nginx,
        single=single,
        ratio=_ratios((vs_nginx, "nginx"), (ratio(ours, single), "1 worker")),
        target=f"≥ {WARM_TARGET}x nginx",
        met=None if vs_nginx is None else vs_nginx >= WARM_TARGET,
    )


# -- the cold blob, clients writing to disk ----------------------------------------------------------------------


def _same_file(path: Path, blob: BlobFile) -> None:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            sha.update(chunk)
    if "sha256:" + sha.hexdigest() != blob.digest:
        raise RuntimeError(f"{path.name}: {path.stat().st_size} bytes that are not the blob")


def _served_by(mirror: DioProxy, blob: BlobFile) -> str:
    """Requests for ``blob`` in the mirror's access log, per worker (``4+12``), from its ``[worker I]`` prefixes."""
    counts: dict[str, int] = {}
    for line in (mirror.base / "dioproxy.log").read_text(errors="replace").splitlines():
        if "dioproxy.access" in line and f"GET {blob.url_path()} " in line:
            worker = line.split("[worker ", 1)[1].split("]", 1)[0] if "[worker " in line else "-"
            counts[worker] = counts.get(worker, 0) + 1
    return "+".join(str(counts[w]) for w in sorted(counts))


@dataclass(frozen=True)
class Download:
    """What :func:`to_disk` saw: the wall time, each curl's own time (stream order), and the upstream's GETs of the
    blob meanwhile: those that sent it (2xx) and the others (a 401 challenge before a token)."""

    wall: float
    times: list[float]
    gets: int
    others: int


def to_disk(stage: Stage, urls: str | Sequence[str], blob: BlobFile, count: int, into: Path) -> Download:
    """``count`` concurrent curls of the cold ``blob``, round robin over ``urls``, each into its own file in the
    fresh directory ``into`` (removed afterwards). Raises if a file is not the blob; each is checked once the clock
    has stopped."""
    into.mkdir()
    try:
        mark = stage.upstream.log_offset()
        wall, _, times = clients.curl_streams(urls, count, into=into)
        for i in range(count):
            _same_file(into / f"stream-{i}", blob)
        time.sleep(0.5)  # the registry writes its access-log line after the response
        gets, others = stage.upstream.blob_downloads(mark, blob.digest)
        return Download(wall, times, gets, others)
    finally:
        shutil.rmtree(into, ignore_errors=True)


def _to_disk(
    stage: Stage, mirror: DioProxy, blob: BlobFile, count: int, into: Path, challenges: list[int], spread: list[str]
) -> Callable[[], float]:
    """:func:`to_disk` of one mirror: the wall time; errors if the upstream sent the blob other than once (GETs
    without the bytes, 401s, are added to ``challenges``). For a crowd, how its requests spread over the workers
    and its curls' times go to ``spread``."""

    def run() -> float:
        got = to_disk(stage, mirror.url + blob.url_path(), blob, count, into)
        if got.gets != 1:
            raise RuntimeError(f"{got.gets} upstream GETs sent the blob for {count} clients, not 1")
        challenges[0] += got.others
        if count > 1:  # per worker, and the fastest and slowest curl's own time: a stall shows here
            spread.append(f"{_served_by(mirror, blob)} ({min(got.times):.2f}-{max(got.times):.2f} s)")
        return got.wall

    return run


def _cold(stage: Stage, pair: _Mirrors) -> list[Row]:
    """``worker_rounds`` rounds; each seeds two fresh blobs per mirror: one for one curl, one for the crowd."""
    plan, upstream = stage.plan, stage.upstream
    crowd = plan.cold_clients
    alone: dict[int, list[Cell]] = {1: [], 2: []}
    many: dict[int, list[Cell]] = {1: [], 2: []}
    challenges = {1: [0], 2: [0]}  # GETs answered without the blob (a worker's first 401), per mirror
    spread: dict[int, list[str]] = {1: [], 2: []}
    for r in range(plan.worker_rounds):
        blobs = {
            (n, count): upstream.add_blob(f"workers-{n}-{count}-{r}", plan.cold_blob)
            for n in (1, 2)
            for count in (1, crowd)
        }
        for count, cells in ((1, alone), (crowd, many)):
            for n, mirror in pair.mirrors.items():
                what = f"cold blob, {count} curl{'s' if count > 1 else ''} to disk, total (s)"
                into = pair.downloads / f"{n}-{count}-{r}"
                measure = _to_disk(stage, mirror, blobs[n, count], count, into, challenges[n], spread[n])
                cells[n].append(attempt(stage, mirror, what, measure))
    one_alone, two_alone = (_median(alone[n]) for n in (1, 2))
    one_many, two_many = (_strict(many[n]) for n in (1, 2))
    per_round = {n: ", ".join(_text(ratio(m, a), 2) for a, m in zip(alone[n], many[n])) for n in (1, 2)}
    stage.notes.append(
        f"Scenario 7, cold: {plan.worker_rounds} rounds, two fresh {plan.cold_blob / MB:.0f} MB blobs per mirror "
        f"each, {plan.link_rate / MB:.0f} MB/s far link per mirror; every file checked against the digest, every "
        f"download one upstream GET that sent the blob (besides, GETs answered 401, a worker's first ask before it "
        f"had a token: 1 worker {challenges[1][0]}, 2 workers {challenges[2][0]}). {crowd} clients / one client "
        f"per round: 1 worker {per_round[1]}; 2 workers {per_round[2]}. The {crowd} requests per worker (and "
        f"their curls' times) each round: 1 worker {', '.join(spread[1]) or '-'}; --workers 2 "
        f"{', '.join(spread[2]) or '-'}."
    )
    size = f"{plan.cold_blob / MB:.0f} MB"
    rows = [
        Row(
            "7",
            f"cold {size} blob, 1 curl writing to disk: total",
            "s",
            two_alone,
            single=one_alone,
            ratio=_ratios(
                (ratio(two_alone, plan.link_floor), "link floor (2 workers)"),
                (ratio(one_alone, plan.link_floor), "link floor (1 worker)"),
            ),
        )
    ]
    for n, alone_cell, many_cell in ((1, one_alone, one_many), (2, two_alone, two_many)):
        growth = ratio(many_cell, alone_cell)
        rows.append(
            Row(
                "7",
                f"cold {size} blob, {crowd} curls writing to disk, "
                + ("1 worker" if n == 1 else "--workers 2")
                + ": total",
                "s",
                many_cell if n == 2 else None,
                single=many_cell if n == 1 else None,
                ratio=f"{growth:.2f}x one client, 1 upstream GET" if growth is not None else "-",
                target=f"≤ {COLD_TARGET}x one client, 1 upstream GET",
                met=None if growth is None else growth <= COLD_TARGET,
            )
        )
    return rows


def _text(cell: Cell, digits: int = 0) -> str:
    return f"{cell:.{digits}f}" if isinstance(cell, (int, float)) else "error"
