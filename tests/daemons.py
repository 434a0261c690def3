"""What the fixtures of real daemons in the test world share (tests/seaweed.py, tests/redisserver.py)."""

from __future__ import annotations

import atexit
import tempfile
from typing import Any, Callable

from twisted.internet import defer, threads


def log_tail(path: str, size: int = 3000) -> str:
    """The end of a daemon's log, for the message of a test that failed because of it."""
    try:
        with open(path, errors="replace") as f:
            return f.read()[-size:]
    except OSError:
        return "(no log)"


def shared_instance(started: dict[str, Any], name: str, make: Callable[[str], Any]) -> defer.Deferred:
    """The daemon named ``name`` in ``started``, made by ``make(directory)`` and started on first use (in a thread,
    off the reactor), stopped at exit; fires with it."""
    if name in started:
        return defer.succeed(started[name])
    daemon = make(tempfile.mkdtemp(prefix=f"{name}-", dir="."))

    def up(_: None) -> Any:
        started[name] = daemon
        atexit.register(daemon.stop)
        return daemon

    return threads.deferToThread(daemon.start).addCallback(up)
