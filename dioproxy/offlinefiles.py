"""The offline windows of ``--workers N``, shared through small files in the workers' run directory.

Without them each worker learns on its own that a registry is down: N workers cost N failed requests (each up to
the whole retry cycle) and N probes per interval. With them, the window one worker opens is seen by all; the
probe is run by one worker at a time; the answer that ends it (a probe's or any request's) ends it for all.

One file per registry, ``offline-<registry>``: its modification time is the end of the window (read with a single
``stat``, cheap enough to do before every upstream request), its content the reason. Absent: the registry is up.
``probe-<registry>``: its modification time is when the last probe started; a worker runs a probe while it holds
the file's ``flock`` (the kernel lets go of it if the worker dies). The directory is private to the workers
(0700, on the local disk or tmpfs), so these calls on the reactor thread do not wait on anything remote.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from urllib.parse import quote


class OfflineFiles:
    """Per registry: the end of its offline window as the workers share it, and who probes it."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _path(self, kind: str, registry: str) -> str:
        return os.path.join(self.directory, f"{kind}-{quote(registry, safe='')}")

    def until(self, registry: str) -> float | None:
        """The end of ``registry``'s window (Unix time), or None when no worker has it offline."""
        try:
            return os.stat(self._path("offline", registry)).st_mtime_ns / 1e9
        except OSError:  # absent (or unreadable: then each worker finds out for itself)
            return None

    def reason(self, registry: str) -> str | None:
        """Why it went offline, as the worker that saw it wrote (for the status page)."""
        try:
            with open(self._path("offline", registry), encoding="utf-8", errors="replace") as f:
                return f.read(500) or None
        except OSError:
            return None

    def start(self, registry: str, until: float, reason: str) -> None:
        """Offline until ``until``: written to a temporary file, then renamed over the old one (readers see the
        old window or the new one, never a half-written file)."""
        path = self._path("offline", registry)
        temp = f"{path}.{os.getpid()}"
        with open(temp, "w", encoding="utf-8") as f:
            f.write(reason[:500])
        ns = int(until * 1e9)
        os.utime(temp, ns=(ns, ns))
        os.replace(temp, path)

    def end(self, registry: str) -> None:
        """The registry answered: up for every worker."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path("offline", registry))

    def claim_probe(self, registry: str, now: float, interval: float) -> int | None:
        """A descriptor to hand to :meth:`probe_done` if this worker is to probe ``registry`` now: no other worker
        probes it and the last probe began ``interval`` seconds ago or more. None otherwise."""
        fd = os.open(self._path("probe", registry), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        last = os.fstat(fd).st_mtime_ns / 1e9
        if os.fstat(fd).st_size and now - last < interval:
            os.close(fd)  # closing lets go of the lock
            return None
        os.ftruncate(fd, 1)  # size 1: a probe has run (a new file's mtime says nothing)
        ns = int(now * 1e9)
        os.utime(fd, ns=(ns, ns))
        return fd

    def probe_done(self, fd: int) -> None:
        os.close(fd)

    def probing(self, registry: str) -> bool:
        """Whether some worker holds the probe lock (its probe is under way)."""
        try:
            fd = os.open(self._path("probe", registry), os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False
