"""The cache index: every stored entry's size and last use, in SQLite (``index.db`` in the cache directory).

Why SQLite: it is in the standard library, its B-tree on ``used`` gives the least recently used entries without
holding a million of them in memory or sorting them, each change is a small transaction instead of a rewritten
snapshot, and in WAL mode several processes on one cache directory read and write the same file safely (readers
never wait for the writer; writers take turns, waiting up to ``busy_timeout``). Byte and entry totals are kept by
triggers, so reading them costs two rows, not a scan.

Blocking, no Twisted: the proxy calls it only from its one ``index`` thread (``mirror.pools.index``), the admin
command directly. The index is derived data: a missing, old or damaged file is rebuilt from the directory by the
next scan (last uses then start from the files' mtimes).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator

from dioproxy.storage.cachedir import KINDS, load_lastuse, scan

INDEX_FILE = "index.db"
#: Bumped when the schema changes: an index of another version is dropped and rebuilt by the scan.
VERSION = 1
Key = tuple[str, str]  # (kind, digest)

_SCHEMA = (
    """CREATE TABLE entries (
        kind TEXT NOT NULL, digest TEXT NOT NULL, size INTEGER NOT NULL, used REAL NOT NULL,
        PRIMARY KEY (kind, digest)
    ) WITHOUT ROWID""",
    "CREATE INDEX entries_by_use ON entries (used)",
    "CREATE TABLE totals (kind TEXT PRIMARY KEY, entries INTEGER NOT NULL, bytes INTEGER NOT NULL)",
    "INSERT INTO totals VALUES ('blob', 0, 0), ('manifest', 0, 0)",
    """CREATE TRIGGER entries_added AFTER INSERT ON entries BEGIN
        UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.size WHERE kind = NEW.kind;
    END""",
    """CREATE TRIGGER entries_removed AFTER DELETE ON entries BEGIN
        UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.size WHERE kind = OLD.kind;
    END""",
    """CREATE TRIGGER entries_resized AFTER UPDATE OF size ON entries BEGIN
        UPDATE totals SET bytes = bytes - OLD.size + NEW.size WHERE kind = NEW.kind;
    END""",
)
_UPSERT = (
    "INSERT INTO entries (kind, digest, size, used) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (kind, digest) DO UPDATE SET size = excluded.size, used = excluded.used"
)
_TOUCH = "UPDATE entries SET used = max(used, ?) WHERE kind = ? AND digest = ?"


def index_path(root: str) -> str:
    return os.path.join(root, INDEX_FILE)


def remove_index(root: str) -> None:
    """Delete the index file and its WAL companions (it is rebuilt from the directory)."""
    _remove(index_path(root))


def _remove(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def last_use(root: str) -> dict[Key, float]:
    """``(kind, digest) → last use`` of every entry in the directory, for the admin command: the index's time
    where it knows one (an old snapshot's before that), else the file's mtime."""
    known = _read_last_uses(index_path(root))
    snapshot = load_lastuse(root)
    return {
        (e.kind, e.digest): max(e.mtime, snapshot[e.kind].get(e.digest, 0.0), known.get((e.kind, e.digest), 0.0))
        for e in scan(root)
    }


def _read_last_uses(path: str) -> dict[Key, float]:
    """Read only, creating no file (the admin may run as another user than the proxy): with ``mode=ro`` while a
    proxy has the index open (its WAL exists), as an immutable file when nobody has."""
    if not os.path.exists(path):
        return {}
    mode = "mode=ro" if os.path.exists(path + "-wal") else "immutable=1"
    try:
        db = sqlite3.connect(f"file:{path}?{mode}", uri=True)
        try:
            return {(k, d): used for k, d, used in db.execute("SELECT kind, digest, used FROM entries")}
        finally:
            db.close()
    except sqlite3.Error:
        return {}  # unreadable: the proxy's next scan rebuilds it


class CacheIndex:
    """Entries by (kind, digest) → (size, last use); one connection, used by one thread at a time."""

    def __init__(self, path: str, busy_timeout: float = 30.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        try:
            self._db = self._open_shared()
        except sqlite3.OperationalError:  # locked, unwritable: never a reason to drop what others share
            raise
        except sqlite3.DatabaseError:  # not a database, or damaged: derived data, so start afresh
            _remove(path)
            self._db = self._open()

    def _open_shared(self) -> sqlite3.Connection:
        """Open, retrying while another process holds the lock: switching to WAL (and WAL recovery) can answer
        "database is locked" at once, without SQLite's busy handler waiting. We run in the index thread, so the
        pauses block no reactor."""
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.01
        while True:
            try:
                return self._open()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # WAL: a crash may lose the last uses, never corrupt the file
            with self._write(db):
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version != VERSION:
                    tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
                    for (name,) in tables:  # their indexes and triggers go with them
                        db.execute(f'DROP TABLE "{name}"')
                    for statement in _SCHEMA:  # not executescript: it would commit
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    @contextlib.contextmanager
    def _write(db: sqlite3.Connection) -> Iterator[None]:
        """One write transaction, taken at once (IMMEDIATE): what it reads stays true until it commits."""
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # -- reading -------------------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return sum(self.totals()[1].values())

    @property
    def counts(self) -> dict[str, int]:
        return self.totals()[0]

    def totals(self) -> tuple[dict[str, int], dict[str, int]]:
        """``({kind: entries}, {kind: bytes})``."""
        rows = self._db.execute("SELECT kind, entries, bytes FROM totals").fetchall()
        counts, sizes = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)
        for kind, n, nbytes in rows:
            counts[kind], sizes[kind] = n, nbytes
        return counts, sizes

    def __len__(self) -> int:
        return sum(self.counts.values())

    def __contains__(self, key: Key) -> bool:
        return self.get(key) is not None

    def get(self, key: Key) -> tuple[int, float] | None:
        return self._db.execute("SELECT size, used FROM entries WHERE kind = ? AND digest = ?", key).fetchone()

    def oldest(self, before: float | None = None) -> Iterator[tuple[Key, tuple[int, float]]]:
        """The entries, least recently used first (only those last used before ``before``), lazily."""
        query = "SELECT kind, digest, size, used FROM entries"
        args: tuple = ()
        if before is not None:
            query, args = query + " WHERE used < ?", (before,)
        for kind, digest, size, used in self._db.execute(query + " ORDER BY used", args):
            yield (kind, digest), (size, used)

    # -- changes -------------------------------------------------------------------------------------------------

    def add(self, key: Key, size: int, used: float) -> None:
        """A new (or rewritten) entry; it counts as just used."""
        self.apply({key: (size, used)}, {})

    def touch(self, key: Key, now: float) -> bool:
        with self._write(self._db):
            return self._db.execute(_TOUCH, (now, *key)).rowcount > 0

    def remove(self, key: Key) -> tuple[int, float] | None:
        with self._write(self._db):
            entry = self.get(key)
            self._db.execute("DELETE FROM entries WHERE kind = ? AND digest = ?", key)
        return entry

    def apply(self, added: dict[Key, tuple[int, float]], touched: dict[Key, float]) -> None:
        """A batch of stored entries and last uses, in one transaction."""
        if not added and not touched:
            return
        with self._write(self._db):
            self._db.executemany(_UPSERT, [(k, d, size, used) for (k, d), (size, used) in added.items()])
            self._db.executemany(_TOUCH, [(used, k, d) for (k, d), used in touched.items()])

    def claim(
        self,
        pinned: set[Key],
        limit: int,
        before: float | None = None,
        room: int | None = None,
        need: int = 0,
    ) -> tuple[list[tuple[str, str, int, str]], int]:
        """Take victims out of the index, at most ``limit``, in one transaction (two processes never take the
        same one): entries last used before ``before`` ("age"), then least recently used ones until the stored
        bytes fit in ``room`` ("size") or until ``need`` bytes are freed ("space"). Pinned entries stay.

        Returns ``[(kind, digest, size, reason)]`` and the bytes still wanted (more than 0: hit the limit, or
        the rest is pinned)."""
        victims: list[tuple[str, str, int, str]] = []
        with self._write(self._db):
            if before is not None:
                self._take(victims, pinned, limit, "age", before=before)
            stored = sum(self.totals()[1].values()) - sum(v[2] for v in victims)
            wanted = max(need, stored - room if room is not None else 0)
            if wanted > 0:
                wanted -= self._take(victims, pinned, limit, "space" if need else "size", wanted=wanted)
            self._db.executemany(
                "DELETE FROM entries WHERE kind = ? AND digest = ?", [(kind, digest) for kind, digest, _, _ in victims]
            )
        return victims, max(wanted, 0)

    def _take(
        self,
        victims: list,
        pinned: set[Key],
        limit: int,
        reason: str,
        before: float | None = None,
        wanted: int | None = None,
    ) -> int:
        taken = {(v[0], v[1]) for v in victims}
        freed = 0
        for key, (size, _) in self.oldest(before):
            if len(victims) >= limit or (wanted is not None and freed >= wanted):
                break
            if key in pinned or key in taken:
                continue
            victims.append((*key, size, reason))
            freed += size
        return freed

    def reconcile(
        self,
        kind: str,
        prefix: str,
        listing: list[tuple[str, int, float]],
        listed_at: float,
        last_use: dict[str, float],
        leaving: set[Key],
    ) -> tuple[int, int]:
        """Make the entries of one directory slice (digests starting with ``prefix``) match its ``listing`` of
        ``(digest, size, mtime)``, taken at ``listed_at``. New entries start from their mtime (or an old
        snapshot's ``last_use``); entries whose file is gone leave, unless stored or used since the listing
        (their file came after it). ``leaving`` entries are being evicted now: not added back.

        Returns (added, removed)."""
        lo, hi = prefix, prefix + "g"  # hex digits sort below "g"
        with self._write(self._db):
            known = dict(
                self._db.execute(
                    "SELECT digest, size FROM entries WHERE kind = ? AND digest >= ? AND digest < ?", (kind, lo, hi)
                )
            )
            new, resized = [], []
            for digest, size, mtime in listing:
                had = known.pop(digest, None)
                if had is None:
                    if (kind, digest) not in leaving:
                        new.append((kind, digest, size, max(mtime, last_use.get(digest, 0.0))))
                elif had != size:
                    resized.append((size, kind, digest))
            self._db.executemany(_UPSERT, new)
            self._db.executemany("UPDATE entries SET size = ? WHERE kind = ? AND digest = ?", resized)
            gone = self._db.executemany(
                "DELETE FROM entries WHERE kind = ? AND digest = ? AND used < ?",
                [(kind, digest, listed_at) for digest in known],
            ).rowcount
        return len(new), gone
