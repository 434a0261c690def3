"""The shared shape of every client test: cold pull, warm pull, offline pull, with digests and upstream counts.

A test gets the shared upstream :class:`~tests.e2e.world.World` and its own proxy with an empty cache, so each
client's cold pull really is cold. The three phases of :meth:`ClientTestCase.check_pulls`:

``cold``
    the proxy's cache is empty: the pull must succeed with the upstream's digest, and upstream must have seen blob
    requests (which also proves the proxy served it: the client knows no other way to reach the upstream).
    No blob may be fetched upstream twice.
``warm``
    the client forgot the image and pulls again: the proxy must serve every blob from its cache, i.e. the upstream
    access logs show **zero** blob requests, while the proxy's own log shows it answered.
``offline``
    both upstream registries are stopped; the cached image must still pull, with the same digest.

Everything blocking (subprocesses, log parsing) runs in threads via ``deferToThread``; the reactor never waits.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from . import report
from .clients import Proxy, log_dir
from .world import Image, World, get_world


class ClientTestCase(unittest.TestCase):
    """Base class: ``self.world`` (shared upstreams) and ``self.proxy`` (fresh, per test)."""

    #: Client name in the measurements table.
    client = "?"
    timeout = 600

    async def setUp(self) -> None:
        await self.start_world()
        self.proxy: Proxy = await self.start(Proxy(self.world, self.proxy_name()))

    async def start_world(self) -> None:
        """``self.world``, the shared upstreams (a test that starts its own proxies calls only this)."""
        if os.geteuid() != 0:
            self.fail("the end-to-end client tests run real daemons (dockerd, containerd, podman) and need root")
        self.world: World = await deferToThread(get_world)

    def proxy_name(self, suffix: str = "") -> str:
        """``Class.test_method`` (plus ``suffix``): names a proxy's state directory and log file."""
        return self.id().rsplit(".", 2)[-2] + "." + self._testMethodName + suffix

    async def start(self, thing: Any) -> Any:
        """Starts a harness (proxy, daemon) in a thread and registers its stop as a cleanup, even if start fails."""
        self.addCleanup(deferToThread, thing.stop)
        await deferToThread(thing.start)
        return thing

    def image(self, key: str) -> Image:
        return self.world.images[key]

    async def measure(self, image: Image, phase: str, pull: Callable[[], object]) -> report.Pull:
        """Runs ``pull`` in a thread and records its time, the upstream requests and the proxy requests it caused."""

        def blocking() -> report.Pull:
            mark = self.world.mark()
            proxy_before = len(self.proxy.requests())
            started = time.monotonic()
            pull()
            seconds = time.monotonic() - started
            upstream_requests = mark.requests()
            counts = mark.since(settle=0)
            result = report.Pull(
                self.client,
                f"{image.registry}/{image.repository}:{image.tag}",
                phase,
                round(seconds, 3),
                counts,
                len(self.proxy.requests()) - proxy_before,
            )
            report.record(result, log_dir())
            blob_gets = Counter(
                req.uri.split("?")[0]
                for _, req in upstream_requests
                if req.kind == "blob" and req.method == "GET" and req.status < 300
            )
            twice = sorted(uri for uri, n in blob_gets.items() if n > 1)
            if twice:
                raise AssertionError(f"{self.client} {phase} pull fetched these blobs upstream twice: {twice}")
            return result

        return await deferToThread(blocking)

    async def check_pulls(
        self,
        images: Sequence[Image],
        pull: Callable[[Image], object],
        remove: Callable[[Image], object],
        verify: Callable[[Image], object],
    ) -> None:
        """Cold, warm and offline pulls of each image; ``verify`` checks the client's copy (digest) each time."""
        for image in images:
            cold = await self.measure(image, "cold", lambda image=image: pull(image))
            await deferToThread(verify, image)
            self.assertGreater(
                cold.upstream[f"{image.registry} blob"],
                0,
                f"{self.client}: cold pull of {image.reference} made no upstream blob request: not via the proxy?",
            )
            for other in self.world.registries:
                if other != image.registry:
                    self.assertEqual(cold.upstream[f"{other} total"], 0, f"{image.reference} was routed to {other} too")
            await deferToThread(remove, image)
            warm = await self.measure(image, "warm", lambda image=image: pull(image))
            await deferToThread(verify, image)
            self.assertEqual(
                warm.upstream[f"{image.registry} blob"],
                0,
                f"{self.client}: warm pull of {image.reference} fetched blobs upstream again: {warm.upstream}",
            )
            self.assertGreater(warm.proxy_requests, 0, f"{self.client}: the proxy logged no request for warm pull")
        for image in images:
            await deferToThread(remove, image)
        self.addCleanup(deferToThread, self.world.start_upstreams)
        await deferToThread(self.world.stop_upstreams)
        for image in images:
            offline = await self.measure(image, "offline", lambda image=image: pull(image))
            await deferToThread(verify, image)
            self.assertGreater(offline.proxy_requests, 0, f"{self.client}: the proxy logged no offline request")
        await deferToThread(self.world.start_upstreams)


def assert_digest(digests: Sequence[str], image: Image, name: str) -> None:
    """``digests`` (RepoDigests-style ``name@sha256:...``) must include the upstream digest under ``name``."""
    expected = f"{name}@{image.digest}"
    if expected not in digests:
        raise AssertionError(f"expected {expected} among the pulled image's digests, got {digests}")
