"""nginx sends cached blobs itself (``cache.accel_redirect`` + the documented site config with the cache directory).

The proxy still decides (routing, access rules, private content, the cache), but answers a cached blob with
``X-Accel-Redirect`` and no body; nginx then serves the file with sendfile, Range included.
"""

from __future__ import annotations

import hashlib
import re
import urllib.request
from pathlib import Path

from twisted.internet.threads import deferToThread

from dioproxy.snippets import ACCEL_PREFIX

from .base import ClientTestCase
from .clients import Nginx, Proxy, Skopeo, verify_oci_layout
from .world import Image


class AccelRedirectTests(ClientTestCase):
    client = "nginx accel + skopeo"

    async def setUp(self) -> None:
        await super().setUp()
        config = Path(self.mktemp()).absolute()
        config.write_text(f"cache:\n  accel_redirect: {ACCEL_PREFIX}\n")
        self.accel: Proxy = Proxy(self.world, "accel." + self._testMethodName)
        self.accel.daemon.argv += ["--config", str(config)]
        await self.start(self.accel)
        self.nginx: Nginx = await self.start(Nginx(self.accel.address, str(self.accel.base / "cache")))

    async def test_nginx_serves_cached_blobs(self) -> None:
        skopeo = await self.start(Skopeo())
        copies: dict[str, Path] = {}

        def pull(image: Image) -> None:
            copies["last"] = skopeo.copy(f"{self.nginx.address}/{image.repository}:{image.tag}")

        def verify(image: Image) -> None:
            digest, blobs = verify_oci_layout(copies["last"])
            self.assertEqual(digest, image.digest)
            self.assertEqual(blobs, set(image.blobs))

        self.proxy = self.accel  # the proxy whose requests check_pulls counts
        big = self.image("big")
        await self.check_pulls([big], pull, lambda image: None, verify)

        cache = self.accel.base / "cache" / "blobs" / "sha256"
        cached = [d for d in big.blobs if (cache / d[7:9] / d[7:]).exists()]
        layer = max(cached, key=lambda d: (cache / d[7:9] / d[7:]).stat().st_size)
        url = f"http://{self.nginx.address}/v2/{big.repository}/blobs/{layer}"

        def ranged() -> tuple[int, dict, bytes]:
            request = urllib.request.Request(url, headers={"Range": "bytes=100-1099"})
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read()

        status, headers, body = await deferToThread(ranged)
        self.assertEqual((status, len(body)), (206, 1000))
        self.assertEqual(headers.get("Docker-Content-Digest"), layer)
        whole = await deferToThread(lambda: urllib.request.urlopen(url, timeout=30).read())
        self.assertEqual("sha256:" + hashlib.sha256(whole).hexdigest(), layer)
        self.assertEqual(whole[100:1100], body)
        # The proxy answered those cached blob requests without sending the bytes itself.
        lines = [line for line in self.accel.daemon.log_text().splitlines() if f"/blobs/{layer}" in line]
        sent = [int(m.group(1)) for m in (re.search(r" 200 (\d+) [\d.]+ms hit", line) for line in lines) if m]
        self.assertTrue(sent, lines[-5:])
        self.assertEqual(set(sent), {0}, "a cached blob went through the proxy instead of nginx")
