"""Which upstream registry and repository a request is for (GUIDE §1).

Order: the ``ns=`` query parameter (containerd) → a first path segment naming a configured registry (podman's
``location = "mirror/ghcr.io"``) → the ``Host`` header mapping → the default registry. Anything else is refused:
the proxy never connects to a host that is not configured.
"""

from __future__ import annotations

from dataclasses import dataclass

from dioproxy.config import Config, Upstream
from dioproxy.errors import name_unknown
from dioproxy.names import check_name, looks_like_host

DOCKER_HUB = "docker.io"


@dataclass(frozen=True)
class Target:
    """A repository on one upstream: ``name`` is the upstream's own spelling (``library/alpine``)."""

    upstream: Upstream
    name: str

    @property
    def registry(self) -> str:
        return self.upstream.registry


def _mapped_host(config: Config, host: str) -> str | None:
    """The registry a ``hosts:`` entry maps this host name to, with or without its port."""
    host = host.lower()
    return config.hosts.get(host) or config.hosts.get(host.rsplit(":", 1)[0])


def _registry_for(config: Config, host: str) -> str | None:
    return host.lower() if host.lower() in config.upstreams else _mapped_host(config, host)


def resolve(config: Config, name: str, ns: str | None = None, host: str | None = None) -> Target:
    """Map the repository part of a ``/v2/<name>/...`` path to a :class:`Target`."""
    registry = None
    if ns:
        registry = _registry_for(config, ns)
        if registry is None:
            raise name_unknown(ns)
    first, sep, rest = name.partition("/")
    if sep and looks_like_host(first):
        prefixed = _registry_for(config, first)
        if prefixed is None:
            raise name_unknown(first)
        if registry is None or registry == prefixed:
            registry, name = prefixed, rest
    if registry is None and host:
        registry = _mapped_host(config, host)
    registry = registry or config.default_registry
    check_name(name)
    if registry == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    return Target(config.upstreams[registry], name)
