"""Client configuration snippets: a thin re-export of :mod:`dioproxy.snippets`, where the templates now live.

One source for the end-to-end tests (which feed these renderings to the real clients), ``docs/clients.md``
(``tests/e2e/test_docs.py`` checks it shows exactly ``doc_snippets()``) and ``dioproxy client-config``. Re-render
the documentation's copies with ``python -m tests.e2e.snippets`` (or ``python -m dioproxy.snippets``).
"""

from __future__ import annotations

from dioproxy.snippets import (
    CONTAINERD_SERVERS,
    DOC_CONFIG,
    DOC_MIRROR,
    DOC_PROXY_PORT,
    containerd_hosts_toml,
    doc_snippets,
    docker_daemon_json,
    nginx_site_conf,
    podman_registries_conf,
    proxy_argv,
    render_docker_daemon_json,
    systemd_unit,
)

__all__ = [
    "CONTAINERD_SERVERS",
    "DOC_CONFIG",
    "DOC_MIRROR",
    "DOC_PROXY_PORT",
    "containerd_hosts_toml",
    "doc_snippets",
    "docker_daemon_json",
    "nginx_site_conf",
    "podman_registries_conf",
    "proxy_argv",
    "render_docker_daemon_json",
    "systemd_unit",
]

if __name__ == "__main__":
    for name, text in doc_snippets().items():
        print(f"==> {name}\n{text}")
