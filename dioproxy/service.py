"""``twistd dioproxy``: command-line options and the service they build."""

from __future__ import annotations

from typing import Any

from twisted.application import internet, service
from twisted.python import usage

from dioproxy.config import ConfigError, load_config
from dioproxy.mirror import Mirror
from dioproxy.resources import Root
from dioproxy.site import MirrorSite


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "A caching pull-through mirror for container registries (Docker Registry V2 API)."
    optParameters = [
        ["port", "p", 8004, "TCP port to listen on", int],
        ["server.port", None, None, "the seed project's spelling of --port", int],
        ["interface", "i", "", "address to listen on (default: all)"],
        ["config", "c", None, "YAML configuration file"],
        ["cache-dir", "d", None, "cache directory (default: ./data, or cache.dir from the config)"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["upstream"] = []

    def opt_upstream(self, value: str) -> None:
        """REGISTRY=URL, e.g. docker.io=https://registry-1.docker.io (repeatable; overrides the config)"""
        self["upstream"].append(value)

    def postOptions(self) -> None:
        if self["server.port"] is not None:
            self["port"] = self["server.port"]
        try:
            self.config = load_config(self["config"], self["upstream"], self["cache-dir"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


class MirrorService(service.MultiService):
    """Cleans the cache's leftovers before the port opens."""

    def __init__(self, mirror: Mirror) -> None:
        super().__init__()
        self.mirror = mirror

    def startService(self) -> None:
        self.mirror.start()
        super().startService()


def makeService(options: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor
    mirror = Mirror(options.config, reactor)
    top = MirrorService(mirror)
    site = MirrorSite(Root(mirror))
    internet.TCPServer(options["port"], site, interface=options["interface"]).setServiceParent(top)
    return top
