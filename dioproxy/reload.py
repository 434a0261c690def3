"""Live reload: on SIGHUP, and when the config file changes on disk, re-read it and put it in force at once.

The new configuration is built exactly as at start (same file, same command-line overrides) and validated; a
broken one is refused with a log line and the old one stays. An applied one takes effect for every request that
starts afterwards: upstreams, credentials, host mappings, the default registry, TTLs, timeouts, access rules, rate
limits and cache bounds. Transfers under way keep the client objects they started with and are not interrupted.
``cache.dir`` and ``cache.enabled`` need a restart (the log says so), as do the listening port and TLS.

The file is watched by polling its mtime, size and inode every ``interval`` seconds (a ``LoopingCall``: no thread,
nothing blocks); an editor that saves by rename is seen too.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import fields, replace
from typing import Any, Callable

from twisted.internet import task
from twisted.logger import Logger

from dioproxy.config import Config
from dioproxy.egress import make_public_http_client
from dioproxy.upstream import identity, make_http_client

log = Logger()

#: Settings read once at start; a reload that changes them says they need a restart.
RESTART_ONLY = ("cache_dir", "cache_enabled", "storage")


def changed_settings(old: Config, new: Config) -> list[str]:
    return [f.name for f in fields(Config) if getattr(old, f.name) != getattr(new, f.name)]


def apply_config(mirror: Any, new: Config) -> list[str]:
    """Swap ``new`` into ``mirror``; returns the names of the settings that changed."""
    old = mirror.config
    for name in RESTART_ONLY:
        if getattr(new, name) != getattr(old, name):
            log.warn(
                "config reload: {name} changed from {old!r} to {new!r}; that takes a restart, keeping the old value",
                name=name,
                old=getattr(old, name),
                new=getattr(new, name),
            )
            new = replace(new, **{name: getattr(old, name)})
    changes = changed_settings(old, new)
    if not changes:
        return []

    if new.connect_timeout != old.connect_timeout and mirror.own_http:
        mirror.http = make_http_client(mirror.reactor, new, mirror.pool)
        mirror.public_http = make_public_http_client(mirror.reactor, new, mirror.pool)
    clients = {}
    for name, upstream in new.upstreams.items():
        current = mirror.clients.get(name)
        if current is not None and current.upstream == upstream and current.http is mirror.http:
            current.timeout = new.read_timeout  # read per request: in-flight ones keep theirs
            clients[name] = current
            continue
        if current is not None and current.upstream.credentials != upstream.credentials:
            # Tokens are keyed by the credentials they were fetched with: the new ones never see the old ones'
            # tokens, and those go now. What was seen with the old credentials stays private (see private.py).
            mirror.tokens.forget(identity(current.upstream.credentials))
        clients[name] = mirror.make_client(upstream, new)

    if new.security != old.security:
        mirror.apply_security(new)  # first: it may refuse (an unreadable htpasswd file) before anything changed
    mirror.config = new
    mirror.clients = clients
    mirror.manifests.tag_ttl = new.tag_ttl
    if mirror.cache is not None:
        mirror.cache.configure(new.cache_max_size, new.cache_max_age)
    for hook in list(mirror.reloaders):
        hook(old, new)
    return changes


class ConfigReloader:
    """Watches the config file and SIGHUP; ``load()`` builds a validated :class:`Config` or raises."""

    def __init__(
        self,
        mirror: Any,
        load: Callable[[], Config],
        path: str | None,
        reactor: Any,
        interval: float = 2.0,
        refusals: tuple[type[BaseException], ...] = (ValueError,),
    ) -> None:
        self.mirror = mirror
        self.load = load
        self.path = path
        self.reactor = reactor
        self.interval = interval
        self.refusals = refusals
        self._seen = self._signature()
        self._loop: task.LoopingCall | None = None
        self._previous_handler: Any = None

    def start(self) -> None:
        if self.path and self.interval > 0:
            self._loop = task.LoopingCall(self.poll)
            self._loop.clock = self.reactor
            self._loop.start(self.interval, now=False).addErrback(lambda f: log.failure("config watch failed", f))
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGHUP, self._sighup)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None

    def _sighup(self, signum: int, frame: Any) -> None:
        # A signal handler may run between any two bytecodes: hand the work to the reactor.
        self.reactor.callFromThread(self.hangup)

    def hangup(self) -> None:
        """SIGHUP: reload the config; re-read the cache directory (after ``dioproxy purge`` or ``verify --repair``)."""
        self.reload("SIGHUP")
        self.mirror.manifests.drop_memory()
        if getattr(self.mirror, "cache", None) is not None and self.mirror.cache.ready:
            self.mirror.cache.rescan()

    def _signature(self) -> tuple | None:
        if not self.path:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def poll(self) -> None:
        seen = self._signature()
        if seen != self._seen:
            self._seen = seen
            self.reload(f"{self.path} changed")

    def reload(self, why: str) -> bool:
        """Load, validate, apply; True if the new configuration is in force (changed or not)."""
        metrics = self.mirror.metrics
        try:
            config = self.load()
        except self.refusals as e:
            log.error("config reload ({why}) refused, the old configuration stays in force: {error}", why=why, error=e)
            metrics.reloaded("refused")
            return False
        try:
            changes = self.mirror.apply(config)
        except Exception:
            log.failure("config reload ({why}) failed while applying; the old configuration stays", why=why)
            metrics.reloaded("refused")
            return False
        if changes:
            log.info("config reloaded ({why}): {changes}", why=why, changes=", ".join(changes))
            metrics.reloaded("applied")
        else:
            log.info("config reload ({why}): nothing changed", why=why)
            metrics.reloaded("unchanged")
        return True
