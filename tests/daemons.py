"""What the fixtures of real daemons in the test world share (tests/seaweed.py, tests/redisserver.py)."""

from __future__ import annotations

import atexit
import signal
import subprocess
import tempfile
import time
from typing import Any, Callable

from twisted.internet import defer, threads


def log_tail(path: str, size: int = 3000) -> str:
    """The end of a daemon's log, for the message of a test that failed because of it."""
    try:
        with open(path, errors="replace") as f:
            return f.read()[-size:]
    except OSError:
        return "(no log)"


class LocalDaemon:
    """A daemon started from ``argv()`` with its output in ``log_path``, ready once ``wait_ready(deadline)`` returns
    (which raises with the log's tail when it is not). Subclasses set ``start_deadline`` and define both."""

    start_deadline = 30.0
    base_dir: str
    log_path: str
    process: subprocess.Popen | None = None
    started_in = 0.0  # seconds the last start took, until it answered

    def argv(self) -> list[str]:
        raise NotImplementedError

    def wait_ready(self, deadline: float) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _end(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; a paused process is continued first so it can exit."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(grace)

    def start(self) -> None:
        assert self.process is None, "already running"
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=self.base_dir)
        try:
            self.wait_ready(began + self.start_deadline)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began

    def log_tail(self, size: int = 3000) -> str:
        return log_tail(self.log_path, size)


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
