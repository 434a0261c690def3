"""Per-registry health: the one place that knows whether an upstream registry is up.

Without it, every request for a stale tag of an unreachable registry waits the whole retry cycle (about three
read timeouts: minutes with the defaults). After a failure the registry is *offline* for ``timeouts.offline``
seconds instead: requests that would go upstream are refused at once with :class:`Offline` (cached tags are then
served stale, everything else answers 503 with ``Retry-After``), and a single background probe (``HEAD /v2/``,
at most one at a time and one every :data:`PROBE_INTERVAL` seconds) asks whether it is back; its success ends the
window early, its failure starts a new one.

What counts as a failure (``UpstreamClient`` reports it): no answer after the retries (connection refused or
reset, DNS; a timeout is not retried), a 5xx after the retries, and a token service that does not answer (without
tokens the registry serves nobody; the probe then asks the token service too). Never a failure: any answer below
500 (404, 401, 403: the registry is up and answered), a 429 (it answered, and asked us to slow down), a caller that
gave up on its own request (cancelled before the read timeout), and a token service that answers with an error.

Under ``--workers N`` the windows are shared (:mod:`dioproxy.offlinefiles`): a window one worker opens is seen by
every worker before its next upstream request, one probe runs for all of them, and an answer in any worker ends
the window for all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from dioproxy.errors import RegistryError, UpstreamError
from dioproxy.offlinefiles import OfflineFiles

log = Logger()

#: Seconds between two probes of an offline registry (a probe that fails fast must not become a request storm).
PROBE_INTERVAL = 5.0


class Offline(UpstreamError):
    """The registry is in its offline window: not asked, answered at once (stale, or 503 with Retry-After)."""

    def to_registry_error(self) -> RegistryError:
        error = super().to_registry_error()
        error.headers["Retry-After"] = self.retry_after or "1"
        error.detail = {"registry": self.registry}
        return error


@dataclass
class _State:
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    offline_until: float | None = None
    probing: bool = False
    last_probe: float | None = None


class Health:
    """Up or offline, per registry; ``snapshot()`` for the status page."""

    def __init__(
        self,
        reactor: Any,
        window: float = 30.0,
        clock: Callable[[], float] = time.time,
        shared: OfflineFiles | None = None,
    ) -> None:
        self.reactor = reactor
        #: ``timeouts.offline``: how long a registry stays offline after a failure (0: never).
        self.window = window
        self.clock = clock
        self._states: dict[str, _State] = {}
        self._probes: set[defer.Deferred] = set()
        #: The windows of the other workers of ``--workers N`` (None: this process is the only one).
        self.shared = shared

    def track(self, registries: Iterable[str]) -> None:
        """The configured registries (at start and after a reload): new ones start up, removed ones are dropped."""
        wanted = set(registries)
        self._states = {r: self._states.get(r) or _State() for r in sorted(wanted)}

    def forget(self, registry: str) -> None:
        """Start afresh (its URL or credentials changed on a reload: the old failures say nothing of the new)."""
        if registry in self._states:
            self._states[registry] = _State()
            self._share("end", registry)

    def offline(self, registry: str) -> bool:
        state = self._states.get(registry)
        if state is not None and self.shared is not None:
            return self._shared_offline(registry, state)
        if state is None or state.offline_until is None:
            return False
        return state.probing or self.clock() < state.offline_until

    def _shared_offline(self, registry: str, state: _State) -> bool:
        """The shared file is the window: another worker may have opened, extended or ended it."""
        until = self.shared.until(registry)
        if until is None:
            if not state.probing:
                state.offline_until = None  # ended by an answer in some worker
            return state.probing
        if state.offline_until is None:  # opened by another worker: say why on our status page too
            state.last_error = self.shared.reason(registry) or "another worker saw it fail"
            state.last_error_at = until - self.window
        state.offline_until = until
        return state.probing or self.clock() < until or self.shared.probing(registry)

    def check(self, registry: str, probe: Callable[[], Coroutine[Any, Any, int]]) -> None:
        """Raise :class:`Offline` if ``registry`` is offline, starting ``probe`` (it answers a status code) when
        none runs and the last one is :data:`PROBE_INTERVAL` old. Returns quietly when the registry may be asked."""
        if not self.offline(registry):
            return
        state = self._states[registry]
        now = self.clock()
        if not state.probing and (state.last_probe is None or now - state.last_probe >= PROBE_INTERVAL):
            claim = self._claim_probe(registry, now)
            if claim is not False:  # shared: only the worker that claimed it probes
                self._probe(registry, state, probe, now, claim)
        wait = max(1, math.ceil(state.offline_until - now))
        raise Offline(registry, f"offline since {state.last_error}; next try in {wait} s", None, str(wait))

    def succeeded(self, registry: str) -> None:
        """The registry answered (below 500): it is up, whatever window it was in."""
        state = self._state(registry)
        state.last_success = self.clock()
        self._share("end", registry)
        if state.offline_until is not None:
            state.offline_until = None
            log.info("upstream {registry} answers again; its offline window is over", registry=registry)

    def failed(self, registry: str, reason: str) -> None:
        """The registry did not answer, or answered 5xx, after the retries: offline for ``window`` seconds."""
        state = self._state(registry)
        now = self.clock()
        was_offline = self.offline(registry)
        state.last_error, state.last_error_at = reason, now
        if self.window <= 0:
            return
        state.offline_until = now + self.window
        self._share("start", registry, state.offline_until, reason)
        if not was_offline:
            log.warn(
                "upstream {registry} failed ({reason}): offline for {window} s; cached tags are served stale, "
                "other requests answer 503 at once",
                registry=registry,
                reason=reason,
                window=self.window,
            )

    def stop(self) -> None:
        """Cancel the probes under way (at shutdown: none may hand a connection back to a closed pool)."""
        for d in list(self._probes):
            d.cancel()

    def snapshot(self) -> dict[str, dict]:
        """Per registry: ``last_success``, ``last_error``, ``last_error_at``, ``offline_until`` (Unix times, or None;
        ``offline_until`` is None while the registry is up)."""
        now = self.clock()
        out = {}
        for registry, s in self._states.items():
            until = s.offline_until if self.offline(registry) else None
            if until is not None and s.probing:
                until = max(until, now)
            out[registry] = {
                "last_success": s.last_success,
                "last_error": s.last_error,
                "last_error_at": s.last_error_at,
                "offline_until": until,
            }
        return out

    def _state(self, registry: str) -> _State:
        return self._states.setdefault(registry, _State())

    def _share(self, what: str, registry: str, *args: Any) -> None:
        """Tell the other workers (``start`` or ``end`` a window); a run directory we cannot write only costs them
        finding out for themselves."""
        if self.shared is None:
            return
        try:
            getattr(self.shared, what)(registry, *args)
        except OSError as e:
            log.warn("cannot share the offline window of {registry}: {e}", registry=registry, e=e)

    def _claim_probe(self, registry: str, now: float) -> int | bool | None:
        """The shared probe lock (a descriptor), None to probe without one, False if another worker probes."""
        if self.shared is None:
            return None
        try:
            claim = self.shared.claim_probe(registry, now, PROBE_INTERVAL)
        except OSError as e:
            log.warn("cannot claim the probe of {registry} ({e}): probing anyway", registry=registry, e=e)
            return None
        return False if claim is None else claim

    def _probe(
        self,
        registry: str,
        state: _State,
        probe: Callable[[], Coroutine[Any, Any, int]],
        now: float,
        claim: int | None = None,
    ) -> None:
        """One background ``probe()``, with the window as its deadline: one that hangs is a failure. ``claim``:
        the shared probe lock, let go when it ends."""
        state.probing, state.last_probe = True, now
        d = defer.ensureDeferred(probe())
        d.addTimeout(max(self.window, 0.001), self.reactor)
        self._probes.add(d)
        if claim is not None:
            d.addBoth(lambda result: (self.shared.probe_done(claim), result)[1])

        def answered(code: int) -> None:
            state.probing = False
            self._probes.discard(d)
            if self._states.get(registry) is not state:  # forgotten by a reload meanwhile
                return
            if code < 500:
                self.succeeded(registry)
            else:
                self.failed(registry, f"probe: HTTP {code}")

        def broke(failure: Failure) -> None:
            state.probing = False
            self._probes.discard(d)
            if self._states.get(registry) is state:
                self.failed(registry, f"probe: {failure.type.__name__}: {failure.value}")

        d.addCallbacks(answered, broke).addErrback(lambda f: log.failure("health probe of {r}", f, r=registry))
