"""Harnesses for the proxy and the real clients, each with private state, sockets and configuration.

Nothing here touches the machine's own daemons or configuration: dockerd gets its own data-root, exec-root and
socket (and starts its own containerd under the exec-root), containerd its own root, state and socket, podman its
own storage and registries.conf, nginx its own prefix. State lives under short ``/tmp`` paths (unix socket paths
are limited to 107 bytes); logs go to ``e2e-logs/`` in trial's working directory so they survive a failure.

All methods block; tests call them through ``deferToThread``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import snippets
from .procs import Daemon, free_port, http_status, remove_tree, run, tool
from .world import World

REPOSITORY = Path(__file__).resolve().parents[2]

#: ``twistd`` of the running interpreter (``python -m twisted`` is the other runner, ``twist``, which has no ``-n``).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

#: A proxy access-log line names the request path; this finds the registry API ones.
PROXY_REQUEST = re.compile(r"\b(GET|HEAD) (/v2/\S*)")
#: The whole line (dioproxy.site): method, URI, status (or ``aborted``), body bytes sent, time, outcome.
PROXY_ACCESS = re.compile(r"\b(GET|HEAD) (/v2/\S*) (\d{3}|aborted) (\d+) [\d.]+ms (\S+)")


@dataclass(frozen=True)
class Access:
    """One registry API request as the proxy logged it."""

    method: str
    uri: str
    status: str
    sent: int
    outcome: str

    @property
    def digest(self) -> str | None:
        """The digest a ``/blobs/`` or ``/manifests/`` URI names, if it names one (not a tag)."""
        match = re.search(r"/(?:blobs|manifests)/(sha256:[0-9a-f]{64})", self.uri)
        return match[1] if match else None

    @property
    def kind(self) -> str:
        path = self.uri.split("?", 1)[0]
        return "blob" if "/blobs/" in path else "manifest" if "/manifests/" in path else "other"


def log_dir() -> Path:
    """``e2e-logs/`` under the current directory (trial's ``_trial_temp``)."""
    path = Path.cwd() / "e2e-logs"
    path.mkdir(exist_ok=True)
    return path


def state_dir(name: str, needs: tuple[str, ...] = ()) -> Path:
    """A private directory for one harness, made only after the tools it ``needs`` were found (else fail loudly)."""
    for path in needs:
        tool(path)
    return Path(tempfile.mkdtemp(prefix=f"dpe2e-{name}-"))


class Proxy:
    """dioproxy under ``twistd``, with a fresh cache directory and the world's registries as upstreams."""

    def __init__(self, world: World, name: str) -> None:
        self.port = free_port()
        self.base = state_dir(f"proxy-{name}")
        argv = snippets.proxy_argv(
            TWISTD,
            self.port,
            "127.0.0.1",
            str(self.base / "cache"),
            {reg_name: reg.url for reg_name, reg in world.registries.items()},
        )
        # The checkout under test, whether or not it is installed in this interpreter's environment.
        pythonpath = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": pythonpath}
        self.daemon = Daemon(f"dioproxy ({name})", argv, log_dir() / f"proxy-{name}.log", env=env, cwd=self.base)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Proxy:
        self.daemon.start()
        self.daemon.wait_until(lambda: http_status(f"http://{self.address}/healthz") == 200, what="healthy")
        return self

    def stop(self) -> None:
        self.daemon.stop()
        remove_tree(self.base)

    def requests(self) -> list[str]:
        """``METHOD /v2/...`` of every registry API request in the proxy's access log."""
        return [f"{m[1]} {m[2]}" for m in PROXY_REQUEST.finditer(self.daemon.log_text())]

    def access(self) -> list[Access]:
        """Every registry API request in the proxy's access log, with its status and the bytes sent."""
        return [Access(m[1], m[2], m[3], int(m[4]), m[5]) for m in PROXY_ACCESS.finditer(self.daemon.log_text())]


class Dockerd:
    """A private dockerd configured with the proxy as its ``registry-mirrors`` entry."""

    def __init__(self, mirror: str) -> None:
        self.base = state_dir("docker", ("/usr/sbin/dockerd", "/usr/bin/docker"))
        self.socket = self.base / "docker.sock"
        self.config_path = self.base / "daemon.json"
        self.config: dict = {
            "storage-driver": "vfs",
            "iptables": False,
            "ip6tables": False,
            "ip-forward": False,
            "ip-masq": False,
            "bridge": "none",
            "data-root": str(self.base / "data"),
            "exec-root": str(self.base / "exec"),
            "pidfile": str(self.base / "docker.pid"),
            "hosts": [f"unix://{self.socket}"],
        }
        self.write_config(mirror)
        self.env = {**os.environ, "DOCKER_CONFIG": str(self.base / "client")}
        self.daemon = Daemon(
            "dockerd",
            [tool("/usr/sbin/dockerd"), "--config-file", str(self.config_path)],
            log_dir() / "dockerd.log",
        )

    def write_config(self, mirror: str) -> None:
        """daemon.json: the documented snippet plus the keys that keep this dockerd private."""
        self.config.update(snippets.docker_daemon_json(mirror))
        self.config_path.write_text(json.dumps(self.config, indent=2))

    def reload(self, mirror: str) -> None:
        """The documented ``systemctl reload docker``: rewrite daemon.json, SIGHUP, wait for the new mirror."""
        self.write_config(mirror)
        assert self.daemon.process is not None
        self.daemon.process.send_signal(signal.SIGHUP)
        self.daemon.wait_until(lambda: self.mirrors() == [f"http://{mirror}/"], what=f"using mirror {mirror}")

    def mirrors(self) -> list[str]:
        return json.loads(self.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout)

    def start(self) -> Dockerd:
        self.daemon.start()
        self.daemon.wait_until(lambda: self.docker("version", check=False).returncode == 0, timeout=60)
        return self

    def stop(self) -> None:
        self.daemon.stop(timeout=30)
        remove_tree(self.base)

    def docker(self, *args: str, check: bool = True):
        return run(["/usr/bin/docker", "-H", f"unix://{self.socket}", *args], env=self.env, check=check)

    def pull(self, reference: str) -> None:
        self.docker("pull", reference)

    def remove(self, reference: str) -> None:
        self.docker("rmi", reference)

    def repo_digests(self, reference: str) -> list[str]:
        out = self.docker("image", "inspect", "--format", "{{json .RepoDigests}}", reference).stdout
        return json.loads(out)


class Podman:
    """podman with private storage, run root and a generated registries.conf (``CONTAINERS_REGISTRIES_CONF``)."""

    def __init__(self, mirror: str) -> None:
        self.base = state_dir("podman", ("/usr/bin/podman",))
        registries = self.base / "registries.conf"
        registries.write_text(snippets.podman_registries_conf(mirror))
        containers = self.base / "containers.conf"
        # Root without systemd: plain cgroupfs and a file for events instead of journald.
        containers.write_text('[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
        self.env = {
            **os.environ,
            "CONTAINERS_REGISTRIES_CONF": str(registries),
            "CONTAINERS_CONF": str(containers),
            "XDG_CONFIG_HOME": str(self.base / "config"),
        }
        self.global_args = [
            "--root",
            str(self.base / "root"),
            "--runroot",
            str(self.base / "run"),
            "--tmpdir",
            str(self.base / "tmp"),
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]

    def start(self) -> Podman:
        return self

    def stop(self) -> None:
        remove_tree(self.base)

    def podman(self, *args: str, check: bool = True):
        return run([tool("/usr/bin/podman"), *self.global_args, *args], env=self.env, check=check)

    def pull(self, reference: str) -> None:
        self.podman("pull", "--quiet", reference)

    def remove(self, reference: str) -> None:
        self.podman("rmi", reference)

    def repo_digests(self, reference: str) -> list[str]:
        return json.loads(self.podman("image", "inspect", "--format", "{{json .RepoDigests}}", reference).stdout)


class Containerd:
    """A private containerd (no CRI plugin) and ``ctr images pull --hosts-dir`` with generated hosts.toml files."""

    NAMESPACE = "e2e"

    def __init__(self, mirror: str) -> None:
        self.base = state_dir("containerd", ("/usr/bin/containerd", "/usr/bin/ctr"))
        self.socket = self.base / "containerd.sock"
        self.hosts_dir = self.base / "certs.d"
        for registry in ("docker.io", "ghcr.io"):
            (self.hosts_dir / registry).mkdir(parents=True)
            (self.hosts_dir / registry / "hosts.toml").write_text(snippets.containerd_hosts_toml(mirror, registry))
        self.default_hosts_dir = self.base / "certs.d-default"
        (self.default_hosts_dir / "_default").mkdir(parents=True)
        (self.default_hosts_dir / "_default" / "hosts.toml").write_text(snippets.containerd_hosts_toml(mirror, None))
        config = self.base / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.base / "root"}"\n'
            f'state = "{self.base / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.base / "ttrpc.sock"}"\n'
            '[debug]\n  address = ""\n'
            '[metrics]\n  address = ""\n'
            # Without this containerd installs its "opt" plugin into the machine-wide /opt/containerd.
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{self.base / "opt"}"\n'
        )
        self.daemon = Daemon(
            "containerd", [tool("/usr/bin/containerd"), "--config", str(config)], log_dir() / "containerd.log"
        )

    def start(self) -> Containerd:
        self.daemon.start()
        self.daemon.wait_until(lambda: self.ctr("version", check=False).returncode == 0, timeout=60)
        return self

    def stop(self) -> None:
        self.daemon.stop(timeout=30)
        remove_tree(self.base)

    def ctr(self, *args: str, check: bool = True):
        return run(["/usr/bin/ctr", "--address", str(self.socket), "--namespace", self.NAMESPACE, *args], check=check)

    def pull(self, reference: str, default_hosts: bool = False) -> None:
        """Pulls and unpacks linux/amd64 (native snapshotter: overlayfs may be unavailable on the test machine)."""
        hosts = self.default_hosts_dir if default_hosts else self.hosts_dir
        self.ctr("images", "pull", "--hosts-dir", str(hosts), "--snapshotter", "native", reference)

    def remove(self, reference: str) -> None:
        """``--sync`` runs the garbage collector now, so the content is really gone before the next pull."""
        self.ctr("images", "rm", "--sync", reference)

    def digest(self, reference: str) -> str:
        for line in self.ctr("images", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == reference:
                return fields[2]
        raise AssertionError(f"{reference} not in `ctr images ls`")


class Skopeo:
    """``skopeo copy --all`` from the proxy into OCI layout directories, verifying every blob's digest."""

    def __init__(self) -> None:
        self.base = state_dir("skopeo", ("/usr/bin/skopeo",))
        self.copies = 0

    def start(self) -> Skopeo:
        return self

    def stop(self) -> None:
        remove_tree(self.base)

    def copy(self, source: str) -> Path:
        """Copies ``docker://source`` (all platforms) into a fresh OCI layout; returns its directory."""
        self.copies += 1
        dest = self.base / f"copy{self.copies}"
        run(
            [
                tool("/usr/bin/skopeo"),
                "--insecure-policy",
                "copy",
                "--all",
                "--quiet",
                "--src-tls-verify=false",
                f"docker://{source}",
                f"oci:{dest}:latest",
            ]
        )
        return dest


def verify_oci_layout(directory: Path) -> tuple[str, set[str]]:
    """Checks that every blob's sha256 matches its name; returns (digest of the tagged manifest, blob digests)."""
    blobs = set()
    for blob in (directory / "blobs" / "sha256").iterdir():
        h = hashlib.sha256()
        with open(blob, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != blob.name:
            raise AssertionError(f"blob {blob.name} in {directory} has sha256 {h.hexdigest()}")
        blobs.add(f"sha256:{blob.name}")
    index = json.loads((directory / "index.json").read_text())
    return index["manifests"][0]["digest"], blobs


class Nginx:
    """nginx (``nginx-light``) in front of the proxy with the documented site config, own prefix and pid file.

    ``proxy`` is one address, or several: an ``upstream`` block that nginx goes round (replicas behind one
    balancer). ``limit_rate`` (e.g. ``8m`` bytes a second) makes it a slow link for each response."""

    def __init__(self, proxy: str | Sequence[str], cache_dir: str | None = None, limit_rate: str | None = None) -> None:
        self.base = state_dir("nginx", ("/usr/sbin/nginx",))
        self.port = free_port()
        site = self.base / "site.conf"
        balanced = ""
        if not isinstance(proxy, str):
            servers = "".join(f"  server {address};\n" for address in proxy)
            balanced, proxy = f"upstream dioproxy_replicas {{\n{servers}}}\n", "dioproxy_replicas"
        if limit_rate:  # not the documented site: nginx rate-limits only the responses it buffers
            site.write_text(
                f"server {{\n  listen 127.0.0.1:{self.port};\n  location / {{\n    proxy_pass http://{proxy};\n"
                f"    proxy_set_header Host $http_host;\n    limit_rate {limit_rate};\n  }}\n}}\n"
            )
        else:
            site.write_text(
                balanced + snippets.nginx_site_conf(f"127.0.0.1:{self.port}", "localhost", proxy, cache_dir)
            )
        logs = log_dir()
        self.access_log = logs / f"nginx-access-{self.port}.log"
        conf = self.base / "nginx.conf"
        # The wrapper a distribution's nginx.conf provides, with every path private. `user root`: the temp
        # directories live in a private 0700 directory that the default `nobody` workers could not enter.
        conf.write_text(
            f"daemon off;\nuser root;\nworker_processes 1;\npid {self.base}/nginx.pid;\n"
            f"error_log {logs}/nginx-error.log info;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            f"  access_log {self.access_log};\n"
            f"  client_body_temp_path {self.base}/client_body;\n"
            f"  proxy_temp_path {self.base}/proxy;\n"
            f"  fastcgi_temp_path {self.base}/fastcgi;\n"
            f"  uwsgi_temp_path {self.base}/uwsgi;\n"
            f"  scgi_temp_path {self.base}/scgi;\n"
            f"  include {site};\n"
            "}\n"
        )
        self.daemon = Daemon(
            "nginx", [tool("/usr/sbin/nginx"), "-p", str(self.base), "-c", str(conf)], log_dir() / "nginx.log"
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        self.daemon.start()
        # Through to the backend: the API root answers 200 (or 401 with a challenge), never nginx's 502.
        self.daemon.wait_until(lambda: http_status(f"http://{self.address}/v2/") in (200, 401), what="proxying")
        return self

    def stop(self) -> None:
        self.daemon.stop()
        remove_tree(self.base)

    def requests(self) -> int:
        """Registry API requests in nginx's access log (the proxy behind it logs them too)."""
        try:
            text = self.access_log.read_text()
        except FileNotFoundError:
            return 0
        return len(PROXY_REQUEST.findall(text))
