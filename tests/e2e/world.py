"""The upstream world of the end-to-end suite: a Docker-Hub-like token service and two CNCF registries.

``docker.io`` and ``ghcr.io`` are played by two ``docker-registry serve`` processes on loopback ports, both guarded
by ``auth: token`` so the Bearer challenge flow is the real one. They are seeded once with generated images:

=====================  ==========================================================================
``library/hello:1.0``  OCI index, linux/amd64 + linux/arm64 (docker.io stand-in)
``library/classic:1.0``  Docker schema2 manifest, linux/amd64 (pushed with ``--format v2s2``)
``library/big:1.0``    OCI manifest, linux/amd64, one layer of :data:`BIG_LAYER_MIB` MiB of random bytes
``acme/tool:2.0``      OCI index, linux/amd64 + linux/arm64 (ghcr.io stand-in)
=====================  ==========================================================================

Starting and seeding takes a few seconds, so one world serves the whole run: :func:`get_world` starts it on first
use (from a thread) and an ``atexit`` hook stops it. Tests that stop the upstreams (offline pulls) restart them
in a cleanup, so later tests still find them up.

Upstream requests are counted from the registries' own access logs (one combined-log line per request), so the
counts are what a real upstream saw, not what the proxy believes it asked.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import images
from .procs import Daemon, ensure_tools, free_port, http_status, run, tool
from .tokens import SEED_PASSWORD, SEED_USER, TokenService

BIG_LAYER_MIB = 24

#: One access-log line of the registry (gorilla's combined log format).
ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) ')


@dataclass(frozen=True)
class Request:
    method: str
    uri: str
    status: int

    @property
    def kind(self) -> str:
        """``blob``, ``manifest``, ``ping`` or ``other``: what the counts in the tests are made of."""
        path = self.uri.split("?", 1)[0]
        if "/blobs/" in path:
            return "blob"
        if "/manifests/" in path:
            return "manifest"
        if path in ("/v2", "/v2/"):
            return "ping"
        return "other"


class Registry:
    """One CNCF registry (``docker-registry serve``) with token auth and filesystem storage."""

    def __init__(self, name: str, service: str, directory: Path, token_url: str, cert: Path, logs: Path) -> None:
        self.name = name
        self.service = service
        self.directory = directory
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}, "formatter": "text"},
            "storage": {
                "filesystem": {"rootdirectory": str(directory / "storage")},
                "delete": {"enabled": True},
                "cache": {"blobdescriptor": "inmemory"},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "dioproxy-e2e", "headers": {}},
            "auth": {
                "token": {
                    "realm": token_url,
                    "service": service,
                    "issuer": "dioproxy-test-token-service",
                    "rootcertbundle": str(cert),
                }
            },
        }
        self.config_path = directory / "config.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.daemon = Daemon(
            f"registry {name}",
            [tool("/usr/bin/docker-registry"), "serve", str(self.config_path)],
            logs / f"registry-{name}.log",
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.daemon.start()
        # An unauthenticated ping answers 401 with the Bearer challenge once the registry listens.
        self.daemon.wait_until(lambda: http_status(f"{self.url}/v2/") == 401, what="answering /v2/")

    def stop(self) -> None:
        self.daemon.stop()

    def requests(self) -> list[Request]:
        """Every request this registry logged so far (across restarts: the log file is appended to)."""
        found = []
        for line in self.daemon.log_text().splitlines():
            match = ACCESS_LINE.search(line)
            if match:
                found.append(Request(match["method"], match["uri"], int(match["status"])))
        return found


class Mark:
    """Remembers how many requests each upstream had logged, to count what happened after it."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.offsets = {name: len(reg.requests()) for name, reg in world.registries.items()}
        self.tokens = world.tokens.token_count()

    def requests(self, settle: float = 0.3) -> list[tuple[str, Request]]:
        """(registry name, request) of everything logged upstream since the mark.

        The registry writes its access line after the response, so wait briefly for late lines."""
        time.sleep(settle)
        return [
            (name, request)
            for name, reg in self.world.registries.items()
            for request in reg.requests()[self.offsets[name] :]
        ]

    def since(self, settle: float = 0.3) -> Counter:
        """Counts by ``"<registry> <kind>"`` (e.g. ``"docker.io blob"``), ``"<registry> total"``, ``"tokens"``."""
        counts: Counter = Counter()
        for name, request in self.requests(settle):
            counts[f"{name} {request.kind}"] += 1
            counts[f"{name} total"] += 1
        counts["tokens"] = self.world.tokens.token_count() - self.tokens
        return counts


@dataclass
class Image:
    """A seeded image: where it lives upstream and the digest of the manifest (or index) its tag names."""

    registry: str
    repository: str
    tag: str
    digest: str
    blobs: tuple[str, ...]

    @property
    def reference(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"


class World:
    """Token service + two registries + seeded images, under one temporary directory."""

    def __init__(self, logs: Path) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="dioproxy-e2e-world-"))
        self.logs = logs
        self.tokens = TokenService(self.base, logs / "token-service.log")
        self.registries: dict[str, Registry] = {}
        self.images: dict[str, Image] = {}

    def start(self) -> None:
        token_port = self.tokens.start()
        token_url = f"http://127.0.0.1:{token_port}/token"
        for name, service in (("docker.io", "registry.docker.io"), ("ghcr.io", "ghcr.io")):
            self.registries[name] = Registry(
                name, service, self.base / name, token_url, self.tokens.cert_path, self.logs
            )
        for registry in self.registries.values():
            registry.start()
        self._seed()

    def stop(self) -> None:
        """Stops everything and removes the storage (the logs stay in ``logs``)."""
        for registry in self.registries.values():
            registry.stop()
        self.tokens.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def stop_upstreams(self) -> None:
        for registry in self.registries.values():
            registry.stop()

    def start_upstreams(self) -> None:
        for registry in self.registries.values():
            if not registry.daemon.running:
                registry.start()

    def mark(self) -> Mark:
        return Mark(self)

    def upstream_args(self) -> list[str]:
        """The proxy's ``--upstream`` options for this world."""
        args = []
        for name, registry in self.registries.items():
            args += ["--upstream", f"{name}={registry.url}"]
        return args

    def _seed(self) -> None:
        layouts = self.base / "layouts"
        plan = [
            ("hello", "docker.io", "library/hello", "1.0", images.multi_platform, {}, []),
            (
                "classic",
                "docker.io",
                "library/classic",
                "1.0",
                images.single_platform,
                {},
                ["--format", "v2s2"],
            ),
            (
                "big",
                "docker.io",
                "library/big",
                "1.0",
                images.single_platform,
                {"big_layer_mib": BIG_LAYER_MIB},
                [],
            ),
            ("tool", "ghcr.io", "acme/tool", "2.0", images.multi_platform, {}, []),
        ]
        for key, registry, repository, tag, build, kwargs, extra in plan:
            layout = build(layouts / key, key, tag, **kwargs)
            digest_file = layouts / f"{key}.digest"
            run(
                [
                    tool("/usr/bin/skopeo"),
                    "--insecure-policy",
                    "copy",
                    "--all",
                    "--quiet",
                    "--dest-tls-verify=false",
                    "--dest-creds",
                    f"{SEED_USER}:{SEED_PASSWORD}",
                    "--digestfile",
                    str(digest_file),
                    *extra,
                    f"oci:{layout.path}:{tag}",
                    f"docker://{self.registries[registry].address}/{repository}:{tag}",
                ]
            )
            blobs = tuple(sorted("sha256:" + p.name for p in (layout.path / "blobs" / "sha256").iterdir()))
            self.images[key] = Image(registry, repository, tag, digest_file.read_text().strip(), blobs)


_world: World | None = None
_world_lock = threading.Lock()


def get_world() -> World:
    """The shared world, started on first use. Blocking: call it with ``deferToThread``."""
    global _world
    with _world_lock:
        if _world is None:
            ensure_tools()
            logs = Path.cwd() / "e2e-logs"
            logs.mkdir(exist_ok=True)
            world = World(logs)
            try:
                world.start()
            except BaseException:
                world.stop()
                raise
            _world = world
            import atexit

            atexit.register(world.stop)
        else:
            # A test that stopped the upstreams restarts them in its cleanup; make sure of it anyway.
            _world.start_upstreams()
        return _world
