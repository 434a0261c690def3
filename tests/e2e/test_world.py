"""The upstream world behaves like Docker Hub: Bearer challenges on every 401, anonymous pull-only tokens.

If these fail, the client tests' failures say nothing about the proxy; so they come first and stay cheap.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from .tokens import libtrust_key_id
from .world import World, get_world

ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


def fetch(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def challenge(headers: dict) -> dict[str, str]:
    value = headers.get("WWW-Authenticate") or headers.get("Www-Authenticate") or ""
    if not value.startswith("Bearer "):
        raise AssertionError(f"not a Bearer challenge: {value!r}")
    return dict(re.findall(r'(\w+)="([^"]*)"', value))


class WorldTests(unittest.TestCase):
    timeout = 120

    async def setUp(self) -> None:
        self.world: World = await deferToThread(get_world)

    def test_key_id_is_libtrust_fingerprint(self) -> None:
        kid = libtrust_key_id(self.world.tokens.key.public_key())
        self.assertRegex(kid, r"^([A-Z2-7]{4}:){11}[A-Z2-7]{4}$")

    async def test_docker_hub_token_flow(self) -> None:
        """401 + challenge → anonymous token from the realm → the manifest with the seeded digest."""

        def flow() -> None:
            hub = self.world.registries["docker.io"]
            hello = self.world.images["hello"]
            url = f"{hub.url}/v2/{hello.repository}/manifests/{hello.tag}"
            status, headers, _ = fetch(url, {"Accept": ACCEPT})
            self.assertEqual(status, 401)
            params = challenge(headers)
            self.assertEqual(params["service"], "registry.docker.io")
            self.assertEqual(params["scope"], f"repository:{hello.repository}:pull")
            status, _, body = fetch(f"{params['realm']}?service={params['service']}&scope={params['scope']}")
            self.assertEqual(status, 200)
            answer = json.loads(body)
            self.assertEqual(answer["token"], answer["access_token"])
            self.assertGreater(answer["expires_in"], 0)
            status, headers, _ = fetch(url, {"Accept": ACCEPT, "Authorization": f"Bearer {answer['token']}"})
            self.assertEqual(status, 200)
            self.assertEqual(headers["Docker-Content-Digest"], hello.digest)

        await deferToThread(flow)

    async def test_anonymous_token_cannot_push(self) -> None:
        def flow() -> None:
            ghcr = self.world.registries["ghcr.io"]
            url = f"{ghcr.url}/v2/acme/tool/blobs/uploads/"
            status, headers, _ = fetch(url, method="POST")
            self.assertEqual(status, 401)
            params = challenge(headers)
            self.assertEqual(params["service"], "ghcr.io")
            _, _, body = fetch(f"{params['realm']}?service={params['service']}&scope={params['scope']}")
            token = json.loads(body)["token"]
            status, _, _ = fetch(url, {"Authorization": f"Bearer {token}"}, method="POST")
            self.assertEqual(status, 401)

        await deferToThread(flow)
