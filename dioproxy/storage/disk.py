"""The cache on disk: content-addressed blobs and manifests, tag entries and private records; the disk
implementation of :mod:`dioproxy.storage.base`'s blob and metadata stores, over the layout of
:mod:`dioproxy.storage.layout`.

Every entry appears by ``rename`` of a complete, verified (and for small files fsynced) temp file, so a crash never
leaves a half-written entry in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from dioproxy.pools import BlockingPool
from dioproxy.storage import cachedir, layout, partial
from dioproxy.storage.base import BLOB, MANIFEST, Key, TagEntry
from dioproxy.storage.cachedir import listing
from dioproxy.storage.layout import blob_name as blob_name  # dioproxy.blobs builds the nginx accel path with it

log = Logger()

#: Bytes read at a time when a whole entry is checked against its digest.
CHUNK = 1024 * 1024


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _manifest_entry(data: bytes, digest: str) -> tuple[str, bytes] | None:
    """(media type, bytes) of a manifest file, or None if the bytes are not the digest's (a damaged file)."""
    media_type, _, body = data.partition(b"\n")
    if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
        return None
    return media_type.decode("utf-8", "replace"), body


def read_manifest(root: str, digest: str) -> tuple[str, bytes] | None:
    """(media type, bytes) of a stored manifest, or None (missing, or not matching its digest)."""
    data = _read(layout.manifest_path(root, digest))
    return None if data is None else _manifest_entry(data, digest)


def _replace(tmp: str, path: str, data: bytes | None) -> None:
    """Put ``data`` at ``path`` (None: remove it): a temp file, fsynced, renamed over it. Blocking: a thread's job.

    The fsync comes before the rename so a crash never leaves an empty or torn file under the final name (ext4's
    delayed allocation would); the directory is not fsynced: a rename lost in a crash only loses a cache entry.
    """
    if data is None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(path)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = os.path.join(tmp, f"w.{secrets.token_hex(8)}")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


@dataclass
class LocalBlob:
    """A blob file open for reading (a :class:`~dioproxy.storage.base.BlobSource`)."""

    fd: int
    size: int

    def close(self) -> None:
        os.close(self.fd)


class DiskStorage:
    """Paths and atomic writes; callers have already validated names and digests.

    Besides the interfaces, the local tier's own calls (paths, temp files, answers in the same turn) are here
    for what only makes sense on this machine: fills, sendfile, the command-line tools.

    Small files (manifests, tag entries, records) are written in ``pool`` (the disk pool: an fsync must never
    stall the reactor), one write at a time per path, the latest bytes winning; until a write is done, reads
    through this object see its bytes, so callers can go on as if it were done. Without a pool (the command-line
    tools) they are written at once; listings and deletes too.

    ``create=False`` (the command-line tools): a directory is read as it is, no subdirectory made.
    """

    def __init__(self, root: str, pool: BlockingPool | None = None, *, create: bool = True) -> None:
        self.root = os.path.abspath(root)
        self.tmp = layout.tmp_dir(self.root)
        for sub in layout.DIRS if create else ():
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self.pool = pool
        self._writing: dict[str, bytes | None] = {}  # path -> bytes being written now (None: a removal)
        self._queued: dict[str, bytes | None] = {}  # path -> bytes to write once that is done
        self._waiters: dict[str, list[defer.Deferred]] = {}  # path -> callers of write_small for the queued bytes
        self._settled: list[defer.Deferred] = []

    def clean_temp(self) -> int:
        """Remove what a crash left in ``tmp/``; returns how many files. Partial files another process on this
        directory is filling stay (:mod:`dioproxy.storage.partial`); the rest is only safe before serving starts."""
        removed = partial.remove_unclaimed(self.tmp)
        for entry in os.scandir(self.tmp):
            if entry.name.endswith(partial.PART) or (
                entry.name.endswith(partial.INFO) and os.path.exists(entry.path[: -len(partial.INFO)] + partial.PART)
            ):
                continue
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError as e:
                log.warn("cannot remove stale temp file {path}: {e}", path=entry.path, e=e)
        return removed

    # -- blobs ---------------------------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        return layout.blob_path(self.root, digest)

    def blob_size(self, digest: str) -> int | None:
        try:
            return os.stat(self.blob_path(digest)).st_size
        except FileNotFoundError:
            return None

    def commit_blob(self, temp_path: str, digest: str) -> str:
        final = self.blob_path(digest)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(temp_path, final)
        return final

    def free_bytes(self) -> int:
        """Room left on the disk the fills write to."""
        stat = os.statvfs(self.tmp)
        return stat.f_bavail * stat.f_frsize

    # BlobStore: a stat and an open cost microseconds, so they run on the reactor, as they always did.

    def size(self, digest: str) -> defer.Deferred:
        return defer.succeed(self.blob_size(digest))

    def open(self, digest: str) -> defer.Deferred:
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return defer.succeed(None)
        return defer.succeed(LocalBlob(fd, os.fstat(fd).st_size))

    def commit(self, temp_path: str, digest: str) -> defer.Deferred:
        self.commit_blob(temp_path, digest)
        return defer.succeed(None)

    def delete(self, digests: list[str]) -> defer.Deferred:
        return self.delete_entries([(BLOB, d) for d in digests])

    def list(self, prefix: str) -> defer.Deferred:
        return self.list_entries(BLOB, prefix)

    # -- manifests -----------------------------------------------------------------------------------------------

    def manifest_path(self, digest: str) -> str:
        return layout.manifest_path(self.root, digest)

    def read_manifest(self, digest: str) -> tuple[str, bytes] | None:
        """(media type, bytes), or None; a file that does not match its digest is removed, never served."""
        path = self.manifest_path(digest)
        data = self.read_small(path)
        entry = None if data is None else _manifest_entry(data, digest)
        if data is not None and entry is None:
            log.warn("cached manifest {digest} does not match its digest: removed", digest=digest)
            self._write(path, None)
        return entry

    def write_manifest(self, digest: str, media_type: str, body: bytes) -> None:
        self.write_small(self.manifest_path(digest), media_type.encode() + b"\n" + body)

    def has_manifest(self, digest: str) -> bool:
        return os.path.exists(self.manifest_path(digest))

    def peek_manifest(self, digest: str) -> tuple[str, bytes] | None:
        """As :meth:`read_manifest`, but a damaged file stays (the command-line tools report it)."""
        return read_manifest(self.root, digest)

    def delete_manifests(self, digests: list[str]) -> defer.Deferred:
        return self.delete_entries([(MANIFEST, d) for d in digests])

    def list_manifests(self, prefix: str) -> defer.Deferred:
        return self.list_entries(MANIFEST, prefix)

    # -- entries of both kinds (the cache bound, the command-line tools) ----------------------------------------

    def slices(self) -> list[tuple[str, str]]:
        return layout.slices()

    def list_entries(self, kind: str, prefix: str) -> defer.Deferred:
        return self._run(listing, layout.entry_dir(self.root, kind, prefix), prefix)

    def delete_entries(self, keys: list[Key]) -> defer.Deferred:
        return self._run(unlink_all, [layout.entry_path(self.root, kind, digest) for kind, digest in keys])

    def legacy_last_uses(self) -> defer.Deferred:
        """``{kind: {digest: time}}`` from the snapshot of versions before the index (empty: none); see
        :func:`~dioproxy.storage.cachedir.load_lastuse`."""
        return self._run(cachedir.load_lastuse, self.root)

    def drop_legacy_last_uses(self) -> defer.Deferred:
        """Remove that snapshot, once the index holds what it said."""
        return self._run(_unlink, layout.lastuse_path(self.root))

    # Blocking, answered at once: the command-line tools.

    def scan(self) -> Iterator[cachedir.Entry]:
        """Every stored blob and manifest with its size and mtime."""
        return cachedir.scan(self.root)

    def tags(self) -> Iterator[cachedir.Tag]:
        """Every tag entry (None where unreadable)."""
        return cachedir.tags(self.root)

    def temp_files(self) -> list[str]:
        """Names in ``tmp/``: fills under way, or what a crash left."""
        tmp = self.tmp
        return os.listdir(tmp) if os.path.isdir(tmp) else []

    def entry_size(self, kind: str, digest: str) -> int | None:
        """The entry's size; None if it is not stored (or ``digest`` names no file)."""
        try:
            return os.stat(layout.entry_path(self.root, kind, digest)).st_size
        except (FileNotFoundError, NotADirectoryError, IndexError):
            return None

    def check_entry(self, kind: str, digest: str) -> str | None:
        """What is wrong with a stored entry (its bytes against its digest; a manifest's media type line), None if
        nothing. Raises FileNotFoundError if it is not stored, OSError if it cannot be read."""
        sha = hashlib.sha256()
        with open(layout.entry_path(self.root, kind, digest), "rb") as f:
            if kind == MANIFEST:
                data = f.read()
                media_type, newline, body = data.partition(b"\n")
                if not newline or not media_type:
                    return "not a manifest entry (no media type line)"
                sha.update(body)
            else:
                while data := f.read(CHUNK):
                    sha.update(data)
        got = "sha256:" + sha.hexdigest()
        return None if got == digest else f"content has digest {got}"

    def unlink_entry(self, kind: str, digest: str) -> None:
        """Remove an entry now (gone already is fine; other errors are raised)."""
        _unlink(layout.entry_path(self.root, kind, digest))

    def unlink_tag(self, registry: str, name: str, tag: str) -> None:
        """Remove a tag entry now, past the queue of small writes (gone already is fine; other errors are raised)."""
        _unlink(layout.tag_path(self.root, registry, name, tag))

    # -- tags ----------------------------------------------------------------------------------------------------

    def tag_path(self, registry: str, name: str, tag: str) -> str:
        return layout.tag_path(self.root, registry, name, tag)

    def read_tag(self, registry: str, name: str, tag: str) -> TagEntry | None:
        data = self.read_small(self.tag_path(registry, name, tag))
        if data is None:
            return None
        try:
            return TagEntry(**json.loads(data))
        except (ValueError, TypeError) as e:
            log.warn(
                "ignoring unreadable tag entry {registry}/{name}:{tag}: {e}",
                registry=registry,
                name=name,
                tag=tag,
                e=e,
            )
            return None

    def write_tag(self, registry: str, name: str, tag: str, entry: TagEntry) -> None:
        self.write_small(self.tag_path(registry, name, tag), json.dumps(asdict(entry)).encode())

    def list_tags(self, registry: str, name: str) -> defer.Deferred:
        """Fires with the sorted tags we hold an entry for, entries still being written included: the directory is
        listed in the disk pool, the pending writes are merged here, on the reactor, where they change."""
        directory = layout.tags_dir(self.root, registry, name)
        listed = self._run(_listdir, directory)

        def merged(tags: set[str]) -> list[str]:
            for pending in (self._writing, self._queued):  # the queued write is the later one
                for path, data in pending.items():
                    if os.path.dirname(path) == directory:
                        (tags.add if data is not None else tags.discard)(os.path.basename(path))
            return sorted(tags)

        return listed.addCallback(merged)

    def delete_tag(self, registry: str, name: str, tag: str) -> None:
        self.delete_small(self.tag_path(registry, name, tag))

    # -- private records -----------------------------------------------------------------------------------------

    def _record_path(self, digest: str) -> str:
        return layout.record_path(self.root, digest)

    def read_record(self, digest: str) -> bytes | None:
        return self.read_small(self._record_path(digest))

    def write_record(self, digest: str, data: bytes) -> defer.Deferred:
        return self.write_small(self._record_path(digest), data)

    def delete_record(self, digest: str) -> defer.Deferred:
        return self.delete_small(self._record_path(digest))

    # -- small files ---------------------------------------------------------------------------------------------

    def read_small(self, path: str) -> bytes | None:
        """A small file's bytes (None: there is none), a write still under way included."""
        for pending in (self._queued, self._writing):
            if path in pending:
                return pending[path]
        return _read(path)

    def write_small(self, path: str, data: bytes) -> defer.Deferred:
        """Small files only (manifests, tag entries, records): written whole, fsynced, renamed into place, in the
        disk pool. A failure is logged (the caller's memory still has the bytes).

        Returns a Deferred firing with True once these bytes (or later ones for the path) are on disk, False if
        that failed: a caller that must order something after the write (a record other processes read) waits for
        it, the others need not.
        """
        return self._write(path, data)

    def delete_small(self, path: str) -> defer.Deferred:
        """Remove a small file, in order with the writes asked for before (the same queue)."""
        return self._write(path, None)

    def settled(self) -> defer.Deferred:
        """Fires once every small write asked for so far is on disk (before the pool stops; tests that read files)."""
        if not self._writing:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._settled.append(d)
        return d

    def _run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Blocking work: in the disk pool, or at once without one."""
        return defer.maybeDeferred(f, *args) if self.pool is None else self.pool.run(f, *args)

    def _write(self, path: str, data: bytes | None) -> defer.Deferred:
        if self.pool is None:
            try:
                _replace(self.tmp, path, data)
            except OSError as e:
                return defer.succeed(self._failed(e, path))
            return defer.succeed(True)
        done: defer.Deferred = defer.Deferred()
        self._queued[path] = data
        self._waiters.setdefault(path, []).append(done)
        if path not in self._writing:
            self._next(path)
        return done

    def _next(self, path: str) -> None:
        data = self._writing[path] = self._queued.pop(path)
        waiters = self._waiters.pop(path)
        d = self.pool.run(_replace, self.tmp, path, data)
        d.addCallbacks(lambda _: True, lambda failure: self._failed(failure.value, path))
        d.addCallback(self._written, path, waiters)

    def _written(self, ok: bool, path: str, waiters: list[defer.Deferred]) -> None:
        del self._writing[path]
        if path in self._queued:
            self._next(path)
        for d in waiters:
            d.callback(ok)
        if not self._writing:
            settled, self._settled = self._settled, []
            for d in settled:
                d.callback(None)

    def _failed(self, error: BaseException, path: str) -> bool:
        log.warn("cannot write {path}: {error}", path=os.path.relpath(path, self.root), error=error)
        return False


def _listdir(directory: str) -> set[str]:
    try:
        return set(os.listdir(directory))
    except FileNotFoundError:
        return set()


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def unlink_all(paths: list[str]) -> list[str | None]:
    """Per path: None (removed), "gone" (it was not there) or the error."""
    errors: list[str | None] = []
    for path in paths:
        try:
            os.unlink(path)
            errors.append(None)
        except FileNotFoundError:
            errors.append("gone")
        except OSError as e:
            errors.append(str(e))
    return errors
