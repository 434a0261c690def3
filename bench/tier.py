"""Scenario 6, the shared tier (issue 10): mirrors with ``storage.s3`` on a real SeaweedFS, against the bucket
itself read and written with curl, and against nginx.

Three mirrors on one bucket and prefix, each its own process and cache dir, all asking the upstream directly (no
far link: no row here times the upstream):

- ``tier``: fills each blob from the upstream, commits it to its hot tier and uploads it in the background. Its
  warm GETs are the hot-tier row (nginx serves the same file), its upload the upload row (``curl -T`` of the same
  file to a presigned PUT URL);
- ``reader``: another replica whose hot tier lacks the blob: its GET streams it from the bucket (the upstream's log
  must show no GET for it), against ``curl`` of a presigned GET URL of the same object;
- ``redirect``: ``storage.s3.redirect: true``: ``curl -L`` through it, against the same presigned URL.

A content-addressed key is uploaded once, and a replica reads it from the bucket once before its tier has it, so
each round seeds a fresh blob and the figures are medians over ``tier_rounds`` blobs. The upload is timed from the
end of the client's download (the commit) to the object answering a HEAD, polled every 20 ms. The RSS of every
mirror is sampled from their start to their stop.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from . import clients
from .memory import Sampler, group_cpu, machine_cpu
from .plan import MB
from .report import Cell, Row, ratio
from .scenarios import Stage, _median, _ratios, attempt, say
from .servers import DioProxy, Seaweed, Server
from .upstream import BlobFile

PREFIX = "bench/"
POLL = 0.02
UPLOAD_DEADLINE = 300.0


def _config(path: Path, store: Seaweed, redirect: bool) -> Path:
    s3 = store.weed.s3_settings(PREFIX, redirect=redirect)
    path.write_text(yaml.safe_dump({"storage": {"s3": s3}}))
    return path


def _blob_key(blob: BlobFile) -> str:
    return f"{PREFIX}blobs/sha256/{blob.digest[7:9]}/{blob.digest[7:]}"


class _Tier:
    """The store, the three mirrors, a boto3 client behind their backs, and CPU time counted per measurement."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        base = stage.ours.base.parent / "tier"
        self.store = Seaweed(base / "seaweedfs")
        upstream = f"http://{stage.upstream.address}"
        command = shlex.join(stage.ours.daemon.argv[: stage.ours.daemon.argv.index("--port")])
        self.mirrors: dict[str, DioProxy] = {}
        for role, redirect in (("tier", False), ("reader", False), ("redirect", True)):
            home = base / role
            home.mkdir(parents=True)
            config = _config(home / "dioproxy.yaml", self.store, redirect)
            self.mirrors[role] = DioProxy(home, upstream, command, ["--config", str(config)], f"dioproxy ({role})")
        self.s3 = None
        self.cpu: dict[str, dict[str, list[float]]] = {}  # what -> server -> [CPU seconds, bytes]
        self.busy: dict[str, list[float]] = {}  # what -> [busy, all] CPU seconds of the machine

    def start(self) -> None:
        for server in (self.store, *self.mirrors.values()):
            try:
                server.start()
            except Exception as e:
                say(f"{server.name} did not start: {e}")
                self.stage.down[server.name] = str(e).splitlines()[0]
        if self.store.name in self.stage.down:
            for mirror in self.mirrors.values():
                self.stage.down.setdefault(mirror.name, f"no bucket: {self.stage.down[self.store.name]}")
        else:
            self.s3 = self.store.weed.client(timeout=10.0)

    def stop(self) -> None:
        for server in (*self.mirrors.values(), self.store):
            with contextlib.suppress(Exception):
                server.stop()

    def presign(self, operation: str, key: str) -> str:
        return self.s3.generate_presigned_url(
            operation, Params={"Bucket": self.store.weed.bucket, "Key": key}, ExpiresIn=3600
        )

    def stored_at(self, key: str) -> float:
        """``time.monotonic()`` when ``key`` first answers a HEAD (polled every POLL s, at most UPLOAD_DEADLINE)."""
        deadline = time.monotonic() + UPLOAD_DEADLINE
        while time.monotonic() < deadline:
            with contextlib.suppress(self.s3.exceptions.ClientError):
                self.s3.head_object(Bucket=self.store.weed.bucket, Key=key)
                return time.monotonic()
            time.sleep(POLL)
        raise TimeoutError(f"{key} not in the bucket after {UPLOAD_DEADLINE:g} s")

    def counted(self, what: str, size: int, measure: Callable[[], float], *servers: Server) -> Callable[[], float]:
        """``measure`` with the CPU time of ``servers`` charged to ``what`` (per GB, in the notes), and how busy
        the machine's cores were meanwhile."""

        def run() -> float:
            before, machine = [group_cpu(s.pid) for s in servers], machine_cpu()
            value = measure()
            for server, began in zip(servers, before):
                spent = self.cpu.setdefault(what, {}).setdefault(server.name, [0.0, 0.0])
                spent[0] += group_cpu(server.pid) - began
                spent[1] += size
            busy = self.busy.setdefault(what, [0.0, 0.0])
            for n, (now, then) in enumerate(zip(machine_cpu(), machine)):
                busy[n] += now - then
            return value

        return run


def _get_rate(url: str, size: int, redirected: bool = False, output: Path | None = None) -> float:
    _, total, times = clients.curl_streams(url, 1, redirected=redirected, output=output)
    if total != size:
        raise RuntimeError(f"got {total} bytes, not {size}")
    return size / times[0] / MB


def shared_tier(stage: Stage) -> list[Row]:
    """The hot tier, a read through the bucket, a redirect and an upload of ``tier_blob`` bytes, in rounds."""
    plan, upstream, nginx = stage.plan, stage.upstream, stage.nginx
    tier = _Tier(stage)
    runs: dict[str, list[Cell]] = {
        key: [] for key in ("hot", "nginx", "read", "redirect", "bucket", "upload", "put", "fill", "to disk", "307")
    }
    peaks: dict[str, Cell] = {}
    try:
        tier.start()
        if tier.store.name in stage.down:
            raise RuntimeError(f"{tier.store.name} did not start: {stage.down[tier.store.name]}")
        samplers = {m.name: Sampler(m.pid) for m in tier.mirrors.values() if m.name not in stage.down}
        with contextlib.ExitStack() as sampling:
            for sampler in samplers.values():
                sampling.enter_context(sampler)
            for n in range(plan.tier_rounds):
                blob = upstream.add_blob(f"tier-{n}", plan.tier_blob)
                (nginx.root / "blobs" / f"tier-{n}").hardlink_to(blob.path)
                _round(stage, tier, blob, n, runs)
        peaks = {name: sampler.peak_mb for name, sampler in samplers.items()}
    except Exception as e:  # the stage itself failed (the store, seeding, a link): every cell says so
        say(f"scenario 6: FAILED {type(e).__name__}: {e}")
        for cells in runs.values():
            cells.append(f"{type(e).__name__}: {e}")
    finally:
        tier.stop()
    return _rows(stage, tier, runs, peaks)


def _round(stage: Stage, tier: _Tier, blob: BlobFile, n: int, runs: dict[str, list[Cell]]) -> None:
    mirror, reader, redirect = tier.mirrors["tier"], tier.mirrors["reader"], tier.mirrors["redirect"]
    path, size, key = blob.url_path(), blob.size, _blob_key(blob)
    upstream = stage.upstream
    direct = tier.presign("get_object", key)

    def take(run: str, server: Server, what: str, measure: Callable[[], float]) -> None:
        runs[run].append(attempt(stage, server, f"tier: {what} MB/s", measure))

    def upload() -> float:
        # The fill first (verified, committed, upload queued): the same path as a read through the bucket.
        fill = tier.counted("fill", size, lambda: _get_rate(mirror.url + path, size), mirror)
        take("fill", mirror, "cold fill from the upstream", fill)
        ended = time.monotonic()
        return size / (tier.counted("upload", size, lambda: tier.stored_at(key), mirror, tier.store)() - ended) / MB

    def put() -> float:
        sent, seconds = clients.curl_upload(tier.presign("put_object", f"{PREFIX}anchor/put-{n}"), blob.path)
        if sent != size:
            raise RuntimeError(f"curl sent {sent} bytes, not {size}")
        return size / seconds / MB

    def to_disk() -> float:  # what writing the hot tier costs a reader that does nothing else
        copy = reader.cache.parent / "curl-copy"
        try:
            return _get_rate(direct, size, output=copy)
        finally:
            copy.unlink(missing_ok=True)

    def read() -> float:
        mark = upstream.log_offset()
        rate = tier.counted("read", size, lambda: _get_rate(reader.url + path, size), reader, tier.store)()
        time.sleep(0.5)  # the registry writes its access-log line after the response
        gets = upstream.blob_gets(mark, blob.digest)
        if gets:
            raise RuntimeError(f"the reader asked the upstream {gets} times: its bytes were not the bucket's")
        return rate

    take("upload", mirror, "background upload", upload)
    take("put", tier.store, "curl -T presigned", put)
    for _ in range(2):
        take(
            "hot",
            mirror,
            "warm blob from the hot tier",
            tier.counted("hot", size, lambda: _get_rate(mirror.url + path, size), mirror),
        )
        take("nginx", stage.nginx, "the same file", lambda: _get_rate(f"{stage.nginx.url}/blobs/tier-{n}", size))
    take(
        "bucket",
        tier.store,
        "curl presigned GET",
        tier.counted("bucket", size, lambda: _get_rate(direct, size), tier.store),
    )
    take("to disk", tier.store, "curl presigned GET into a file", tier.counted("to disk", size, to_disk, tier.store))
    take("read", reader, "streamed from the bucket", read)

    def answer() -> float:  # the redirect alone: what the mirror adds to a read from the bucket
        code, seconds = clients.curl_answer(redirect.url + path)
        if code != 307:
            raise RuntimeError(f"answered {code}, not 307")
        return seconds * 1000

    runs["307"].append(attempt(stage, redirect, "tier: the 307 alone (ms)", answer))
    for _ in range(2):
        take(
            "redirect", redirect, "by redirect, curl -L", lambda: _get_rate(redirect.url + path, size, redirected=True)
        )
        take("bucket", tier.store, "curl presigned GET", lambda: _get_rate(direct, size))


def _spent(tier: _Tier, what: str) -> str:
    servers = ", ".join(f"{name} {c[0] / (c[1] / 1e9):.2f}" for name, c in tier.cpu[what].items() if c[1])
    busy, total = tier.busy.get(what, (0.0, 0.0))
    return f"{servers} ({busy / total:.0%})" if total else servers


def _text(cell: Cell, digits: int = 0) -> str:
    return f"{cell:.{digits}f}" if isinstance(cell, (int, float)) else f"({cell})"


def _rows(stage: Stage, tier: _Tier, runs: dict[str, list[Cell]], peaks: dict[str, Cell]) -> list[Row]:
    plan = stage.plan
    size = f"{plan.tier_blob / MB:.0f} MB"
    hot, nginx, read, redirect, bucket, upload, put = (
        _median(runs[key]) for key in ("hot", "nginx", "read", "redirect", "bucket", "upload", "put")
    )
    numbers = [p for p in peaks.values() if isinstance(p, (int, float))]
    rss: Cell = max(numbers) if numbers else next((c for c in runs["hot"] if isinstance(c, str)), "no mirror ran")
    fill, to_disk = _median(runs["fill"]), _median(runs["to disk"])
    stage.notes.append(
        f"Scenario 6: medians over {plan.tier_rounds} blobs of {size}, each seeded afresh; the bucket is a real "
        "SeaweedFS (`weed mini`, auth on) on the same 2 cores. Beside the read through the bucket: the tier "
        f"mirror's cold fill of each blob straight from the upstream registry (no far link) {_text(fill)} MB/s, "
        f"and curl of the presigned URL into a file on the mirrors' disk {_text(to_disk)} MB/s. The redirect "
        f"mirror's 307 alone took {_text(_median(runs['307']), 1)} ms. "
        "CPU seconds per GB (and the 2 cores' busy share meanwhile): "
        + "; ".join(f"{what} {_spent(tier, what)}" for what in tier.cpu)
        + "; peak RSS: "
        + ", ".join(f"{name} {p:.0f} MB" for name, p in peaks.items() if isinstance(p, (int, float)))
        + "."
    )
    vs_nginx, vs_read, vs_redirect, vs_put = (
        ratio(hot, nginx),
        ratio(read, bucket),
        ratio(redirect, bucket),
        ratio(upload, put),
    )
    target = plan.memory_target_mb
    return [
        Row(
            "6",
            f"shared tier: warm {size} blob from the hot tier",
            "MB/s",
            hot,
            nginx=nginx,
            ratio=_ratios((vs_nginx, "nginx")),
            target="≥ 0.9x nginx",
            met=None if vs_nginx is None else vs_nginx >= 0.9,
        ),
        Row(
            "6",
            f"shared tier: {size} blob streamed from the bucket",
            "MB/s",
            read,
            bucket=bucket,
            ratio=_ratios((vs_read, "bucket"), (ratio(read, to_disk), "curl into a file")),
            target="≥ 0.8x bucket",
            met=None if vs_read is None else vs_read >= 0.8,
        ),
        Row(
            "6",
            f"shared tier: {size} blob by redirect, curl -L",
            "MB/s",
            redirect,
            bucket=bucket,
            ratio=_ratios((vs_redirect, "bucket")),
            target="≥ 0.95x bucket",
            met=None if vs_redirect is None else vs_redirect >= 0.95,
        ),
        Row(
            "6",
            f"shared tier: upload of a {size} blob to the bucket",
            "MB/s",
            upload,
            bucket=put,
            ratio=_ratios((vs_put, "curl -T")),
        ),
        Row(
            "6",
            "shared tier: peak RSS of each mirror",
            "MB",
            rss,
            ratio="-",
            target=f"≤ {target:.0f} MB",
            met=None if not numbers else rss <= target,
            target_value=target,
        ),
    ]
