"""Processes of the end-to-end world: finding tools, free ports, starting, waiting for and stopping daemons.

Everything here is blocking on purpose and is called from threads (``deferToThread``), never on trial's reactor.
Each daemon runs in its own session (process group) so that stopping it also stops what it spawned (dockerd's
containerd, nginx's workers), and every started process is remembered so that an interpreter exit kills leftovers
even when a test died half-way.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

#: Binary → Debian package; ``scripts/install-system-deps`` (run by ``make test`` as root) installs them.
TOOLS = {
    "/usr/bin/docker-registry": "docker-registry",
    "/usr/sbin/dockerd": "docker.io",
    "/usr/bin/docker": "docker.io",
    "/usr/bin/podman": "podman",
    "/usr/bin/containerd": "containerd",
    "/usr/bin/ctr": "containerd",
    "/usr/bin/skopeo": "skopeo",
    "/usr/sbin/nginx": "nginx-light",
}


class MissingTool(AssertionError):
    """A tool the suite needs is absent. An assertion error on purpose: the tests fail, they never skip."""


def tool(path: str) -> str:
    """Returns ``path`` if it is an executable, else fails with the command that installs it.

    Full paths, not ``$PATH`` look-ups: ``/usr/local/bin/docker`` on some machines is another client build.
    """
    if os.access(path, os.X_OK):
        return path
    package = TOOLS.get(path, "?")
    raise MissingTool(
        f"{path} is missing (Debian package {package}): run `sudo scripts/install-system-deps` "
        "(`make test` does it when run as root)"
    )


INSTALLER = Path(__file__).resolve().parents[2] / "scripts" / "install-system-deps"


def ensure_tools() -> None:
    """Installs missing Debian packages when running as root (what ``make test`` does first anyway), then fails
    loudly, naming every tool still missing. Blocking (apt-get): call it from a thread."""
    missing = [path for path in TOOLS if not os.access(path, os.X_OK)]
    if missing and os.geteuid() == 0:
        subprocess.run([str(INSTALLER)], stdin=subprocess.DEVNULL, capture_output=True, timeout=1200)
        missing = [path for path in TOOLS if not os.access(path, os.X_OK)]
    if missing:
        packages = sorted({TOOLS[path] for path in missing})
        raise MissingTool(
            f"missing {', '.join(missing)} (Debian packages {' '.join(packages)}): "
            f"run `sudo {INSTALLER}` (`make test` does it when run as root)"
        )


def free_port() -> int:
    """An unused loopback port. A small race with other programs remains; the suite runs alone on CI."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_live: set[Daemon] = set()
_live_lock = threading.Lock()


class Daemon:
    """One long-running process with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.process: subprocess.Popen | None = None

    def start(self) -> Daemon:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        with _live_lock:
            _live.add(self)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], timeout: float = 30.0, what: str = "ready") -> None:
        """Polls ``ready`` until true; fails with the daemon's log tail if it dies or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise AssertionError(
                    f"{self.name} exited with {self.process and self.process.returncode} before it was {what}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not {what} after {timeout}s; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the whole process group, SIGKILL after ``timeout``."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        # Children that outlived their leader (rare) go too.
        _signal_group(process.pid, signal.SIGKILL)
        with _live_lock:
            _live.discard(self)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@atexit.register
def _kill_leftovers() -> None:
    """Last line of defence: no daemon of the suite survives the test run, whatever happened."""
    for daemon in list(_live):
        daemon.stop(timeout=5)


def http_status(url: str, timeout: float = 2.0) -> int:
    """The status code of a GET, errors included (a 401 is an answer too)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def run(
    argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Runs a command to completion, output captured; with ``check`` a failure shows the command's output."""
    result = subprocess.run(
        list(argv), env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"command failed ({result.returncode}): {' '.join(argv)}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
        )
    return result


def remove_tree(path: Path) -> None:
    """Removes a state directory; dockerd and podman leave read-only or mounted bits behind, so be forgiving."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)
