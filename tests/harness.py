"""A proxy under test on a real loopback port, wired to a fake upstream, torn down cleanly by trial."""

from __future__ import annotations

import http.client
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import treq
from twisted.internet import defer, reactor, task, threads
from twisted.web.client import Agent, HTTPConnectionPool

from dioproxy.config import build_config
from dioproxy.mirror import Mirror
from dioproxy.resources import Root
from dioproxy.site import MirrorSite
from tests.fakeregistry import FakeRegistry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@defer.inlineCallbacks
def eventually(check: Any, timeout: float = 10.0, step: float = 0.05, why: str = "") -> Any:
    """Poll ``check()`` (no sleeping on the reactor) until it is true; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while True:
        result = yield defer.maybeDeferred(check)
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"not true after {timeout}s: {why or check}")
        yield task.deferLater(reactor, step, lambda: None)


class Proxy:
    """A running mirror: ``url``, the ``mirror`` object, and a treq client that keeps no connections."""

    def __init__(
        self, testcase: Any, upstream_url: str, cache_dir: str | None = None, port: int = 0, **config: Any
    ) -> None:
        self.cache_dir = cache_dir or os.path.abspath(testcase.mktemp())
        configured = config.get("upstreams", {})
        overrides = [f"{r}={upstream_url}" for r in ("docker.io", "ghcr.io", "quay.io") if r not in configured]
        self.config = build_config(config or None, overrides, self.cache_dir)
        self.mirror = Mirror(self.config, reactor)
        self.mirror.start()
        self.port = reactor.listenTCP(port, MirrorSite(Root(self.mirror)), interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        self.client = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        testcase.addCleanup(self.stop)

    def get(self, path: str, method: str = "GET", **kwargs: Any) -> defer.Deferred:
        return self.client.request(method, self.url + path, **kwargs)

    def head(self, path: str) -> defer.Deferred:
        """(status, headers) of a HEAD, through http.client: Twisted's client hides a HEAD's Content-Length."""

        def call() -> tuple[int, dict[str, str]]:
            connection = http.client.HTTPConnection("127.0.0.1", self.port.getHost().port, timeout=10)
            try:
                connection.request("HEAD", path)
                response = connection.getresponse()
                return response.status, {k.lower(): v for k, v in response.getheaders()}
            finally:
                connection.close()

        return threads.deferToThread(call)

    def blob_file(self, digest: str) -> str:
        return self.mirror.storage.blob_path(digest)

    def temp_files(self) -> list[str]:
        return os.listdir(os.path.join(self.cache_dir, "tmp"))

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.port.stopListening()
        for channel in list(getattr(self.port.factory, "_channels", ())):
            channel.transport.abortConnection()
        yield self.mirror.close()


def start_upstream(testcase: Any, **kwargs: Any) -> FakeRegistry:
    fake = FakeRegistry(**kwargs).start()
    testcase.addCleanup(fake.stop)
    return fake


class ProxyProcess:
    """A real ``twistd dioproxy`` child process on a free loopback port, for tests that kill or soak it.

    Its log goes to ``log_path``, so no pipe can fill up and stall it. ``nofile``: its descriptor limit
    (``ulimit -n``).
    """

    def __init__(
        self,
        testcase: Any,
        cache_dir: str,
        upstream_url: str,
        *extra: str,
        nofile: int | None = None,
        port: int | None = None,
    ) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = port or s.getsockname()[1]
        self.log_path = os.path.abspath(testcase.mktemp())
        argv = [sys.executable, "-m", "twisted", "--log-format", "text", "dioproxy", "--port", str(self.port)]
        argv += ["--interface", "127.0.0.1", "--cache-dir", cache_dir, "--upstream", f"docker.io={upstream_url}"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*argv, *extra],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None,
            )
        testcase.addCleanup(self.kill)

    @property
    def pid(self) -> int:
        return self.process.pid

    def listening(self) -> defer.Deferred:
        """Fires once the port accepts connections; fails with the log if the process died first."""

        def wait() -> None:
            for _ in range(400):
                if self.process.poll() is not None:
                    with open(self.log_path, errors="replace") as f:
                        raise AssertionError("the proxy exited: " + f.read()[-2000:])
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return
                except OSError:
                    time.sleep(0.05)  # in a thread, never on the reactor
            raise AssertionError("the proxy did not start listening")

        return threads.deferToThread(wait)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
