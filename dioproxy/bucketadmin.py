"""The ``dioproxy`` admin command against the shared tier (``storage.s3`` in ``--config``): the bucket's half of
``ls``, ``stats``, ``verify`` and ``purge``; :mod:`dioproxy.admin` does the cache directory's half and the output.

Blocking (:class:`~dioproxy.storage.bucketscan.BucketScan`), a few calls at once in a thread pool; memory stays
bounded by a listing page and a chunk per worker, except that ``ls`` and ``purge`` keep the digests they look up.

What it never does, because other replicas share the bucket while it runs:

- delete an object that was replaced since it was read: ``verify --repair`` and ``purge`` delete with
  ``If-Match`` on the ETag they saw, so verified bytes a replica just uploaded over a damaged object stay;
- delete a blob or manifest that any tag entry in the bucket, or in the local cache directory, still refers to
  (through an index and its children): another replica may be serving that tag. When a kept tag's manifest can be
  read from neither tier, what it refers to is unknown, and no blob or manifest is deleted at all;
- delete a private record (``private/``): a replica that uploads a blob again writes its record first, and
  removing a record would make credentialed content look public.

A replica writing a new tag while ``purge`` runs may still find a blob gone: it then fetches it from the upstream.
A replica whose local tier still holds purged content uploads it again at its next reconcile (purge it there too).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import IO, Any

from dioproxy.config import S3Storage
from dioproxy.names import check_digest
from dioproxy.objectstore import ObjectStoreError, StoreConfigError
from dioproxy.prefetch import platform_of
from dioproxy.storage.base import TagEntry
from dioproxy.storage.bucketscan import TAGS, BucketScan, BucketTag, kind_key
from dioproxy.storage.cachedir import BLOB, MANIFEST, references
from dioproxy.storage.disk import DiskStorage

Key = tuple[str, str]  # (kind, digest)


class BucketAdminError(Exception):
    """The bucket refused or failed: one line for the operator (the key to fix when it is the configuration)."""


def open_bucket(settings: S3Storage, jobs: int = 4, timeout: float = 30.0) -> BucketScan:
    """A checked :class:`BucketScan`: wrong credentials, bucket or endpoint are one line naming the key."""
    scan = BucketScan(settings, timeout=timeout, connections=max(4, jobs + 2))
    try:
        scan.check()
    except StoreConfigError as e:
        raise BucketAdminError(str(e)) from None
    return scan


@contextlib.contextmanager
def failures() -> Iterator[None]:
    """A store failing mid-command ends it with one line, not a traceback."""
    try:
        yield
    except ObjectStoreError as e:
        raise BucketAdminError(str(e)) from None


# -- image trees -----------------------------------------------------------------------------------------------


@dataclass
class Tree:
    manifests: list[str]
    blobs: list[str]
    platforms: list[str]
    unreadable: list[str]  # manifests found in neither tier: what they refer to is unknown


class Trees:
    """What an image refers to, its manifests read from the cache directory first (no request), else the bucket;
    each verified against its digest, each read once per command."""

    def __init__(self, local: DiskStorage | None, scan: BucketScan | None) -> None:
        self.local, self.scan = local, scan
        self._refs: dict[str, tuple[list[str], list[str], list[str]] | None] = {}

    def _read(self, digest: str) -> tuple[list[str], list[str], list[str]] | None:
        if digest not in self._refs:
            found = self.local.peek_manifest(digest) if self.local else None
            if found is None and self.scan is not None:
                with contextlib.suppress(ValueError):
                    found = self.scan.manifest(digest)
            refs = None
            if found is not None:
                children, blobs = references(found[1])
                platforms = []
                if children:
                    with contextlib.suppress(ValueError, AttributeError, TypeError):
                        platforms = [platform_of(e) for e in json.loads(found[1]).get("manifests", [])]
                refs = (children, blobs, platforms)
            self._refs[digest] = refs
        return self._refs[digest]

    def tree(self, digest: str | None) -> Tree:
        tree = Tree([], [], [], [])
        pending = [digest] if digest else []
        while pending:
            d = pending.pop()
            if d in tree.manifests:
                continue
            tree.manifests.append(d)
            refs = self._read(d)
            if refs is None:
                tree.unreadable.append(d)
                continue
            pending += refs[0]
            tree.blobs += [b for b in refs[1] if b not in tree.blobs]
            tree.platforms += refs[2]
        return tree

    def keys(self, digest: str | None) -> set[Key]:
        tree = self.tree(digest)
        return {(MANIFEST, m) for m in tree.manifests} | {(BLOB, b) for b in tree.blobs}


def sizes(scan: BucketScan) -> dict[Key, int]:
    """``(kind, digest) -> size`` of every blob and manifest object (one listing page at a time)."""
    return {(kind, digest): info.size for kind in (BLOB, MANIFEST) for digest, info in scan.entries(kind)}


# -- stats -----------------------------------------------------------------------------------------------------


def stats(scan: BucketScan, out: IO[str], human: Callable[[float], str]) -> None:
    """Objects and bytes per kind, from the listing alone (no object is read)."""
    kinds = {"blobs": [0, 0], "manifests": [0, 0], "tags": [0, 0], "private": [0, 0], "other": [0, 0]}
    repositories: set[tuple[str, str]] = set()
    for info in scan.objects():
        top = info.key.split("/", 1)[0]
        kind = top if top in kinds else "other"
        kinds[kind][0] += 1
        kinds[kind][1] += info.size
        if kind == "tags":
            registry, _, rest = info.key[len(TAGS) :].partition("/")
            repositories.add((registry, rest.rpartition("/")[0]))
    out.write(f"bucket            {scan.label} at {scan.settings.endpoint or 'AWS S3'}\n")
    for kind, label in (("blobs", "blobs"), ("manifests", "manifests"), ("tags", "tags"), ("private", "records")):
        count, size = kinds[kind]
        extra = f"  in {len(repositories)} repositories" if kind == "tags" else ""
        extra = "  (private content: the repositories it was seen in)" if kind == "private" else extra
        out.write(f"  {label:<15} {count:>8}  {human(size):>9}{extra}\n")
    count = sum(c for c, _ in kinds.values())
    out.write(f"  {'total':<15} {count:>8}  {human(sum(s for _, s in kinds.values())):>9}\n")
    if kinds["other"][0]:
        out.write(f"  {'other keys':<15} {kinds['other'][0]:>8}  (not the mirror's layout; left alone)\n")


# -- verify ----------------------------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    counts: dict[str, int] = field(default_factory=lambda: {BLOB: 0, MANIFEST: 0, "tag": 0})
    bytes: int = 0
    damaged: int = 0
    removed: int = 0
    kept: int = 0  # damaged, but replaced by a replica before the delete
    unreadable: int = 0
    seconds: float = 0.0


def verify(scan: BucketScan, out: IO[str], repair: bool, jobs: int = 4) -> VerifyResult:
    """Every blob and manifest object through sha256 (``jobs`` streams at once, each a chunk at a time), and every
    tag entry for readability. A damaged object is reported; with ``repair`` it is deleted if unchanged since it
    was read. An object the store fails to send is reported as unreadable and never deleted: that is the store's
    trouble, not proof of damage."""
    result = VerifyResult()
    began = time.monotonic()

    def check(kind: str, digest: str) -> tuple[str, str, Any]:
        try:
            return kind, digest, scan.hash(kind, kind_key(kind, digest))
        except ObjectStoreError as e:
            return kind, digest, e

    def settle(done: Iterable[Future]) -> None:
        for future in done:
            kind, digest, checked = future.result()
            if checked is None:
                continue  # deleted since the listing (a purge, or a replica replacing a damaged copy)
            if isinstance(checked, ObjectStoreError):
                result.unreadable += 1
                out.write(f"UNREADABLE  bucket {kind} {digest}: {checked}\n")
                continue
            result.counts[kind] += 1
            result.bytes += checked.size
            problem = checked.problem
            if problem is None and checked.digest != digest:
                problem = f"content has digest {checked.digest}"
            if problem:
                damaged(f"bucket {kind} {digest}: {problem}", kind_key(kind, digest), checked.etag)

    def damaged(what: str, key: str, etag: str) -> None:
        result.damaged += 1
        if not repair:
            out.write(f"DAMAGED  {what}\n")
        elif scan.delete(key, etag):
            result.removed += 1
            out.write(f"removed  {what}\n")
        else:
            result.kept += 1
            out.write(f"kept     {what}: replaced in the bucket since it was read\n")

    with failures(), ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="verify") as pool:
        pending: set[Future] = set()
        for kind in (BLOB, MANIFEST):
            for digest, _ in scan.entries(kind):
                pending.add(pool.submit(check, kind, digest))
                if len(pending) >= 2 * jobs:  # a bounded queue, however many objects the bucket holds
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    settle(done)
        settle(wait(pending).done)
        for tag in scan.tags():
            result.counts["tag"] += 1
            problem = _tag_problem(tag)
            if problem:
                damaged(f"bucket tag {tag.registry}/{tag.name}:{tag.tag}: {problem}", tag.key, tag.etag)
    result.seconds = time.monotonic() - began
    return result


def _tag_problem(tag: BucketTag) -> str | None:
    if tag.entry is None:
        return "unreadable entry"
    try:
        check_digest(tag.entry.digest)
    except Exception:
        return f"bad digest {tag.entry.digest!r}"
    return None


# -- purge -----------------------------------------------------------------------------------------------------


@dataclass
class PurgePlan:
    tags: list[BucketTag]
    objects: dict[Key, int]  # what goes, with its size
    blocked_by: list[str]  # kept tags whose tree is unknown: then no object goes


def plan_purge(
    scan: BucketScan,
    trees: Trees,
    bucket_tags: list[BucketTag],
    doomed: list[BucketTag],
    local_kept: Iterable[str | None],
) -> PurgePlan:
    """The tag entries to delete and the objects only they refer to: what the doomed tags' trees hold, less what
    any other bucket tag's or any kept local tag's tree holds (see the module docstring)."""
    keep: set[Key] = set()
    blocked: list[str] = []
    doomed_keys = {t.key for t in doomed}
    kept_digests = [t.entry.digest if t.entry else None for t in bucket_tags if t.key not in doomed_keys]
    for t in bucket_tags:
        if t.key not in doomed_keys and t.entry is None:
            blocked.append(f"tag {t.registry}/{t.name}:{t.tag} in the bucket is unreadable")
    for digest in [*kept_digests, *local_kept]:
        if digest is None:
            continue
        tree = trees.tree(digest)
        keep |= {(MANIFEST, m) for m in tree.manifests} | {(BLOB, b) for b in tree.blobs}
        blocked += [f"manifest {m} (in neither tier)" for m in tree.unreadable]
    goes: set[Key] = set()
    for t in doomed:
        if t.entry is not None:
            goes |= trees.keys(t.entry.digest)
    goes -= keep
    present = sizes(scan) if goes and not blocked else {}
    return PurgePlan(doomed, {k: present[k] for k in sorted(goes) if k in present}, blocked)


def purge(
    scan: BucketScan,
    plan: PurgePlan,
    trees: Trees,
    out: IO[str],
    err: IO[str],
    *,
    dry_run: bool,
    verbose: bool,
    jobs: int,
    human: Callable[[float], str],
) -> int:
    """Carry out a plan: tag entries first (so no replica is sent to what goes next), then manifests, then blobs.
    Returns the bytes freed."""
    verb = "would remove" if dry_run else "removed"
    objects = dict(plan.objects)
    with failures():
        for tag in plan.tags:
            if not dry_run and not scan.delete(tag.key, tag.etag):
                # Rewritten by a replica since it was read: it is in use; keep it and what it now refers to.
                out.write(f"kept tag {tag.registry}/{tag.name}:{tag.tag} in the bucket: a replica rewrote it\n")
                for key in trees.keys(_digest_of(scan, tag.key)):
                    objects.pop(key, None)
                continue
            out.write(f"{verb} tag {tag.registry}/{tag.name}:{tag.tag} from the bucket\n")
        if plan.blocked_by and plan.tags:
            err.write(
                "warning: no blob or manifest removed from the bucket: what a kept tag refers to is unknown ("
                + "; ".join(plan.blocked_by[:3])
                + (", ..." if len(plan.blocked_by) > 3 else "")
                + "); purge that tag too, pull it again, or remove an unreadable entry with "
                + "`dioproxy verify --repair`\n"
            )
        ordered = sorted(objects, key=lambda k: (k[0] != MANIFEST, k))

        def remove(key: Key) -> Key:
            if not dry_run:
                scan.delete(kind_key(*key))
            return key

        freed = 0
        with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="purge") as pool:
            for kind, digest in pool.map(remove, ordered):
                freed += objects[(kind, digest)]
                if verbose:
                    out.write(f"{verb} bucket {kind} {digest} ({human(objects[(kind, digest)])})\n")
    out.write(f"{verb} {len(objects)} bucket objects, {human(freed)}\n")
    return freed


def _digest_of(scan: BucketScan, key: str) -> str | None:
    """The digest a tag entry names now (None: gone or unreadable)."""
    with contextlib.suppress(ValueError, TypeError):
        found = scan.read_small(key)
        return TagEntry(**json.loads(found[0])).digest if found else None
    return None


def matching(bucket_tags: list[BucketTag], registry: str, name: str, tag: str | None) -> list[BucketTag]:
    return [t for t in bucket_tags if t.registry == registry and t.name == name and (not tag or t.tag == tag)]


def older_than(bucket_tags: list[BucketTag], cutoff: float) -> list[BucketTag]:
    """Tag entries no replica has checked with the upstream since ``cutoff``: a pulled tag is checked again every
    ``cache.tag_ttl``, so these are tags nobody pulled (an unreadable entry is left to ``verify``)."""
    return [t for t in bucket_tags if t.entry is not None and t.entry.checked < cutoff]
