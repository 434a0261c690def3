"""The three figures issue 2 asks for, against the fake Docker Hub: ``python -m bench.core_figures``.

1. upstream GETs for 16 concurrent cold requests of one 64 MiB blob (must be 1);
2. upstream requests for 100 repeated GETs of a tag within its TTL (must be 0);
3. what a client sees when the upstream sends a damaged blob (never a complete body).
"""

from __future__ import annotations

import hashlib
import os
import tempfile

from treq.client import HTTPClient
from twisted.internet import defer, reactor, task
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed

from dioproxy.config import build_config
from dioproxy.mirror import Mirror
from dioproxy.resources import Root
from dioproxy.site import MirrorSite
from tests.fakeregistry import FakeRegistry

MB = 1024 * 1024


async def measure() -> None:
    fake = FakeRegistry().start()
    data = os.urandom(64 * MB)
    digest = fake.add_blob(data)
    fake.add_image("library/hello", "1.0", layer_sizes=[10])
    mirror = Mirror(build_config(None, [f"docker.io={fake.registry_url}"], tempfile.mkdtemp()), reactor)
    mirror.start()
    port = reactor.listenTCP(0, MirrorSite(Root(mirror)), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    gate = fake.gate_blob(digest)  # hold the upstream until all 16 requests are in
    requests = [client.get(f"{url}/v2/library/hello/blobs/{digest}") for _ in range(16)]
    await fake.wait_for_requests(1, "cdn", "GET", digest)
    await task.deferLater(reactor, 0.3, lambda: None)
    gate.callback(None)
    bodies = [await r.content() for r in await defer.gatherResults(requests)]
    right = sum("sha256:" + hashlib.sha256(b).hexdigest() == digest for b in bodies)
    print(
        f"16 concurrent cold GETs of a 64 MiB blob: {right}/16 bodies right, upstream GETs: {fake.count('cdn', 'GET')}"
    )

    await (await client.get(f"{url}/v2/library/hello/manifests/1.0")).content()
    fake.clear_requests()
    for _ in range(100):
        await (await client.get(f"{url}/v2/library/hello/manifests/1.0")).content()
    print(f"100 GETs of a tag within its TTL: upstream requests: {len(fake.requests)}")

    bad = fake.add_blob(os.urandom(8 * MB))
    fake.corrupt_blob(bad)
    response = await client.get(f"{url}/v2/library/hello/blobs/{bad}")
    try:
        body = await response.content()
        seen = f"a complete body of {len(body)} bytes (a bug!)"
    except ResponseFailed as e:
        seen = f"the connection aborted mid-body ({', '.join(type(f.value).__name__ for f in e.reasons)})"
    cached = os.path.exists(mirror.storage.blob_path(bad))
    print(f"damaged blob: status {response.code}, Content-Length {response.length}, then {seen}; cached: {cached}")
    await port.stopListening()
    await mirror.close()
    await fake.stop()


if __name__ == "__main__":
    task.react(lambda _: defer.ensureDeferred(measure()))
