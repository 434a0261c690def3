"""``dioproxy``: the operator's command. Prefetch images through a running proxy; list, inspect, verify and purge
the cache directory; print client configuration for this proxy's address.

    dioproxy prefetch alpine:3.19 ghcr.io/owner/img:1 --proxy http://127.0.0.1:8004 [--platform linux/amd64,linux/arm64]
    dioproxy ls [--cache-dir DIR | --config FILE]
    dioproxy stats [--proxy URL]
    dioproxy verify [--repair]
    dioproxy purge IMAGE... | --older-than 30d [--dry-run]
    dioproxy client-config --docker|--podman|--containerd|--nginx|--systemd [--address mirror.example:8004]

The cache commands read the directory directly (no proxy needed); with a proxy running on it they are safe: entries
appear and disappear by rename/unlink only. With ``storage.s3`` in ``--config`` they work on the bucket too
(:mod:`dioproxy.bucketadmin`). After a purge or a repair, ``systemctl reload dioproxy`` (SIGHUP) has
the proxy re-read the directory at once instead of at its hourly rescan.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import IO, Any
from urllib.parse import quote

from dioproxy import __version__, bucketadmin, names, snippets
from dioproxy.bucketadmin import BucketAdminError, Trees
from dioproxy.config import ConfigError, S3Storage, load_config, parse_duration
from dioproxy.manifests import INDEX_TYPES
from dioproxy.names import ImageRef, check_digest
from dioproxy.objectstore import ObjectStoreError
from dioproxy.prefetch import blobs_of, select_platforms
from dioproxy.storage.base import BLOB, MANIFEST
from dioproxy.storage.bucketscan import BucketScan
from dioproxy.storage.cachedir import is_cache_dir
from dioproxy.storage.disk import DiskStorage
from dioproxy.storage.index import last_use
from dioproxy.upstream import MANIFEST_TYPES

CHUNK = 1024 * 1024


class AdminError(Exception):
    """A problem the user can fix; printed without a traceback."""


# -- image references ----------------------------------------------------------------------------------------------


def parse_image(text: str, default_tag: str | None = "latest") -> ImageRef:
    try:
        return names.parse_image(text, default_tag)
    except ValueError as e:
        raise AdminError(str(e)) from None


# -- prefetch ------------------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal; a line per finished blob otherwise."""

    def __init__(self, out: IO[str], total: int, blobs: int, quiet: bool = False) -> None:
        self.out, self.total, self.blobs, self.quiet = out, total, blobs, quiet
        self.done = self.blobs_done = 0
        self.lock = threading.Lock()
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.started = time.monotonic()
        self._last = 0.0

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            now = time.monotonic()
            if self.tty and not self.quiet and now - self._last > 0.1:
                self._last = now
                self._draw()

    def blob_done(self, digest: str, size: int) -> None:
        with self.lock:
            self.blobs_done += 1
            if self.quiet:
                return
            if self.tty:
                self._draw()
            else:
                self.out.write(f"  {digest[:19]} {human(size):>9}  [{self.blobs_done}/{self.blobs}]\n")
                self.out.flush()

    def rate(self) -> float:
        return self.done / max(1e-6, time.monotonic() - self.started)

    def _draw(self) -> None:
        fraction = min(1.0, self.done / self.total) if self.total else 1.0
        width = 30
        bar = "#" * int(fraction * width) + "." * (width - int(fraction * width))
        rate = self.rate()
        eta = f"ETA {clock(max(0, self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        self.out.write(
            f"\r[{bar}] {fraction * 100:5.1f}% {human(self.done)}/{human(self.total)} "
            f"{self.blobs_done}/{self.blobs} blobs {human(rate)}/s {eta:<9}"
        )
        self.out.flush()

    def finish(self) -> None:
        if self.quiet:
            return
        if self.tty:
            self._draw()
            self.out.write("\n")
        else:
            elapsed = time.monotonic() - self.started
            self.out.write(f"  done: {human(self.done)} in {clock(elapsed)} ({human(self.rate())}/s)\n")
        self.out.flush()


class ProxyClient:
    """Blocking HTTP to a running proxy, routed with ``ns=`` (every registry the proxy mirrors works)."""

    def __init__(self, base: str, timeout: float = 60.0) -> None:
        self.base = base.rstrip("/")
        self.timeout = timeout

    def url(self, image: ImageRef, kind: str, reference: str) -> str:
        return f"{self.base}/v2/{image.name}/{kind}/{quote(reference)}?ns={quote(image.registry)}"

    def open(self, url: str, headers: dict[str, str] | None = None) -> Any:
        request = urllib.request.Request(url, headers=headers or {})
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            detail = e.read(2000).decode("utf-8", "replace")
            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                detail = json.loads(detail)["errors"][0]["message"]
            raise AdminError(f"{url}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise AdminError(f"{url}: {getattr(e, 'reason', e)}") from None

    def manifest(self, image: ImageRef, reference: str) -> tuple[str, str, bytes]:
        with self.open(self.url(image, "manifests", reference), {"Accept": ", ".join(MANIFEST_TYPES)}) as response:
            body = response.read(8 * 1024 * 1024)
            media_type = (response.headers.get("Content-Type") or "").split(";")[0].strip()
            digest = response.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise AdminError(f"{image}: the manifest does not match its digest {digest}")
        return digest, media_type or json.loads(body).get("mediaType", ""), body

    def blob(self, image: ImageRef, digest: str, progress: Progress) -> int:
        sha = hashlib.sha256()
        size = 0
        with self.open(self.url(image, "blobs", digest)) as response:
            while True:
                data = response.read(CHUNK)
                if not data:
                    break
                sha.update(data)
                size += len(data)
                progress.add(len(data))
        if "sha256:" + sha.hexdigest() != digest:
            raise AdminError(f"{image}: blob {digest} arrived damaged")
        return size


def prefetch(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    client = ProxyClient(args.proxy, args.timeout)
    failed = 0
    for text in args.images:
        try:
            image = parse_image(text)
            digest, media_type, body = client.manifest(image, image.reference)
            manifests = [(digest, media_type, body, None)]
            blobs: dict[str, int] = {}
            try:
                if media_type in INDEX_TYPES:
                    chosen = select_platforms(body, args.platform)
                    manifests = [(*client.manifest(image, child), platform) for child, platform in chosen]
                for _, _, manifest_body, _ in manifests:
                    blobs.update(blobs_of(manifest_body))
            except (ValueError, AttributeError, TypeError) as e:
                raise AdminError(f"{image}: {e}") from None
            platforms = [p for *_, p in manifests if p]
            out.write(
                f"{image}: {digest}"
                + (f", {len(platforms)} platform(s): {', '.join(platforms)}" if platforms else "")
                + f", {len(blobs)} blobs, {human(sum(blobs.values()))}\n"
            )
            out.flush()
            progress = Progress(err if args.progress_to_stderr else out, sum(blobs.values()), len(blobs), args.quiet)

            def fetch(item: tuple[str, int], image: ImageRef = image, progress: Progress = progress) -> None:
                size = client.blob(image, item[0], progress)
                progress.blob_done(item[0], size)

            with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                for result in [pool.submit(fetch, item) for item in blobs.items()]:
                    result.result()
            progress.finish()
        except AdminError as e:
            err.write(f"error: {e}\n")
            failed += 1
    return 1 if failed else 0


# -- cache directory commands --------------------------------------------------------------------------------------


def tiers(args: argparse.Namespace, err: IO[str] | None = None) -> tuple[DiskStorage | None, S3Storage | None]:
    """The cache directory (``--cache-dir``, else ``cache.dir`` of ``--config``, else ./data), read as it is, and
    the bucket (``storage.s3`` of ``--config``). With a bucket, a missing directory only means this machine has no
    hot tier."""
    try:
        config = load_config(args.config) if args.config else None
    except ConfigError as e:
        raise AdminError(str(e)) from None
    s3 = config.storage.s3 if config else None
    root = os.path.abspath(args.cache_dir or (config.cache_dir if config else "./data"))
    if not is_cache_dir(root):
        if s3 is None:
            raise AdminError(f"{root} is not a dioproxy cache directory (use --cache-dir or --config)")
        if err is not None:
            err.write(f"note: {root} is not a dioproxy cache directory: the bucket only\n")
        return None, s3
    return DiskStorage(root, create=False), s3


def cache_root(args: argparse.Namespace) -> str:
    local, _ = tiers(args)
    if local is None:
        raise AdminError("no cache directory here (use --cache-dir)")
    return local.root


def _bucket(s3: S3Storage | None, args: argparse.Namespace) -> BucketScan | None:
    return bucketadmin.open_bucket(s3, getattr(args, "jobs", 4)) if s3 else None


@dataclass
class ImageInfo:
    tag: Any
    manifests: list[str]
    blobs: list[str]
    platforms: list[str]


def image_info(local: DiskStorage, tag: Any, trees: Trees | None = None) -> ImageInfo:
    """What a tag's image holds: its manifests (index and children) and blobs, read from the cache directory (and
    from the bucket, with ``trees`` over both)."""
    tree = (trees or Trees(local, None)).tree(tag.entry.digest if tag.entry else None)
    return ImageInfo(tag, tree.manifests, tree.blobs, tree.platforms)


def _size(local: DiskStorage | None, kind: str, digest: str) -> int:
    return (local.entry_size(kind, digest) or 0) if local is not None else 0


def ls(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    local_tier, s3 = tiers(args, err)
    bucket = _bucket(s3, args)
    trees = Trees(local_tier, bucket)
    used = last_use(local_tier.root) if local_tier else {}
    local = {(t.registry, t.name, t.tag): t for t in local_tier.tags()} if local_tier else {}
    with bucketadmin.failures():
        shared = {(t.registry, t.name, t.tag): t for t in bucket.tags()} if bucket else {}
        held = bucketadmin.sizes(bucket) if bucket else {}
    rows = []
    for key in sorted(set(local) | set(shared)):
        tag, theirs = local.get(key), shared.get(key)
        digest = tag.entry.digest if tag and tag.entry else None
        bucket_digest = theirs.entry.digest if theirs and theirs.entry else None
        info = trees.tree(digest or bucket_digest)
        size = sum(_size(local_tier, BLOB, b) for b in info.blobs)
        size += sum(_size(local_tier, MANIFEST, m) for m in info.manifests)
        times = [used[(MANIFEST, m)] for m in info.manifests if (MANIFEST, m) in used]
        times += [used[(BLOB, b)] for b in info.blobs if (BLOB, b) in used]
        row = {
            "registry": key[0],
            "repository": key[1],
            "tag": key[2],
            "digest": digest or bucket_digest,
            "size": size,
            "blobs_cached": sum(1 for b in info.blobs if _size(local_tier, BLOB, b)),
            "blobs": len(info.blobs),
            "platforms": sorted(set(info.platforms)),
            "last_use": max(times) if times else None,
        }
        if bucket:
            in_bucket = [(MANIFEST, m) for m in info.manifests] + [(BLOB, b) for b in info.blobs]
            row.update(
                tiers=[t for t, there in (("local", tag), ("bucket", theirs)) if there],
                bucket_digest=bucket_digest,
                bucket_size=sum(held.get(k, 0) for k in in_bucket),
                bucket_blobs=sum(1 for b in info.blobs if (BLOB, b) in held),
                checked=theirs.entry.checked if theirs and theirs.entry else None,
            )
        rows.append(row)
    if args.json:
        json.dump(rows, out, indent=2)
        out.write("\n")
        return 0
    if bucket:
        out.write(f"{'IMAGE':<50} {'DIGEST':<19} {'TIER':<6} {'SIZE':>9} {'LOCAL':>7} {'BUCKET':>7}  ")
    else:
        out.write(f"{'IMAGE':<50} {'DIGEST':<19} {'SIZE':>9} {'BLOBS':>7}  ")
    out.write(f"{'LAST USE':<16} PLATFORMS\n")
    for row in rows:
        image = f"{row['registry']}/{row['repository']}:{row['tag']}"
        digest = (row["digest"] or "unreadable")[:19]
        blobs = f"{row['blobs_cached']:>3}/{row['blobs']:<3}"
        last = row["last_use"]
        if bucket:
            tier = "both" if len(row["tiers"]) == 2 else row["tiers"][0]
            size = max(row["size"], row["bucket_size"])
            last = max(t for t in (last, row["checked"], 0) if t is not None) or None
            out.write(f"{image:<50} {digest:<19} {tier:<6} {human(size):>9} {blobs} {row['bucket_blobs']:>3}/")
            out.write(f"{row['blobs']:<3}  ")
        else:
            out.write(f"{image:<50} {digest:<19} {human(row['size']):>9} {blobs}  ")
        out.write(f"{when(last):<16} {','.join(row['platforms'])}\n")
    return 0


def stats(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    local, s3 = tiers(args, err) if (args.cache_dir or args.config or not args.proxy) else (None, None)
    bucket = _bucket(s3, args)
    if local:
        entries = list(local.scan())
        used = last_use(local.root)
        by_kind = {kind: [e for e in entries if e.kind == kind] for kind in (BLOB, MANIFEST)}
        all_tags = list(local.tags())
        temp = local.temp_files()
        out.write(f"cache directory   {local.root}\n")
        for kind, items in by_kind.items():
            out.write(f"{kind + 's':<17} {len(items):>8}  {human(sum(e.size for e in items)):>9}\n")
        out.write(f"{'total':<17} {len(entries):>8}  {human(sum(e.size for e in entries)):>9}\n")
        out.write(
            f"tags              {len(all_tags):>8}  in {len({(t.registry, t.name) for t in all_tags})} repositories\n"
        )
        out.write(f"in progress       {len(temp):>8}  temp files (fills under way, or left by a crash)\n")
        if used:
            out.write(f"least recent use  {when(min(used.values()))}\nmost recent use   {when(max(used.values()))}\n")
    if bucket:
        with bucketadmin.failures():
            bucketadmin.stats(bucket, out, human)
    if args.proxy:
        try:
            with urllib.request.urlopen(args.proxy.rstrip("/") + "/metrics", timeout=args.timeout) as response:
                text = response.read().decode()
        except (urllib.error.URLError, OSError) as e:
            raise AdminError(f"{args.proxy}/metrics: {getattr(e, 'reason', e)}") from None
        out.write(live_summary(text))
    return 0


def live_summary(text: str) -> str:
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def total(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    cacheable = total("dioproxy_requests_total", endpoint="blobs") + total(
        "dioproxy_requests_total", endpoint="manifests"
    )
    hits = total("dioproxy_requests_total", outcome="hit")
    lines = [
        "proxy (since its start)",
        f"  requests          {total('dioproxy_requests_total'):>12.0f}",
        f"  hit ratio         {hits / cacheable * 100 if cacheable else 0:>11.1f}%  (blobs and manifests)",
        f"  sent from cache   {human(total('dioproxy_sent_bytes_total', outcome='hit')):>12}",
        f"  fetched upstream  {human(total('dioproxy_upstream_bytes_total')):>12}",
        f"  upstream errors   {total('dioproxy_upstream_errors_total'):>12.0f}",
        f"  fills running     {total('dioproxy_fills_in_progress'):>12.0f}",
        f"  cache size        {human(total('dioproxy_cache_size_bytes')):>12}"
        + (
            f" of {human(total('dioproxy_cache_max_size_bytes'))}"
            if total("dioproxy_cache_max_size_bytes")
            else " (unbounded)"
        ),
        f"  evictions         {total('dioproxy_evictions_total'):>12.0f}",
    ]
    for s in samples:
        if s.name == "dioproxy_upstream_ratelimit_remaining":
            who = f"{s.labels.get('registry')} ({s.labels.get('account')})"
            lines.append(f"  pulls left        {s.value:>12.0f}  {who}")
    return "\n".join(lines) + "\n"


def verify(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """Every blob and manifest against its digest, tag entries for readability, in the cache directory and the
    bucket; ``--repair`` removes the damaged."""
    local, s3 = tiers(args, err)
    bucket = _bucket(s3, args)
    failed = 0
    if local:
        failed = _verify_local(local, args, out)
    if bucket:
        result = bucketadmin.verify(bucket, out, args.repair, args.jobs)
        checked = result.counts
        out.write(
            f"bucket: verified {checked[BLOB]} blobs ({human(result.bytes)} with manifests, "
            f"{human(result.bytes / max(result.seconds, 1e-6))}/s), {checked[MANIFEST]} manifests, "
            f"{checked['tag']} tags: {result.damaged} damaged"
            + (f", {result.removed} removed" if args.repair and result.damaged else "")
            + (f", {result.unreadable} unreadable (left alone)" if result.unreadable else "")
            + "\n"
        )
        if result.damaged and not args.repair:
            failed += result.damaged
        failed += result.unreadable
    if failed and not args.repair:
        out.write("run `dioproxy verify --repair` to remove them; they are fetched again on the next pull\n")
    return 1 if failed else 0


def _verify_local(local: DiskStorage, args: argparse.Namespace, out: IO[str]) -> int:
    """The cache directory's half of ``verify``: the number of damaged entries left in place."""
    damaged: list[tuple[Callable[[], None], str]] = []  # (how to remove it, what is wrong)
    counts = {BLOB: 0, MANIFEST: 0}
    checked_bytes = 0
    for entry in local.scan():
        try:
            problem = local.check_entry(entry.kind, entry.digest)
        except FileNotFoundError:
            continue  # evicted or purged meanwhile
        except OSError as e:
            problem = f"unreadable: {e.strerror}"
        counts[entry.kind] += 1
        checked_bytes += entry.size
        if problem:
            remove = partial(local.unlink_entry, entry.kind, entry.digest)
            damaged.append((remove, f"{entry.kind} {entry.digest}: {problem}"))
    tag_count = 0
    for tag in local.tags():
        tag_count += 1
        remove = partial(local.unlink_tag, tag.registry, tag.name, tag.tag)
        if tag.entry is None:
            damaged.append((remove, f"tag {tag.registry}/{tag.name}:{tag.tag}: unreadable entry"))
        elif not _valid_digest(tag.entry.digest):
            damaged.append((remove, f"tag {tag.registry}/{tag.name}:{tag.tag}: bad digest {tag.entry.digest!r}"))
    for remove, problem in damaged:
        if args.repair:
            remove()
            out.write(f"removed  {problem}\n")
        else:
            out.write(f"DAMAGED  {problem}\n")
    out.write(
        f"verified {counts[BLOB]} blobs ({human(checked_bytes)} with manifests), {counts[MANIFEST]} manifests, "
        f"{tag_count} tags: {len(damaged)} damaged" + (", removed" if args.repair and damaged else "") + "\n"
    )
    return 0 if args.repair else len(damaged)


def _valid_digest(digest: Any) -> bool:
    try:
        check_digest(digest)
    except Exception:
        return False
    return True


def purge(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """Tags named (or unused for ``--older-than``) and what only they refer to, from the cache directory and the
    bucket; in the bucket nothing another tag refers to goes (see :mod:`dioproxy.bucketadmin`)."""
    local, s3 = tiers(args, err)
    if not args.images and args.older_than is None:
        raise AdminError("purge what? name images (alpine:3.19, ghcr.io/owner/img) or give --older-than")
    images = [parse_image(text, default_tag=None) for text in args.images]
    bucket = _bucket(s3, args)
    with bucketadmin.failures():
        bucket_tags = list(bucket.tags()) if bucket else []
    all_tags = list(local.tags()) if local else []
    doomed_tags, bucket_doomed = [], []
    for text, image in zip(args.images, images):
        matched = [
            t
            for t in all_tags
            if t.registry == image.registry
            and t.name == image.name
            and (not image.reference or t.tag == image.reference)
        ]
        shared = bucketadmin.matching(bucket_tags, image.registry, image.name, image.reference)
        if not matched and not shared:
            err.write(f"warning: nothing cached for {text}\n")
        doomed_tags += matched
        bucket_doomed += [t for t in shared if t not in bucket_doomed]
    kept_tags = [t for t in all_tags if t not in doomed_tags]
    if local:
        _purge_local(local, args, out, doomed_tags, kept_tags)
    if bucket:
        if args.older_than is not None:
            old = bucketadmin.older_than(bucket_tags, time.time() - args.older_than)
            bucket_doomed += [t for t in old if t not in bucket_doomed]
        kept_local = [t.entry.digest if t.entry else None for t in kept_tags if t not in doomed_tags]
        trees = Trees(local, bucket)
        with bucketadmin.failures():
            plan = bucketadmin.plan_purge(bucket, trees, bucket_tags, bucket_doomed, kept_local)
        bucketadmin.purge(
            bucket, plan, trees, out, err, dry_run=args.dry_run, verbose=args.verbose, jobs=args.jobs, human=human
        )
    return 0


def _purge_local(
    local: DiskStorage, args: argparse.Namespace, out: IO[str], doomed_tags: list, kept_tags: list
) -> None:
    """The cache directory's half of ``purge``; adds to ``doomed_tags`` the tags whose manifest goes."""
    doomed: set[tuple[str, str]] = set()
    if doomed_tags:
        keep = _referenced(local, kept_tags)
        for tag in doomed_tags:
            info = image_info(local, tag)
            doomed |= {(MANIFEST, m) for m in info.manifests} | {(BLOB, b) for b in info.blobs}
        doomed -= keep
    if args.older_than is not None:
        cutoff = time.time() - args.older_than
        doomed |= {key for key, t in last_use(local.root).items() if t < cutoff}
        # Tags whose manifest goes too.
        doomed_tags += [t for t in kept_tags if t.entry and (MANIFEST, t.entry.digest) in doomed]
    freed = 0
    verb = "would remove" if args.dry_run else "removed"
    for kind, digest in sorted(doomed):
        size = local.entry_size(kind, digest)
        if size is None:
            continue
        if not args.dry_run:
            local.unlink_entry(kind, digest)
        freed += size
        if args.verbose:
            out.write(f"{verb} {kind} {digest} ({human(size)})\n")
    for tag in doomed_tags:
        if not args.dry_run:
            local.unlink_tag(tag.registry, tag.name, tag.tag)
        out.write(f"{verb} tag {tag.registry}/{tag.name}:{tag.tag}\n")
    out.write(f"{verb} {len(doomed)} entries, {human(freed)}\n")
    if not args.dry_run and (doomed or doomed_tags):
        out.write("a running proxy re-reads the directory on `systemctl reload dioproxy` (SIGHUP) or within the hour\n")


def _referenced(local: DiskStorage, kept: Iterable[Any]) -> set[tuple[str, str]]:
    keep: set[tuple[str, str]] = set()
    for tag in kept:
        info = image_info(local, tag)
        keep |= {(MANIFEST, m) for m in info.manifests} | {(BLOB, b) for b in info.blobs}
    return keep


# -- client-config -------------------------------------------------------------------------------------------------


def client_config(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    address = args.address or f"{socket.getfqdn()}:8004"
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise AdminError(f"--address: expected HOST:PORT, got {address!r}")
    chosen = [k for k in ("docker", "podman", "containerd", "nginx", "systemd") if getattr(args, k)] or ["docker"]
    if args.all:
        chosen = ["docker", "podman", "containerd", "nginx", "systemd"]
    registries = args.registry or ["docker.io", "ghcr.io"]
    parts = []
    if "docker" in chosen:
        parts.append(
            ("/etc/docker/daemon.json (then: systemctl reload docker)", snippets.render_docker_daemon_json(address))
        )
    if "podman" in chosen:
        others = [r for r in registries if r != "docker.io"]
        parts.append(
            ("/etc/containers/registries.conf.d/dioproxy.conf", snippets.podman_registries_conf(address, others))
        )
    if "containerd" in chosen:
        for registry in registries:
            parts.append(
                (f"/etc/containerd/certs.d/{registry}/hosts.toml", snippets.containerd_hosts_toml(address, registry))
            )
        parts.append(("/etc/containerd/certs.d/_default/hosts.toml", snippets.containerd_hosts_toml(address, None)))
    if "nginx" in chosen:
        parts.append(
            (
                "/etc/nginx/sites-available/dioproxy",
                snippets.nginx_site_conf(args.listen, args.server_name or host, f"127.0.0.1:{port}"),
            )
        )
    if "systemd" in chosen:
        twistd = args.twistd or os.path.join(os.path.dirname(sys.executable), "twistd")
        argv = snippets.proxy_argv(
            [twistd], int(port), args.interface, args.cache_dir or "/var/cache/dioproxy", config=args.config_path
        )
        parts.append(("/etc/systemd/system/dioproxy.service", snippets.systemd_unit(argv)))
    for i, (where, text) in enumerate(parts):
        if len(parts) > 1 or args.headers:
            out.write(("\n" if i else "") + f"# ==> {where}\n")
        out.write(text)
    return 0


# -- helpers and main ----------------------------------------------------------------------------------------------


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def clock(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) for a progress bar's elapsed time and ETA."""
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def _duration(text: str) -> float:
    try:
        return parse_duration(text, "--older-than")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _platforms(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="dioproxy",
        description="Prefetch images through a running proxy; list, inspect, verify and purge the cache directory; "
        "print client configuration for this proxy.",
    )
    top.add_argument("--version", action="version", version=f"dioproxy {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cache_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cache-dir", "-d", help="the cache directory (default: cache.dir from --config, or ./data)")
        p.add_argument("--config", "-c", help="the proxy's YAML configuration: its cache.dir and bucket (storage.s3)")

    p = sub.add_parser("prefetch", help="warm the cache: pull images through a running proxy")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="alpine:3.19, ghcr.io/owner/img:tag, name@sha256:...")
    p.add_argument("--proxy", default="http://127.0.0.1:8004", help="the proxy's URL (default: %(default)s)")
    p.add_argument(
        "--platform",
        action="extend",
        type=_platforms,
        default=[],
        help="os/arch[/variant], comma-separated or repeated: linux/amd64,linux/arm64 (default: all)",
    )
    p.add_argument("--jobs", "-j", type=int, default=4, help="blobs fetched at once (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds without progress before giving up")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=prefetch, progress_to_stderr=True)

    p = sub.add_parser("ls", help="cached images: tags, digests, sizes, last use")
    cache_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=ls)

    p = sub.add_parser("stats", help="what the cache holds; with --proxy, what the running proxy did")
    cache_options(p)
    p.add_argument("--proxy", help="also read a running proxy's /metrics (e.g. http://127.0.0.1:8004)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=stats)

    p = sub.add_parser("verify", help="check every cached blob and manifest against its digest")
    cache_options(p)
    p.add_argument("--repair", action="store_true", help="remove damaged entries (they are fetched again when pulled)")
    p.add_argument("--jobs", "-j", type=int, default=4, help="bucket objects read at once (default: %(default)s)")
    p.set_defaults(func=verify)

    p = sub.add_parser("purge", help="remove images, or entries not used for a while, from the cache")
    cache_options(p)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="repository (every tag) or repository:tag")
    p.add_argument("--older-than", type=_duration, metavar="DURATION", help="entries not used for this long (30d)")
    p.add_argument("--dry-run", "-n", action="store_true", help="say what would go, remove nothing")
    p.add_argument("--verbose", "-v", action="store_true", help="list every entry")
    p.add_argument("--jobs", "-j", type=int, default=4, help="bucket objects deleted at once (default: %(default)s)")
    p.set_defaults(func=purge)

    p = sub.add_parser("client-config", help="print client configuration for this proxy")
    for name, what in (
        ("docker", "dockerd's daemon.json (registry-mirrors)"),
        ("podman", "registries.conf for podman, buildah, skopeo"),
        ("containerd", "hosts.toml files for containerd / Kubernetes"),
        ("nginx", "an nginx site in front of the proxy"),
        ("systemd", "the systemd unit of the proxy itself"),
        ("all", "all of the above"),
    ):
        p.add_argument(f"--{name}", action="store_true", help=what)
    p.add_argument("--address", "-a", help="HOST:PORT clients use to reach the proxy (default: this host's name:8004)")
    p.add_argument("--registry", action="append", help="registries to mirror (default: docker.io and ghcr.io)")
    p.add_argument("--server-name", help="nginx server_name (default: the address's host)")
    p.add_argument("--listen", default="80", help="nginx listen (default: %(default)s)")
    p.add_argument("--twistd", help="systemd: path of twistd (default: the one next to this Python)")
    p.add_argument("--interface", default="0.0.0.0", help="systemd: address the proxy listens on")
    p.add_argument("--cache-dir", help="systemd: cache directory (default: /var/cache/dioproxy)")
    p.add_argument("--config", dest="config_path", default="/etc/dioproxy/config.yaml", help="systemd: config file")
    p.add_argument("--headers", action="store_true", help="name the file even when printing only one")
    p.set_defaults(func=client_config)
    return top


def main(argv: list[str] | None = None, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = parser().parse_args(argv)
    try:
        return args.func(args, out, err)
    except (AdminError, BucketAdminError, ObjectStoreError) as e:
        err.write(f"dioproxy {args.command}: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
