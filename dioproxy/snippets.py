"""Client configuration snippets, shared by ``dioproxy client-config``, the end-to-end tests and the docs.

Each function renders one file a user copies onto a machine. The end-to-end tests render them with loopback
addresses and feed them to the real clients; ``python -m dioproxy.snippets`` renders them with the documentation's
example addresses, and ``tests/e2e/test_docs.py`` checks that ``docs/clients.md`` contains exactly those
renderings; ``dioproxy client-config`` renders them for a given proxy address. So a snippet in the docs, or printed
by the command, is always one that a real client was just shown to work with.
(``tests/e2e/snippets.py`` re-exports this module, where the templates used to live.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

#: Example addresses used in the documentation.
DOC_MIRROR = "mirror.example.internal:8004"
DOC_PROXY_PORT = 8004
DOC_CONFIG = "/etc/dioproxy/config.yaml"


def docker_daemon_json(mirror: str, secure: bool = False) -> dict:
    """``/etc/docker/daemon.json``: dockerd uses ``registry-mirrors`` for docker.io images only; the mirror URL is
    a bare origin. ``insecure-registries`` lets ``docker pull MIRROR/library/hello:1.0`` talk plain HTTP too
    (``secure``: the mirror answers HTTPS, behind nginx with TLS, and needs neither)."""
    if secure:
        return {"registry-mirrors": [f"https://{mirror}"]}
    return {"registry-mirrors": [f"http://{mirror}"], "insecure-registries": [mirror]}


def render_docker_daemon_json(mirror: str, secure: bool = False) -> str:
    return json.dumps(docker_daemon_json(mirror, secure), indent=2) + "\n"


def podman_registries_conf(mirror: str, registries: Sequence[str] = ("ghcr.io",), secure: bool = False) -> str:
    """``/etc/containers/registries.conf`` (or a drop-in in ``registries.conf.d/``) for podman, buildah, skopeo.

    docker.io is mirrored at the proxy's root; any other registry at the proxy with a path prefix naming it, which
    the proxy routes by its first path segment. The last block allows plain HTTP for direct pulls of
    ``MIRROR/library/hello:1.0`` (``secure``: HTTPS, no ``insecure`` lines).
    """
    insecure = "" if secure else "insecure = true\n"
    blocks = [
        'unqualified-search-registries = ["docker.io"]\n',
        f'[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n\n'
        f'[[registry.mirror]]\nlocation = "{mirror}"\n{insecure}',
    ]
    for registry in registries:
        blocks.append(
            f'[[registry]]\nprefix = "{registry}"\nlocation = "{registry}"\n\n'
            f'[[registry.mirror]]\nlocation = "{mirror}/{registry}"\n{insecure}'
        )
    if not secure:
        blocks.append(f'[[registry]]\nlocation = "{mirror}"\n{insecure}')
    return "\n".join(blocks)


#: The upstream API host that containerd would use without the mirror (``server`` in hosts.toml).
CONTAINERD_SERVERS = {"docker.io": "https://registry-1.docker.io", "ghcr.io": "https://ghcr.io"}


def containerd_hosts_toml(mirror: str, registry: str | None, secure: bool = False) -> str:
    """``/etc/containerd/certs.d/<registry>/hosts.toml``; ``registry=None`` renders ``_default/hosts.toml``, which
    applies to every registry without its own directory. containerd adds ``?ns=<registry>`` to each request."""
    head = ""
    if registry is not None:
        head = f'server = "{CONTAINERD_SERVERS.get(registry, "https://" + registry)}"\n\n'
    scheme = "https" if secure else "http"
    return f'{head}[host."{scheme}://{mirror}"]\n  capabilities = ["pull", "resolve"]\n'


def containerd_cri_config() -> str:
    """The lines of ``/etc/containerd/config.toml`` that make Kubernetes' CRI plugin read the hosts.toml files."""
    return 'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n'


ACCEL_PREFIX = "/_dioproxy/blobs/"


def nginx_site_conf(listen: str, server_name: str, proxy: str, cache_dir: str | None = None) -> str:
    """The seed's nginx site, corrected: ``$http_host`` keeps the port (``$host`` drops it), the real scheme
    instead of a hard-coded ``https``, no websocket ``Upgrade`` headers (they made every request ``Connection:
    upgrade``), and no buffering so large blobs stream through instead of being spooled to nginx's disk first.

    With ``cache_dir`` (nginx on the same host as the cache, and ``cache.accel_redirect: /_dioproxy/blobs/`` in the
    proxy's config), nginx sends cached blobs itself when the proxy answers with ``X-Accel-Redirect``."""
    accel = ""
    if cache_dir:
        accel = f"""
  location {ACCEL_PREFIX} {{
    internal;
    alias {cache_dir.rstrip("/")}/blobs/sha256/;
    default_type application/octet-stream;
    add_header Docker-Content-Digest $upstream_http_docker_content_digest always;
    add_header Docker-Distribution-Api-Version registry/2.0 always;
  }}
"""
    return f"""server {{
  listen {listen};
  server_name {server_name};
{accel}
  location / {{
    proxy_pass http://{proxy};
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $http_host;
    proxy_set_header X-Real-IP $remote_addr;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_buffering off;
    proxy_request_buffering off;
    proxy_read_timeout 15m;{chr(10) + "    proxy_set_header X-Dioproxy-Accel on;" if cache_dir else ""}
  }}
}}
"""


def proxy_argv(
    twistd: Sequence[str],
    port: int,
    interface: str,
    cache_dir: str,
    upstreams: Mapping[str, str] | None = None,
    config: str | None = None,
) -> list[str]:
    """The proxy's command line (``twistd`` may be ``[python, -c, "from twisted.scripts.twistd import run; run()"]``);
    also the systemd unit's ``ExecStart``. Without ``upstreams`` the proxy uses the configured (or real) registries."""
    argv = [*twistd, "-n", "--pidfile=", "dioproxy"]
    if config:
        argv += ["--config", config]
    argv += ["--port", str(port), "--interface", interface, "--cache-dir", cache_dir]
    for name, url in (upstreams or {}).items():
        argv += ["--upstream", f"{name}={url}"]
    return argv


def systemd_unit(exec_start: Sequence[str], user: str = "dioproxy", cache_dir: str = "/var/cache/dioproxy") -> str:
    """``/etc/systemd/system/dioproxy.service``: a system unit (``User=`` is meaningless in a ``--user`` unit, where
    the seed put it) running as a dedicated unprivileged user (``useradd --system dioproxy``, so the config file
    with upstream passwords can be ``root:dioproxy 0640``), restarted on failure, ``systemctl reload`` = SIGHUP =
    live config reload, and sandboxed: the whole file system read-only but the cache, no privileges to gain."""
    return f"""[Unit]
Description=dioproxy, a caching pull-through mirror for container registries
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={user}
Group={user}
ExecStart={" ".join(exec_start)}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5s
TimeoutStopSec=30s
LimitNOFILE=65536
UMask=0027
CacheDirectory={cache_dir.rstrip("/").rsplit("/", 1)[-1]}
ReadWritePaths={cache_dir}
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
CapabilityBoundingSet=
AmbientCapabilities=

[Install]
WantedBy=multi-user.target
"""


def doc_snippets() -> dict[str, str]:
    """Every snippet as ``docs/clients.md`` shows it (example host names instead of loopback ports)."""
    exec_start = proxy_argv(
        ["/opt/dioproxy/bin/twistd"], DOC_PROXY_PORT, "127.0.0.1", "/var/cache/dioproxy", config=DOC_CONFIG
    )
    return {
        "daemon.json": render_docker_daemon_json(DOC_MIRROR),
        "registries.conf": podman_registries_conf(DOC_MIRROR),
        "certs.d/docker.io/hosts.toml": containerd_hosts_toml(DOC_MIRROR, "docker.io"),
        "certs.d/ghcr.io/hosts.toml": containerd_hosts_toml(DOC_MIRROR, "ghcr.io"),
        "certs.d/_default/hosts.toml": containerd_hosts_toml(DOC_MIRROR, None),
        "config.toml, Kubernetes": containerd_cri_config(),
        "nginx site": nginx_site_conf("80", "mirror.example.internal", f"127.0.0.1:{DOC_PROXY_PORT}"),
        "nginx site, accel": nginx_site_conf(
            "80", "mirror.example.internal", f"127.0.0.1:{DOC_PROXY_PORT}", "/var/cache/dioproxy"
        ),
        "dioproxy.service": systemd_unit(exec_start),
    }


if __name__ == "__main__":
    for name, text in doc_snippets().items():
        print(f"==> {name}\n{text}")
