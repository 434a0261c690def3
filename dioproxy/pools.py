"""Thread pools of our own, one per kind of blocking work, each wait on them with a deadline.

Twisted's default pool also runs its name resolver: if bcrypt checks or a slow disk filled it, DNS lookups for
upstream requests would queue behind them. So logins (CPU-bound bcrypt), disk work (fsync, unlink, scans)
and the cache index (one thread: it owns its SQLite connection) each get a small pool, and a caller
never waits longer than its deadline for one (the work itself cannot be interrupted; its answer is dropped).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool


class PoolTimeout(Exception):
    """A thread pool did not answer within its deadline."""


class BlockingPool:
    """``size`` threads for one kind of blocking work; ``run`` fails with :class:`PoolTimeout` past ``timeout``."""

    def __init__(self, reactor: Any, name: str, size: int, timeout: float) -> None:
        self.reactor = reactor
        self.name = name
        self.timeout = timeout
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name=f"dioproxy-{name}")
        self._pool.start()  # threads are made on demand

    def run(self, f: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> defer.Deferred:
        """``f(*args, **kwargs)`` in a thread of this pool; its result, or PoolTimeout after the deadline."""
        deadline = self.timeout if timeout is None else timeout
        d = threads.deferToThreadPool(self.reactor, self._pool, f, *args, **kwargs)

        def timed_out(failure: Any) -> Any:
            failure.trap(defer.TimeoutError)
            raise PoolTimeout(f"{self.name} pool: no answer within {deadline:g} s")

        return d.addTimeout(deadline, self.reactor).addErrback(timed_out)

    @property
    def busy(self) -> int:
        """Threads working now plus calls waiting for one."""
        return len(self._pool.working) + self._pool._queue.qsize()

    def stop(self) -> None:
        """Let running work finish and join the threads (at shutdown)."""
        if self._pool.started:
            self._pool.stop()


class Pools:
    """The mirror's pools: ``auth`` (bcrypt), ``disk`` (fsync, unlink, scans), ``index`` (one thread)."""

    def __init__(self, reactor: Any) -> None:
        self.auth = BlockingPool(reactor, "auth", 2, timeout=30.0)
        self.disk = BlockingPool(reactor, "disk", 4, timeout=120.0)
        self.index = BlockingPool(reactor, "index", 1, timeout=120.0)

    def stop(self) -> None:
        for pool in (self.auth, self.disk, self.index):
            pool.stop()
