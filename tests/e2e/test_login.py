"""A mirror closed to strangers (``--htpasswd``): real ``docker login`` and ``podman login`` against it.

Clients meet a 401 with a Bearer challenge whose realm is the proxy's ``/token``, fetch a token there with the
credentials they were given, and pull. Without credentials the pull fails.
"""

from __future__ import annotations

import os

import bcrypt
from twisted.internet.threads import deferToThread

from .base import ClientTestCase, assert_digest
from .clients import Dockerd, Podman, Proxy


class LoginTests(ClientTestCase):
    client = "login"

    async def setUp(self) -> None:
        await super().setUp()
        htpasswd = os.path.abspath(self.mktemp())
        with open(htpasswd, "wb") as f:
            f.write(b"alice:" + bcrypt.hashpw(b"wonderland", bcrypt.gensalt(5)) + b"\n")
        self.closed: Proxy = Proxy(self.world, "login." + self._testMethodName)
        self.closed.daemon.argv += ["--htpasswd", htpasswd]
        await self.start(self.closed)

    async def test_podman_login(self) -> None:
        podman = await self.start(Podman(self.closed.address))
        ref = f"{self.closed.address}/library/hello:1.0"
        refused = await deferToThread(podman.podman, "pull", "--tls-verify=false", ref, check=False)
        self.assertNotEqual(refused.returncode, 0, "a stranger pulled from a closed mirror")
        self.assertIn("unauthorized", (refused.stdout + refused.stderr).lower())
        wrong = await deferToThread(
            podman.podman, "login", "--tls-verify=false", "-u", "alice", "-p", "nope", self.closed.address, check=False
        )
        self.assertNotEqual(wrong.returncode, 0)
        await deferToThread(
            podman.podman, "login", "--tls-verify=false", "-u", "alice", "-p", "wonderland", self.closed.address
        )
        await deferToThread(podman.podman, "pull", "--quiet", "--tls-verify=false", ref)
        digests = await deferToThread(podman.repo_digests, ref)
        assert_digest(digests, self.image("hello"), f"{self.closed.address}/library/hello")

    async def test_docker_login(self) -> None:
        docker = await self.start(Dockerd(self.closed.address))
        ref = f"{self.closed.address}/library/hello:1.0"
        refused = await deferToThread(docker.docker, "pull", ref, check=False)
        self.assertNotEqual(refused.returncode, 0, "a stranger pulled from a closed mirror")
        login = await deferToThread(docker.docker, "login", "-u", "alice", "-p", "wonderland", self.closed.address)
        self.assertIn("Login Succeeded", login.stdout)
        await deferToThread(docker.pull, ref)
        digests = await deferToThread(docker.repo_digests, ref)
        assert_digest(digests, self.image("hello"), f"{self.closed.address}/library/hello")
