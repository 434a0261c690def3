"""Partial files: the blobs being filled, shared by every process on one cache directory.

A fill writes ``tmp/<hex>.part``, a name every process can find, and holds an exclusive ``flock`` on it for as
long as it runs. So a second process (a ``--workers`` sibling, or any other mirror on the same directory) that
wants the same digest finds the lock taken and follows the growing file instead of asking the upstream again;
and when the owner dies, the kernel drops its lock and one follower takes the file over, resuming from the
upstream with ``Range`` at the bytes already there. ``tmp/<hex>.fill`` beside it says what followers must know
(the size once the upstream answered, the repository the fill runs for): :class:`FillInfo`.

The end of a fill is its path: committed, the file was renamed into ``blobs/`` (verified: followers may send the
tail); failed, it was unlinked first and then unlocked (followers abort, never sending an unverified tail).
Because a path can be renamed or unlinked between our ``open`` and our ``flock``, a claim is only good when the
path still names the inode we locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from dataclasses import asdict, dataclass

PART, INFO = ".part", ".fill"


@dataclass
class FillInfo:
    """What the owner of a fill tells its followers in other processes (``tmp/<hex>.fill``)."""

    repository: str
    credentialed: bool
    source: str = "upstream"
    #: Set once the upstream (or the bucket) answered: the blob's size, None when the upstream does not say.
    size: int | None = None
    answered: bool = False
    pid: int = 0


@dataclass
class Claim:
    """An open partial file: ``owned`` with its lock held (we fill it), else another process fills it."""

    path: str
    fd: int
    owned: bool

    @property
    def written(self) -> int:
        return os.fstat(self.fd).st_size

    def take(self) -> bool:
        """Try to become the owner (the previous one died: its lock is gone). False while it lives, or once the
        file was committed or removed (the path no longer names our inode)."""
        if self.owned:
            return True
        if not _lock(self.fd):
            return False
        if not same_file(self.path, self.fd):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            return False
        self.owned = True
        return True

    def release(self, remove: bool) -> None:
        """Let go: ``remove`` unlinks the file (a failed fill) before the lock goes, so no taker finds it."""
        if remove and self.owned and same_file(self.path, self.fd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self.owned:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(info_path(self.path))
        os.close(self.fd)


def part_path(tmp: str, digest: str) -> str:
    return os.path.join(tmp, digest.split(":", 1)[1] + PART)


def info_path(part: str) -> str:
    return part[: -len(PART)] + INFO


def claim(tmp: str, digest: str) -> Claim:
    """Open (creating it if need be) the partial file of ``digest`` and lock it if nobody holds it."""
    path = part_path(tmp, digest)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        owned = _lock(fd)
        if same_file(path, fd):
            return Claim(path, fd, owned)
        os.close(fd)  # renamed (committed) or unlinked (failed) under us: the path names a new file now


def held(tmp: str, digest: str) -> Claim | None:
    """The partial file of ``digest`` if another process is filling it now (a claim not ours), else None; never
    creates one."""
    path = part_path(tmp, digest)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    if _lock(fd) or not same_file(path, fd):  # nobody fills it (a leftover), or it just ended
        os.close(fd)
        return None
    return Claim(path, fd, owned=False)


def same_file(path: str, fd: int) -> bool:
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (there.st_ino, there.st_dev) == (here.st_ino, here.st_dev)


def write_info(part: str, info: FillInfo) -> None:
    """Replace the fill's info atomically (a follower never reads half of it). A few bytes, no fsync: it only
    matters while the processes that read it live."""
    path = info_path(part)
    temp = f"{path}.{secrets.token_hex(4)}"
    with open(temp, "w") as f:
        json.dump(asdict(info), f)
    os.rename(temp, path)


def read_info(part: str) -> FillInfo | None:
    try:
        with open(info_path(part)) as f:
            return FillInfo(**json.load(f))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def remove_unclaimed(tmp: str) -> int:
    """Remove the partial files nobody fills (left by a process that died) with their info files; returns how many.
    Each is unlinked while we hold its lock, so a process claiming it at the same moment finds a new file."""
    removed = 0
    for entry in os.scandir(tmp):
        if not entry.name.endswith(PART):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            if _lock(fd) and same_file(entry.path, fd):
                os.unlink(entry.path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(info_path(entry.path))
                removed += 1
        finally:
            os.close(fd)
    return removed


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
