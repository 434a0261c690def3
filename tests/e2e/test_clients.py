"""Real clients pull through the proxy: dockerd, podman, containerd (ctr), skopeo, and nginx in front.

Each test starts its own proxy (empty cache) and its own private client daemon, then runs the cold / warm /
offline sequence of :meth:`tests.e2e.base.ClientTestCase.check_pulls`. Timings and upstream request counts of every
pull land in ``_trial_temp/e2e-logs/pulls.txt``.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections import Counter

from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread

from . import report
from .base import ClientTestCase, assert_digest
from .clients import Containerd, Dockerd, Nginx, Podman, Skopeo, log_dir, verify_oci_layout
from .world import Image


class DockerTests(ClientTestCase):
    """dockerd with ``registry-mirrors``: the seed's daemon.json flow. dockerd falls back to Docker Hub when the
    mirror fails, which cannot be reached here: a pull that succeeds came through the mirror, and the counts say
    so too."""

    client = "docker (registry-mirrors)"

    async def test_mirror_pull(self) -> None:
        """``docker pull hello:1.0`` (OCI index), ``classic:1.0`` (Docker schema2) and ``big:1.0``."""
        docker = await self.start(Dockerd(self.proxy.address))

        def short(image: Image) -> str:
            return f"{image.repository.removeprefix('library/')}:{image.tag}"

        def verify(image: Image) -> None:
            assert_digest(docker.repo_digests(short(image)), image, short(image).split(":")[0])

        await self.check_pulls(
            [self.image("hello"), self.image("classic"), self.image("big")],
            lambda image: docker.pull(short(image)),
            lambda image: docker.remove(short(image)),
            verify,
        )

    async def test_direct_pull(self) -> None:
        """``docker pull 127.0.0.1:PORT/library/hello:1.0``: the proxy as a registry (``insecure-registries``)."""
        self.client = "docker (direct)"
        docker = await self.start(Dockerd(self.proxy.address))
        name = f"{self.proxy.address}/library/hello"

        await self.check_pulls(
            [self.image("hello")],
            lambda image: docker.pull(f"{name}:{image.tag}"),
            lambda image: docker.remove(f"{name}:{image.tag}"),
            lambda image: assert_digest(docker.repo_digests(f"{name}:{image.tag}"), image, name),
        )

    async def test_reload_registry_mirrors(self) -> None:
        """The documented reload: dockerd starts with a dead mirror, daemon.json is fixed, SIGHUP, pull works."""
        self.client = "docker (after SIGHUP)"
        docker = await self.start(Dockerd("127.0.0.1:9"))
        await deferToThread(docker.reload, self.proxy.address)
        hello = self.image("hello")
        cold = await self.measure(hello, "cold", lambda: docker.pull("hello:1.0"))
        self.assertGreater(cold.proxy_requests, 0)
        await deferToThread(lambda: assert_digest(docker.repo_digests("hello:1.0"), hello, "hello"))


class PodmanTests(ClientTestCase):
    """podman with a generated registries.conf: docker.io mirrored at the proxy's root, ghcr.io at a path prefix."""

    client = "podman (registries.conf)"

    async def test_docker_io_mirror(self) -> None:
        podman = await self.start(Podman(self.proxy.address))

        def ref(image: Image) -> str:
            return f"docker.io/{image.repository}:{image.tag}"

        await self.check_pulls(
            [self.image("hello"), self.image("classic"), self.image("big")],
            lambda image: podman.pull(ref(image)),
            lambda image: podman.remove(ref(image)),
            lambda image: assert_digest(podman.repo_digests(ref(image)), image, f"docker.io/{image.repository}"),
        )

    async def test_ghcr_path_prefix_mirror(self) -> None:
        """``location = "127.0.0.1:PORT/ghcr.io"``: requests arrive as ``/v2/ghcr.io/acme/tool/...``."""
        self.client = "podman (ghcr.io prefix)"
        podman = await self.start(Podman(self.proxy.address))
        tool = self.image("tool")
        ref = f"ghcr.io/{tool.repository}:{tool.tag}"
        await self.check_pulls(
            [tool],
            lambda image: podman.pull(ref),
            lambda image: podman.remove(ref),
            lambda image: assert_digest(podman.repo_digests(ref), image, f"ghcr.io/{image.repository}"),
        )

    async def test_direct_pull(self) -> None:
        """``podman pull 127.0.0.1:PORT/library/hello:1.0`` (an insecure registry in registries.conf)."""
        self.client = "podman (direct)"
        podman = await self.start(Podman(self.proxy.address))
        name = f"{self.proxy.address}/library/hello"
        await self.check_pulls(
            [self.image("hello")],
            lambda image: podman.pull(f"{name}:{image.tag}"),
            lambda image: podman.remove(f"{name}:{image.tag}"),
            lambda image: assert_digest(podman.repo_digests(f"{name}:{image.tag}"), image, name),
        )


class ContainerdTests(ClientTestCase):
    """containerd + ``ctr images pull --hosts-dir``: every request carries ``?ns=<registry>``."""

    client = "containerd (hosts.toml)"

    async def _check(self, keys: list[str], default_hosts: bool = False) -> None:
        ctr = await self.start(Containerd(self.proxy.address))

        def ref(image: Image) -> str:
            return f"{image.registry}/{image.repository}:{image.tag}"

        def verify(image: Image) -> None:
            digest = ctr.digest(ref(image))
            if digest != image.digest:
                raise AssertionError(f"ctr has {ref(image)} at {digest}, upstream at {image.digest}")

        await self.check_pulls(
            [self.image(key) for key in keys],
            lambda image: ctr.pull(ref(image), default_hosts=default_hosts),
            lambda image: ctr.remove(ref(image)),
            verify,
        )

    async def test_docker_io(self) -> None:
        await self._check(["hello", "big"])

    async def test_ghcr_io(self) -> None:
        self.client = "containerd (ghcr.io)"
        await self._check(["tool"])

    async def test_default_hosts(self) -> None:
        """``certs.d/_default/hosts.toml`` alone routes ghcr.io through the mirror too."""
        self.client = "containerd (_default)"
        await self._check(["tool"], default_hosts=True)


class SkopeoTests(ClientTestCase):
    """``skopeo copy --all`` of multi-platform indexes into OCI layouts; every blob's sha256 is checked."""

    client = "skopeo copy --all"

    async def _check(self, registry_address: str, prefix: str, key: str) -> None:
        skopeo = await self.start(Skopeo())
        copies: dict[str, object] = {}

        def pull(image: Image) -> None:
            copies["last"] = skopeo.copy(f"{registry_address}/{prefix}{image.repository}:{image.tag}")

        def verify(image: Image) -> None:
            digest, blobs = verify_oci_layout(copies["last"])  # type: ignore[arg-type]
            if digest != image.digest:
                raise AssertionError(f"skopeo copied {digest}, upstream has {image.digest}")
            if blobs != set(image.blobs):
                raise AssertionError(f"blobs differ from the seeded image: {blobs ^ set(image.blobs)}")

        await self.check_pulls([self.image(key)], pull, lambda image: None, verify)

    async def test_copy_all_docker_io(self) -> None:
        await self._check(self.proxy.address, "", "hello")

    async def test_copy_all_ghcr_io_prefix(self) -> None:
        self.client = "skopeo (ghcr.io prefix)"
        await self._check(self.proxy.address, "ghcr.io/", "tool")


class NginxTests(ClientTestCase):
    """nginx in front of the proxy with the documented site config (the seed's, corrected)."""

    client = "nginx + skopeo"

    async def test_skopeo_through_nginx(self) -> None:
        nginx = await self.start(Nginx(self.proxy.address))
        skopeo = await self.start(Skopeo())
        copies: dict[str, object] = {}

        def pull(image: Image) -> None:
            copies["last"] = skopeo.copy(f"{nginx.address}/{image.repository}:{image.tag}")

        def verify(image: Image) -> None:
            digest, blobs = verify_oci_layout(copies["last"])  # type: ignore[arg-type]
            self.assertEqual(digest, image.digest)
            self.assertEqual(blobs, set(image.blobs))

        await self.check_pulls([self.image("hello"), self.image("big")], pull, lambda image: None, verify)
        self.assertGreater(nginx.requests(), 0, "nginx logged no registry request: the pulls bypassed it?")

    async def test_podman_through_nginx(self) -> None:
        """podman with nginx as its docker.io mirror: the whole chain a production set-up has."""
        self.client = "nginx + podman"
        nginx = await self.start(Nginx(self.proxy.address))
        podman = await self.start(Podman(nginx.address))
        ref = "docker.io/library/hello:1.0"
        await self.check_pulls(
            [self.image("hello")],
            lambda image: podman.pull(ref),
            lambda image: podman.remove(ref),
            lambda image: assert_digest(podman.repo_digests(ref), image, "docker.io/library/hello"),
        )


class PlainHttpPortTests(ClientTestCase):
    """What an ``insecure`` registry's clients do before speaking plain HTTP."""

    client = "TLS probe"

    async def test_tls_client_hello_refused_at_once(self) -> None:
        """podman, skopeo and dockerd try HTTPS first on an insecure registry (``insecure = true``,
        ``insecure-registries``) and fall back to HTTP only when the handshake fails. The CNCF registry and nginx
        answer a ClientHello at once (400, close); a server that waits for more bytes costs every pull 10 s."""

        def probe() -> float:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            started = time.monotonic()
            # Expected: SSLError (or a reset) right away. A timeout (also an OSError) comes too late.
            with (
                socket.create_connection(("127.0.0.1", self.proxy.port), timeout=5) as sock,
                contextlib.suppress(OSError),
            ):
                context.wrap_socket(sock)
            return time.monotonic() - started

        elapsed = await deferToThread(probe)
        self.assertLess(elapsed, 2.0, f"TLS handshake on the plain-HTTP port took {elapsed:.1f}s to fail")


class ConcurrentClientsTests(ClientTestCase):
    """Different clients pulling the same cold image at the same moment: the proxy fills each blob once."""

    client = "concurrent"

    async def test_three_clients_one_upstream_fetch_per_blob(self) -> None:
        """containerd, podman (through nginx) and skopeo (through nginx) pull ``big:1.0`` together. Whatever
        the interleaving, upstream sees at most one GET per blob (the 24 MiB layer included)."""
        nginx = await self.start(Nginx(self.proxy.address))
        ctr = await self.start(Containerd(self.proxy.address))
        podman = await self.start(Podman(nginx.address))
        skopeo = await self.start(Skopeo())
        big = self.image("big")
        ref = f"docker.io/{big.repository}:{big.tag}"
        mark = await deferToThread(self.world.mark)
        proxy_before = len(await deferToThread(self.proxy.requests))
        started = time.monotonic()
        await gatherResults(
            [
                deferToThread(ctr.pull, ref),
                deferToThread(podman.pull, ref),
                deferToThread(skopeo.copy, f"{nginx.address}/{big.repository}:{big.tag}"),
            ],
            consumeErrors=True,
        )
        seconds = time.monotonic() - started
        requests = await deferToThread(mark.requests)
        blob_gets = Counter(r.uri for _, r in requests if r.kind == "blob" and r.method == "GET")
        report.record(
            report.Pull(
                self.client + " (3 clients)",
                ref,
                "cold",
                round(seconds, 3),
                await deferToThread(mark.since),
                len(await deferToThread(self.proxy.requests)) - proxy_before,
            ),
            log_dir(),
        )
        self.assertTrue(blob_gets, "no upstream blob request at all")
        self.assertEqual(max(blob_gets.values()), 1, f"blobs fetched upstream more than once: {blob_gets}")
        self.assertEqual(await deferToThread(ctr.digest, ref), big.digest)
        await deferToThread(lambda: assert_digest(podman.repo_digests(ref), big, f"docker.io/{big.repository}"))
