"""``twistd dioproxy``: command-line options and the service they build."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Any

from twisted.application import internet, service
from twisted.internet import defer, ssl
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from dioproxy import __version__
from dioproxy.auth import HtpasswdError, read_htpasswd
from dioproxy.config import Config, ConfigError, load_config
from dioproxy.mirror import Mirror
from dioproxy.reload import ConfigReloader
from dioproxy.resources import Root
from dioproxy.siblings import OwnShare
from dioproxy.site import MirrorSite
from dioproxy.workers import SharedPort, Workers, worker_count

log = Logger()

#: On stop, how long the requests under way have to finish once the port is closed (under the unit's 30 s
#: TimeoutStopSec, so systemd never kills a drain that is about to end).
DRAIN_TIMEOUT = 25.0


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "A caching pull-through mirror for container registries (Docker Registry V2 API)."
    optParameters = [
        ["port", "p", 8004, "TCP port to listen on", int],
        ["server.port", None, None, "the seed project's spelling of --port", int],
        ["interface", "i", "", "address to listen on (default: all)"],
        ["config", "c", None, "YAML configuration file"],
        ["cache-dir", "d", None, "cache directory (default: ./data, or cache.dir from the config)"],
        ["htpasswd", None, None, "bcrypt htpasswd file: clients must log in (docker login / podman login)"],
        ["tls-cert", None, None, "serve HTTPS with this PEM certificate (chain)"],
        ["tls-key", None, None, "the PEM private key for --tls-cert"],
        ["workers", "w", "1", "processes serving the port and cache directory together (auto: one per core)"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["upstream"] = []
        self.args: list[str] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        self.args = list(sys.argv[1:] if options is None else options)  # what each worker is started with
        super().parseOptions(options)

    def opt_upstream(self, value: str) -> None:
        """REGISTRY=URL, e.g. docker.io=https://registry-1.docker.io (repeatable; overrides the config)"""
        self["upstream"].append(value)

    def postOptions(self) -> None:
        if self["server.port"] is not None:
            self["port"] = self["server.port"]
        try:
            self["workers"] = worker_count(str(self["workers"]))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        try:
            config = load_config(self["config"], self["upstream"], self["cache-dir"])
            security = config.security
            overrides = {
                "htpasswd": self["htpasswd"] or security.htpasswd,
                "tls_cert": self["tls-cert"] or security.tls_cert,
                "tls_key": self["tls-key"] or security.tls_key,
            }
            if bool(overrides["tls_cert"]) != bool(overrides["tls_key"]):
                raise ConfigError("--tls-cert and --tls-key go together")
            self.config = replace(config, security=replace(security, **overrides))
            if self.config.security.htpasswd:
                read_htpasswd(self.config.security.htpasswd)
            self.tls = tls_options(self.config) if overrides["tls_cert"] else None
        except (ConfigError, HtpasswdError) as e:
            raise usage.UsageError(str(e)) from None
        except OSError as e:
            raise usage.UsageError(f"{e.filename}: {e.strerror}") from None


class MirrorService(service.MultiService):
    """Cleans the cache's leftovers before the port opens; reloads the config on SIGHUP or when it changes; on
    stop, lets the requests under way finish (up to :data:`DRAIN_TIMEOUT`) once the port is closed."""

    def __init__(
        self,
        mirror: Mirror,
        reloader: ConfigReloader | None = None,
        site: MirrorSite | None = None,
        worker: int | None = None,
    ) -> None:
        super().__init__()
        self.mirror = mirror
        self.reloader = reloader
        self.site = site
        self.worker = worker  # the index of this worker of ``--workers N``; None: the only process

    def startService(self) -> None:
        # The supervisor cleaned before any worker started; the first worker alone keeps the prefetch list warm.
        removed = self.mirror.start(clean=self.worker is None, prefetch=self.worker in (None, 0))
        config = self.mirror.config
        log.info(
            "dioproxy {version}: cache {cache} (tag TTL {ttl:.0f} s{leftovers}); upstreams: {upstreams}; "
            "logins {login}",
            version=__version__,
            cache=os.path.abspath(config.cache_dir) if config.cache_enabled else "off (pass-through)",
            ttl=config.tag_ttl,
            leftovers=f", {removed} interrupted downloads removed" if removed else "",
            upstreams=", ".join(f"{u.registry}={u.url}" for u in config.upstreams.values()),
            login="required (htpasswd)" if config.security.htpasswd else "off",
        )
        self.mirror.bucket_started.addErrback(self._unusable_store)
        if self.reloader is not None:
            self.reloader.start()
        super().startService()

    def _unusable_store(self, failure: Any) -> None:
        """The object store refused our configuration (wrong credentials, no such bucket): say which key, stop."""
        log.critical("cannot use the object store: {e}", e=failure.getErrorMessage())
        self.mirror.reactor.stop()

    def stopService(self) -> Any:
        if self.reloader is not None:
            self.reloader.stop()
        d = defer.maybeDeferred(super().stopService)
        if self.site is not None:
            d.addCallback(lambda _: self.site.drain(DRAIN_TIMEOUT, self.mirror.reactor))
        d.addCallback(lambda _: self.mirror.close())  # flushes the cache index and pending small writes
        return d


def reread(options: Options) -> Config:
    """The configuration built as at start (same file, same command-line options), validated again."""
    options.postOptions()
    return options.config


def makeService(options: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor
    if options["workers"] > 1:
        cache_dir = options.config.cache_dir if options.config.cache_enabled else None
        return Workers(options["workers"], options.args, options["port"], options["interface"], cache_dir, reactor)
    top, site = _mirror_service(options, reactor)
    if options.tls is not None:
        internet.SSLServer(options["port"], site, options.tls, interface=options["interface"]).setServiceParent(top)
    else:
        internet.TCPServer(options["port"], site, interface=options["interface"]).setServiceParent(top)
    return top


def make_worker(options: Options, index: int, reactor: Any, run_dir: str | None = None) -> service.IService:
    """Worker ``index`` of ``--workers N`` (:mod:`dioproxy.workers`): the mirror on its share of the port; with
    the supervisor's ``run_dir``, its offline windows and ``/metrics`` shared with the other workers."""
    top, site = _mirror_service(options, reactor, index)
    if run_dir is not None:
        top.mirror.join_workers(run_dir, index, options["workers"])
        OwnShare(top.mirror, run_dir, index).setServiceParent(top)
    factory = site if options.tls is None else TLSMemoryBIOFactory(options.tls, False, site)
    SharedPort(options["port"], options["interface"], factory, reactor).setServiceParent(top)
    return top


def _mirror_service(options: Options, reactor: Any, worker: int | None = None) -> tuple[MirrorService, MirrorSite]:
    mirror = Mirror(options.config, reactor, port=options["port"])
    reloader = ConfigReloader(mirror, lambda: reread(options), options["config"], reactor, refusals=(usage.UsageError,))
    site = MirrorSite(Root(mirror))
    return MirrorService(mirror, reloader, site, worker), site


def tls_options(config: Config) -> ssl.CertificateOptions:
    """TLS 1.2 and later with Twisted's modern cipher defaults; the certificate file may hold a chain."""
    with open(config.security.tls_cert, "rb") as f:
        chain = f.read()
    with open(config.security.tls_key, "rb") as f:
        key = f.read()
    try:
        certificate = ssl.PrivateCertificate.loadPEM(chain + b"\n" + key)
        extra = [c.original for c in _pem_certificates(chain)[1:]]
    except Exception as e:  # pyOpenSSL raises its own error types for bad PEM
        raise ConfigError(f"--tls-cert/--tls-key: cannot load: {e}") from None
    return ssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        extraCertChain=extra,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def _pem_certificates(data: bytes) -> list[ssl.Certificate]:
    marker = b"-----END CERTIFICATE-----"
    blocks = [block + marker for block in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]
    return [ssl.Certificate.loadPEM(block) for block in blocks]
