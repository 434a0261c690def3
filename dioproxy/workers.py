"""``--workers N``: N processes serve one port and one cache directory; the twistd process supervises them.

Why processes: one Python process uses one core (the GIL), and a mirror on a busy machine has more. Nothing else
is needed (no Redis on a single machine): the workers share what lives in the cache directory already (blobs,
manifests, tag entries, private records, the SQLite index, the login token secret), and a fill is one per digest
for all of them through its locked partial file (:mod:`dioproxy.storage.partial`).

Each worker listens on the port with ``SO_REUSEPORT`` and the kernel spreads new connections evenly over them (a
socket shared by all would give a burst of connections to whichever worker wakes first; the cost is that
connections still queued for a worker that dies are reset). The supervisor holds the port, cleans the cache's
leftovers once before the first worker starts, restarts a worker that dies (after a pause that grows while they
keep dying), passes SIGHUP on to every worker, and on SIGTERM stops them all, each draining its requests first.

A worker is ``python -m dioproxy.workers --index I --run-dir DIR -- <the plugin's options>``. The run directory
is private to the workers (made by the supervisor with mode 0700, removed when it stops): each worker's socket
(its metrics and status page share, :mod:`dioproxy.siblings`) and the shared offline windows
(:mod:`dioproxy.offlinefiles`) live there.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from dioproxy.storage.disk import DiskStorage

log = Logger(namespace="dioproxy.workers")  # also when this module runs as a worker's __main__

#: Pause before a dead worker is started again: the first, the most, and how long a worker must live for its
#: successor to start at once.
RESTART_FIRST, RESTART_MAX, HEALTHY_AFTER = 0.5, 30.0, 10.0
#: How long the workers have to finish their requests on SIGTERM before they are killed.
STOP_TIMEOUT = 35.0


def worker_count(text: str) -> int:
    """``--workers``: a number of processes, or ``auto`` for one per core."""
    if text == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--workers: {text!r} is neither a number nor auto") from None
    if not 1 <= n <= 256:
        raise ValueError(f"--workers: {n} is not between 1 and 256")
    return n


def port_socket(port: int, interface: str, listen: bool) -> socket.socket:
    """A socket on the shared port (IPv6 when ``interface`` is an IPv6 address), with ``SO_REUSEPORT``: each
    worker listens on one of its own and the kernel spreads new connections evenly over them. The supervisor's
    is bound but not listening: it holds the port (an error at start if another program has it) and takes none
    of the connections."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((interface or ("::" if family == socket.AF_INET6 else ""), port))
    if listen:
        sock.listen(1024)
        sock.setblocking(False)
    return sock


class _Worker(protocol.ProcessProtocol):
    """One worker process: its output goes to our log line by line, its end to the supervisor."""

    def __init__(self, supervisor: Workers, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = supervisor.reactor.seconds()
        self.ended: defer.Deferred = defer.Deferred()
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            if line.strip():
                log.info("{line}", line=line.decode("utf-8", "replace"), log_system=f"worker {self.index}")

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


class Workers(service.Service):
    """Starts, watches and stops the worker processes (the twistd process's whole job under ``--workers N``)."""

    def __init__(
        self, count: int, plugin_args: list[str], port: int, interface: str, cache_dir: str | None, reactor: Any
    ) -> None:
        self.count = count
        self.plugin_args = plugin_args
        self.port = port
        self.interface = interface
        self.cache_dir = cache_dir
        self.reactor = reactor
        self.workers: dict[int, _Worker] = {}
        self.restart_in: dict[int, float] = {}
        self.stopping = False
        self.sock: socket.socket | None = None
        self.run_dir: str | None = None
        self._previous_hup: Any = None

    def startService(self) -> None:
        super().startService()
        self.sock = port_socket(self.port, self.interface, listen=False)
        self.run_dir = tempfile.mkdtemp(prefix="dioproxy-workers-")  # mode 0700
        removed = DiskStorage(self.cache_dir).clean_temp() if self.cache_dir else 0
        log.info(
            "dioproxy: {n} workers on port {port}{leftovers}",
            n=self.count,
            port=self.sock.getsockname()[1],
            leftovers=f", {removed} interrupted downloads removed" if removed else "",
        )
        for i in range(self.count):
            self.spawn(i)
        if hasattr(signal, "SIGHUP"):
            self._previous_hup = signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.hup))

    def spawn(self, index: int) -> None:
        """Start worker ``index``. Its log goes straight to our stdout when we have one (systemd's journal, a
        terminal, a file): relaying each line through our logger cost this process up to a third of a core under
        load. Only a daemon whose stdout is /dev/null (``twistd --logfile``) relays them."""
        worker = _Worker(self, index)
        args = [sys.executable, "-m", "dioproxy.workers", "--index", str(index), "--run-dir", self.run_dir]
        direct = not _is_devnull(1)
        if direct:
            args.append("--log-direct")
        args += ["--", *self.plugin_args]
        fds = {0: "w", 1: 1, 2: 2} if direct else {0: "w", 1: "r", 2: "r"}
        self.reactor.spawnProcess(worker, sys.executable, args, env=os.environ, childFDs=fds)
        self.workers[index] = worker

    def hup(self) -> None:
        """SIGHUP: every worker reloads its configuration and re-reads the cache directory."""
        for worker in self.workers.values():
            with contextlib.suppress(OSError, error.ProcessExitedAlready):
                worker.transport.signalProcess("HUP")

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.stopping:
            return
        lived = self.reactor.seconds() - worker.started
        wait = self.restart_in.get(worker.index, 0.0)
        wait = 0.0 if lived > HEALTHY_AFTER else min(RESTART_MAX, max(RESTART_FIRST, wait * 2))
        self.restart_in[worker.index] = wait
        log.warn(
            "worker {i} (pid {pid}) ended ({why}); starting it again in {s:.1f} s",
            i=worker.index,
            pid=worker.transport.pid if worker.transport else "?",
            why=reason.value,
            s=wait,
        )
        self.reactor.callLater(wait, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if not self.stopping and index not in self.workers:
            self.spawn(index)

    def stopService(self) -> defer.Deferred:
        """SIGTERM to every worker (each drains its requests), SIGKILL to those still there after the timeout."""
        super().stopService()
        self.stopping = True
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        ended = [w.ended for w in self.workers.values()]
        for worker in self.workers.values():
            with contextlib.suppress(OSError, error.ProcessExitedAlready):
                worker.transport.signalProcess("TERM")
        kill = self.reactor.callLater(STOP_TIMEOUT, self._kill)
        d = defer.DeferredList(ended)

        def done(_: Any) -> None:
            if kill.active():
                kill.cancel()
            if self.sock is not None:
                self.sock.close()
            if self.run_dir is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)

        return d.addCallback(done)

    def _kill(self) -> None:
        for worker in self.workers.values():
            log.warn("worker {i} still running after {s:.0f} s: killed", i=worker.index, s=STOP_TIMEOUT)
            with contextlib.suppress(OSError, error.ProcessExitedAlready):
                worker.transport.signalProcess("KILL")


# -- the worker process ------------------------------------------------------------------------------------------


class SharedPort(service.Service):
    """This worker's own listening socket on the shared port (``SO_REUSEPORT``)."""

    def __init__(self, port: int, interface: str, factory: Any, reactor: Any) -> None:
        self.address = (port, interface)
        self.factory = factory
        self.reactor = reactor
        self.port: Any = None
        self.sock: socket.socket | None = None

    def startService(self) -> None:
        super().startService()
        self.sock = port_socket(*self.address, listen=True)
        self.port = self.reactor.adoptStreamPort(self.sock.fileno(), self.sock.family, self.factory)
        self.sock.close()  # the port holds its own descriptor

    def stopService(self) -> Any:
        super().stopService()
        return self.port.stopListening() if self.port is not None else None


def _is_devnull(fd: int) -> bool:
    try:
        here, null = os.fstat(fd), os.stat(os.devnull)
    except OSError:
        return True
    return (here.st_dev, here.st_ino) == (null.st_dev, null.st_ino)


def _log_to(out: Any, index: int, timestamps: bool) -> None:
    """Log lines marked ``[worker I]``, timestamped here when they go straight to the supervisor's stdout."""
    from twisted.logger import FileLogObserver, formatEvent, formatTime, globalLogBeginner

    def line(event: dict) -> str:
        stamp = formatTime(event.get("log_time")) + " " if timestamps else ""
        level = event.get("log_level")
        where = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
        text = formatEvent(event).replace("\n", "\n\t")
        return f"{stamp}[worker {index}] [{where}] {text}\n"

    globalLogBeginner.beginLoggingTo([FileLogObserver(out, line)], redirectStandardIO=False)


def _die_with_parent() -> None:
    """Linux: SIGTERM when the supervisor goes, however it goes (a killed supervisor leaves no orphans serving)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dioproxy.workers", description="one worker of --workers N")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--run-dir", help="the workers' private directory (their sockets, offline windows)")
    parser.add_argument("--log-direct", action="store_true", help="stdout is the supervisor's own, not a pipe")
    parser.add_argument("plugin_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    plugin_args = args.plugin_args[1:] if args.plugin_args[:1] == ["--"] else args.plugin_args
    _die_with_parent()

    from twisted.internet import reactor

    from dioproxy.service import Options, make_worker

    sys.stdout.reconfigure(line_buffering=True)  # each line as it is written, whoever reads it
    _log_to(sys.stdout, args.index, timestamps=args.log_direct)
    options = Options()
    options.parseOptions(plugin_args)
    top = make_worker(options, args.index, reactor, args.run_dir)
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.callWhenRunning(_stop_once_on_sigterm, reactor)
    reactor.run()


def _stop_once_on_sigterm(reactor: Any) -> None:
    """systemd signals the whole cgroup and the supervisor passes SIGTERM on too: the second one is no news
    (Twisted's own handler would stop a stopping reactor and log a traceback)."""
    stopping = []

    def handler(signum: int, frame: Any) -> None:
        if not stopping:
            stopping.append(signum)
            log.info("Received SIGTERM, shutting down.")
            reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    main()
