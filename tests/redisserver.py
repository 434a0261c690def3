"""A real Redis for tests: Debian's ``redis-server`` on a free loopback port, nothing saved, output to a log file.

Shaped like :mod:`tests.seaweed`: ``start``/``stop``/``wait_ready`` block (at most their deadline), so call them
from ``setUp`` through ``threads.deferToThread`` while the reactor runs; :func:`shared` gives each test class (by
name) one server for the run. ``stop`` then ``start`` keeps the port, so an outage test sees the same Redis come
back (empty: ``--save ''`` writes nothing, like a Redis restarted without persistence). ``pause`` is SIGSTOP: the
port still accepts connections but nothing answers, the way a stalled Redis looks to its clients.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from twisted.internet import defer

from tests.daemons import LocalDaemon, shared_instance
from tests.seaweed import free_ports

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_DEADLINE = 10.0


class RedisServer(LocalDaemon):
    """One ``redis-server`` process on ``port`` (its log in ``base_dir``); ``url`` is what a client is given."""

    start_deadline = START_DEADLINE

    def __init__(self, base_dir: str, password: str | None = None) -> None:
        if not os.access(REDIS_SERVER, os.X_OK):
            raise RuntimeError(
                f"{REDIS_SERVER} is missing: the fleet tests need Debian's redis-server (scripts/install-system-deps)"
            )
        self.base_dir = os.path.abspath(base_dir)
        os.makedirs(self.base_dir, exist_ok=True)
        self.log_path = os.path.join(self.base_dir, "redis.log")
        self.port = free_ports(1)[0]
        self.host = "127.0.0.1"
        self.password = password
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}{self.host}:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.started_in = 0.0  # seconds the last start took, until PING answered

    def argv(self) -> list[str]:
        return [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            self.base_dir,
            *(["--requirepass", self.password] if self.password else []),
        ]

    def wait_ready(self, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; log:\n{self.log_tail()}")
            try:
                if self.command("PING") in (b"+PONG", b"-NOAUTH Authentication required."):
                    return
            except OSError as e:
                last = e
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer within {START_DEADLINE:g} s ({last}); log:\n{self.log_tail()}")

    def command(self, *args: str, timeout: float = 2.0) -> bytes:
        """One command over a fresh socket (no AUTH), its first reply line (for the test itself: look behind the
        client)."""
        wire = f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            s.sendall(wire)
            reply = b""
            while b"\r\n" not in reply:
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.split(b"\r\n", 1)[0]

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; a paused process is continued first so it can exit."""
        self._end(grace)

    def kill(self) -> None:
        """SIGKILL, paused or not: the process dies without answering anything pending (a crash)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(5)

    def flush(self) -> None:
        """Forget every key (blocking: from a thread), for a test that counts what Redis holds."""
        with socket.create_connection((self.host, self.port), timeout=5) as s:
            if self.password:
                s.sendall(f"AUTH {self.password}\r\n".encode())
                s.recv(100)
            s.sendall(b"FLUSHALL\r\n")
            if not s.recv(100).startswith(b"+OK"):
                raise RuntimeError("FLUSHALL refused")

    def pause(self) -> None:
        """SIGSTOP: the port stays open and accepts connections, but nothing answers (a stalled Redis)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)


_shared: dict[str, RedisServer] = {}


def shared(name: str) -> defer.Deferred:
    """The server named ``name``, started on first use (in a thread, off the reactor); fires with it."""
    return shared_instance(_shared, f"redis-{name}", RedisServer)
