"""A proxy under test on a real loopback port, wired to a fake upstream, torn down cleanly by trial."""

from __future__ import annotations

import http.client
import os
from typing import Any

import treq
from twisted.internet import defer, reactor, threads
from twisted.web.client import Agent, HTTPConnectionPool

from dioproxy.config import build_config
from dioproxy.mirror import Mirror
from dioproxy.resources import Root
from dioproxy.site import MirrorSite
from tests.fakeregistry import FakeRegistry


class Proxy:
    """A running mirror: ``url``, the ``mirror`` object, and a treq client that keeps no connections."""

    def __init__(self, testcase: Any, upstream_url: str, cache_dir: str | None = None, **config: Any) -> None:
        self.cache_dir = cache_dir or os.path.abspath(testcase.mktemp())
        configured = config.get("upstreams", {})
        overrides = [f"{r}={upstream_url}" for r in ("docker.io", "ghcr.io", "quay.io") if r not in configured]
        self.config = build_config(config or None, overrides, self.cache_dir)
        self.mirror = Mirror(self.config, reactor)
        self.mirror.start()
        self.port = reactor.listenTCP(0, MirrorSite(Root(self.mirror)), interface="127.0.0.1")
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
