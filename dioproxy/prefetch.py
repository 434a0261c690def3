"""Keep images warm (``prefetch:``): listed tags revalidated on schedule, the blobs of new digests fetched.

Each listed image is revalidated every ``every`` (one HEAD, free on Docker Hub's rate limit); the manifests and
blobs of the platforms asked for are fetched when they are not cached, through the same paths a client's pull
takes: ``Mirror.manifests`` (digests verified, identical requests shared) and the ``FillManager`` (one verified
fill per digest, however many pulls and prefetches want it). So a deployment's first pull is all cache hits. A
failure is logged and retried sooner, backing off (15 s, 30 s, ... up to ``every``). Images are warmed one at a
time, a few blobs at once, so a prefetch never crowds out the clients.

Which platforms and blobs an image's manifests name (:func:`select_platforms`, :func:`blobs_of`) is shared with
``dioproxy prefetch``, which does the same once through a running proxy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from dioproxy.config import Config, PrefetchImage
from dioproxy.errors import RegistryError, UpstreamError
from dioproxy.fill import DiskFull, FillFailed
from dioproxy.manifests import INDEX_TYPES
from dioproxy.names import DIGEST_RE
from dioproxy.storage.cachedir import BLOB, MANIFEST

log = Logger()

#: Seconds before the first retry of a failed prefetch; doubled at each further failure, up to the item's ``every``.
RETRY_FIRST = 15.0
#: Blobs of one image fetched at once.
BLOBS_AT_ONCE = 3
#: Failures logged as one line (the upstream, the image, the disk); anything else is a bug: logged with its traceback.
EXPECTED = (RegistryError, UpstreamError, ValueError, FillFailed, DiskFull, defer.TimeoutError)


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


# -- the scheduled prefetch ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Warmed:
    """What one prefetch of an image found and did."""

    digest: str
    platforms: tuple[str, ...]
    blobs: int
    fetched: int  # blobs that were not cached
    fetched_bytes: int


async def warm(mirror: Any, image: PrefetchImage) -> Warmed:
    """Revalidate ``image``'s tag now and make sure the manifests and blobs of its platforms are cached."""
    target = mirror.route(image.name, ns=image.registry)
    top = await mirror.manifests.get(target, image.reference, max_age=0)
    if top.outcome == "stale":
        raise UpstreamError(image.registry, f"cannot revalidate {image} (the cached digest is still served)")
    manifests, platforms = [top], ()
    if top.media_type in INDEX_TYPES:
        chosen = select_platforms(top.body, image.platforms)
        manifests = [await mirror.manifests.get(target, digest) for digest, _ in chosen]
        platforms = tuple(platform for _, platform in chosen)
    blobs: dict[str, int] = {}
    for manifest in manifests:
        blobs.update(blobs_of(manifest.body))
    semaphore = defer.DeferredSemaphore(BLOBS_AT_ONCE)
    try:
        sizes = await defer.gatherResults(
            [semaphore.run(lambda d=d: defer.ensureDeferred(fetch_blob(mirror, target, d))) for d in blobs],
            consumeErrors=True,
        )
    except defer.FirstError as e:
        e.subFailure.raiseException()
    if mirror.cache is not None:  # kept warm: what a deployment is about to pull is not the first to be evicted
        for manifest in [top, *manifests]:
            mirror.cache.touch(MANIFEST, manifest.digest)
        for digest in blobs:
            mirror.cache.touch(BLOB, digest)
    fetched = [size for size in sizes if size is not None]
    return Warmed(top.digest, platforms, len(blobs), len(fetched), sum(fetched))


async def fetch_blob(mirror: Any, target: Any, digest: str) -> int | None:
    """Cache one blob through the fill path (joining a fill already under way); its size if it was fetched, None
    if it was cached. Waits as long as the fill makes progress."""
    if mirror.storage.blob_size(digest) is not None:
        return None
    fill = mirror.fills.get(digest)
    if fill is None:  # its private record is written once the blob is verified
        fill = mirror.fills.start(digest, mirror.client(target), target)
    config = mirror.config
    stall = 2 * config.read_timeout + config.connect_timeout
    while not (fill.done or fill.failure):
        written = fill.written
        try:
            await fill.wait().addTimeout(stall, mirror.reactor)
        except defer.TimeoutError:
            if fill.written == written:
                raise UpstreamError(target.registry, f"blob {digest} made no progress for {stall:.0f} s") from None
    if fill.failure:
        fill.failure.raiseException()
    return fill.size


class _Job:
    def __init__(self, image: PrefetchImage) -> None:
        self.image = image
        self.call: Any = None  # the next run's IDelayedCall
        self.failures = 0
        self.digest: str | None = None  # the digest warmed last


class Prefetcher:
    """Runs the ``prefetch:`` list on schedule; reconfigured by each applied reload (``mirror.reloaders``).

    ``clock`` schedules the runs (the reactor; tests pass a ``task.Clock``); the transfers use the reactor.
    """

    def __init__(self, mirror: Any, clock: Any = None) -> None:
        self.mirror = mirror
        self.clock = clock or mirror.reactor
        self.jobs: dict[PrefetchImage, _Job] = {}
        self.running = False
        self._turn = defer.DeferredLock()  # one image at a time
        self._busy: set[defer.Deferred] = set()

    def start(self) -> None:
        self.running = True
        self.mirror.reloaders.append(self._reloaded)
        self.configure(self.mirror.config.prefetch)

    def stop(self) -> None:
        """No further runs; one under way finishes on its own (its transfers serve the cache as a pull's would)."""
        self.running = False
        if self._reloaded in self.mirror.reloaders:
            self.mirror.reloaders.remove(self._reloaded)
        self.configure(())

    def idle(self) -> defer.Deferred:
        """Fires when no run is under way (for tests and an orderly shutdown)."""
        return defer.DeferredList(list(self._busy))

    def _reloaded(self, old: Config, new: Config) -> None:
        if new.prefetch != old.prefetch:
            self.configure(new.prefetch)

    def configure(self, images: Iterable[PrefetchImage]) -> None:
        """Keep the schedule of images still listed; drop the others; new ones run at once."""
        wanted = dict.fromkeys(images) if self.running else {}
        if wanted and self.mirror.fills is None:
            log.warn("prefetch: the cache is disabled (cache.enabled: false), nothing is kept warm")
            wanted = {}
        for image, job in list(self.jobs.items()):
            if image not in wanted:
                if job.call is not None and job.call.active():
                    job.call.cancel()
                del self.jobs[image]
        for image in wanted:
            if image not in self.jobs:
                job = self.jobs[image] = _Job(image)
                self._schedule(job, 0)

    def _schedule(self, job: _Job, delay: float) -> None:
        job.call = self.clock.callLater(delay, self._run, job)

    def _run(self, job: _Job) -> None:
        job.call = None
        d = self._turn.run(lambda: defer.ensureDeferred(warm(self.mirror, job.image)))
        d.addCallbacks(self._warmed, self._failed, callbackArgs=(job,), errbackArgs=(job,))
        self._busy.add(d)
        d.addBoth(lambda _: self._busy.discard(d))

    def _current(self, job: _Job) -> bool:
        return self.running and self.jobs.get(job.image) is job

    def _warmed(self, result: Warmed, job: _Job) -> None:
        image = job.image
        log.info(
            "prefetch {image}: {digest} {state}{platforms}, {fetched} of {blobs} blobs fetched ({size} bytes)",
            image=str(image),
            digest=result.digest,
            state="unchanged" if result.digest == job.digest else "new",
            platforms=f", {', '.join(result.platforms)}" if result.platforms else "",
            fetched=result.fetched,
            blobs=result.blobs,
            size=result.fetched_bytes,
        )
        job.digest, job.failures = result.digest, 0
        if self._current(job):
            self._schedule(job, image.every)

    def _failed(self, failure: Any, job: _Job) -> None:
        job.failures += 1
        delay = min(job.image.every, RETRY_FIRST * 2 ** (job.failures - 1))
        if failure.check(*EXPECTED):
            why = getattr(failure.value, "reason", None) or getattr(failure.value, "message", None)
            log.warn(
                "prefetch {image} failed ({why}); retrying in {delay:.0f} s",
                image=str(job.image),
                why=why or failure.getErrorMessage() or failure.type.__name__,
                delay=delay,
            )
        else:
            log.failure(
                "prefetch {image} failed; retrying in {delay:.0f} s", failure, image=str(job.image), delay=delay
            )
        if self._current(job):
            self._schedule(job, delay)
